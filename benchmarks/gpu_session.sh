#!/usr/bin/env bash
# The pretraining figures that need a GPU, as one time-boxed script for a session with a device
# (device README: one prepared run, 15 minutes of device time in all). Writes everything under
# ${OUT:-benchmarks/results/gpu}; each step has its own timeout so one slow step cannot eat the rest.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh            # ~9 minutes on one H100/H200
#
# 1. training step throughput + peak memory of the official ViT-S/14 (b64) and ViT-L/14 (b32)
#    recipes: eager, compiled, and compiled with the packed crop pass (issue: >= 1.5x the official
#    trainer's compiled throughput, ViT-L/14 >= 210 img/s on an H200);
# 2. CIFAR-10 pretraining for a fixed wall-clock share (the `cifar10` preset, epochs cut to fit),
#    kNN top-1 on the test split (issue goal: >= 90% within 10 minutes).
#
# DEVICE / PRESETS / ITERS override the throughput step (a CPU smoke run of this script:
#   DEVICE=cpu PRESETS=cpu-smoke:4 ITERS=1 CIFAR_OVERRIDES="model.arch=vit_tiny_patch4 model.depth=1 \
#   train.epochs=1 train.iters_per_epoch=2 train.batch_size_per_gpu=32 train.num_workers=0 optim.warmup_epochs=0 \
#   loss.warmup_teacher_temp_epochs=0 optim.freeze_last_layer_epochs=0" bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"

timeout 300 python benchmarks/train_throughput.py --device "$DEVICE" --presets "${PRESETS:-vits14:64,vitl14:32}" \
    --modes eager,compile,compile+packed --iters "${ITERS:-10}" --warmup 3 --json "$OUT/train_throughput-$DEVICE.json" \
    2>&1 | tee "$OUT/train_throughput.log"

# CIFAR-10: the device sees only the repository, so copy the archives first and carry the folder:
#   mkdir -p .cache/cifar10 && cp ../shared/data/cifar10/*.tar.gz .cache/cifar10/   (carry: .cache/cifar10)
# Epochs: set CIFAR_OVERRIDES to fit ~4 minutes of training at the speed step 1 measured (warm-ups
# must not exceed train.epochs: the config check refuses such a run before it starts).
[ -d .cache/cifar10 ] && export DINOLAB_CIFAR10=${DINOLAB_CIFAR10:-.cache/cifar10}
timeout 330 python benchmarks/pretrain_cifar10.py --profile gpu --out "$OUT/pretrain_cifar10-gpu" \
    --json "$OUT/pretrain_cifar10-gpu.json" \
    ${CIFAR_OVERRIDES:-train.epochs=20 optim.warmup_epochs=2 loss.warmup_teacher_temp_epochs=4 \
      train.eval_every=0 train.checkpoint_every=0} \
    2>&1 | tail -n 40 | tee "$OUT/pretrain_cifar10.log"
