#!/usr/bin/env bash
# One command that checks masksplit on a CUDA GPU and times what every table row would cost there (README, "On a
# GPU"). From the repository root, after `pip install -r requirements.txt`:
#
#   bash tests/gpu_check.sh           # at most ~9 min on one GPU; the summary on stdout and in $OUT/summary.txt
#   DRY=1 bash tests/gpu_check.sh     # the same steps on the CPU at tiny sizes (tests/test_gpu_check.py runs it)
#
# Steps, each under its own timeout inside one deadline (BUDGET seconds), so that the summary always comes: CUDA
# seen?, tests/bench_fss.py step for the three backbones at the paper's settings (400 px, batch 16; random weights:
# nothing is downloaded, the speed does not depend on them), the host's cost of augmenting a batch, the loader at
# the machine's cores, an evaluation, 30 real training steps (log.jsonl's data_s and pairs_per_s), the demo on the
# GPU with the test suite beside it (CUDA visible). Logs and the summary go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
DRY=${DRY:-0}; OUT=${OUT:-runs/gpu_check}; BUDGET=${BUDGET:-540}; PY=${PY:-python}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd); SUMMARY=$OUT/summary.txt; : > "$SUMMARY"
START=$SECONDS
if [[ $DRY == 1 ]]; then
  DEV=cpu SIZE=32 BATCH=2 REPEATS=1 EPISODES=4 IMAGES=8 TRAIN_SIZE=64 STEPS=2 WORKERS=0
  TESTS=(tests/test_gpu_paths.py -k "mixed_precision_decision or auto_device")
  export SALIENCY_FLAGS="--prior-size 48 --superpixels 40 --image-size 32 --rounds 1 --epochs 1" \
         BASNET_FLAGS="--max-steps 2" PSEUDO_FLAGS="--threshold 0 --min-fraction 0" FSS_FLAGS="--max-steps 2 --image-size 64" \
         EVAL_FLAGS="--episodes 4 --image-size 64" WEIGHTS=none
else
  DEV=cuda SIZE=400 BATCH=16 REPEATS=5 EPISODES=500 IMAGES=200 TRAIN_SIZE=400 STEPS=30
  WORKERS=$(( $($PY -c "import os; print(len(os.sched_getaffinity(0)))") - 1 ))
  TESTS=(tests)
fi

left() { echo $(( BUDGET - (SECONDS - START) )); }
# step NAME CAP CMD...: CMD under a timeout of min(CAP, time left - 20 s), its output in $OUT/NAME.log
step() {
  local name=$1 cap=$2; shift 2
  local t=$(( $(left) - 20 )); (( cap < t )) && t=$cap
  if (( t < 10 )); then echo "$name: skipped, no time left" >> "$SUMMARY"; return 1; fi
  local begin=$SECONDS
  timeout -k 5 "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc $rc in $(( SECONDS - begin )) s$( ((rc == 124)) && echo ", timed out at $t s")" >> "$SUMMARY"
  return $rc
}

step env 30 "$PY" -c "import sys, torch; gpu = torch.cuda.is_available()
print('torch', torch.__version__, 'CUDA build', torch.version.cuda, 'GPU', gpu and torch.cuda.get_device_name())
sys.exit(0 if gpu or $DRY else 3)"
found=$?; cat "$OUT/env.log" >> "$SUMMARY"
if (( found != 0 )); then
  echo "no CUDA GPU seen by torch: see nvidia-smi, and README 'On a GPU' for a torch of an older CUDA" | tee -a "$SUMMARY"
  exit 3
fi

for backbone in resnet101 resnet50 efficientnet_lite0; do
  step "step_$backbone" 90 "$PY" tests/bench_fss.py step --device "$DEV" --backbone "$backbone" \
    --image-size "$SIZE" --batch-size "$BATCH" --repeats "$REPEATS"
done
step augment 40 "$PY" tests/bench_datasets.py augment --device "$DEV" --repeats 20
step evaluate 60 "$PY" tests/bench_fss.py evaluate --device "$DEV" --image-size "$SIZE" --episodes "$EPISODES" \
  --workers "$WORKERS"

DATA=$OUT/data
step data 60 "$PY" -c "import sys; sys.path.insert(0, 'tests'); from demo_data import make_demo_data
make_demo_data(sys.argv[1], train_images=$IMAGES, val_images=2, salient_images=0, coco_images=0,
               size_range=(375, 500))" "$DATA"
step loader 60 "$PY" tests/bench_datasets.py loader --images "$DATA/VOCdevkit/VOC2012/JPEGImages" \
  --masks "$DATA/VOCdevkit/VOC2012/SegmentationClass" --mask-source groundtruth --workers "$WORKERS"
rm -rf "$OUT/train"
step train 120 "$PY" train_fss.py --mask-source gt --voc-root "$DATA/VOCdevkit/VOC2012" --backbone resnet101 \
  --weights none --image-size "$TRAIN_SIZE" --batch-size "$BATCH" --workers "$WORKERS" --device "$DEV" \
  --max-steps "$STEPS" --log-every 10 --out "$OUT/train"

# the tests with CUDA visible, beside the demo (the demo's stages 1-3 run mostly on the CPU cores)
step pytest $(( $(left) - 40 )) "$PY" -m pytest -q -p no:cacheprovider -rfE "${TESTS[@]}" &
TESTS_PID=$!
rm -rf "$OUT/demo"
RUN=$OUT/demo DEVICE=$DEV step demo 330 bash pipeline.sh demo
wait "$TESTS_PID"

"$PY" - "$OUT" $(( SECONDS - START )) <<'EOF' | tee -a "$SUMMARY"
import json, pathlib, sys
out, took = pathlib.Path(sys.argv[1]), sys.argv[2]
read = lambda name: (out / f"{name}.log").read_text(errors="replace") if (out / f"{name}.log").is_file() else ""
records = lambda name: [json.loads(l) for l in read(name).splitlines() if l.startswith("{")]
print(f"total {took} s")
steps = {}
for backbone in ("resnet101", "resnet50", "efficientnet_lite0"):
    for r in records(f"step_{backbone}"):
        steps[backbone] = r["train_step_s"]
        print("bench_fss step", json.dumps(r))
for r in records("augment") + records("evaluate"):
    print(json.dumps(r))
print(*[l for l in read("loader").splitlines() if "pairs" in l], sep="\n")
log = [json.loads(l) for l in (out / "train" / "log.jsonl").read_text().splitlines()] \
    if (out / "train" / "log.jsonl").is_file() else []
for r in log:
    print("train_fss.py", {k: r.get(k) for k in ("step", "loss", "data_s", "pairs_per_s")})
demo = read("demo")
print(demo[demo.find("PASCAL-5i one-shot mIoU"):][:500] or "demo: no mIoU table (demo.log)")
print("tests:", (read("pytest").strip().splitlines() or ["no output"])[-1])
# a row's hours: its training steps (README, The paper's tables) x train_step_s, plus 4 folds x 5 runs x 2500
# episodes at the measured evaluation speed (ResNet-101)
episodes_per_s = next((r["episodes_per_s"] for r in records("evaluate")), None)
evaluation = 4 * 5 * 2500 / episodes_per_s if episodes_per_s else 0
for row, n in (("PASCAL 'all' row (Tables 1, 2, 3), at most", 66200),
               ("Table 2 fold rows, all four folds, at most", 4 * 66200), ("Table 4, COCO-20i, at most", 103480)):
    if "resnet101" in steps:
        print(f"{row}: {n} steps x {steps['resnet101']} s + evaluation {evaluation / 3600:.2f} h = "
              f"{(n * steps['resnet101'] + evaluation) / 3600:.1f} h (ResNet-101)")
EOF
