#!/usr/bin/env bash
# On a CUDA machine, in at most 10 minutes (each step has its own time limit and the steps go on
# after a failure):
#   1. the kernel tests compiled on the GPU (no interpreter), with the SASS checks of every
#      launched variant (tests/test_kernels_sass.py, which needs no GPU but runs here too);
#   2. perf/sweep_gpu_copy.py: pack / unpack GB/s against a device-to-device copy_ of the same
#      bytes per layout, slot pattern and SM budget (8/16/32/all), the slowdown of a matmul beside
#      a copy per budget, arena <-> pinned host against the PCIe rate (CSV, PNG);
#   3. the CUDA IPC arena and multi-GPU tests;
#   4. the CPU-oriented kernel sweep on the GPU (quick preset).
# Logs and results go to perf/results/<gpu-name>/. Exits non-zero if a step fails.
#   bash perf/gpu_check.sh            (PYTHON=... to use another interpreter than .venv's)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

gpu=$("$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: torch sees no CUDA device (a CPU build of torch?)")
sys.path.insert(0, "perf")
from common import device_name
print(device_name("cuda"))
EOF
) || exit 2
out="perf/results/$gpu"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    > "$out/versions.txt" 2>&1

status=0
step() {  # step SECONDS LOG COMMAND...: run with a time limit (SIGINT first: results so far are kept)
    local limit=$1 log=$2
    shift 2
    timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "gpu_check: step stopped after ${limit}s: $*" | tee -a "$log"
    [ "$rc" -eq 0 ] || status=1
}
unset TRITON_INTERPRET
export GPUKV_REQUIRE_CUDA_TOOLCHAIN=1
echo "== kernel tests, compiled on $gpu"
GPUKV_TRITON_COMPILED=1 step 210 "$out/tests.log" "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_kernels_triton.py tests/test_kernels_plan.py tests/test_kernels_sass.py \
    tests/test_copy_torch.py tests/test_copy.py tests/test_copy_layers.py tests/test_copy_vllm_cpu.py \
    tests/test_layout.py tests/test_l1.py
echo "== copy kernel vs copy_, matmul beside it, PCIe on $gpu"
step 240 "$out/sweep_gpu_copy.log" "$PY" perf/sweep_gpu_copy.py --out "$out"
echo "== CUDA IPC arena and multi-GPU tests on $gpu"
GPUKV_TRITON_COMPILED=1 step 90 "$out/tests_ipc.log" "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_frontend_cuda.py
echo "== kernel sweep (quick preset) on $gpu"
step 60 "$out/sweep_kernels_quick.log" "$PY" perf/sweep_kernels.py --preset quick --device cuda
echo "gpu_check: $([ $status -eq 0 ] && echo passed || echo FAILED); logs and results in $out"
exit $status
