#!/usr/bin/env bash
# Set up .venv/ (as ./start.sh does), make sure Chromium is there for the browser tests, and run the
# whole test suite. Extra arguments go to pytest, e.g. ./run-tests.sh -k engine -x
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup-env.sh
# llama.cpp's llama-server for the remote-loader tests: built once (~10 min on 2 cores), cached under ~/.cache/loradeck
bash scripts/build-llama-server.sh >/dev/null || echo "[setup] llama-server could not be built: its tests will skip"
# vLLM's CPU build for the tests against real vLLM: a venv of its own (~2-4 min, 3.5 GB), cached under ~/.cache/loradeck
bash scripts/install-vllm.sh >/dev/null || echo "[setup] vLLM's CPU build could not be installed: its tests will skip"
if [ ! -x /usr/bin/chromium ]; then
  echo "[setup] installing Debian's chromium for the browser tests"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
# No hub at test time: tests build their own models; a test that needs a hub points HF_ENDPOINT at its own server.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False
export GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-$(nproc)}"
exec .venv/bin/python -m pytest "$@"
