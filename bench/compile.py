"""The compiled xform step (``xf.jit``) against the eager hand-written loop, on CPU.

A small GPT-style transformer (pre-LayerNorm blocks, causal ``scaled_dot_product_attention``,
GELU MLP; ~3.3M parameters by default), next-token cross-entropy, AdamW (foreach), one
thread for every runner. Runners, all from the same weights on the same batch:

- ``hand eager``: ``opt.zero_grad``, ``loss.backward()``, ``opt.step()``: the usual loop.
- ``hand compiled model``: the same loop with ``torch.compile(model)`` (forward and
  backward compiled; the optimizer and the loop's Python stay eager).
- ``xform eager``: the xform step, no compilation.
- ``xform jit``: ``xf.jit(step)``: forward, backward and the AdamW update in one graph.

Method: each runner is warmed up (compilations happen there; their wall time is printed),
then all run in interleaved rounds of ``--steps`` steps with the order rotating every
round. Printed: per runner, the median seconds per step with quartiles over rounds, and
the paired ratio *hand eager / runner* (a speedup, > 1 is faster than the hand loop) with
its quartiles ``[q1, q3]``, each ratio taken within one round. ``max|dw|`` is the largest
weight difference from the hand loop after all steps (rounding of reordered arithmetic).

Allocator: the runners share one process, hence one heap. With glibc's default heap
trimming, freed pages are unmapped and faulted in again, and which runner pays depends on
the heap's history (the hand loop measured 31 or 40 ms per step depending on what ran
before it). The script therefore reruns itself with trimming off (``--malloc steady``,
what ``xform launch`` sets on CPU hosts); ``--malloc default`` keeps glibc's defaults.

Run: ``.venv/bin/python bench/compile.py`` (``--rounds 7 --steps 5``); ``--quick``: a
tiny model, 2 rounds, the ``aot_eager`` backend (no C++ compilation): checks that the
script runs, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import xform as xf
from _common import quartiles, steady_malloc  # bench/ is the script's directory


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def model(cfg: dict) -> GPT:
    torch.manual_seed(0)
    return GPT(**cfg)


def loss_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def hand_loop(cfg: dict, backend: str | None):
    """The usual loop; with ``backend``, over ``torch.compile(model, backend=backend)``."""
    m = model(cfg)
    fwd = torch.compile(m, backend=backend) if backend else m
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True)

    def run(ids):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(fwd(ids), ids)
        loss.backward()
        opt.step()
        return loss.detach()

    return run, lambda: list(m.parameters())


def xform_loop(cfg: dict, jitted: bool, backend: str):
    def step(state, ids):
        loss, grads = xf.value_and_grad(lambda p: loss_of(xf.apply(state, p, ids), ids))(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    fn = xf.jit(step, backend=backend) if jitted else step
    box = [xf.TrainState.create(model(cfg), optimizer=torch.optim.AdamW, lr=1e-3)]

    def run(ids):
        box[0], metrics = fn(box[0], ids)
        return metrics["loss"]

    return run, lambda: list(box[0].params.values())


def time_steps(run: Callable, ids, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        run(ids)
    return (time.perf_counter() - start) / steps



def _q(xs: list[float], fmt: str = "5.3f") -> str:
    q1, q2, q3 = quartiles(xs)
    return f"{q2:{fmt}} [{q1:{fmt}}, {q3:{fmt}}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=5, help="steps per round and runner")
    parser.add_argument("--warmup", type=int, default=3, help="steps of each runner before timing (compiles)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of both compiled runners")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--malloc", choices=("steady", "default"), default="steady",
        help="steady: rerun with glibc's heap trimming off (as xform launch does on CPU); default: glibc's",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, aot_eager, 2 rounds: checks the script runs")
    args = parser.parse_args()
    malloc = steady_malloc(args.malloc)
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 2, 2
        args.layers, args.width, args.seq, args.batch, args.vocab, args.backend = 1, 32, 16, 2, 64, "aot_eager"
    torch.set_num_threads(args.threads)
    cfg = dict(vocab=args.vocab, d=args.width, layers=args.layers, heads=max(1, args.width // 64), seq=args.seq)
    n_params = sum(p.numel() for p in model(cfg).parameters())
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    print(
        f"compile: GPT {args.layers} layers x {args.width}, vocab {args.vocab}, seq {args.seq}, batch {args.batch} "
        f"({n_params / 1e6:.2f}M params), AdamW foreach, {args.threads} thread(s), backend {args.backend}; "
        f"{args.rounds} interleaved rounds x {args.steps} steps after {args.warmup} warm-up steps each; {malloc}"
    )
    runners: dict[str, tuple[Callable, Callable]] = {}
    makers = {
        "hand eager": lambda: hand_loop(cfg, None),
        "hand compiled model": lambda: hand_loop(cfg, args.backend),
        "xform eager": lambda: xform_loop(cfg, False, args.backend),
        "xform jit": lambda: xform_loop(cfg, True, args.backend),
    }
    for name, make in makers.items():
        run, params = make()
        start = time.perf_counter()
        for _ in range(args.warmup):
            run(ids)
        print(f"  warm-up of {name:20s} {time.perf_counter() - start:7.2f} s ({args.warmup} steps, compilation included)")
        runners[name] = (run, params)
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(time_steps(runners[n][0], ids, args.steps))
    ref = [p.detach() for p in runners["hand eager"][1]()]
    print("compile: summary (speedup = hand eager time / runner time, paired per round; median [q1, q3])")
    print(f"{'runner':22s} {'ms/step median [q1, q3]':>28s} {'speedup vs hand eager':>28s} {'max|dw|':>9s}")
    for n in names:
        ms = [t * 1e3 for t in times[n]]
        speed = [a / b for a, b in zip(times["hand eager"], times[n])]
        dw = max(float((p.detach() - q).abs().max()) for p, q in zip(runners[n][1](), ref))
        print(f"{n:22s} {_q(ms, '8.2f'):>28s} {_q(speed):>28s} {dw:9.2e}")
    if not all(math.isfinite(t) for ts in times.values() for t in ts):
        raise SystemExit("compile: a runner produced a non-finite time")


if __name__ == "__main__":
    main()
