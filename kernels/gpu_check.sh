#!/usr/bin/env bash
# One prepared call for a lent GPU (device tool): build the CUDA extension, run the kernel tests on the GPU,
# run the benchmark, print a short table last. Everything also lands in $OUT (default /tmp/us_jepa_gpu).
#   run: bash kernels/gpu_check.sh        (timeout ~500 s leaves room for a rerun in a 15-minute lease)
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
timeout 240 python -m pytest -q -x tests/test_kernels.py > "$OUT/tests.log" 2>&1; echo "tests rc=$?"; tail -3 "$OUT/tests.log"
timeout 300 python kernels/bench.py > "$OUT/bench.txt" 2>&1; echo "bench rc=$?"
cat "$OUT/bench.txt"
