#!/usr/bin/env bash
# Creates .venv and installs Rebound with its dev extras. Idempotent: a no-op when
# nothing in pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# tests/test_ui_screenshot.py needs a headless browser: Debian's `chromium`. Installed (quietly,
# once) only as root with apt-get at hand; anyone else gets that test skipped, naming the package.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
    >/dev/null 2>&1 || echo "bootstrap: apt-get could not install chromium" >&2
fi
stamp="$VENV/.rebound-installed"
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# An unpinned torch with none installed pulls a multi-GB CUDA build. On a machine without an
# NVIDIA driver take the CPU 2.13.0 wheel first; a machine that already has torch>=2.13
# (a GPU user's CUDA build, say) keeps it: pip then sees the requirement satisfied.
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$VENV/bin/pip" install --quiet "torch>=2.13"
  else
    "$VENV/bin/pip" install --quiet "torch==2.13.0"
  fi
fi
"$VENV/bin/pip" install --quiet -e ".[dev]"
echo "$want" > "$stamp"
