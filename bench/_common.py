"""What the benchmarks here share: the quartiles printed beside every median, and the
xform step of the MLP benchmarks (MSE loss on ``(x, y)``)."""

from __future__ import annotations

import statistics

import torch.nn.functional as F

import xform as xf


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """``(q1, median, q3)`` of ``xs`` (inclusive method); one value gives it three times."""
    xs = list(xs)
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def mse_step(state, batch):
    """The plain xform step on ``batch = (x, y)``: MSE loss, one update."""
    x, y = batch

    def loss_fn(params):
        return F.mse_loss(xf.apply(state, params, x), y)

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}
