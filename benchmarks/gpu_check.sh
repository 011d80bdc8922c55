#!/usr/bin/env bash
# EVA-02-L Cascade Mask R-CNN check on one GPU (issues 4 and 14), under 8 minutes in all:
#  1. training: 1024^2, bf16, batch 2, 20 iterations on random LVIS-like data (1203 classes)
#     (benchmarks/bench_model.py train-check);
#  2. inference: 20 images of mixed aspect ratios through slsd's Predictor (square canvas, bf16,
#     up to 300 detections per image, paste + RLE) (benchmarks/bench_inference.py infer-check).
# Each prints images/s, peak GPU memory per image (goal <= 24.9 GB, detectron2's ViTDet-L Cascade on
# LVIS) and a NaN check; the script exits 1 if either found a NaN (or failed).
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --smoke    # the same python on the CPU, tiny EVA, seconds
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if [[ "${1:-}" == "--smoke" ]]; then
  train=(--device cpu --size 256 --iters 1 --backbone eva02_tiny --batch 1 --dtype fp32)
  infer=(--device cpu --size 256 --images 3 --backbone eva02_tiny --dtype fp32)
else
  train=(--device cuda --size 1024 --iters 20 --backbone eva02_large --batch 2 --dtype bf16)
  infer=(--device cuda --size 1024 --images 20 --backbone eva02_large --dtype bf16)
fi
echo "== training check"
timeout 300 python benchmarks/bench_model.py train-check "${train[@]}"
train_rc=$?
echo "== inference check"
timeout 160 python benchmarks/bench_inference.py infer-check "${infer[@]}"
infer_rc=$?
echo "== exit codes: training $train_rc, inference $infer_rc (0 = pass, 1 = NaN, 124 = timed out)"
[[ $train_rc -eq 0 && $infer_rc -eq 0 ]]
