#!/usr/bin/env bash
# The one job for a lent GPU machine (about 15 minutes of device time in all): the paper-size network
# (22 M parameters, 1 mm, 128^3 patches) trained from scratch on the 29 real cases, one model per
# cross-validation fold plus the final one, judged afterwards here by the same CV as every recipe.
#
# Only the checkout travels (64 MiB with what is carried), so the cases go as a compact pack: the tumour
# box + 16 mm, 8-bit, 1.4 MiB a case measured on 3 cases (41 MiB for 29; at 24 mm it was 1.9 MiB, too
# much beside the checkout). Made here:
#   brainunet cv-pack --data ../shared/data/train --output .cache/pack-1mm --margin-mm 16 \
#       --config BrainUNetSegmentation/brainunet_lab/configs/paper-gpu-real.json
# Device tool: run(command="bash BrainUNetSegmentation/brainunet_lab/scripts/gpu-paper-cv.sh",
#                  carry=[".cache/pack-1mm"], timeout_s=600)
# Back here: copy <files_at>/paper-cv to runs/paper-cv, then score the fold models (no retraining):
#   brainunet cv --data ../shared/data/train --output runs/paper-cv --resume --scratch --final \
#       --config BrainUNetSegmentation/brainunet_lab/configs/paper-gpu-real.json --steps $STEPS
# The GPU image has torch but not torchio (and SimpleITK, its dependency, is too large to carry),
# so this recipe turns real_augmentation off; flips, intensity jitter and modality dropout remain.
# Tested on the CPU by Testing/test_training.py (STEPS=2 DEVICE=cpu with a tiny pack and network).
set -euo pipefail
STEPS=${STEPS:-500}
MINUTES=${MINUTES:-8.5}
PACK=${PACK:-.cache/pack-1mm}
CONFIG=${CONFIG:-BrainUNetSegmentation/brainunet_lab/configs/paper-gpu-real.json}
OUT_DIR=${OUT:-runs}/paper-cv
export PYTHONPATH="$PWD/BrainUNetSegmentation${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"${PYTHON:-python3}" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
"${PYTHON:-python3}" -m brainunet_lab cv --pack "$PACK" --train-only --final --scratch ${MODEL:+--model "$MODEL"} \
    --config "$CONFIG" --steps "$STEPS" --device "${DEVICE:-cuda}" --output "$OUT_DIR" \
    --time-limit "$MINUTES" --progress none
# what scoring needs comes back (fp16 weights, history); the optimizer checkpoints are too large
find "$OUT_DIR" -name checkpoint.pt -delete
ls -R "$OUT_DIR" | head -40
