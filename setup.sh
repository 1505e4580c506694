#!/usr/bin/env bash
# One-step set-up of the DepthG Workbench on Linux (x86-64, Python 3.11), with or without a GPU.
#   ./setup.sh            creates .venv/ and installs the pinned environment (requirements.txt),
#                         the optional extras (dense CRF, faiss) and the workbench itself (editable).
# Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")"

# open3d needs Debian's libusb; install it when we can (root or passwordless sudo).
if ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then
  if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; elif sudo -n true 2>/dev/null; then apt_get="sudo apt-get"; else apt_get=""; fi
  if [ -n "$apt_get" ]; then
    $apt_get update -q >/dev/null && $apt_get install -y -q libusb-1.0-0 >/dev/null
  else
    echo "setup.sh: please install the system package libusb-1.0-0 (open3d needs it), then re-run." >&2
    exit 1
  fi
fi

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), f"Python >= 3.11 is needed, found {sys.version}"'

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch/torchvision are pinned in the same file as everything else, so nothing re-resolves them.
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
.venv/bin/python -c 'import depthg, torch; print(f"depthg {depthg.__version__} ready (torch {torch.__version__}, cuda={torch.cuda.is_available()})")'
