"""Small models, batches and steps shared by the unit tests."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import xform as xf


def mlp(seed: int = 0, sizes=(4, 8, 3), dropout: float = 0.0) -> nn.Sequential:
    """A ReLU MLP built under ``torch.manual_seed(seed)``: equal seeds, equal weights."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def make_state(seed: int = 0, *, sizes=(4, 8, 3), dropout: float = 0.0, optimizer=torch.optim.AdamW, **kw):
    kw.setdefault("lr", 1e-2)
    return xf.TrainState.create(mlp(seed, sizes, dropout), optimizer=optimizer, **kw)


def batch(n: int = 8, d: int = 4, classes: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, d, generator=g), "y": torch.randint(0, classes, (n,), generator=g)}


def step(state, batch):
    """The plain classification step of the design sketch."""

    def loss_fn(params):
        return F.cross_entropy(xf.apply(state, params, batch["x"]), batch["y"])

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def token_step(state, batch):
    """A per-token loss with masked labels (-100), returned as ``xf.Mean(sum, n_tokens)``."""

    def loss_fn(params):
        logits = xf.apply(state, params, batch["x"])
        labels = batch["y"]
        total = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum")
        return xf.Mean(total, (labels != -100).sum())

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def scaled_step(state, b):
    """``step`` with the loss multiplied by ``b["mult"]``: a huge one overflows the grads, a NaN poisons them."""

    def loss_fn(p):
        return F.cross_entropy(xf.apply(state, p, b["x"]), b["y"]) * b["mult"]

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def good(seed: int = 0) -> dict[str, torch.Tensor]:
    return {**batch(seed=seed), "mult": torch.tensor(1.0)}


def init(step_fn, state):
    """``step_fn.init(state)`` when the step has one (a plain step does not)."""
    return getattr(step_fn, "init", lambda s: s)(state)


def run(step_fn, state, batches):
    losses = []
    for b in batches:
        state, metrics = step_fn(state, b)
        losses.append(metrics["loss"])
    return state, losses


def snapshot(state) -> list[tuple[str, object]]:
    """Every leaf of ``state``, tensors cloned: to check later that nothing changed."""
    return [(p, v.detach().clone() if isinstance(v, torch.Tensor) else v) for p, v in xf.tree.flatten_with_path(state)]
