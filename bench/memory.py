"""Per-process memory of replicate / zero1 / zero2 / zero3: the state's size, the ZeRO
formula, and the peak measured inside a step (gradients, buckets and collective buffers
included).

fp32 AdamW on CPU (Psi = number of parameters). The ZeRO paper's formulas count model
states only (params + gradients + optimizer state): replicate 16 Psi (4 params + 4 grads
+ 8 Adam), zero1 4 Psi + 4 Psi + 8 Psi/N, zero2 4 Psi + 12 Psi/N, zero3 16 Psi/N. (With
fp16/bf16 params and grads and fp32 master + Adam: 16 Psi, 4 Psi + 12 Psi/N, 2 Psi + 14
Psi/N, 16 Psi/N.) Adding up the state's tensors gives these formulas by construction; what
a process holds while a step runs can only be measured.

How it is measured, in every process of a gloo group of N
(``xform.distributed.procs.ProcessPool``), on ``xf.shard(step, strategy)``:

- params, opt: local bytes of ``state.params`` and of the tensors in ``state.opt_state``
  (a DTensor counts its ``to_local()``) after the last step; grads: local bytes of the
  gradients ``xf.value_and_grad`` returned inside the step. counted = their sum: what the
  formula counts (this script's figure before it measured).
- between, peak: live bytes in PyTorch's CPU allocator, from ``torch.profiler``
  (``profile_memory=True``) running around the whole worker, from before the model is
  built. The profiler reports every allocation and free that the c10 CPU allocator makes
  on the profiled thread, with its address and size; replaying them in order gives the
  bytes alive at each moment: every tensor storage (the model's, the optimizer's, the
  batch, activations, gradients alive during the backward pass, gradient buckets), the
  copies and outputs that c10d's gloo collectives allocate (the clone of the input that
  gloo's reduce-scatter makes, the staging buffer of its all-gather) and FSDP2's
  gathered params. Step 1 creates the optimizer state; then ``--steps`` steps are
  measured, each after ``gc.collect()`` (garbage of earlier steps is not counted; the
  bytes that collection freed, memory an earlier step left in reference cycles, are
  reported when there are any). "between" is the live count just before a step, "peak"
  the largest one while it runs; the table gives their medians over the measured steps
  and ranks, and the peaks' range. "in-step" = peak - between: what a step needs beyond
  what it keeps.
- For the largest peak, the bytes allocated in that step and alive at that moment are
  listed by where they were made (innermost Python frame > ops), from the profiler's
  stacks; so are the bytes alive at the start of a step that an earlier step made, when
  there are any.

Limits, and what is done about them: the profiler records only this thread's frees.
When gloo's worker thread drops the last reference to a buffer (c10d's temporaries, or a
tensor whose collective outlived the Python call), its free is not seen (about one free
in five of a gloo all-gather's buffers, here). Two corrections: an address allocated
again counts as freed first (reported as "addresses allocated again"), and at the start
of each measured step, after ``gc.collect()``, the replay keeps only the storages of
tensors that Python can still reach (``gc.get_objects()``, a DTensor's local tensor
included): everything else it counts was freed unseen and is dropped (reported as
"freed on another thread"). So "between" counts the storages that Python holds (one
that only C++ held between steps would be missed; none is expected here), and a missed
free can inflate only the peak of the step it happened in, not later ones: the medians
are not moved by an occasional one, the top of the range may be. Also not seen: memory that gloo's
transport mallocs itself, outside the PyTorch allocator (its algorithms work in the
tensors' own memory), and the allocator's and the OS's caching (these are allocated
bytes, not RSS). The model (an MLP 512 -> 512 -> 1024 -> 256, Psi = 1,050,368) has every
first dimension divisible by 4, so the row shards are exact; batch 8 per process, so
activations are small (~0.1 MiB).

Run: ``.venv/bin/python bench/memory.py`` (``--nprocs 2,4 --steps 5``; ``--quick``:
N = 2, 2 measured steps, to check that the script runs).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._C._profiler import _EventType  # the profiler's event tree (what torch.profiler's memory profiler reads)

import xform as xf

DIMS = (512, 512, 1024, 256)
BATCH = 8  # per process
STRATEGIES = ("replicate", "zero1", "zero2", "zero3")
FORMULAS = {  # fp32 AdamW: (name, bytes per process as a function of Psi and N)
    "replicate": ("16Ψ", lambda psi, n: 16 * psi),
    "zero1": ("4Ψ+4Ψ+8Ψ/N", lambda psi, n: 8 * psi + 8 * psi / n),
    "zero2": ("4Ψ+12Ψ/N", lambda psi, n: 4 * psi + 12 * psi / n),
    "zero3": ("16Ψ/N", lambda psi, n: 16 * psi / n),
}
MIB = 2**20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(DIMS, DIMS[1:])):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(DIMS) - 2 else [])
    return torch.nn.Sequential(*layers)


def _bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _walk(nodes):
    for n in nodes:
        yield n
        yield from _walk(n.children)


def _name(node) -> str:
    try:
        return node.name
    except UnicodeDecodeError:  # torch 2.13's profiler garbles an occasional built-in's name
        return "?"


def _label(node, window) -> str:
    """Where an allocation was made: the innermost Python frame, then the ops below it
    down to the one that allocated, e.g. ``backends/.../data_parallel.py(111): <listcomp>
    > aten::empty`` or ``torch/optim/adam.py(553): _multi_tensor_adam >
    aten::_foreach_sqrt > aten::sqrt``."""
    ops = []
    n = node.parent
    while n is not None and n is not window and n.tag != _EventType.PyCall:
        if n.tag == _EventType.TorchOp:
            ops.append(_name(n))
        n = n.parent
    frame = _name(n).replace(ROOT, "") if n is not None and n is not window else "(the step)"
    ops = ops[::-1]
    return " > ".join([frame] + (ops if len(ops) <= 2 else [ops[0], ops[-1]]))


def replay(prof, windows: list[str], alive: dict[str, set[int]]) -> dict[str, dict]:
    """For each ``record_function`` range named in ``windows`` (in time order, not
    overlapping): the live bytes just before it ("before"), at its end ("after") and at
    its peak ("peak"); the bytes allocated inside it and alive at the peak ("where"), and
    the bytes alive at its start that an earlier window allocated ("carried"), both by
    where they were allocated; from the allocations and frees that ``prof`` recorded,
    replayed in order. ``alive[name]``, where given, holds the addresses of the storages
    really alive when that window starts: anything else the replay still counts then was
    freed on a thread the profiler does not watch, and is dropped ("missed" bytes)."""
    nodes = list(_walk(prof.profiler.kineto_results.experimental_event_tree()))
    spans = {n.name: n for n in nodes if n.tag == _EventType.TorchOp and _name(n) in windows}
    events = sorted(
        ((n.start_time_ns, n.extra_fields.alloc_size, n.extra_fields.ptr, n) for n in nodes
         if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu"),
        key=lambda e: e[:2],
    )
    sizes: dict[int, int] = {}  # ptr -> bytes, of everything alive
    made: dict[int, tuple[object, object]] = {}  # ptr -> (allocation node, window), for the windows' allocations

    def by_place(allocs) -> dict[str, int]:
        where: dict[str, int] = {}
        for node, win in allocs:
            key = _label(node, win)
            where[key] = where.get(key, 0) + node.extra_fields.alloc_size
        return where

    out: dict[str, dict] = {}
    live = unseen = 0
    it = iter(events)
    pending = next(it, None)
    for name in sorted(windows, key=lambda w: spans[w].start_time_ns):
        win = spans[name]
        while pending is not None and pending[0] < win.start_time_ns:  # up to the window
            _, size, ptr, _ = pending
            if size > 0:
                live += size - sizes.get(ptr, 0)  # an address reused: its free was not seen
                unseen += ptr in sizes
                sizes[ptr] = size
            elif ptr in sizes:  # a free of memory allocated before profiling is not counted
                live -= sizes.pop(ptr)
                made.pop(ptr, None)
            pending = next(it, None)
        missed = 0
        if name in alive:
            for ptr in [p for p in sizes if p not in alive[name]]:
                missed += sizes.pop(ptr)
                made.pop(ptr, None)
            live -= missed
        before = peak = live
        carried = by_place(made.values())
        inside: set[int] = set()  # ptrs allocated in this window and alive
        at_peak: list[tuple[object, object]] = []
        while pending is not None and pending[0] <= win.end_time_ns:
            _, size, ptr, node = pending
            if size > 0:
                live += size - sizes.get(ptr, 0)
                unseen += ptr in sizes
                sizes[ptr] = size
                made[ptr] = (node, win)
                inside.add(ptr)
            elif ptr in sizes:
                live -= sizes.pop(ptr)
                made.pop(ptr, None)
                inside.discard(ptr)
            if live > peak:
                peak, at_peak = live, [made[p] for p in inside]
            pending = next(it, None)
        where = by_place(at_peak)
        out[name] = {"before": before, "after": live, "peak": peak, "where": where, "carried": carried, "unseen": unseen,
                     "missed": missed}
    return out


def reachable_storages() -> set[int]:
    """The addresses of the storages of every tensor Python can reach (a DTensor's local
    tensor included): what is really alive between steps, once garbage is collected."""
    objs = gc.get_objects()
    # No Python call per object: the profiler traces every call (with_stack) and there are ~10^5 objects.
    kinds = {cls for cls in set(map(type, objs)) if issubclass(cls, torch.Tensor)}
    ptrs = set()
    for t in [o for o in objs if o.__class__ in kinds]:
        t = t._local_tensor if hasattr(t, "_local_tensor") else t
        if t.device.type == "cpu":
            ptrs.add(t.untyped_storage().data_ptr())
    return ptrs


def measure_worker(strategy: str, steps: int) -> dict:
    # torch 2.13 deprecates the *_tensor collectives the zero1/zero2 code calls; not ours to measure here
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\..*_single`")
    from torch.profiler import ProfilerActivity, profile, record_function

    grads_seen: list[int] = []
    alive: dict[str, set[int]] = {}

    def step(state, batch):
        x, y = batch

        def loss_fn(params):
            return F.mse_loss(xf.apply(state, params, x), y)

        loss, grads = xf.value_and_grad(loss_fn)(state.params)
        grads_seen.append(sum(_bytes(g) for g in grads.values()))
        return state.apply_gradients(grads), {"loss": loss}

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as prof:
        sharded = xf.shard(step, strategy)
        state = sharded.init(xf.TrainState.create(mlp(), optimizer=torch.optim.AdamW, lr=1e-3))
        g = torch.Generator().manual_seed(dist.get_rank())
        batch = (torch.randn(BATCH, DIMS[0], generator=g), torch.randn(BATCH, DIMS[-1], generator=g))
        with record_function("xform-bench: first step"):  # also creates the optimizer state
            state, _ = sharded(state, batch)
        for i in range(steps):
            with record_function(f"xform-bench: gc {i}"):  # what earlier steps left to the cyclic collector
                gc.collect()
                alive[f"xform-bench: step {i}"] = reachable_storages()
            with record_function(f"xform-bench: step {i}"):
                state, _ = sharded(state, batch)
    windows = ["xform-bench: first step"] + [f"xform-bench: {w} {i}" for i in range(steps) for w in ("gc", "step")]
    spans = replay(prof, windows, alive)
    measured = [spans[f"xform-bench: step {i}"] for i in range(steps)]
    top = max(measured, key=lambda s: s["peak"])
    held = max(measured, key=lambda s: s["before"])
    opt = sum(
        _bytes(v) for entry in state.opt_state["state"].values() for v in entry.values() if isinstance(v, torch.Tensor)
    )
    return {
        "params": sum(_bytes(p) for p in state.params.values()),
        "opt": opt,
        "grads": grads_seen[-1],
        "between": [s["before"] for s in measured],
        "peaks": [s["peak"] for s in measured],
        "where": top["where"],
        "carried": held["carried"],
        "unseen": measured[-1]["unseen"],
        "missed": max(s["missed"] for s in measured),
        "garbage": max(spans[f"xform-bench: gc {i}"]["before"] - spans[f"xform-bench: gc {i}"]["after"] for i in range(steps)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", default="2,4", help="process counts, comma-separated")
    parser.add_argument("--steps", type=int, default=5, help="measured steps (after a first one)")
    parser.add_argument("--top", type=int, default=6, help="places listed per strategy for the bytes alive at the peak")
    parser.add_argument("--quick", action="store_true", help="N = 2, 2 measured steps: checks the script runs")
    args = parser.parse_args()
    if args.quick:
        args.nprocs, args.steps = "2", 2
    torch.set_num_threads(1)

    from xform.distributed.procs import ProcessPool

    psi = sum(p.numel() for p in mlp().parameters())
    print(
        f"MLP {'-'.join(map(str, DIMS))}: Psi = {psi:,} params; fp32 AdamW, batch {BATCH}/process, "
        f"{args.steps} measured steps per process"
    )
    rows = []
    for n in [int(s) for s in args.nprocs.split(",")]:
        with ProcessPool(n, timeout_s=300) as pool:
            for strategy in STRATEGIES:
                per_rank = pool.run(measure_worker, strategy, args.steps)
                r = max(per_rank, key=lambda r: max(r["peaks"]))
                peaks = [p for x in per_rank for p in x["peaks"]]
                between = statistics.median(b for x in per_rank for b in x["between"])
                name, formula = FORMULAS[strategy]
                rows.append((strategy, n, r, between, peaks, name, formula(psi, n)))
                alive = sorted(r["where"].items(), key=lambda kv: -kv[1])
                print(
                    f"{strategy} N={n}: largest peak {max(peaks) / MIB:.2f} MiB; made in that step and alive at its "
                    f"peak: {sum(r['where'].values()) / MIB:.2f} MiB, by where:"
                )
                for where, size in alive[: args.top]:
                    print(f"  {size / MIB:7.2f}  {where}")
                if len(alive) > args.top:
                    print(f"  {sum(v for _, v in alive[args.top:]) / MIB:7.2f}  ({len(alive) - args.top} more places)")
                garbage = max(x["garbage"] for x in per_rank)
                if garbage:
                    print(f"  ({garbage / MIB:.2f} MiB of an earlier step was held until gc.collect() freed it)")
                unseen = max(x["unseen"] for x in per_rank)
                if unseen:
                    print(f"  ({unseen} addresses were allocated again without their free being seen: counted as freed)")
                missed = max(x["missed"] for x in per_rank)
                if missed:
                    print(f"  (up to {missed / MIB:.2f} MiB freed on another thread before a step, dropped at its start)")
                if max(b for x in per_rank for b in x["between"]) - min(b for x in per_rank for b in x["between"]) >= MIB / 16:
                    print(f"  between steps by rank (MiB): {[[round(b / MIB, 2) for b in x['between']] for x in per_rank]}")
                held = max(per_rank, key=lambda x: max(x["between"]))["carried"]
                if sum(held.values()) >= MIB / 16:
                    print(f"  alive at the start of a step, made by an earlier one ({sum(held.values()) / MIB:.2f} MiB):")
                    for where, size in sorted(held.items(), key=lambda kv: -kv[1])[: args.top]:
                        print(f"  {size / MIB:7.2f}  {where}")

    print("\n== memory per process (MiB): the state, the formula, and the peak measured in a step ==")
    print(
        f"{'strategy':9s} {'N':>2s} {'params':>7s} {'opt':>7s} {'grads':>7s} {'counted':>8s} "
        f"{'formula':>18s} {'between':>8s} {'peak':>7s} {'peak range':>13s} {'in-step':>8s} {'peak/formula':>12s}"
    )
    for strategy, n, r, between, peaks, name, formula in rows:
        counted = r["params"] + r["opt"] + r["grads"]
        peak = statistics.median(peaks)
        print(
            f"{strategy:9s} {n:2d} {r['params'] / MIB:7.2f} {r['opt'] / MIB:7.2f} {r['grads'] / MIB:7.2f} "
            f"{counted / MIB:8.2f} {name:>11s}={formula / MIB:6.2f} {between / MIB:8.2f} "
            f"{peak / MIB:7.2f} {f'{min(peaks) / MIB:.2f}-{max(peaks) / MIB:.2f}':>13s} "
            f"{(peak - between) / MIB:8.2f} {peak / formula:12.3f}"
        )
    print("counted = params + opt + grads returned (the formula's terms); between = live before a step; peak =")
    print("live at a step's peak, then its range; in-step = peak - between; medians over steps and ranks")


if __name__ == "__main__":
    main()
