"""A training setup shared by test_resume_properties.py and the fresh process it starts.

Run as ``python _resume_script.py ROOT STEPS NAME...``: for each configuration NAME, loads
the checkpoint ROOT/NAME/ckpt into ``step.init(make_state(seed=LIKE_SEED))``, runs STEPS
more steps over the loader from the restored position, and writes the losses to
ROOT/NAME/losses.pt and the final state to ROOT/NAME/final.

``like`` is built with another seed (RNG key and shuffle seed) than the saved run's, so
that a load keeping ``like``'s key or shuffle seed shows in the losses and final state.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import xform as xf

from _support import mlp

DATASET_SIZE, BATCH_SIZE, K = 20, 4, 2  # 5 batches an epoch, 2 micro-batches a batch
SEED, LIKE_SEED = 1, 7  # the trained state's seed; the seed of the state loaded into


def dataset() -> torch.utils.data.Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(DATASET_SIZE, 3, generator=g)
    x[7] *= 1e6  # beyond fp16's range: the batch holding it overflows in fp16 (a skipped update)
    return torch.utils.data.TensorDataset(x, torch.randint(0, 3, (DATASET_SIZE,), generator=g))


def step(state, batch):
    x, y = batch

    def loss_fn(params):
        return F.cross_entropy(xf.apply(state, params, x), y)

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


CONFIGS = {
    "bf16": lambda: xf.accumulate(xf.mixed_precision(step, "bf16"), K),
    "fp16": lambda: xf.mixed_precision(
        xf.accumulate(step, K), "fp16", loss_scale=xf.DynamicLossScale(initial_scale=2.0**8, growth_interval=2)
    ),
}


def build(name: str):
    """``(step, make_state, loader)`` for configuration ``name``."""
    wrapped = CONFIGS[name]()

    def make_state(seed: int = SEED) -> xf.TrainState:
        model = mlp((3, 16, 3), seed=0, dropout=0.25)
        return xf.TrainState.create(
            model, optimizer=torch.optim.AdamW, lr=lambda i: 1e-2 * 0.9**i, max_grad_norm=1.0, seed=seed
        )

    return wrapped, make_state, xf.DataLoader(dataset(), batch_size=BATCH_SIZE, shuffle=True)


def continue_from(name: str, checkpoint: str, steps: int):
    wrapped, make_state, loader = build(name)
    state = xf.load(checkpoint, like=wrapped.init(make_state(seed=LIKE_SEED)))
    losses = []
    for _, batch in zip(range(steps), loader.iterate(state, epochs=None)):
        state, metrics = wrapped(state, batch)
        losses.append(metrics["loss"])
    return state, losses


if __name__ == "__main__":
    torch.set_num_threads(1)
    root, steps, *names = sys.argv[1:]
    for name in names:
        state, losses = continue_from(name, f"{root}/{name}/ckpt", int(steps))
        torch.save(torch.stack(losses), f"{root}/{name}/losses.pt")
        xf.save(state, f"{root}/{name}/final")
