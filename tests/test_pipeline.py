"""pipeline.sh full (and cpu) on tiny data written in the real layouts (a salient-image folder for stages 1-2, a VOC 2012
tree, a COCO split with its instances JSON): every stage runs with the flags given per stage, PASCAL and COCO
results are written and summarised, and a rerun skips every finished stage."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from class_folders import voc_class_folders
from demo_data import make_demo_data

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["saliency", "basnet", "pseudomasks_voc", "fss_voc", "eval_voc", "eval_voc_saliency", "eval_voc_foreground",
          "pseudomasks_coco", "pseudomasks_coco_val", "fss_coco", "eval_coco", "eval_coco_saliency"]


def run_pipeline(env, mode="full"):
    out = subprocess.run(["bash", str(ROOT / "pipeline.sh"), mode], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # every stage that ran said where it ran, before any work (a CUDA wheel on an old driver sees no GPU)
    assert out.stderr.count("device: cpu") == out.stdout.count("+ python "), out.stderr[-3000:]
    return out.stdout


def pipeline_env(run, data, **variables):
    """pipeline.sh's environment for tiny data: one thread, CPU, random weights, tiny stage 1 settings."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               OMP_NUM_THREADS="1", RUN=str(run), MSRA=str(data["salient_images"]), VOC=str(data["voc"]),
               WEIGHTS="none", DEVICE="cpu", PSEUDO_FLAGS="--threshold 0.2",
               SALIENCY_FLAGS="--prior-size 48 --superpixels 40 --image-size 32 --rounds 1 --epochs 1")
    return {**env, **variables}


@pytest.mark.skipif(shutil.which("bash") is None, reason="pipeline.sh needs bash")
def test_full_mode_runs_every_stage_and_a_rerun_skips_them(tmp_path):
    data = make_demo_data(tmp_path / "data", train_images=20, val_images=40, salient_images=8, coco_images=16)
    run = tmp_path / "run"
    env = pipeline_env(run, data, COCO=str(data["coco"]), COCO_TRAIN=data["coco_split"],
                       COCO_VAL=data["coco_split"], BACKBONE="efficientnet_lite0",
                       BASNET_FLAGS="--max-steps 2 --image-size 32 --crop 24 --batch-size 2 --weights none "
                                    "--save-every 1 --encoder efficientnet_lite0 --width 0.25",
                       FSS_FLAGS="--image-size 64 --batch-size 4 --epochs 1 --workers 0",
                       EVAL_FLAGS="--image-size 64 --runs 1 --episodes 4 --workers 0 --fold 0")
    first = run_pipeline(env)
    assert sorted(p.name for p in (run / "done").iterdir()) == sorted(STAGES)
    # each stage's command line is echoed, with its own extra flags last (they override the mode's defaults)
    assert "+ python saliency_train.py" in first and "--rounds 1 --epochs 1 --resume" in first
    assert "--epochs 20 --backbone efficientnet_lite0" in first and "--epochs 1 --workers 0 --resume" in first
    voc_images = len(list((data["voc"] / "JPEGImages").glob("*.jpg")))
    pseudo = run / "pseudomasks" / "voc"
    records = [json.loads(line) for log in pseudo.glob("log_shard*.jsonl") for line in log.read_text().splitlines()]
    assert len(records) == voc_images and len(list(pseudo.glob("*.png"))) == sum(r["written"] for r in records)
    for name in ("results_voc", "results_voc_saliency", "results_voc_foreground", "results_coco",
                 "results_coco_saliency"):
        result = json.loads((run / f"{name}.json").read_text())
        assert 0.0 <= result["mean"]["miou"] <= 1.0 and [k for k in result if k.startswith("fold")] == ["fold0"], name
    assert "PASCAL-5i one-shot mIoU" in first and "COCO-20i one-shot mIoU" in first
    summary = first[first.index("PASCAL-5i one-shot mIoU"):]

    second = run_pipeline(env)
    assert [line for line in second.splitlines() if line.startswith("[skip]")] == \
        [f"[skip] {name}: complete in {run}" for name in STAGES]
    assert "+ python" not in second and second[second.index("PASCAL-5i one-shot mIoU"):] == summary


@pytest.mark.skipif(shutil.which("bash") is None, reason="pipeline.sh needs bash")
def test_cpu_mode_runs_the_pascal_stages_with_its_own_settings(tmp_path):
    data = make_demo_data(tmp_path / "data", train_images=12, val_images=30, salient_images=6, coco_images=4)
    run = tmp_path / "run"
    # one epoch of BCE from random weights leaves every label empty, which BAS-Net refuses (README, Bad input): the
    # F-measure loss (the default's) spreads the tiny maps enough for a test of the plumbing
    env = pipeline_env(run, data, BASNET_FLAGS="--max-steps 2 --image-size 32 --crop 24 --batch-size 2 --weights none",
                       SALIENCY_FLAGS="--prior-size 48 --superpixels 40 --image-size 32 --rounds 1 --epochs 1 "
                                      "--loss fmeasure",
                       FSS_FLAGS="--image-size 64 --batch-size 4 --max-steps 2 --workers 0",
                       EVAL_FLAGS="--image-size 64 --runs 1 --episodes 4 --workers 0 --fold 0")
    out = run_pipeline(env, "cpu")
    assert sorted(p.name for p in (run / "done").iterdir()) == sorted(STAGES[:7])  # no COCO given: PASCAL only
    # the CPU recipe's settings, then the extra flags; Lite0 by default, also as BAS-Net's encoder
    assert "--backbone efficientnet_lite0" in out and "--encoder efficientnet_lite0" in out
    assert "--batch-size 8 --loss bce --prior-thresholds rbd=0.5,mc=0.5 --no-crf --prior-size 48" in out
    assert "PASCAL-5i one-shot mIoU" in out and "COCO-20i" not in out


@pytest.mark.skipif(shutil.which("bash") is None, reason="pipeline.sh needs bash")
def test_own_mode_trains_on_an_image_folder_and_evaluates_class_folders(tmp_path):
    data = make_demo_data(tmp_path / "data", train_images=2, val_images=16, salient_images=8, coco_images=0)
    classes = voc_class_folders(data["voc"], tmp_path / "eval")                   # labelled class folders
    run = tmp_path / "run"
    env = pipeline_env(run, data, IMAGES=str(data["salient_images"]), EVAL=str(tmp_path / "eval"), MSRA="", VOC="",
                       SALIENCY_FLAGS="--prior-size 48 --superpixels 40 --image-size 32 --rounds 1 --epochs 1 "
                                      "--loss fmeasure",
                       BASNET_FLAGS="--max-steps 2 --image-size 32 --crop 24 --batch-size 2 --weights none",
                       FSS_FLAGS="--image-size 64 --batch-size 4 --max-steps 2 --workers 0",
                       EVAL_FLAGS="--image-size 64 --runs 1 --episodes 4 --workers 0")
    out = run_pipeline(env, "own")
    assert sorted(p.name for p in (run / "done").iterdir()) == sorted(
        ["saliency", "basnet", "pseudomasks_own", "fss_own", "pseudomasks_eval", "eval_own", "eval_own_saliency",
         "eval_own_foreground"])
    # no GPU here: the cpu mode's settings; stages 1-4 on the image folder, no VOC tree read
    assert "--image-size 128 --rounds 2 --epochs 5" in out and f"--images {data['salient_images']}" in out
    assert "python evaluate.py predict --checkpoint" in out and "--image-size 64" in out
    eval_pseudo = sorted(p.relative_to(run / "pseudomasks" / "eval").parent.name
                         for p in (run / "pseudomasks" / "eval").rglob("*.png"))
    assert set(eval_pseudo) == set(classes)                                       # every class folder's images
    summary = out[out.index("Class folders (EVAL) one-shot mIoU"):]
    assert "MaskSplit (ours)" in summary and "per class" in summary
    result = json.loads((run / "results_own.json").read_text())
    assert set(result["fold0"]["class_names"].values()) <= set(classes)
    # a rerun with other evaluation flags redoes the evaluations (their results removed first), and only them
    again = run_pipeline({**env, "EVAL_FLAGS": "--image-size 64 --runs 1 --episodes 3 --workers 0"}, "own")
    redone = [line.split(":")[0] for line in again.splitlines() if line.startswith("[redo]")]
    assert redone == ["[redo] eval_own", "[redo] eval_own_saliency", "[redo] eval_own_foreground"]
    assert again.count("[skip]") == 5 and json.loads((run / "results_own.json").read_text())["config"]["episodes"] == 3
