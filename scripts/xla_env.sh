#!/usr/bin/env bash
# Creates .venv-xla (torch 2.9 + torch_xla 2.9 + this package) if it is missing; reused when present.
# torch_xla 2.9 imports only with torch 2.9, so it cannot share .venv (torch 2.13). About 7 GB;
# 1.5-2.5 min to create on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv-xla/bin/python -c "import torch_xla, xform" 2>/dev/null; then
    python3 -m venv .venv-xla
    .venv-xla/bin/pip install -q -c constraints-xla.txt torch torch_xla -e . "pytest>=8" numpy
fi
