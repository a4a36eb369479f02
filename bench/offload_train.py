"""Training-step time and peak resident memory of ``offload(optimizer="disk")`` and
``offload(params="disk")`` (and both) against the plain step.

An MLP of ``depth`` square Linear layers (fp32, AdamW, batch 8), one worker process per
variant, each with one thread. Every worker builds its state, runs 2 warm-up steps (the
first creates the optimizer state), then resets its peak resident set size
(``/proc/self/clear_refs``) after returning freed heap to the system (``malloc_trim``).
The parent then runs interleaved rounds: in each round every worker in turn runs
``steps`` steps and reports their times; a round's figure is the median step. A ratio
is taken within a round (variant / plain: same round, same machine load), then its
median and quartiles over the rounds are printed. Memory, counted from the worker's
resident size before its model exists: "held", resident between steps after the last
round (heap trimmed): the params and optimizer state kept in memory; "peak", the largest
resident size during the measured steps (VmHWM, reset after the warm-up so that
``TrainState.create``'s placeholders of the optimizer state do not count): held + the
gradients + the update's temporaries + the pages streamed in at once (all of the
optimizer state in the plain step, about one chunk under offload). The files go to ``--dir`` (default: a temporary
directory under the current one; put it on the disk you mean to measure, never a tmpfs).
The page cache is not dropped between steps (that needs root), so on a machine with
free memory the disk reads are served from it: the time figures are the cost of the
streaming machinery with a warm cache, not of a cold disk.

Run: ``.venv/bin/python bench/offload_train.py`` (``--width 2048 --depth 8 --rounds 7
--steps 3 --chunk-mb 64``; ``--quick``: a small model and 3 rounds, a few seconds).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from _common import quartiles  # bench/ is the script's directory

VARIANTS = {
    "plain": {},
    'offload(optimizer="disk")': {"optimizer": "disk"},
    'offload(params="disk")': {"params": "disk"},
    'offload(params="disk", optimizer="disk")': {"params": "disk", "optimizer": "disk"},
}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def worker(variant: str, width: int, depth: int, chunk_mb: float, directory: str) -> None:
    """Runs in a child process: reads "run K" / "end" lines, answers JSON lines."""
    import torch
    import torch.nn.functional as F

    import xform as xf

    torch.set_num_threads(1)
    gc.collect()
    before = _status("VmRSS")  # the process before the model exists
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])

    def step(state, batch):
        def loss_fn(params):
            return F.mse_loss(xf.apply(state, params, batch[0]), batch[1])

        loss, grads = xf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    settings = VARIANTS[variant]
    if settings:
        step = xf.offload(step, dir=directory, chunk_mb=chunk_mb, **settings)
    state = xf.TrainState.create(model, optimizer=torch.optim.AdamW, lr=1e-4)
    state = getattr(step, "init", lambda s: s)(state)
    del model
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, width, generator=g), torch.randn(8, width, generator=g))
    for _ in range(2):
        state, _ = step(state, batch)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "end":
            peak = _status("VmHWM")
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            print(json.dumps({"peak": peak - before, "held": _status("VmRSS") - before}), flush=True)
            return
        times = []
        for _ in range(int(cmd[1])):
            t = time.perf_counter()
            state, metrics = step(state, batch)
            float(metrics["loss"])
            times.append(time.perf_counter() - t)
        print(json.dumps({"times": times}), flush=True)



def train_rows(quick: bool, *, width: int | None = None, depth: int | None = None, rounds: int | None = None,
               steps: int | None = None, chunk_mb: float | None = None, directory: str | None = None) -> list[str]:
    """The closing table's lines (also printed by ``bench/offload.py``)."""
    width = width or (256 if quick else 2048)
    depth = depth or (4 if quick else 8)
    rounds = rounds or (3 if quick else 7)
    steps = steps or (1 if quick else 3)
    chunk_mb = chunk_mb or (0.25 if quick else 64)
    params_mib = depth * (width * width + width) * 4 / 2**20
    with tempfile.TemporaryDirectory(dir=directory or ".", prefix="offload-bench-") as tmp:
        procs = {}
        for name in VARIANTS:
            procs[name] = subprocess.Popen(
                [sys.executable, __file__, "--worker", name, "--width", str(width), "--depth", str(depth),
                 "--chunk-mb", str(chunk_mb), "--dir", tmp],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        try:
            for p in procs.values():
                json.loads(p.stdout.readline())  # ready
            medians: dict[str, list[float]] = {n: [] for n in VARIANTS}
            for r in range(rounds):
                order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]  # alternate who goes first
                for name in order:
                    p = procs[name]
                    p.stdin.write(f"run {steps}\n")
                    p.stdin.flush()
                    medians[name].append(statistics.median(json.loads(p.stdout.readline())["times"]))
            peaks, held = {}, {}
            for name, p in procs.items():
                p.stdin.write("end\n")
                p.stdin.flush()
                out = json.loads(p.stdout.readline())
                peaks[name], held[name] = out["peak"] / 2**20, out["held"] / 2**20
                p.wait(timeout=60)
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
    rows = [
        f"== offload_train: {depth} x Linear({width}, {width}), {params_mib:.0f} MiB params, AdamW "
        f"({2 * params_mib:.0f} MiB state), batch 8, 1 thread, chunk {chunk_mb:g} MiB, "
        f"{rounds} rounds x {steps} steps",
        f"{'variant':44s} {'step ms median [q1, q3]':>26s} {'time / plain [q1, q3]':>24s} "
        f"{'held MiB':>9s} {'peak MiB':>9s} {'peak / plain':>12s}",
    ]
    base = medians["plain"]
    for name in VARIANTS:
        ms = [1e3 * x for x in medians[name]]
        q1, m, q3 = quartiles(ms)
        ratios = [a / b for a, b in zip(medians[name], base)]
        r1, rm, r3 = quartiles(ratios)
        rows.append(
            f"{name:44s} {m:10.2f} [{q1:.2f}, {q3:.2f}]".ljust(71)
            + f" {rm:8.2f} [{r1:.2f}, {r3:.2f}]".rjust(24)
            + f" {held[name]:9.1f} {peaks[name]:9.1f} {peaks[name] / max(peaks['plain'], 1e-9):12.2f}"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker")
    ap.add_argument("--width", type=int)
    ap.add_argument("--depth", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--chunk-mb", type=float)
    ap.add_argument("--dir")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.width, args.depth, args.chunk_mb, args.dir)
        return
    for row in train_rows(args.quick, width=args.width, depth=args.depth, rounds=args.rounds, steps=args.steps,
                          chunk_mb=args.chunk_mb, directory=args.dir):
        print(row)


if __name__ == "__main__":
    main()
