"""The command lines (issue 14): --help of every script, `evaluate.py predict` on a user's images, the Figure 5
grid."""
import argparse

import pytest

import basnet_train
import evaluate
import make_pseudomasks
import saliency_metrics
import saliency_train
import train_fss
from model import HelpFormatter


class Captured(Exception):
    pass


def parsers(monkeypatch):
    """{name: ArgumentParser} of every script and evaluate.py subcommand, as the scripts build them."""
    found = {}

    def capture(self, *args, **kwargs):
        found["parser"] = self
        raise Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    out = {}
    for name, parse in (("saliency_train.py", saliency_train.parse_args), ("basnet_train.py", basnet_train.parse_args),
                        ("make_pseudomasks.py", make_pseudomasks.parse_args), ("train_fss.py", train_fss.parse_args),
                        ("saliency_metrics.py", saliency_metrics.parse_args), ("evaluate.py", evaluate.main)):
        with pytest.raises(Captured):
            parse([])
        out[name] = found["parser"]
    for action in out["evaluate.py"]._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.update({f"evaluate.py {sub}": p for sub, p in action.choices.items()})
    return out


def test_every_flag_has_help_and_shows_its_default(monkeypatch):
    found = parsers(monkeypatch)
    assert {"evaluate.py fss", "evaluate.py predict", "evaluate.py merge", "saliency_metrics.py"} <= set(found)
    for name, parser in found.items():
        assert parser.formatter_class is HelpFormatter, name
        assert parser.description, f"{name}: no description"
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if action.help == argparse.SUPPRESS:                # an earlier spelling, hidden from --help
                assert action.dest in {a.dest for a in parser._actions if a.help != argparse.SUPPRESS}, action
                continue
            flag = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{flag}: no help"
            if action.option_strings:
                assert "%(default)" in formatter._get_help_string(action), f"{flag}: default not shown"
        parser.format_help()                                  # every help string formats


# ---- evaluate.py predict ----

import json  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from datasets import VOC_CLASS_NAMES, FewShotEpisodes, load_binary_mask, save_png  # noqa: E402
from demo_data import make_demo_data  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Demo data and a train_fss.py checkpoint of a few steps (64 px, Lite0 without weights)."""
    root = tmp_path_factory.mktemp("cli")
    demo = make_demo_data(root / "data")
    train_fss.main(["--mask-source", "gt", "--voc-root", str(demo["voc"]), "--backbone", "efficientnet_lite0",
                    "--weights", "none", "--image-size", "64", "--batch-size", "4", "--workers", "0",
                    "--max-steps", "3", "--device", "cpu", "--out", str(root / "run")])
    return demo, root / "run" / "last.pt"


def test_predict_reproduces_evaluate_and_reports_bad_queries(trained, tmp_path, capsys):
    demo, ckpt = trained
    evaluate.main(["fss", "--checkpoint", str(ckpt), "--voc-root", str(demo["voc"]), "--fold", "1", "--runs", "1",
                   "--episodes", "3", "--image-size", "64", "--eval-resolution", "original", "--workers", "0",
                   "--device", "cpu", "--out", str(tmp_path / "r.json"), "--save-episodes", str(tmp_path / "e.jsonl")])
    ds = FewShotEpisodes("pascal", demo["voc"], 1, episodes=3, seed=0, image_size=64)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    for n, line in enumerate((tmp_path / "e.jsonl").read_text().splitlines()):
        episode = json.loads(line)
        _, support_mask = ds.load(episode["supports"][0], episode["class"])
        save_png(support_mask == 1, tmp_path / f"support{n}.png")
        other = next(s for s in ds.holders[episode["class"]] if s not in (episode["query"], *episode["supports"]))
        out = tmp_path / f"out{n}"
        with pytest.raises(SystemExit, match="2 queries failed"):   # the two bad ones; the others are written
            evaluate.main(["predict", "--checkpoint", str(ckpt), "--image-size", "64", "--workers", "0",
                           "--device", "cpu", "--batch-size", "2", "--support", str(ds.image_paths[episode["supports"][0]]),
                           str(tmp_path / f"support{n}.png"), "--query", str(ds.image_paths[episode["query"]]),
                           str(tmp_path / "broken.jpg"), str(ds.image_paths[other]), str(tmp_path / "absent.jpg"),
                           "--out", str(out), "--overlay", str(tmp_path / f"overlay{n}")])
        err = capsys.readouterr().err
        assert "broken.jpg" in err and "absent.jpg" in err
        _, truth = ds.load(episode["query"], episode["class"])
        pred = load_binary_mask(out / f"{episode['query']}.png")
        valid = truth != 255
        assert (int((pred & (truth == 1) & valid).sum()), int(((pred | (truth == 1)) & valid).sum())) == \
            (episode["intersection"], episode["union"])                # evaluate's prediction, pixel for pixel
        assert sorted(p.name for p in out.iterdir()) == sorted([f"{episode['query']}.png", f"{other}.png"])
        assert np.unique(np.asarray(Image.open(out / f"{other}.png"))).tolist() in ([0], [255], [0, 255])
        assert Image.open(tmp_path / f"overlay{n}" / f"{other}.png").size == Image.open(ds.image_paths[other]).size


def test_predict_bad_supports_are_one_line_naming_the_file(trained, tmp_path):
    demo, ckpt = trained
    image = next(demo["voc_images"].iterdir())
    wrong = tmp_path / "wrong.png"
    save_png(np.ones((10, 12), bool), wrong)
    empty = tmp_path / "empty.png"
    save_png(np.zeros(np.asarray(Image.open(image)).shape[:2], bool), empty)
    for support, name in (([str(tmp_path / "absent.jpg"), str(wrong)], "absent.jpg"), ([str(image), str(wrong)],
                          "wrong.png: mask is 12x10"), ([str(image), str(empty)], "empty.png: support mask is empty")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(["predict", "--checkpoint", str(ckpt), "--support", *support, "--query", str(image),
                           "--out", str(tmp_path / "out"), "--workers", "0"])
        assert name in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_figure_has_titles_and_rows_of_every_fold(trained, tmp_path, monkeypatch):
    demo, ckpt = trained
    drawn = []
    draw = evaluate.figure_grid
    monkeypatch.setattr(evaluate, "figure_grid", lambda rows, path: (drawn.extend(rows), draw(rows, path)))
    evaluate.main(["fss", "--checkpoint", str(ckpt), "--voc-root", str(demo["voc"]), "--fold", "1,3", "--runs", "2",
                   "--episodes", "4", "--image-size", "64", "--workers", "0", "--out", str(tmp_path / "r.json"),
                   "--save-episodes", str(tmp_path / "e.jsonl"), "--figure", str(tmp_path / "fig.png"),
                   "--figure-episodes", "3"])
    episodes = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    first = [e for fold in (1, 3) for e in [e for e in episodes if e["fold"] == fold and e["run"] == 0][:3]]
    assert [(fold, name) for _, _, fold, name, _ in drawn] == [(e["fold"], VOC_CLASS_NAMES[e["class"] - 1])
                                                               for e in first]
    assert [iou for *_, iou in drawn] == pytest.approx([e["intersection"] / e["union"] for e in first])
    width, height = Image.open(tmp_path / "fig.png").size
    assert height == 2 * 11 + 6 * 68 + 4 and width > 4 * 68 + 4       # title band, 6 rows; a label column
