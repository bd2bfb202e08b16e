"""tests/gpu_check.sh's dry mode: every step of the GPU check, on the CPU at tiny sizes, and its summary."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["env", "step_resnet101", "step_resnet50", "step_efficientnet_lite0", "augment", "evaluate", "data", "loader",
         "train", "pytest", "demo"]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_dry_mode_runs_every_step_and_prints_the_row_estimates(tmp_path):
    env = dict(os.environ, DRY="1", OUT=str(tmp_path / "out"), PY=sys.executable, OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")   # pipeline.sh's python
    proc = subprocess.run(["bash", str(ROOT / "tests" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    for name in STEPS:
        assert f"{name}: rc 0 in" in summary, summary
    assert summary.count("bench_fss step {") == 3 and "train_fss.py {'step': 2" in summary
    assert "MaskSplit (ours)" in summary and "tests: 2 passed" in summary
    for row in ("PASCAL 'all' row", "Table 2 fold rows", "Table 4, COCO-20i"):
        assert any(line.startswith(row) and line.endswith(" h (ResNet-101)") for line in summary.splitlines()), row
