#!/usr/bin/env bash
# One-step set-up of the DepthG Workbench on Linux (x86-64, Python 3.11), with or without a GPU.
#   ./setup.sh            creates .venv/ and installs the pinned environment (requirements.txt),
#                         the optional extras (dense CRF, faiss) and the workbench itself (editable).
# Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")"

# Debian packages, installed when we can (root or passwordless sudo): libusb for open3d (required) and
# chromium for the JupyterLab browser check (scripts/check_jupyterlab.py; without it that check is skipped).
if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; elif sudo -n true 2>/dev/null; then apt_get="sudo apt-get"; else apt_get=""; fi
apt_updated=""
apt_install() {
  [ -n "$apt_get" ] || return 1
  [ -n "$apt_updated" ] || { $apt_get update -q >/dev/null && apt_updated=1; } || return 1
  DEBIAN_FRONTEND=noninteractive $apt_get install -y -q "$@" >/dev/null
}
if ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then
  apt_install libusb-1.0-0 || {
    echo "setup.sh: please install the system package libusb-1.0-0 (open3d needs it), then re-run." >&2
    exit 1
  }
fi
if ! command -v chromium >/dev/null 2>&1; then
  apt_install chromium || echo "setup.sh: could not install chromium; the JupyterLab browser check will be skipped." >&2
fi

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), f"Python >= 3.11 is needed, found {sys.version}"'

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch/torchvision are pinned in the same file as everything else, so nothing re-resolves them.
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
# dash (an open3d dependency) ships an unbuilt JupyterLab source extension, which makes JupyterLab show
# "Build Recommended" on every load; the workbench never uses dash in JupyterLab, so take it out of the lab
# application (nothing is built, no other extension changes).
if [ -e .venv/share/jupyter/lab/extensions/dash-jupyterlab.tgz ]; then
  .venv/bin/jupyter labextension uninstall --no-build @plotly/dash-jupyterlab >/dev/null 2>&1
fi
# JupyterLab defaults of this environment: no "get notified about Jupyter news?" pop-up in every fresh browser
# and no update check (both would reach out to the internet). A user's own settings still take precedence.
lab_settings=.venv/share/jupyter/lab/settings
if [ ! -e "$lab_settings/overrides.json" ]; then
  mkdir -p "$lab_settings"
  echo '{"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": false}}' > "$lab_settings/overrides.json"
fi
# Widgets save their state into a notebook when it is saved, so a notebook saved after running reopens with its
# sliders drawn instead of "Error displaying widget: model not found" (overrides.d: written on every run).
mkdir -p "$lab_settings/overrides.d"
echo '{"@jupyter-widgets/jupyterlab-manager:plugin": {"saveState": true}}' > "$lab_settings/overrides.d/depthg.json"
.venv/bin/python -c 'import depthg, torch; print(f"depthg {depthg.__version__} ready (torch {torch.__version__}, cuda={torch.cuda.is_available()})")'
