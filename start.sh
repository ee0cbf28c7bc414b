#!/usr/bin/env bash
# Set up .venv/ (first run: installs everything from PyPI, several minutes) and start LoRA Deck.
# All arguments go to app.py, e.g. ./start.sh --model my-model --port 7861
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup-env.sh
export GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-$(nproc)}"
exec .venv/bin/python app.py "$@"
