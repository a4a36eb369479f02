"""The XLA suite: run by scripts/test in .venv-xla (torch 2.9 + torch_xla 2.9) with
PJRT_DEVICE=CPU CPU_NUM_DEVICES=4, all in one process (SPMD over 4 CPU devices)."""

import os

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("CPU_NUM_DEVICES", "4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's per-graph GSPMD deprecation notes

import torch  # noqa: E402

torch.set_num_threads(1)

from xform.backends.xla import XlaBackend  # noqa: E402

# Lay SPMD out before any CPU backward pass of the process (the tests compare with CPU
# steps; see XlaLayout._start for why the order matters).
XlaBackend().layout(__import__("xform").core.strategies.Replicate(), None)._start()
