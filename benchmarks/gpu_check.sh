#!/usr/bin/env bash
# EVA-02-L Cascade Mask R-CNN training check on one GPU (issue 4): 1024^2, bf16, batch 2,
# 20 iterations on random LVIS-like data (1203 classes). Prints images/s, peak GPU memory per image
# (goal <= 24.9 GB, detectron2's ViTDet-L Cascade on LVIS) and a NaN check; exit 1 on NaN.
# Extra arguments override the defaults, e.g. a CPU smoke run of the python part:
#   bash benchmarks/gpu_check.sh --device cpu --size 256 --iters 1 --backbone eva02_tiny
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec timeout 470 python benchmarks/bench_model.py train-check \
  --device cuda --size 1024 --iters 20 --backbone eva02_large --batch 2 --dtype bf16 "$@"
