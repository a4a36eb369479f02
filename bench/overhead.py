"""Per-step overhead of xform against a hand-written PyTorch loop doing the same math.

Tiny MLP (3 layers of 32), batch 8, AdamW (foreach), one thread. Each variant runs
side by side with its hand-written twin, interleaved in rounds; the medians of the
per-round times give the ratio. The twin computes what the xform step returns: the
update and the batch's loss (averaged over micro-batches). Also: ``import xform`` time
minus ``import torch``.

Run: ``.venv/bin/python bench/overhead.py`` (``--rounds 30 --steps 200``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import xform as xf

WIDTH, BATCH = 32, 8


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(),
        torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(),
        torch.nn.Linear(WIDTH, WIDTH),
    )


def hand_loop(micro: int, dtype: torch.dtype | None):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)

    def run(batch):
        x, y = batch
        opt.zero_grad(set_to_none=True)
        total = None
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            if dtype is None:
                out = model(xs)
            else:
                with torch.autocast("cpu", dtype=dtype):
                    out = model(xs)
            loss = F.mse_loss(out.float(), ys)
            (loss / micro).backward()
            total = loss.detach() if total is None else total + loss.detach()
        opt.step()
        return total / micro if micro > 1 else total  # the loss a training loop logs, as xform's metrics

    return run


def xform_loop(micro: int, policy: str):
    def step(state, batch):
        x, y = batch

        def loss_fn(params):
            return F.mse_loss(xf.apply(state, params, x), y)

        loss, grads = xf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    step = xf.accumulate(xf.mixed_precision(step, policy), micro)
    init = getattr(step, "init", lambda state: state)  # a step no transform changed has none
    box = [init(xf.TrainState.create(mlp(), optimizer=torch.optim.AdamW, lr=1e-3))]

    def run(batch):
        box[0], _ = step(box[0], batch)

    return run


def time_steps(run, batch, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        run(batch)
    return (time.perf_counter() - start) / steps


def import_time(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--imports", type=int, default=5, help="runs of each import timing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch = (torch.randn(BATCH, WIDTH), torch.randn(BATCH, WIDTH))
    variants = [
        ("step", 1, "fp32", None),
        ("mixed_precision(bf16)", 1, "bf16", torch.bfloat16),
        ("accumulate(2)", 2, "fp32", None),
        ("accumulate(mixed_precision(bf16), 2)", 2, "bf16", torch.bfloat16),
    ]
    print(f"MLP 3x{WIDTH}, batch {BATCH}, AdamW foreach, 1 thread; {args.rounds} rounds x {args.steps} steps, medians")
    print(f"{'variant':40s} {'hand (us)':>10s} {'xform (us)':>11s} {'ratio':>7s}")
    for name, micro, policy, dtype in variants:
        hand, ours = hand_loop(micro, dtype), xform_loop(micro, policy)
        for run in (hand, ours):  # warm up
            time_steps(run, batch, 50)
        h, x = [], []
        for _ in range(args.rounds):
            h.append(time_steps(hand, batch, args.steps))
            x.append(time_steps(ours, batch, args.steps))
        mh, mx = statistics.median(h), statistics.median(x)
        print(f"{name:40s} {mh * 1e6:10.1f} {mx * 1e6:11.1f} {mx / mh:7.3f}")
    t_torch = statistics.median(import_time("torch") for _ in range(args.imports))
    t_xform = statistics.median(import_time("xform") for _ in range(args.imports))
    print(f"import torch {t_torch:.3f} s; import xform {t_xform:.3f} s; xform adds {t_xform - t_torch:+.3f} s")


if __name__ == "__main__":
    main()
