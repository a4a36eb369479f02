"""Strategies, models and steps shared by the property tests."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

import xform as xf


@st.composite
def mlp_configs(draw, *, min_width: int = 1, max_width: int = 12, activation: str = "relu"):
    """A small MLP: input width, hidden widths, number of classes, activation, init seed."""
    return {
        "sizes": (
            draw(st.integers(1, 6)),
            *draw(st.lists(st.integers(min_width, max_width), min_size=1, max_size=2)),
            draw(st.integers(2, 4)),
        ),
        "activation": activation,
        "seed": draw(st.integers(0, 2**16)),
    }


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def mlp(sizes, seed, dropout: float = 0.0, activation: str = "relu") -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(_ACTIVATIONS[activation]())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def state_factory(config, *, dropout: float = 0.0, optimizer=torch.optim.AdamW, **kwargs):
    """A zero-argument ``make_state`` for ``xform.testing``: a new module each call."""
    kwargs = {"lr": 1e-3, **kwargs}

    def make_state() -> xf.TrainState:
        model = mlp(config["sizes"], config["seed"], dropout, config.get("activation", "relu"))
        return xf.TrainState.create(model, optimizer=optimizer, **kwargs)

    return make_state


def classification_batch(config, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, classes = config["sizes"][0], config["sizes"][-1]
    return {"x": torch.randn(n, d, generator=g), "y": torch.randint(0, classes, (n,), generator=g)}


def step(state, batch):
    """The plain single-process classification step: the definition everything is checked against."""

    def loss_fn(params):
        return F.cross_entropy(xf.apply(state, params, batch["x"]), batch["y"])

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def token_step(state, batch):
    """A per-token loss: masked labels are -100; the loss is ``xf.Mean(sum, n_tokens)``."""

    def loss_fn(params):
        logits = xf.apply(state, params, batch["x"])
        labels = batch["y"]
        total = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum")
        return xf.Mean(total, (labels != -100).sum())

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def token_mean_step(state, batch):
    """The same loss as a per-micro-batch mean: wrong under accumulate for uneven counts."""

    def loss_fn(params):
        logits = xf.apply(state, params, batch["x"])
        return F.cross_entropy(logits.flatten(0, -2), batch["y"].flatten(), ignore_index=-100)

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def token_batch(config, valid: list[int], seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Rows of ``seq`` tokens of which the first ``valid[i]`` carry a label."""
    g = torch.Generator().manual_seed(seed)
    d, classes = config["sizes"][0], config["sizes"][-1]
    y = torch.randint(0, classes, (len(valid), seq), generator=g)
    for row, n in enumerate(valid):
        y[row, n:] = -100
    return {"x": torch.randn(len(valid), seq, d, generator=g), "y": y}


def init(step_fn, state):
    return getattr(step_fn, "init", lambda s: s)(state)
