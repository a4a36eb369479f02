"""glibc's heap trimming and a CPU training step: time and page faults per step of the hand
loop and of xform's eager step, each alone in its own process, with glibc's defaults and with
``xform launch``'s CPU settings (``STEADY_MALLOC``: trimming off, large blocks kept in the heap).

The model is ``bench/compile.py``'s GPT (4 layers x 256, vocab 2048, 4.22M params), batch 2 x 32
tokens, AdamW foreach, one thread. Each cell is its own interpreter (a shared heap would make
one runner's faults depend on what ran before it): ``--warmup`` steps, then ``--rounds`` rounds
of ``--steps`` steps; the median ms per step with its quartiles, and the median page faults per
step (``resource.getrusage(...).ru_minflt``).

Run: ``.venv/bin/python bench/malloc.py`` (about a minute); ``--quick``: a tiny model, 2 rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from _common import quartiles  # bench/ is the script's directory
from xform.cli._launch import STEADY_MALLOC


def worker(runner: str, cfg: dict, batch: int, warmup: int, rounds: int, steps: int) -> dict:
    import torch

    import compile as bench_compile

    torch.set_num_threads(1)
    ids = torch.randint(0, cfg["vocab"], (batch, cfg["seq"]), generator=torch.Generator().manual_seed(1))
    run, _ = bench_compile.hand_loop(cfg, None) if runner == "hand" else bench_compile.xform_loop(cfg, False, "eager")
    for _ in range(warmup):
        run(ids)
    times, faults = [], []
    for _ in range(rounds):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        for _ in range(steps):
            run(ids)
        times.append((time.perf_counter() - start) / steps)
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / steps)
    return {"times": times, "faults": faults, "tunables": os.environ.get("GLIBC_TUNABLES")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds: checks the script runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = dict(vocab=2048, d=256, heads=4, layers=4, seq=32)
    batch = 2
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 2, 1
        cfg = dict(vocab=64, d=32, heads=1, layers=1, seq=16)
    if args.worker:
        print(json.dumps(worker(args.worker, cfg, batch, args.warmup, args.rounds, args.steps)))
        return
    print(
        f"malloc: GPT {cfg['layers']} layers x {cfg['d']}, vocab {cfg['vocab']}, {batch}x{cfg['seq']} tokens, "
        f"AdamW foreach, 1 thread; each cell its own process: {args.warmup} warm-up steps, "
        f"{args.rounds} rounds x {args.steps} steps"
    )
    print(f"{'allocator':10s} {'runner':8s} {'ms/step median [q1, q3]':>26s} {'faults/step':>12s}")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    argv = [sys.executable, os.path.abspath(__file__), "--rounds", str(args.rounds), "--steps", str(args.steps),
            "--warmup", str(args.warmup)] + (["--quick"] if args.quick else [])
    for label, extra in (("default", {}), ("steady", {"GLIBC_TUNABLES": STEADY_MALLOC})):
        for runner in ("hand", "xform"):
            out = subprocess.run(argv + ["--worker", runner], env={**env, **extra}, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"malloc: the {runner} worker failed:\n{out.stderr}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            if res["tunables"] != extra.get("GLIBC_TUNABLES"):
                raise SystemExit(f"malloc: the {label} {runner} worker ran with GLIBC_TUNABLES={res['tunables']!r}")
            q1, q2, q3 = (t * 1e3 for t in quartiles(res["times"]))
            print(f"{label:10s} {runner:8s} {f'{q2:.2f} [{q1:.2f}, {q3:.2f}]':>26s} {quartiles(res['faults'])[1]:12.0f}")
    print(f"steady: GLIBC_TUNABLES={STEADY_MALLOC} (what xform launch sets on CPU hosts)")


if __name__ == "__main__":
    main()
