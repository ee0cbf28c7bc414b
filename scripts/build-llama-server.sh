#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` from the llama.cpp sources shipped in the llama-cpp-python sdist (the
# version pinned in pyproject.toml), for the remote-loader tests and benchmarks, and caches it under
# ~/.cache/loradeck/llama-server-VERSION/ (bin/llama-server plus the shared libraries beside it).
# Rebuilds only when that binary is missing. Prints the binary's path on the last line of stdout.
# `--check` builds nothing: exit status 1 when the binary is missing.
# The build takes about 10 minutes on 2 idle cores; LLAMA_SERVER_JOBS sets the parallelism (default 2).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="$(grep -oE '"llama-cpp-python==[^"]+"' "$ROOT/pyproject.toml" | head -1 | sed -E 's/.*==([^"]+)"/\1/')"
CACHE="${LORADECK_CACHE:-$HOME/.cache/loradeck}/llama-server-$VERSION"
BIN="$CACHE/bin/llama-server"
if [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi
# --check: only say whether it is built (the benchmarks skip their llama-server rows rather than build)
if [ "${1:-}" = "--check" ]; then
  echo "llama-server is not built: bash scripts/build-llama-server.sh builds it" >&2
  exit 1
fi
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
WORK="$CACHE.build"
rm -rf "$WORK"
mkdir -p "$WORK"
echo "[llama-server] downloading the llama-cpp-python $VERSION sdist" >&2
"$PY" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$WORK" >&2
tar -xzf "$WORK"/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
echo "[llama-server] building (about 10 minutes on 2 cores)" >&2
# Curl is off: the server needs no downloads, and the build then needs no libcurl headers.
nice cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
nice cmake --build "$WORK/build" --target llama-server -j"${LLAMA_SERVER_JOBS:-2}" >&2
# The binary links libllama/libggml* shared libraries from build/bin: keep them together.
mkdir -p "$CACHE/bin.tmp"
cp -a "$WORK/build/bin/." "$CACHE/bin.tmp/"
find "$WORK/build" -name '*.so*' -exec cp -a {} "$CACHE/bin.tmp/" \;
rm -rf "$CACHE/bin"
mv "$CACHE/bin.tmp" "$CACHE/bin"
rm -rf "$WORK"
echo "$BIN"
