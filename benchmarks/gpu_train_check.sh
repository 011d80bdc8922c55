#!/usr/bin/env bash
# EVA-02-L teacher training check on one GPU (issue 5), under 8 minutes: recipe lvis_eva02_L_teacher
# (random init, uniform smoothing), 1024 px LSJ on synth images upscaled from 256 px, bf16, batch 2,
# 50 iterations through the real engine (data loader workers, AMP, clipping, final checkpoint).
# Prints images/s, peak GPU memory and the share of step time spent waiting for data (goal < 5%).
#   bash benchmarks/gpu_train_check.sh            # on the GPU machine
#   bash benchmarks/gpu_train_check.sh --smoke    # the same python on the CPU, tiny EVA, seconds
# Needs pycocotools on the GPU machine (not in its image: carry a cp312 manylinux wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec timeout 470 python benchmarks/bench_train.py gpu-check "$@"
