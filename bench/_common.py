"""What the benchmarks here share: the quartiles printed beside every median, and the
xform step of the MLP benchmarks (MSE loss on ``(x, y)``)."""

from __future__ import annotations

import os
import platform
import statistics
import sys

import torch.nn.functional as F

import xform as xf
from xform.cli._launch import STEADY_MALLOC


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """``(q1, median, q3)`` of ``xs`` (inclusive method); one value gives it three times."""
    xs = list(xs)
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def steady_malloc(choice: str) -> str:
    """With ``choice == "steady"``, re-executes this script with glibc's heap trimming off
    (``STEADY_MALLOC``, what ``xform launch`` sets on CPU hosts) unless GLIBC_TUNABLES is set;
    returns the line that says which allocator settings the run has.

    Why: runners interleaved in one process share one heap; by default glibc unmaps freed
    pages, and which runner faults them in again depends on the heap's history, not on the
    runner (measured on bench/compile.py's GPT: the hand loop at 600 or 4,800 faults per
    step depending on what ran before it)."""
    own = os.environ.get("GLIBC_TUNABLES")
    if choice == "steady" and own is None and platform.libc_ver()[0] == "glibc":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": STEADY_MALLOC})
    if own is not None:
        return f"malloc: GLIBC_TUNABLES={own}"
    return "malloc: glibc defaults (heap trimming on: page faults depend on the heap's history)"


def mse_step(state, batch):
    """The plain xform step on ``batch = (x, y)``: MSE loss, one update."""
    x, y = batch

    def loss_fn(params):
        return F.mse_loss(xf.apply(state, params, x), y)

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}
