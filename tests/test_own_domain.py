"""Class folders (issue 27): evaluate.py fss --dataset folders / fss1000 on tiny folders written here, and
make_pseudomasks.py --class-folders."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import make_pseudomasks
from datasets import FewShotEpisodes, class_folders
from model import FSSNet, save_checkpoint
from test_robustness import saliency_checkpoint


def write_class_folders(root, counts, size=(40, 48), seed=0, suffix=".jpg"):
    """root/<class>/<i>.jpg with its 0/255 mask <i>.png beside it (FSS-1000's layout), counts {class: images}."""
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            image = (rng.random((*size, 3)) * 255).astype(np.uint8)
            mask = np.zeros(size, np.uint8)
            mask[4 + i:30, 6:30 + i] = 255
            Image.fromarray(image).save(root / name / f"{i + 1}{suffix}")
            Image.fromarray(mask).save(root / name / f"{i + 1}.png")
    return root


def test_class_folders_give_seeded_episodes_within_one_class(tmp_path):
    root = write_class_folders(tmp_path / "classes", {"cat": 4, "dog": 3, "owl": 1})
    with pytest.warns(UserWarning, match=r"\['owl'\] have <= 1 images"):       # fewer than 2 images: skipped
        ds = FewShotEpisodes("folders", root, fold=3, episodes=20, seed=5, image_size=32)
    again = FewShotEpisodes("folders", root, fold=0, episodes=20, seed=5, image_size=32)
    ids = [ds.episode_ids(i) for i in range(20)]
    assert ids == [again.episode_ids(i) for i in range(20)]                        # same seed, same episodes
    assert ids != [FewShotEpisodes("folders", root, 0, episodes=20, seed=6).episode_ids(i) for i in range(20)]
    names = dict(zip(ds.classes, ds.names))
    for query, supports, c in ids:
        assert query.split("/")[0] == names[c] and query not in supports            # one folder, never the query
        assert all(s.split("/")[0] == names[c] for s in supports)
    item = ds[0]
    assert item["query_mask_orig"].shape == (40, 48) and set(item["query_mask_orig"].unique().tolist()) == {0, 1}
    assert item["support_imgs"].shape == (1, 3, 32, 32) and item["query_id"] == ids[0][0]
    # k-shot: two supports, both from the query's folder (dog has 3 images: its queries keep 2 others)
    two = FewShotEpisodes("folders", root, 0, shots=2, episodes=10, image_size=32)
    assert all(len(set(s)) == 2 and q not in s for q, s, _ in (two.episode_ids(i) for i in range(10)))


def test_fss1000_layout_every_image_a_query_once_and_bad_folders_named(tmp_path):
    root = write_class_folders(tmp_path / "FSS-1000", {"abacus": 10, "bus": 10, "zebra": 10})
    (tmp_path / "test.txt").write_text("zebra\nabacus\n")
    ds = FewShotEpisodes("fss1000", root, 0, sampling="every", class_list=tmp_path / "test.txt", image_size=32)
    assert ds.names == ("abacus", "zebra") and len(ds) == 20                       # each listed image once
    assert sorted(ds.episode_ids(i)[0] for i in range(20)) == sorted(f"{c}/{n}" for c in ("abacus", "zebra")
                                                                       for n in range(1, 11))
    (tmp_path / "bad.txt").write_text("abacus\nunicorn\n")
    with pytest.raises(ValueError, match="unicorn"):
        class_folders(root, tmp_path / "bad.txt")
    Image.fromarray(np.full((20, 20), 255, np.uint8)).save(root / "bus" / "3.png")  # a mask of another size
    ds = FewShotEpisodes("folders", root, 0, episodes=30, image_size=32)
    with pytest.raises(ValueError, match=r"bus/3.png: mask is 20x20"):
        for i in range(30):
            ds[i]
    (root / "bus" / "3.png").unlink()                                                # an image without its mask
    with pytest.raises(ValueError, match=r"bus/3.jpg: no mask 3.png"):
        class_folders(root)


def test_evaluate_class_folders_per_class_and_the_saliency_rule(tmp_path, capsys):
    root = write_class_folders(tmp_path / "classes", {"cat": 3, "dog": 3})
    torch.manual_seed(0)
    net = FSSNet("efficientnet_lite0", "none")
    save_checkpoint(tmp_path / "fss.pt", kind="fss", config=net.config, model=net.state_dict())
    common = ["--dataset", "folders", "--root", str(root), "--runs", "2", "--episodes", "6", "--image-size", "32",
              "--workers", "0", "--device", "cpu"]
    evaluate.main(["fss", "--checkpoint", str(tmp_path / "fss.pt"), *common, "--out", str(tmp_path / "r.json")])
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["fold0"]["class_names"] == {"1": "cat", "2": "dog"}
    assert set(r["fold0"]["per_class"]) == set(r["fold0"]["per_class_episode_mean"]) == {"1", "2"}
    table = capsys.readouterr().out
    assert "cat" in table and "dog" in table
    # the Saliency* rule: pseudo-masks of the class folders' images (make_pseudomasks --class-folders), as predictions
    saliency_checkpoint(tmp_path / "sal.pt")
    make_pseudomasks.main(["--checkpoint", str(tmp_path / "sal.pt"), "--images", str(root), "--class-folders",
                           "--out", str(tmp_path / "pseudo"), "--threshold", "0", "--min-fraction", "0",
                           "--workers", "0", "--device", "cpu"])
    assert sorted(p.relative_to(tmp_path / "pseudo").as_posix() for p in (tmp_path / "pseudo").rglob("*.png")) == \
        [f"{c}/{n}.png" for c in ("cat", "dog") for n in (1, 2, 3)]
    evaluate.main(["fss", "--baseline", "saliency", "--masks", str(tmp_path / "pseudo"), *common,
                   "--out", str(tmp_path / "s.json")])
    s = json.loads((tmp_path / "s.json").read_text())          # threshold 0: every pseudo-mask all foreground
    f = evaluate.main(["fss", "--baseline", "foreground", *common, "--out", str(tmp_path / "f.json")])
    assert f is None and s["mean"] == json.loads((tmp_path / "f.json").read_text())["mean"]
    with pytest.raises(SystemExit, match="--class-list"):
        evaluate.main(["fss", "--checkpoint", str(tmp_path / "fss.pt"), "--dataset", "fss1000", "--root", str(root)])
