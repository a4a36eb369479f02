"""A small classifier trained with xform: mixed precision, accumulation, save and resume.

The data is generated (Gaussian clusters), nothing is downloaded. Run it twice with the
same --ckpt-dir and the second run resumes where the first stopped, with exactly the
batches and dropout masks an uninterrupted run would have used:

    .venv/bin/python examples/classifier.py --steps 40 --ckpt-dir runs/clf
    .venv/bin/python examples/classifier.py --steps 80 --ckpt-dir runs/clf
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import xform as xf


def make_dataset(n: int = 2048, dim: int = 16, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + 1.5 * torch.randn(n, dim, generator=g)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


class MLP(torch.nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 64, classes: int = 4):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Dropout(0.1),
            torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Dropout(0.1),
            torch.nn.Linear(hidden, classes),
        )

    def forward(self, x):
        return self.net(x)


def step(state: xf.TrainState, batch):
    def loss_fn(params):
        logits = xf.apply(state, params, batch["x"])
        return F.cross_entropy(logits, batch["y"]), logits

    (loss, logits), grads = xf.value_and_grad(loss_fn, has_aux=True)(state.params)
    accuracy = (logits.argmax(-1) == batch["y"]).float().mean()
    return state.apply_gradients(grads), {"loss": loss, "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="train until this many updates")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--ckpt-dir", default="runs/classifier")
    parser.add_argument("--save-every", type=int, default=20)
    args = parser.parse_args()

    train_step = xf.accumulate(xf.mixed_precision(step, args.precision), args.accumulate)
    init = getattr(train_step, "init", lambda s: s)
    state = init(xf.TrainState.create(MLP(), optimizer=torch.optim.AdamW, lr=3e-3, seed=0))
    manager = xf.CheckpointManager(args.ckpt_dir, keep=2)
    restored = manager.restore(like=state)
    if restored is not None:
        state = restored
        print(f"resumed from {manager.latest()} at step {state.step}")
    loader = xf.DataLoader(make_dataset(), batch_size=args.batch_size, shuffle=True)
    state = loader.attach(state)  # a resume with another global batch size is refused

    while state.step < args.steps:
        for batch in loader.iterate(state):
            state, metrics = train_step(state, batch)
            if state.step % 10 == 0:
                epoch, _ = loader.position(state)
                print(f"step {state.step:4d}  epoch {epoch}  loss {float(metrics['loss']):.4f}  "
                      f"accuracy {float(metrics['accuracy']):.3f}")
            if state.step % args.save_every == 0:
                manager.save(state)
            if state.step >= args.steps:
                break
    manager.save(state)
    print(f"done: step {state.step}, checkpoint {manager.latest()}")


if __name__ == "__main__":
    main()
