#!/usr/bin/env bash
# One prepared call for a lent GPU (device tool): build the CUDA extension, run the kernel tests on the GPU,
# run the benchmark, print a short table last. Everything also lands in $OUT (default /tmp/us_jepa_gpu).
#   run: bash .ci/gpu_check.sh        (~560 s at most: one call, then give_back)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/us_jepa_gpu}; mkdir -p "$OUT"
export TORCH_EXTENSIONS_DIR="$OUT/ext" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
start=$(date +%s)
python -c "import kernels.ext as e; r = e.load(verbose=True); print('BUILD', r or ('ok, cuda' if e.has_cuda() else 'ok, cpu only'))" > "$OUT/build.log" 2>&1
grep BUILD "$OUT/build.log" || tail -20 "$OUT/build.log"
echo "build: $(( $(date +%s) - start )) s"
timeout 120 python -m pytest -q -x tests/test_kernels.py > "$OUT/tests.log" 2>&1; echo "tests rc=$?"; tail -3 "$OUT/tests.log"
timeout 240 python bench.py kernels --quick > "$OUT/bench.txt" 2>&1; echo "bench rc=$?"
cat "$OUT/bench.txt"
# Issue 5: a short real pretrain at the paper's size (trains a 15-step teacher first), bf16 + compile + loader
# workers; its log lines give images/s and MFU, its last line peak GPU memory.
repo=$(pwd)
(cd "$OUT" && timeout 170 python "$repo/us_jepa.py" pretrain --preset paper --epochs 0 --steps 30 --log_every 10 \
  --eval_every 1000 --holdout 0 --n_images 4096 --workers 12 --compile --out runs/paper > paper.log 2>&1)
echo "paper pretrain rc=$?"; grep -E "step (10|20|30)/|done:" "$OUT/paper.log" | tail -6
