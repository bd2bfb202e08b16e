#!/usr/bin/env bash
# The five MaskSplit stages chained (paper section 3.2 -> 4), each stage's command echoed before it runs.
#
#   bash pipeline.sh                      # demo: writes built-in DEMO data, small settings (2-core CPU: ~5 min)
#   MSRA=... VOC=... COCO=... bash pipeline.sh full     # the paper's recipe on one CUDA GPU (see README)
#   MSRA=... VOC=... bash pipeline.sh cpu                # the same stages sized for a 2-core CPU (README, CPU recipe)
#   IMAGES=... [EVAL=...] bash pipeline.sh own          # your own unlabelled images (README, Your own domain)
#
# Variables (all optional in demo mode):
#   RUN   run folder, every intermediate lands here (default runs/demo or runs/full)
#   MSRA  folder of MSRA-B images (stage 1-2 training images; no masks are read); MSRA_LIST: optional id list
#         (DeepUSPS trained on the 2500 images of MSRA-B's train split)
#   VOC   PASCAL VOC 2012 tree (VOCdevkit/VOC2012 with SegmentationClassAug); stage 4 trains on its train_aug
#         images (VOC 2012 + SBD, 10582), or on the ids of the file VOC_LIST
#   COCO  COCO 2014 root (train2014/, val2014/, annotations/instances_{train,val}2014.json); empty = skip COCO;
#         COCO_TRAIN / COCO_VAL name its two splits (default train2014 / val2014)
#   IMAGES (own) folder of your unlabelled images: stages 1-2 train on them (on MSRA when it is given), stage 3
#         makes their pseudo-masks, stage 4 trains on them; IMAGES_LIST: optional id list. EVAL (own, optional):
#         labelled class folders (EVAL/<class>/<name>.jpg + <name>.png, the binary mask) for the one-shot
#         evaluation. SIZING (own): full or cpu, the settings of that mode (default: full where torch sees a GPU)
#   BACKBONE (default resnet101), WEIGHTS (imagenet | PATH), DEVICE (auto)
#   SALIENCY_FLAGS BASNET_FLAGS PSEUDO_FLAGS FSS_FLAGS EVAL_FLAGS: extra flags of each stage, appended last so
#         they override the mode's own, e.g. FSS_FLAGS="--batch-size 8" for a smaller GPU
# RUN/done/<stage> records a finished stage's command and the records of the stages it read: a rerun skips it
# when they are the same, and redoes it (its output removed first) when its flags or an earlier stage changed. The
# training stages always run with --resume (from their last.pt if there is one) and make_pseudomasks.py skips the
# masks it already wrote, so rerunning after a crash continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")"

mode=${1:-demo}
case $mode in demo|full|cpu|own) ;; *) echo "usage: bash pipeline.sh [demo|full|cpu|own]" >&2; exit 2 ;; esac
RUN=${RUN:-runs/$mode}
DEVICE=${DEVICE:-auto}
mkdir -p "$RUN/done"

# stage NAME OUTPUT "DEPS" COMMAND...: run COMMAND, echoing it first, unless RUN/done/NAME records this very
# command after the same records of the stages DEPS (it reads their outputs); another record: remove OUTPUT, redo
stage() {
  local name=$1 output=$2 deps=$3 dep record; shift 3
  record=$(echo "$*"; for dep in $deps; do echo "after $dep: $(cksum < "$RUN/done/$dep")"; done)
  if [[ -f $RUN/done/$name ]]; then
    if [[ $(< "$RUN/done/$name") == "$record" ]]; then echo "[skip] $name: complete in $RUN"; return; fi
    echo "[redo] $name: its flags or an earlier stage changed since $RUN/done/$name; removing $output"
    rm -rf "$output" "$RUN/done/$name"
  fi
  echo "+ $*"
  "$@"
  echo "$record" > "$RUN/done/$name"
}

data_stage=""        # the demo's data are a stage of the run too
if [[ $mode == demo ]]; then
  data_stage=demo_data
  stage demo_data "$RUN/data" "" python tests/demo_data.py "$RUN/data"
  data=$RUN/data
  SAL_IMAGES=$data/salient/images
  VOC=$data/VOCdevkit/VOC2012
  BACKBONE=${BACKBONE:-efficientnet_lite0}
  WEIGHTS=${WEIGHTS:-imagenet}
  # small settings: a CPU finishes the whole demo in minutes; the numbers are demo numbers, not the paper's
  # BCE without the CRF, as the cpu mode: on 40 demo images the F-measure loss and the CRF spread every label
  # to the whole image
  saliency_flags=(--prior-size 128 --image-size 128 --rounds 2 --epochs 3 --batch-size 8 --loss bce --no-crf)
  basnet_flags=(--max-steps 60 --image-size 64 --crop 56 --encoder efficientnet_lite0 --width 0.25 --save-every 20)
  pseudo_flags=()
  fss_flags=(--image-size 160 --batch-size 8 --epochs 8 --workers 1)
  eval_flags=(--image-size 160 --runs 1 --episodes 300 --workers 1)
else
  if [[ $mode == own ]]; then
    : "${IMAGES:?set IMAGES to your folder of images}"
    SAL_IMAGES=${MSRA:-$IMAGES}
    if [[ -z ${SIZING:-} && $DEVICE != cpu ]]; then
      SIZING=$(python -c "import torch; print('full' if torch.cuda.is_available() else 'cpu')")
    fi
    SIZING=${SIZING:-cpu}
    [[ $SIZING == full || $SIZING == cpu ]] || { echo "SIZING must be full or cpu, got $SIZING" >&2; exit 2; }
  else
    : "${MSRA:?set MSRA to the MSRA-B image folder}" "${VOC:?set VOC to VOCdevkit/VOC2012}"
    SAL_IMAGES=$MSRA
    SIZING=$mode
  fi
  saliency_flags=()
  basnet_flags=()
  pseudo_flags=()
  fss_flags=()
  eval_flags=()
  if [[ $SIZING == cpu ]]; then
    # a 2-core CPU: Lite0 with its real ImageNet weights (also as BAS-Net's encoder), small images, few steps
    BACKBONE=${BACKBONE:-efficientnet_lite0}
    # (README "CPU recipe": the priors binarised at 0.5 for RBD / MC, BCE, no CRF, and a narrow BAS-Net decoder)
    saliency_flags=(--image-size 128 --rounds 2 --epochs 5 --batch-size 8 --loss bce --prior-thresholds rbd=0.5,mc=0.5
                    --no-crf)
    basnet_flags=(--encoder efficientnet_lite0 --width 0.25 --image-size 72 --crop 64 --max-steps 1200 --save-every 50)
    fss_flags=(--image-size 256 --batch-size 8 --max-steps 600 --workers 1)
    eval_flags=(--image-size 256 --runs 2 --episodes 1000 --workers 1 --eval-resolution original)
  fi
  BACKBONE=${BACKBONE:-resnet101}
  WEIGHTS=${WEIGHTS:-imagenet}
fi
own_list=()
if [[ -n ${IMAGES_LIST:-} ]]; then own_list=(--list "$IMAGES_LIST"); fi
if [[ -n ${MSRA_LIST:-} ]]; then saliency_flags+=(--list "$MSRA_LIST"); basnet_flags+=(--list "$MSRA_LIST")
elif [[ $mode == own && -z ${MSRA:-} ]]; then saliency_flags+=("${own_list[@]}"); basnet_flags+=("${own_list[@]}"); fi
voc_list=()
if [[ -n ${VOC_LIST:-} ]]; then voc_list=(--list "$VOC_LIST"); fi
read -ra more <<< "${SALIENCY_FLAGS:-}"; saliency_flags+=("${more[@]}")
read -ra more <<< "${BASNET_FLAGS:-}"; basnet_flags+=("${more[@]}")
read -ra more <<< "${PSEUDO_FLAGS:-}"; pseudo_flags+=("${more[@]}")
read -ra more <<< "${FSS_FLAGS:-}"; fss_flags+=("${more[@]}")
read -ra more <<< "${EVAL_FLAGS:-}"; eval_flags+=("${more[@]}")

# 1. unsupervised saliency (DeepUSPS style), 2. BAS-Net on its labels
stage saliency "$RUN/deepusps" "$data_stage" python saliency_train.py --images "$SAL_IMAGES" --out "$RUN/deepusps" \
  --backbone "$BACKBONE" --weights "$WEIGHTS" --device "$DEVICE" "${saliency_flags[@]}" --resume
stage basnet "$RUN/basnet" saliency python basnet_train.py --images "$SAL_IMAGES" --masks "$RUN/deepusps/labels" \
  --out "$RUN/basnet" --device "$DEVICE" "${basnet_flags[@]}" --resume

if [[ $mode == own ]]; then
  # 3. pseudo-masks of your images, 4. MaskSplit training on them, 5. one-shot evaluation on EVAL's class folders
  stage pseudomasks_own "$RUN/pseudomasks/own" basnet python make_pseudomasks.py --checkpoint "$RUN/basnet/last.pt" \
    --images "$IMAGES" "${own_list[@]}" --out "$RUN/pseudomasks/own" --device "$DEVICE" "${pseudo_flags[@]}"
  stage fss_own "$RUN/fss_own" pseudomasks_own python train_fss.py --images "$IMAGES" --masks "$RUN/pseudomasks/own" \
    "${own_list[@]}" --backbone "$BACKBONE" --weights "$WEIGHTS" --device "$DEVICE" --out "$RUN/fss_own" \
    "${fss_flags[@]}" --resume
  if [[ -n ${EVAL:-} ]]; then
    # the Saliency* baseline's predictions: the pseudo-masks of every class folder's images
    stage pseudomasks_eval "$RUN/pseudomasks/eval" basnet python make_pseudomasks.py \
      --checkpoint "$RUN/basnet/last.pt" --images "$EVAL" --class-folders --out "$RUN/pseudomasks/eval" \
      --device "$DEVICE" "${pseudo_flags[@]}"
    stage eval_own "$RUN/results_own.json" fss_own python evaluate.py fss --checkpoint "$RUN/fss_own/last.pt" \
      --dataset folders --root "$EVAL" --device "$DEVICE" --out "$RUN/results_own.json" "${eval_flags[@]}"
    stage eval_own_saliency "$RUN/results_own_saliency.json" pseudomasks_eval python evaluate.py fss \
      --baseline saliency --masks "$RUN/pseudomasks/eval" --dataset folders --root "$EVAL" \
      --out "$RUN/results_own_saliency.json" "${eval_flags[@]}"
    stage eval_own_foreground "$RUN/results_own_foreground.json" "" python evaluate.py fss --baseline foreground \
      --dataset folders --root "$EVAL" --out "$RUN/results_own_foreground.json" "${eval_flags[@]}"
  fi
  size=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['image_size'])" "$RUN/fss_own/args.json")
  echo "Trained: $RUN/fss_own/last.pt. Segment any images from one support image and its mask:"
  echo "  python evaluate.py predict --checkpoint $RUN/fss_own/last.pt --image-size $size \\"
  echo "    --support SUPPORT.jpg SUPPORT_MASK.png --query QUERY_FOLDER --out $RUN/predictions"
fi

# 3. pseudo-masks over every PASCAL image (train images for stage 4; val images for the Saliency* baseline)
if [[ $mode != own ]]; then
  stage pseudomasks_voc "$RUN/pseudomasks/voc" basnet python make_pseudomasks.py --checkpoint "$RUN/basnet/last.pt" \
    --images "$VOC/JPEGImages" --out "$RUN/pseudomasks/voc" --device "$DEVICE" "${pseudo_flags[@]}"

  # 4. MaskSplit training on the PASCAL training images (all folds: Table 1 / Table 3 "Ours"), 5. one-shot evaluation
  stage fss_voc "$RUN/fss_voc" pseudomasks_voc python train_fss.py --images "$VOC/JPEGImages" \
    --masks "$RUN/pseudomasks/voc" --voc-root "$VOC" "${voc_list[@]}" --backbone "$BACKBONE" --weights "$WEIGHTS" \
    --device "$DEVICE" --out "$RUN/fss_voc" "${fss_flags[@]}" --resume
  stage eval_voc "$RUN/results_voc.json" fss_voc python evaluate.py fss --checkpoint "$RUN/fss_voc/last.pt" \
    --dataset pascal --voc-root "$VOC" --fold all --device "$DEVICE" --out "$RUN/results_voc.json" "${eval_flags[@]}"
  stage eval_voc_saliency "$RUN/results_voc_saliency.json" pseudomasks_voc python evaluate.py fss --baseline saliency \
    --masks "$RUN/pseudomasks/voc" --dataset pascal --voc-root "$VOC" --fold all \
    --out "$RUN/results_voc_saliency.json" "${eval_flags[@]}"
  stage eval_voc_foreground "$RUN/results_voc_foreground.json" "$data_stage" python evaluate.py fss \
    --baseline foreground --dataset pascal --voc-root "$VOC" --fold all --out "$RUN/results_voc_foreground.json" \
    "${eval_flags[@]}"
fi

if [[ $mode != demo && -n ${COCO:-} ]]; then
  COCO_TRAIN=${COCO_TRAIN:-train2014}
  COCO_VAL=${COCO_VAL:-val2014}
  stage pseudomasks_coco "$RUN/pseudomasks/coco_train" basnet python make_pseudomasks.py \
    --checkpoint "$RUN/basnet/last.pt" --images "$COCO/$COCO_TRAIN" --out "$RUN/pseudomasks/coco_train" \
    --device "$DEVICE" "${pseudo_flags[@]}"
  stage pseudomasks_coco_val "$RUN/pseudomasks/coco_val" basnet python make_pseudomasks.py \
    --checkpoint "$RUN/basnet/last.pt" --images "$COCO/$COCO_VAL" --out "$RUN/pseudomasks/coco_val" \
    --device "$DEVICE" "${pseudo_flags[@]}"
  # Table 4: 20 epochs on COCO (section 4); FSS_FLAGS come after, so they override this too
  stage fss_coco "$RUN/fss_coco" pseudomasks_coco python train_fss.py --images "$COCO/$COCO_TRAIN" \
    --masks "$RUN/pseudomasks/coco_train" --epochs 20 --backbone "$BACKBONE" --weights "$WEIGHTS" --device "$DEVICE" \
    --out "$RUN/fss_coco" "${fss_flags[@]}" --resume
  stage eval_coco "$RUN/results_coco.json" fss_coco python evaluate.py fss --checkpoint "$RUN/fss_coco/last.pt" \
    --dataset coco --coco-root "$COCO" --image-set "$COCO_VAL" --fold all --device "$DEVICE" \
    --out "$RUN/results_coco.json" "${eval_flags[@]}"
  stage eval_coco_saliency "$RUN/results_coco_saliency.json" pseudomasks_coco_val python evaluate.py fss \
    --baseline saliency --masks "$RUN/pseudomasks/coco_val" --dataset coco --coco-root "$COCO" \
    --image-set "$COCO_VAL" --fold all --out "$RUN/results_coco_saliency.json" "${eval_flags[@]}"
fi

python - "$RUN" "$mode" <<'PY'
import json, os, sys
run, mode = sys.argv[1:]
tables = [("PASCAL-5i", [("MaskSplit (ours)", "results_voc.json"), ("Saliency* baseline", "results_voc_saliency.json"),
                         ("all-foreground", "results_voc_foreground.json")]),
          ("COCO-20i", [("MaskSplit (ours)", "results_coco.json"),
                        ("Saliency* baseline", "results_coco_saliency.json")]),
          ("Class folders (EVAL)", [("MaskSplit (ours)", "results_own.json"),
                                    ("Saliency* baseline", "results_own_saliency.json"),
                                    ("all-foreground", "results_own_foreground.json")])]
for dataset, rows in tables:
    if not os.path.isfile(f"{run}/{rows[0][1]}"):
        continue
    print(f"\n{dataset} one-shot mIoU (%), mean over {'classes' if 'EVAL' in dataset else 'folds'} ({run}); "
          f"mIoU-episode is the metric of the paper's numbers (the authors' code), mIoU-summed the HSNet / PFENet "
          f"standard:")
    print(f"  {'':20s} {'mIoU-episode':>12s} {'mIoU-summed':>12s}")
    results = [json.load(open(f"{run}/{file}")) for _, file in rows if os.path.isfile(f"{run}/{file}")]
    for (name, _), r in zip(rows, results):
        print(f"  {name:20s} {100 * r['mean']['miou_episode_mean']:12.1f} {100 * r['mean']['miou']:12.1f}")
    if "EVAL" in dataset:  # per class: each row's two mIoU
        print(f"  per class (mIoU-episode / mIoU-summed): {' | '.join(name for name, _ in rows[:len(results)])}")
        for c, name in results[0]["fold0"]["class_names"].items():
            cells = [f"{100 * r['fold0']['per_class_episode_mean'].get(c, float('nan')):.1f} / "
                     f"{100 * r['fold0']['per_class'][c]:.1f}" for r in results]
            print(f"  {name:20s} {' | '.join(cells)}")
if mode == "demo":
    print("The demo checks that every stage runs on synthetic shapes; the method's result on real images is the CPU "
          "recipe in README.md, Measured.")
PY
