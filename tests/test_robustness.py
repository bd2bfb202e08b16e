"""Nothing lost, clear errors (issue 6): SIGKILL + rerun of make_pseudomasks.py, and bad inputs given to the
scripts' command lines: either correct output or one line `error: ...` naming the file, never a traceback.
Nothing silently wrong (issue 13): one test per class of bad input. Nothing lost (issue 26): outputs never over
inputs, reruns never reuse what other settings made, one run per folder, a full disk or SIGTERM, at the end."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import basnet_train
import saliency_metrics
import evaluate
import make_pseudomasks
import saliency_train
import train_fss
from datasets import (MaskSplitPairs, SalientObjects, _read_list, list_images, load_binary_mask, load_image,
                      render_coco_masks, save_png)
from demo_data import voc_palette
from model import (FiniteGuard, FSSNet, SaliencyNet, _writer, check_output, load_checkpoint, save_checkpoint,
                   trim_log, write_json)

REPO = Path(__file__).resolve().parents[1]


def write_folder(root, n=4, size=(40, 48), seed=0):
    """n JPEG images with a bright box and their 0/255 masks: root/images, root/masks."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        img = (rng.random((*size, 3)) * 60 + 60).astype(np.uint8)
        mask = np.zeros(size, dtype=np.uint8)
        mask[5 + i % 7:30, 8:34 + i % 9] = 255
        img[mask > 0] = (230, 200, 40)
        Image.fromarray(img).save(root / "images" / f"im{i:02d}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"im{i:02d}.png")
    return root


def saliency_checkpoint(path, size=32):
    """A small untrained saliency network in the checkpoint format make_pseudomasks.py reads."""
    torch.manual_seed(0)
    net = SaliencyNet("efficientnet_lite0", weights="none", channels=8)
    save_checkpoint(path, kind="saliency", config={**net.config, "image_size": size}, model=net.state_dict())
    return path


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_one_line_error(proc, name):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("error:") and name in last, last   # the last line a user sees: after the bars' redraw


def decodes(path):
    with Image.open(path) as im:
        im.load()
    return True


def test_make_pseudomasks_sigkill_leaves_no_truncated_png_and_rerun_completes(tmp_path):
    data = write_folder(tmp_path / "data", n=40, size=(96, 112))
    ckpt = saliency_checkpoint(tmp_path / "sal.pt")
    args = ["--checkpoint", str(ckpt), "--images", str(data / "images"), "--batch-size", "1", "--threshold", "0.5",
            "--min-fraction", "0", "--device", "cpu"]
    make_pseudomasks.main(args + ["--out", str(tmp_path / "full"), "--save-prob", str(tmp_path / "full_prob")])
    out, prob = tmp_path / "part", tmp_path / "part_prob"
    proc = subprocess.Popen([sys.executable, "make_pseudomasks.py", *args, "--out", str(out), "--save-prob", str(prob)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline and len(list(prob.glob("*.png"))) < 3:
        time.sleep(0.002)
    assert proc.poll() is None, "finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(prob.glob("*.png"))
    assert 3 <= len(done) < 40
    assert all(decodes(p) for p in [*done, *out.glob("*.png")])  # no truncated PNG left behind
    make_pseudomasks.main(args + ["--out", str(out), "--save-prob", str(prob)])
    for a_dir, b_dir in ((tmp_path / "full", out), (tmp_path / "full_prob", prob)):
        names = sorted(p.name for p in a_dir.glob("*.png"))
        assert len(names) > 0 and names == sorted(p.name for p in b_dir.glob("*.png"))
        for n in names:
            assert np.array_equal(np.asarray(Image.open(a_dir / n)), np.asarray(Image.open(b_dir / n))), n
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_train_fss_bad_image_is_one_line_error(tmp_path):
    data = write_folder(tmp_path / "data")
    bad = data / "images" / "im01.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated JPEG
    proc = run("train_fss.py", "--images", str(data / "images"), "--masks", str(data / "masks"), "--backbone",
               "efficientnet_lite0", "--weights", "none", "--image-size", "32", "--batch-size", "4", "--workers", "0",
               "--max-steps", "1", "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, str(bad))


def test_make_pseudomasks_unreadable_png_in_a_worker_is_one_line_error(tmp_path):
    data = write_folder(tmp_path / "data")
    bad = data / "images" / "im02.png"
    (data / "images" / "im02.jpg").unlink()
    bad.write_bytes(np.random.default_rng(0).bytes(500))  # a PNG that is not an image
    proc = run("make_pseudomasks.py", "--checkpoint", str(saliency_checkpoint(tmp_path / "sal.pt")), "--images",
               str(data / "images"), "--workers", "1", "--out", str(tmp_path / "masks"))
    assert_one_line_error(proc, str(bad))


def test_saliency_metrics_folder_without_images_is_one_line_error(tmp_path):
    data = write_folder(tmp_path / "data")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    proc = run("tests/saliency_metrics.py", "--pred", str(empty), "--gt", str(data / "masks"))
    assert_one_line_error(proc, str(empty))
    with pytest.raises(SystemExit, match="nowhere"):  # a missing path
        saliency_metrics.main(["--pred", str(tmp_path / "nowhere"), "--gt", str(data / "masks")])
    (data / "masks" / "im03.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="im03.png"):
        saliency_metrics.main(["--pred", str(data / "masks"), "--gt", str(data / "masks")])


def test_checkpoint_of_another_kind_is_refused(tmp_path):
    ckpt = saliency_checkpoint(tmp_path / "sal.pt")
    with pytest.raises(SystemExit, match="sal.pt is a 'saliency' checkpoint"):
        evaluate.main(["fss", "--checkpoint", str(ckpt), "--voc-root", str(tmp_path), "--out", str(tmp_path / "r.json")])
    save_checkpoint(tmp_path / "fss.pt", kind="fss", config={}, model={})
    with pytest.raises(SystemExit, match="fss.pt is a 'fss' checkpoint"):
        make_pseudomasks.main(["--checkpoint", str(tmp_path / "fss.pt"), "--images", str(tmp_path), "--out",
                               str(tmp_path / "m")])
    # a saliency checkpoint whose config names another backbone than its weights
    state = torch.load(ckpt, weights_only=False)
    state["config"]["backbone"] = "resnet50"
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="other.pt: weights do not fit"):
        make_pseudomasks.main(["--checkpoint", str(tmp_path / "other.pt"), "--images", str(tmp_path), "--out",
                               str(tmp_path / "m")])


def test_image_and_mask_variants_give_correct_pairs_or_named_errors(tmp_path):
    data = write_folder(tmp_path / "data", n=6)
    images, masks = data / "images", data / "masks"
    rgb = np.asarray(load_image(images / "im00.jpg"))
    Image.open(images / "im00.jpg").convert("L").save(images / "im00.jpg")  # grayscale JPEG
    Image.open(images / "im01.jpg").convert("CMYK").save(images / "im01.jpg")  # CMYK JPEG
    Image.open(masks / "im02.png").convert("1").save(masks / "im02.png")  # 1-bit mask
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(masks / "im03.png")  # empty pseudo-mask
    gray = np.asarray(load_image(images / "im00.jpg"))
    assert gray.shape == rgb.shape and (gray[..., 0] == gray[..., 2]).all()
    cmyk = np.asarray(load_image(images / "im01.jpg"), dtype=int)
    assert cmyk.shape == rgb.shape and abs(cmyk[20, 20] - (230, 200, 40)).max() < 40  # still the yellow box
    with pytest.warns(UserWarning, match="left out"):
        pairs = MaskSplitPairs(images, masks, image_size=32)
    assert pairs.dropped == ["im03"] and len(pairs) == 5
    for i in range(len(pairs)):
        item = pairs[i]
        assert item["query_img"].shape == (3, 32, 32) and (item["query_target"] == 1).any()
    assert pairs[2]["image_id"] == "im02"  # the 1-bit mask reads as foreground where set
    Image.fromarray(np.zeros((40, 50), np.uint8) + 255).save(masks / "im04.png")  # wrong size
    with pytest.raises(ValueError, match="im04.png: mask is 50x40"):
        MaskSplitPairs(images, masks, image_size=32)[3]
    (masks / "im05.png").unlink()  # an image without mask
    with pytest.raises(ValueError, match="im05.png"):
        MaskSplitPairs(images, masks, image_size=32)


# ---- issue 13: every input gives the right result or one line naming the file, checked before the work ----

def tiny_fss_args(data, out, *extra):
    return ["--images", str(data / "images"), "--masks", str(data / "masks"), "--backbone", "efficientnet_lite0",
            "--weights", "none", "--image-size", "32", "--batch-size", "2", "--workers", "0", "--out", str(out),
            *extra]


def test_non_finite_training_stops_with_one_line_and_writes_no_checkpoint(tmp_path):
    data = write_folder(tmp_path / "data")
    out = tmp_path / "run"
    proc = run("train_fss.py", *tiny_fss_args(data, out, "--lr", "1e30", "--max-steps", "4", "--log-every", "100"))
    assert_one_line_error(proc, "stopped without writing a checkpoint")   # the last line, after the bar's redraw
    assert re.search(r"error: step \d+: (the loss is nan|the loss is inf|weight \S+ is not finite)", proc.stderr)
    assert not (out / "last.pt").exists()
    guard = FiniteGuard()  # a weight overflowed by a step whose loss was finite is caught too
    net = torch.nn.Linear(2, 2)
    guard.record(5, torch.tensor(0.3))
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    with pytest.raises(SystemExit, match="error: step 5: weight weight is not finite"):
        guard.check(5, net)


def test_binary_masks_in_every_encoding_and_an_all_empty_set_is_an_error(tmp_path):
    truth = np.zeros((12, 16), bool)
    truth[3:9, 2:11] = True
    Image.fromarray(truth.astype(np.uint8)).save(tmp_path / "zero_one.png")                  # 0/1 8-bit
    Image.fromarray(truth.astype(np.uint16) * 255).save(tmp_path / "sixteen.png")            # 16-bit 0/255
    pal = Image.fromarray(truth.astype(np.uint8) * 8, "P")                                   # VOC index 8
    pal.putpalette(voc_palette())                                                            # (64, 0, 0): dark
    pal.save(tmp_path / "voc_palette.png")
    Image.fromarray(np.where(truth[..., None], np.uint8([64, 0, 0]), np.uint8(0))).save(tmp_path / "voc_rgb.png")
    Image.fromarray(np.where(truth, 200, 60).astype(np.uint8)).save(tmp_path / "soft.png")   # 8-bit: >= 128
    for name in ("zero_one", "sixteen", "voc_palette", "voc_rgb", "soft"):
        assert Image.open(tmp_path / f"{name}.png").mode in ("L", "I;16", "I", "P", "RGB")
        np.testing.assert_array_equal(load_binary_mask(tmp_path / f"{name}.png"), truth, err_msg=name)
    data = write_folder(tmp_path / "data")
    for p in (data / "masks").iterdir():
        Image.fromarray(np.zeros((40, 48), np.uint8)).save(p)
    with pytest.raises(ValueError, match=f"{data / 'masks'}: every mask is empty"):
        SalientObjects(data / "images", data / "masks")   # BAS-Net labels
    with pytest.raises(SystemExit, match=f"{data / 'masks'}: every mask is empty"):
        saliency_metrics.main(["--pred", str(data / "images"), "--gt", str(data / "masks"),
                       "--out", str(tmp_path / "m.json")])


def test_images_are_read_in_their_exif_orientation(tmp_path):
    data = write_folder(tmp_path / "data", n=2, size=(40, 48))
    stored = np.asarray(Image.open(data / "images" / "im00.jpg"))                           # 48 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6                                                                         # displayed turned
    Image.fromarray(stored).save(data / "images" / "im00.jpg", exif=exif, quality=95)
    shown = load_image(data / "images" / "im00.jpg")
    assert shown.size == (40, 48)
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(ImageOps.exif_transpose(Image.open(
        data / "images" / "im00.jpg"))))
    mask = np.asarray(Image.open(data / "masks" / "im00.png"))
    Image.fromarray(np.ascontiguousarray(np.rot90(mask, -1))).save(data / "masks" / "im00.png")  # as displayed
    pairs = MaskSplitPairs(data / "images", data / "masks", image_size=32)
    assert pairs[0]["image_id"] == "im00" and (pairs[0]["query_target"] == 1).any()


def test_output_locations_are_checked_before_any_work(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    nowhere = tmp_path / "no_dataset_here"                  # the work would fail on it: the output is checked first
    for out, what in ((tmp_path, "is a folder"), (a_file / "r.json", "cannot write there")):
        with pytest.raises(SystemExit, match=f"{out}: .*{what}"):
            evaluate.main(["fss", "--baseline", "foreground", "--voc-root", str(nowhere), "--out", str(out)])
        with pytest.raises(SystemExit, match=f"{out}: .*{what}"):
            evaluate.main(["fss", "--baseline", "foreground", "--voc-root", str(nowhere), "--out",
                           str(tmp_path / "r.json"), "--save-episodes", str(out)])
    with pytest.raises(SystemExit, match=f"{a_file}: cannot write there"):
        train_fss.main(["--images", str(nowhere), "--masks", str(nowhere), "--out", str(a_file)])
    proc = run("make_pseudomasks.py", "--checkpoint", str(saliency_checkpoint(tmp_path / "sal.pt")), "--images",
               str(nowhere), "--out", str(a_file))
    assert_one_line_error(proc, str(a_file))
    proc = run("basnet_train.py", "--images", str(nowhere), "--masks", str(nowhere), "--out", str(a_file / "x"))
    assert_one_line_error(proc, str(a_file / "x"))


# script: (its required flags, [(flag, a bad value), ...])
BAD_FLAG_VALUES = {
    train_fss.parse_args: (["--images", "i", "--masks", "m"], [
        ("--batch-size", "0"), ("--image-size", "-4"), ("--log-every", "0"), ("--epochs", "0"), ("--split-prob", "1.5"),
        ("--device", "cuda:99"), ("--device", "gpu")]),
    saliency_train.parse_args: (["--images", "i", "--out", "o"], [
        ("--superpixels", "0"), ("--rounds", "0"), ("--epochs", "0"), ("--threshold", "2"), ("--momentum", "1"),
        ("--prior-thresholds", "rdb=0.3"), ("--prior-thresholds", "rbd=1.3")]),
    basnet_train.parse_args: (["--images", "i", "--masks", "l", "--out", "o"], [
        ("--save-every", "0"), ("--batch-size", "0"), ("--max-steps", "0")]),
    make_pseudomasks.parse_args: (["--checkpoint", "c", "--images", "i", "--out", "o"], [
        ("--threshold", "2"), ("--batch-size", "0")]),
    evaluate.main: (["fss", "--voc-root", "r"], [("--runs", "0"), ("--episodes", "0")]),
}


@pytest.mark.parametrize("script, argv, flag", [(script, [*required, flag, value], flag)
                                                for script, (required, bad) in BAD_FLAG_VALUES.items()
                                                for flag, value in bad])
def test_bad_flag_values_are_refused_by_argparse_naming_the_flag(script, argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script(argv)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}:" in last, last


def test_every_trainer_refuses_changed_settings_on_resume_and_survives_a_truncated_log(tmp_path):
    data = write_folder(tmp_path / "data")
    out = tmp_path / "basnet"
    flags = ["--out", str(out), "--crop", "24", "--batch-size", "2", "--weights", "none", "--encoder",
             "efficientnet_lite0", "--width", "0.125", "--workers", "0", "--log-every", "1", "--save-every", "1",
             "--device", "cpu"]
    basnet_train.main(["--images", str(data / "images"), "--masks", str(data / "masks"), "--image-size", "32",
                       "--max-steps", "2", *flags])
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')                                         # killed mid-write
    same = ["--masks", str(data / "masks"), "--image-size", "32", *flags]
    basnet_train.main(["--images", f"{data / 'images'}/", "--max-steps", "3", "--resume", *same])  # same folder
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    with pytest.raises(SystemExit, match=r"cannot --resume .*last.pt with different flags: --lr 0.001 -> 0.01"):
        basnet_train.main(["--images", str(data / "images"), "--max-steps", "4", "--resume", "--lr", "1e-2", *same])
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"st')
    trim_log(log, 5)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_make_pseudomasks_rerun_with_other_settings_is_refused(tmp_path):
    data = write_folder(tmp_path / "data")
    args = ["--checkpoint", str(saliency_checkpoint(tmp_path / "sal.pt")), "--images", str(data / "images"),
            "--out", str(tmp_path / "masks"), "--workers", "0"]
    make_pseudomasks.main(args + ["--threshold", "1"])                     # nothing reaches 1: no mask at all
    assert not list((tmp_path / "masks").glob("*.png"))
    with pytest.raises(SystemExit, match=r"masks holds pseudo-masks of other settings \(threshold 1.0 -> 0.5\)"):
        make_pseudomasks.main(args + ["--threshold", "0.5"])
    make_pseudomasks.main(args + ["--threshold", "1"])                     # the same settings: done is done


def test_data_files_bom_duplicates_encodings_case_and_class_values(tmp_path):
    data = write_folder(tmp_path / "data")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "bom.txt").write_bytes("\ufeffim00\nim01\n".encode("utf-8"))
    (lists / "utf16.txt").write_bytes("im00\r\nim02\r\n".encode("utf-16"))
    (lists / "latin1.txt").write_bytes("im00\nim\xe9\n".encode("latin-1"))
    (lists / "twice.txt").write_text("im00\nim01\nim00\n")
    assert [p.stem for p in list_images(data / "images", lists / "bom.txt")] == ["im00", "im01"]
    assert [p.stem for p in list_images(data / "images", lists / "utf16.txt")] == ["im00", "im02"]
    with pytest.raises(ValueError, match="latin1.txt: list file is not UTF-8"):
        list_images(data / "images", lists / "latin1.txt")
    with pytest.warns(UserWarning, match="twice.txt: 1 repeated entries ignored"):
        assert _read_list(lists / "twice.txt") == ["im00", "im01"]
    (data / "masks" / "im01.png").rename(data / "masks" / "im01.PNG")     # upper-case suffixes found too
    (data / "images" / "im02.jpg").rename(data / "images" / "im02.JPG")
    pairs = MaskSplitPairs(data / "images", data / "masks", image_size=32)
    assert [p.name for p in pairs.masks][:2] == ["im00.png", "im01.PNG"] and len(pairs) == 4
    classes = np.asarray(Image.open(data / "masks" / "im03.png")) // 255 * 50  # class 50: not a VOC class
    Image.fromarray(classes.astype(np.uint8)).save(data / "masks" / "im03.png")
    with pytest.raises(ValueError, match=r"im03.png: unknown class index \[50\]"):
        MaskSplitPairs(data / "images", data / "masks", mask_source="groundtruth")


def test_coco_annotations_without_segmentation_and_rle_of_another_size(tmp_path):
    pytest.importorskip("pycocotools")
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.new("RGB", (40, 30)).save(root / "val2014" / "a.jpg")
    box = [[5, 5, 20, 5, 20, 20, 5, 20]]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": box, "iscrowd": 0, "area": 225.0,
             "bbox": [5, 5, 15, 15]},
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [], "iscrowd": 0, "area": 1.0,
             "bbox": [1, 1, 1, 1]},
            {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 1.0, "bbox": [1, 1, 1, 1]}]
    ann_file = root / "annotations" / "instances_val2014.json"

    def write(annotations):
        ann_file.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "height": 30, "width": 40}],
                                        "annotations": annotations,
                                        "categories": [{"id": 1, "name": "x", "supercategory": "x"}]}))
    write(anns)
    with pytest.warns(UserWarning, match=r"instances_val2014.json: 2 annotation\(s\) without a segmentation"):
        out = render_coco_masks(root)
    assert (np.asarray(Image.open(out / "a.png")) == 1).sum() >= 15 * 15
    rle = {"counts": [0, 10 * 10], "size": [10, 10]}                      # the RLE of a 10x10 image
    write(anns[:1] + [{**anns[0], "id": 7, "segmentation": rle, "iscrowd": 1}])
    with pytest.raises(ValueError, match=r"instances_val2014.json: annotation 7 \(image 1\): segmentation is 10x10"):
        render_coco_masks(root)


def test_temporary_files_are_unique_removed_on_any_exit_and_outputs_follow_the_umask(tmp_path, monkeypatch):
    old = os.umask(0o022)
    try:
        save_png(np.eye(4, dtype=bool), tmp_path / "m.png")
        write_json({"a": 1}, tmp_path / "r.json")
        save_checkpoint(tmp_path / "c.pt", kind="fss", config={}, model={})
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {
        "m.png": 0o644, "r.json": 0o644, "c.pt": 0o644}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt                                            # Ctrl-C during the episodes
    monkeypatch.setattr(evaluate, "FewShotEpisodes", interrupted)
    (tmp_path / "out").mkdir()
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(["fss", "--baseline", "foreground", "--voc-root", str(tmp_path), "--out",
                       str(tmp_path / "out" / "r.json"), "--save-episodes", str(tmp_path / "out" / "e.jsonl")])
    assert not list((tmp_path / "out").iterdir())                         # no temporary file left behind
    killed = subprocess.Popen([sys.executable, "-c", ""])                 # SIGKILL leaves its temporary file:
    killed.wait()                                                          # the next run's check removes it
    tag = _writer().rpartition("-")[0]
    (tmp_path / "out" / f".r.json.{tag}-{killed.pid}.abc.tmp").write_text("x")
    (tmp_path / "out" / f".r.json.{tag}-{os.getpid()}.abc.tmp").write_text("x")  # a running writer's: kept
    check_output(tmp_path / "out" / "r.json")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f".r.json.{tag}-{os.getpid()}.abc.tmp"]


# ---- nothing lost (issue 26) ----

def test_no_output_is_or_holds_an_input_or_another_output(tmp_path):
    data = write_folder(tmp_path / "data")
    photos = tmp_path / "photos"                                   # PNG photos: a mask of the same name replaces one
    photos.mkdir()
    for p in (data / "images").glob("*.jpg"):
        Image.open(p).save(photos / f"{p.stem}.png")
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    torch.manual_seed(0)
    net = FSSNet("efficientnet_lite0", "none")
    save_checkpoint(tmp_path / "fss.pt", kind="fss", config=net.config, model=net.state_dict())
    predict = ["predict", "--checkpoint", str(tmp_path / "fss.pt"), "--support", str(data / "images" / "im00.jpg"),
               str(data / "masks" / "im00.png"), "--image-size", "32", "--workers", "0", "--device", "cpu"]
    for out in (["--out", str(photos)], ["--query", str(photos / "im01.png"), "--out", str(tmp_path)],
                ["--out", str(tmp_path / "x"), "--overlay", str(tmp_path / "x")]):
        with pytest.raises(SystemExit, match="would overwrite or mix with it"):
            evaluate.main(predict + ["--query", str(photos), *out])
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before     # every photo as it was
    with pytest.raises(SystemExit, match=f"--out {data / 'images'} is --images"):
        make_pseudomasks.main(["--checkpoint", str(saliency_checkpoint(tmp_path / "sal.pt")), "--images",
                               str(data / "images"), "--out", str(data / "images")])
    with pytest.raises(SystemExit, match="--save-episodes .*r.json is --out"):
        evaluate.main(["fss", "--baseline", "foreground", "--voc-root", str(tmp_path), "--out",
                       str(tmp_path / "r.json"), "--save-episodes", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match="--out .* holds --images"):
        train_fss.main(["--images", str(data / "images"), "--masks", str(data / "masks"), "--out", str(data)])
    assert sorted(p.name for p in data.iterdir()) == ["images", "masks"]       # refused before any work


def test_reruns_redo_or_refuse_what_other_settings_made(tmp_path):
    data = write_folder(tmp_path / "data", n=3, size=(48, 48))
    sal = ["--images", str(data / "images"), "--out", str(tmp_path / "sal"), "--priors-only", "--device", "cpu",
           "--superpixels", "30"]
    saliency_train.main(sal + ["--prior-size", "32"])
    first = np.asarray(Image.open(tmp_path / "sal" / "priors" / "rbd" / "im00.png"))
    saliency_train.main(sal + ["--prior-size", "24"])                     # other priors: made again, not kept
    again = np.asarray(Image.open(tmp_path / "sal" / "priors" / "rbd" / "im00.png"))
    assert json.loads((tmp_path / "sal" / "priors" / "settings.json").read_text())["prior_size"] == 24
    assert first.shape == again.shape and not np.array_equal(first, again)
    # make_pseudomasks.py: a folder of PNGs it did not write is not its work; a rerun adding --save-prob writes them
    ckpt = str(saliency_checkpoint(tmp_path / "m.pt"))
    args = ["--checkpoint", ckpt, "--images", str(data / "images"), "--workers", "0", "--device", "cpu"]
    with pytest.raises(SystemExit, match="holds PNGs that make_pseudomasks.py did not write"):
        make_pseudomasks.main(args + ["--out", str(data / "masks")])
    make_pseudomasks.main(args + ["--out", str(tmp_path / "pm"), "--threshold", "0", "--min-fraction", "0"])
    make_pseudomasks.main(args + ["--out", str(tmp_path / "pm"), "--threshold", "0", "--min-fraction", "0",
                                  "--save-prob", str(tmp_path / "prob")])
    assert sorted(p.name for p in (tmp_path / "prob").glob("*.png")) == ["im00.png", "im01.png", "im02.png"]
    assert len((tmp_path / "pm" / "log_shard0of1.jsonl").read_text().splitlines()) == 3   # each image once
    with pytest.raises(SystemExit, match="other settings .*images"):       # the same folder, other images
        make_pseudomasks.main(["--checkpoint", ckpt, "--images", str(tmp_path / "prob"), "--workers", "0",
                               "--out", str(tmp_path / "pm"), "--threshold", "0", "--min-fraction", "0"])


def test_a_run_holds_its_folder_and_a_killed_one_leaves_it_free(tmp_path):
    data = write_folder(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    flags = ["--images", str(data / "images"), "--masks", str(data / "masks"), "--backbone", "efficientnet_lite0",
             "--weights", "none", "--image-size", "32", "--batch-size", "2", "--max-steps", "1", "--workers", "0",
             "--device", "cpu", "--out", str(out)]
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.'); import model; "
                               f"model.hold({str(out)!r}); print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"                    # another run, writing there
    with pytest.raises(SystemExit, match=f"{out}: another run is writing there"):
        train_fss.main(flags)
    assert not (out / "last.pt").exists()
    holder.kill()                                                          # SIGKILL: the kernel drops its lock
    holder.wait()
    train_fss.main(flags)
    assert (out / "last.pt").is_file()


def test_a_full_disk_or_sigterm_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    data = write_folder(tmp_path / "data")
    flags = ["--images", str(data / "images"), "--masks", str(data / "masks"), "--backbone", "efficientnet_lite0",
             "--weights", "none", "--image-size", "32", "--batch-size", "2", "--max-steps", "1", "--workers", "0",
             "--device", "cpu", "--out", str(tmp_path / "run")]

    def full_disk(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"run/last.pt: cannot write it \(\[enforce fail"):
        train_fss.main(flags)
    monkeypatch.undo()

    def no_space(self, fp, *a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", no_space)
    with pytest.raises(SystemExit, match=r"masks/im00.png: cannot write it \(No space left on device\)"):
        make_pseudomasks.main(["--checkpoint", str(saliency_checkpoint(tmp_path / "sal.pt")), "--images",
                               str(data / "images"), "--out", str(tmp_path / "masks"), "--threshold", "0",
                               "--workers", "0"])
    monkeypatch.undo()
    assert not [p for p in tmp_path.rglob("*.tmp")]
    # SIGTERM in the middle of stage 1: one line, and not one temporary file anywhere under its output
    out = tmp_path / "sal"
    proc = subprocess.Popen([sys.executable, "saliency_train.py", "--images", str(data / "images"), "--out", str(out),
                             "--prior-size", "32", "--superpixels", "30", "--image-size", "32", "--rounds", "1",
                             "--epochs", "400", "--batch-size", "2", "--weights", "none", "--device", "cpu"],
                            cwd=REPO, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not list((out / "refine").rglob("*.png")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert proc.stderr.read().strip().splitlines()[-1].startswith("error: stopped by SIGTERM")
    # a SIGKILL leaves temporary files in subfolders too: the next run's check removes them
    tag = _writer().rpartition("-")[0]
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    stale = out / "refine" / "rbd" / f".im00.png.{tag}-{dead.pid}.abc.tmp"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("x")
    check_output(out, folder=True)
    assert not [p for p in out.rglob("*.tmp")]


def test_resumes_log_and_seed_as_uninterrupted_runs_and_smaller_messages(tmp_path, monkeypatch):
    data = write_folder(tmp_path / "data")
    flags = ["--images", str(data / "images"), "--masks", str(data / "masks"), "--image-size", "32", "--crop", "24",
             "--batch-size", "2", "--weights", "none", "--encoder", "efficientnet_lite0", "--width", "0.125",
             "--workers", "0", "--log-every", "2", "--save-every", "1", "--device", "cpu", "--max-steps", "4"]
    random.seed(1)
    np.random.seed(1)
    basnet_train.main(flags + ["--out", str(tmp_path / "a")])
    random.seed(2)
    np.random.seed(2)

    def killed_after_step_3(path, **state):
        save_checkpoint(path, **state)
        if state["step"] == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(basnet_train, "save_checkpoint", killed_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        basnet_train.main(flags + ["--out", str(tmp_path / "b")])
    monkeypatch.undo()
    basnet_train.main(flags + ["--out", str(tmp_path / "b"), "--resume"])          # resumed at step 3
    logs = [(tmp_path / n / "log.jsonl").read_text() for n in "ab"]
    assert logs[0] == logs[1]                                              # step 4's line: the mean of steps 3-4
    a, b = (load_checkpoint(tmp_path / n / "last.pt") for n in "ab")
    for key in ("python", "numpy", "torch"):                              # seeded, and no draw lost or added
        assert repr(a["rng"][key]) == repr(b["rng"][key]), key
    with pytest.raises(SystemExit, match="is a folder; pass the checkpoint file in it"):
        evaluate.main(["fss", "--checkpoint", str(tmp_path / "a"), "--voc-root", str(tmp_path), "--out",
                       str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match="not a plain state dict .*--resume") as e:
        train_fss.main(flags[:4] + ["--backbone", "efficientnet_lite0", "--weights", str(tmp_path / "a" / "last.pt"),
                                    "--out", str(tmp_path / "fss")])
    assert "Unpickling" not in str(e.value)
