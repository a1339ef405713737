#!/usr/bin/env bash
# On a CUDA machine: the kernel tests compiled on the GPU (no interpreter), the CUDA IPC arena
# tests (the server's arena mapped by worker processes, a second GPU's arena read where present),
# the engine on CUDA pages, then the full kernel sweep. Logs and results go to
# perf/results/<gpu-name>/. Exits non-zero if a step fails.
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
unset TRITON_INTERPRET
echo "== kernel tests, compiled on $gpu"
GPUKV_TRITON_COMPILED=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py \
    tests/test_copy_torch.py tests/test_copy.py tests/test_copy_layers.py tests/test_copy_vllm_cpu.py \
    tests/test_layout.py tests/test_l1.py 2>&1 | tee "$out/tests.log" || status=1
echo "== CUDA IPC arena and multi-GPU tests on $gpu"
GPUKV_TRITON_COMPILED=1 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_frontend_cuda.py 2>&1 | tee "$out/tests_ipc.log" || status=1
echo "== full kernel sweep on $gpu"
"$PY" perf/sweep_kernels.py --preset full --device cuda 2>&1 | tee "$out/sweep_kernels_full.log" \
    || status=1
echo "gpu_check: $([ $status -eq 0 ] && echo passed || echo FAILED); logs and results in $out"
exit $status
