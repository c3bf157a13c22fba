#!/usr/bin/env bash
# Every test of the project: the Rust tests (`cargo test`), then the Python tests of tools/.
# Needs only the Rust toolchain and python3. The Python packages (tools/requirements.txt) go into
# a virtual environment, .venv, made on the first run; it sees packages already installed for
# python3, so a machine that has them installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
need="import torch, onnx, onnxruntime, diffusers, numpy, PIL, pytest"
if ! { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$need" 2>/dev/null; }; then
  if ! [ -x "$venv/bin/python" ]; then
    python3 -m venv --system-site-packages "$venv" || {
      echo "tools/test.sh: python3 -m venv failed; on Debian or Ubuntu: apt-get install python3-venv" >&2
      exit 1
    }
  fi
  if ! "$venv/bin/python" -c "$need" 2>/dev/null; then
    echo "tools/test.sh: installing tools/requirements.txt into $venv (once)" >&2
    "$venv/bin/python" -m pip install -q -r tools/requirements.txt
  fi
fi

# Two statements, not `&&`: under `set -e` a failing left side of `&&` would not stop the script.
cargo test
"$venv/bin/python" -m pytest -q tools
