"""Per-step overhead of xform against two hand-written PyTorch loops doing the same math.

Tiny MLP (3 layers of 32), batch 8, AdamW (foreach), one thread for every runner. Each
xform variant is timed beside two hand-written twins that compute what its step returns
(the update and the batch's loss, averaged over micro-batches):

- ``backward``: ``opt.zero_grad(set_to_none=True)``, ``loss.backward()``, ``opt.step()``:
  the loop most training scripts write.
- ``autograd.grad``: ``torch.autograd.grad(loss, params)``, the gradients set as
  ``p.grad``, ``opt.step()``: the same math without ``zero_grad`` and without
  accumulating into ``.grad`` (within a few percent of ``backward()`` here, faster on
  one step, slower with micro-batches, where ``backward()`` adds each micro-batch's
  gradient inside the backward pass; the table shows both). The ratio to the faster
  twin is what xform's step costs against what the same math can cost.

Both twins enter ``torch.autocast`` once per micro-batch, so under bf16 they cast each
weight once per micro-batch; xform keeps autocast's cache of the weights' casts for the
whole step and casts each weight once (the same bits: ``max|dw|`` below).

Method: all three runners of a variant start from the same weights and see the same
batch. After a warm-up of each, they run in interleaved rounds of ``--steps`` steps, the
order rotating every round, so drift in the machine's load hits all three alike. Each
round gives one time per runner and two paired ratios (xform / twin, both measured in the
same round). The table gives the medians of the per-round times and, per twin, the median
of the paired ratios with their quartiles ``[q1, q3]`` (half the rounds fall inside):
read the spread before the median. ``max|dw|`` is the largest difference between a
twin's weights and xform's after the same steps (0 or rounding: the same math). Also:
``import xform`` time minus ``import torch`` (medians over fresh interpreters).

Run: ``.venv/bin/python bench/overhead.py`` (``--rounds 30 --steps 200``; ``--quick``:
3 short rounds, to check that the script runs, not for figures).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

import xform as xf
from _common import mse_step, quartiles  # bench/ is the script's directory

WIDTH, BATCH = 32, 8
VARIANTS = (  # name, micro-batches, xform policy, autocast dtype of the twins
    ("step", 1, "fp32", None),
    ("mixed_precision(bf16)", 1, "bf16", torch.bfloat16),
    ("accumulate(2)", 2, "fp32", None),
    ("accumulate(mixed_precision(bf16), 2)", 2, "bf16", torch.bfloat16),
    ("accumulate(mixed_precision(bf16), 4)", 4, "bf16", torch.bfloat16),  # the weights cast once, not 4 times
)
RUNNERS = ("xform", "backward", "autograd.grad")


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(),
        torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(),
        torch.nn.Linear(WIDTH, WIDTH),
    )


def _forward(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None:
        return model(x)
    with torch.autocast("cpu", dtype=dtype):
        return model(x)


def backward_loop(micro: int, dtype: torch.dtype | None):
    """The usual loop: ``zero_grad``, ``backward()`` per micro-batch, ``step``."""
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)

    def run(batch):
        x, y = batch
        opt.zero_grad(set_to_none=True)
        total = None
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            loss = F.mse_loss(_forward(model, xs, dtype).float(), ys)
            (loss / micro if micro > 1 else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        opt.step()
        return total / micro if micro > 1 else total  # the loss a training loop logs, as xform's metrics

    return run, model.parameters


def grad_loop(micro: int, dtype: torch.dtype | None):
    """The same math through ``torch.autograd.grad``: no ``zero_grad``, no accumulation
    into ``.grad`` inside the backward pass; the gradients are handed to the optimizer."""
    model = mlp()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)

    def run(batch):
        x, y = batch
        total = grads = None
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            loss = F.mse_loss(_forward(model, xs, dtype).float(), ys)
            g = torch.autograd.grad(loss / micro if micro > 1 else loss, params)
            if grads is None:
                grads = list(g)
            else:
                torch._foreach_add_(grads, g)
            total = loss.detach() if total is None else total + loss.detach()
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        return total / micro if micro > 1 else total

    return run, model.parameters


def xform_loop(micro: int, policy: str):
    step = xf.accumulate(xf.mixed_precision(mse_step, policy), micro)
    init = getattr(step, "init", lambda state: state)  # a step no transform changed has none
    box = [init(xf.TrainState.create(mlp(), optimizer=torch.optim.AdamW, lr=1e-3))]

    def run(batch):
        box[0], _ = step(box[0], batch)

    return run, lambda: box[0].params.values()


def time_steps(run: Callable, batch, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        run(batch)
    return (time.perf_counter() - start) / steps



def measure(micro: int, policy: str, dtype: torch.dtype | None, rounds: int, steps: int, warmup: int, batch) -> dict:
    """Per-round seconds per step of each runner (interleaved, rotating order), the paired
    ratios xform / twin, and each twin's weight difference from xform's at the end."""
    runners = {
        "xform": xform_loop(micro, policy),
        "backward": backward_loop(micro, dtype),
        "autograd.grad": grad_loop(micro, dtype),
    }
    for run, _ in runners.values():
        for _ in range(warmup):
            run(batch)
    times: dict[str, list[float]] = {n: [] for n in RUNNERS}
    for r in range(rounds):
        k = r % len(RUNNERS)
        for n in RUNNERS[k:] + RUNNERS[:k]:  # rotate who goes first
            times[n].append(time_steps(runners[n][0], batch, steps))
    ref = [p.detach() for p in runners["xform"][1]()]
    diff = {
        n: max(float((p.detach() - q).abs().max()) for p, q in zip(runners[n][1](), ref)) for n in RUNNERS[1:]
    }
    ratios = {n: [a / b for a, b in zip(times["xform"], times[n])] for n in RUNNERS[1:]}
    return {"times": times, "ratios": ratios, "diff": diff}


def import_time(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def _q(xs: list[float]) -> str:
    q1, q2, q3 = quartiles(xs)
    return f"{q2:5.3f} [{q1:5.3f}, {q3:5.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=200, help="steps per round and runner")
    parser.add_argument("--warmup", type=int, default=50, help="steps of each runner before timing")
    parser.add_argument("--imports", type=int, default=5, help="runs of each import timing")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 20 steps, 1 import run: checks the script runs")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup, args.imports = 3, 20, 5, 1
    torch.set_num_threads(1)
    batch = (torch.randn(BATCH, WIDTH), torch.randn(BATCH, WIDTH))
    print(
        f"MLP 3x{WIDTH}, batch {BATCH}, AdamW foreach, 1 thread; {args.rounds} interleaved rounds x "
        f"{args.steps} steps after {args.warmup} warm-up steps each"
    )
    print(f"{'variant':38s} {'runner':14s} {'median us':>9s} {'q1 us':>7s} {'q3 us':>7s}  {'max|dw|':>7s}")
    results = {}
    for name, micro, policy, dtype in VARIANTS:
        res = results[name] = measure(micro, policy, dtype, args.rounds, args.steps, args.warmup, batch)
        for n in RUNNERS:
            q1, q2, q3 = quartiles(res["times"][n])
            dw = f"{res['diff'][n]:7.1e}" if n in res["diff"] else f"{'-':>7s}"
            print(f"{name:38s} {n:14s} {q2 * 1e6:9.1f} {q1 * 1e6:7.1f} {q3 * 1e6:7.1f}  {dw}")
    t_torch = statistics.median(import_time("torch") for _ in range(args.imports))
    t_xform = statistics.median(import_time("xform") for _ in range(args.imports))

    print("\n== overhead: xform step / hand-written twin, median [q1, q3] of the paired per-round ratios ==")
    print(f"{'variant':38s} {'xform us':>8s} {'/ backward()':>22s} {'/ autograd.grad':>22s}")
    for name, res in results.items():
        us = statistics.median(res["times"]["xform"]) * 1e6
        print(f"{name:38s} {us:8.1f} {_q(res['ratios']['backward']):>22s} {_q(res['ratios']['autograd.grad']):>22s}")
    print("\n== added microseconds: xform's median minus the twin's (negative: xform is faster) ==")
    added = {
        name: {n: (statistics.median(res["times"]["xform"]) - statistics.median(res["times"][n])) * 1e6 for n in RUNNERS[1:]}
        for name, res in results.items()
    }
    print(f"{'':38s} {'vs backward()':>14s} {'vs autograd.grad':>17s}")
    for name, _, _, _ in VARIANTS:
        print(f"{'per step: ' + name:38s} {added[name]['backward']:+14.1f} {added[name]['autograd.grad']:+17.1f}")
    for single, double in (("step", "accumulate(2)"), ("mixed_precision(bf16)", "accumulate(mixed_precision(bf16), 2)")):
        # accumulate(2) runs one micro-batch more than the plain step: the difference of the
        # two added costs is what one more micro-batch and the accumulate wrapper add
        per_micro = {n: added[double][n] - added[single][n] for n in RUNNERS[1:]}
        print(f"{'per extra micro-batch: ' + single:38s} {per_micro['backward']:+14.1f} {per_micro['autograd.grad']:+17.1f}")
    # the line above also holds accumulate's fixed cost per step (split, pooling, handler, RNG
    # guard); 4 micro-batches against 2 leave only what each further micro-batch adds
    two, four = "accumulate(mixed_precision(bf16), 2)", "accumulate(mixed_precision(bf16), 4)"
    each = {n: (added[four][n] - added[two][n]) / 2 for n in RUNNERS[1:]}
    print(f"{'each micro-batch (k=4 vs k=2): bf16':38s} {each['backward']:+14.1f} {each['autograd.grad']:+17.1f}")
    print(f"import torch {t_torch:.3f} s; import xform {t_xform:.3f} s; xform adds {t_xform - t_torch:+.3f} s")


if __name__ == "__main__":
    main()
