"""Step time of ``xf.shard(step, "replicate")`` against ``torch.nn.parallel.DistributedDataParallel``,
and the collectives ``xf.shard(xf.accumulate(step, k), strategy)`` issues per micro-batch.

Timing: two processes in one gloo group (``xform.distributed.procs.ProcessPool``: spawned, ``file://``
store, one thread each). The model is an MLP of 2.1M parameters (512-1024-1024-512: 8 MiB
of fp32 gradients, so communication matters), batch 32 per process, AdamW (foreach), MSE
loss. Every variant starts from the same weights and sees the same data; inside the same
processes the variants run in interleaved rounds of ``--steps`` steps (the order reverses
every round), after ``--warmup`` steps of each. A round's time is the slower rank's. Each
round gives a paired ratio of two variants (both ran back to back, so drift in the load
hits both): the tables give the median of the paired ratios with their quartiles
``[q1, q3]`` (half the rounds fall inside) and their range, beside the medians of the
per-round times. Single rounds are noisy: read the spread before the median.

"cpu ms" (and the "own CPU" ratios) is the CPU time per step of each process's calling
thread (``time.thread_time``), averaged over the processes: the runner's own work (Python,
the copies into the buckets, launching the collectives) without the waits for the other
process and for gloo's threads, which make step times on 2 cores scatter by +-10% from
round to round. Gloo's own threads are not in it (the same collectives for every runner).

Variants: DDP with its default buckets (25 MB, the first one 1 MB) and with
``bucket_cap_mb=2``; xform with ``Replicate(bucket_mb=25)`` (its default) and 2. The last
column is each variant's bucket layout (DDP's as rebuilt after its first step), and
``max|w-w0|`` the largest difference of its weights from the first variant's after the same
steps (0: the same math). The last lines pair equal layouts.

Counts: the ``torch.distributed`` collectives (``all_reduce``, ``reduce_scatter_tensor``,
``all_gather_into_tensor``, ``broadcast``, and ``all_gather_single``/``reduce_scatter_single``
that FSDP2 calls) and ``ProcessGroup.allreduce`` (which xform's buckets call) are wrapped
with counters in each process; the step that ``accumulate`` wraps reads them before and
after each micro-batch. "after" counts the collectives of the
step issued outside its micro-batches. The second step is counted (the first one also
creates the optimizer state). DDP is not counted: its reducer calls c10d from C++.

``--micro K`` times steps of K micro-batches of ``--batch`` rows each:
``xf.shard(xf.accumulate(step, K), "replicate")`` against DDP accumulating under
``no_sync()`` on all but the last micro-batch (its documented way).

``--dims 64x101`` times a model of 100 small layers instead (200 parameter tensors, 0.4M
params): there the cost per parameter tensor (xform's Python autograd hooks against DDP's
C++ reducer) dominates the communication. ``--dims lenet --batch 4``: LeNet-5 on 28x28
images, 4 per process: a step of little math, where the wrapper's own cost shows.

Run: ``.venv/bin/python bench/ddp.py`` (``--rounds 20 --steps 10``; ``--dims``, ``--batch``,
``--buckets``, ``--ddp-buckets``, ``--accumulate 4``; ``--no-timing``, ``--no-counts``;
``--profile`` prints a cProfile of DDP's and xform's steps on rank 0). About a minute.
``--quick``: 3 rounds of 2 steps, to check that the script runs, not for figures.
"""

from __future__ import annotations

import argparse
import collections
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

import xform as xf
from xform.testing import counting_collectives
from _common import mse_step, quartiles  # bench/ is the script's directory

DIMS = (512, 1024, 1024, 512)
BATCH = 32  # per process


def mlp(dims: "tuple[int, ...] | str" = DIMS) -> torch.nn.Module:
    torch.manual_seed(0)
    if dims == "lenet":
        return lenet()
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(dims) - 2 else [])
    return torch.nn.Sequential(*layers)


def lenet() -> torch.nn.Module:
    """LeNet-5 on 28x28 images (61.7K params in 10 tensors): little math per parameter
    tensor, so the per-step cost of the wrapper around it shows."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )


def batch_for(rank: int, dims: "tuple[int, ...] | str" = DIMS, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    if dims == "lenet":
        return torch.randn(n, 1, 28, 28, generator=g), torch.randn(n, 10, generator=g)
    return torch.randn(n, dims[0], generator=g), torch.randn(n, dims[-1], generator=g)


def parse_dims(text: str) -> "tuple[int, ...] | str":
    """``"512,1024,1024,512"``, ``"64x101"`` for 101 widths of 64 (100 layers), or ``"lenet"``."""
    if text == "lenet":
        return text
    if "x" in text:
        width, count = text.split("x")
        return (int(width),) * int(count)
    return tuple(int(d) for d in text.split(","))


xform_step = mse_step


# --- timing ---------------------------------------------------------------------------------


def _ddp_runner(bucket_mb: float | None, dims: tuple[int, ...], micro: int = 1):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(mlp(dims), bucket_cap_mb=bucket_mb)  # None: DDP's default, 25 MB with a 1 MB first bucket
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)

    def run(batch):
        x, y = batch
        opt.zero_grad(set_to_none=True)
        if micro == 1:
            F.mse_loss(model(x), y).backward()
        else:  # accumulation as DDP's documentation has it: no_sync on all but the last micro-batch
            xs, ys = x.chunk(micro), y.chunk(micro)
            with model.no_sync():
                for i in range(micro - 1):
                    (F.mse_loss(model(xs[i]), ys[i]) / micro).backward()
            (F.mse_loss(model(xs[-1]), ys[-1]) / micro).backward()
        opt.step()

    def layout():  # bucket sizes in MB (DDP rebuilds its buckets after the first step)
        data = model._get_ddp_logging_data()
        sizes = str(data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes", ""))  # "2099200, 6299648"
        return [round(int(b) / 2**20, 2) for b in sizes.replace(",", " ").split()]

    return run, lambda: {k: v.detach() for k, v in model.module.named_parameters()}, layout


def _xform_runner(bucket_mb: float, dims: tuple[int, ...], micro: int = 1):
    from xform.backends.torch_native.data_parallel import _Plan

    step = xf.shard(xf.accumulate(xform_step, micro), xf.Replicate(bucket_mb=bucket_mb))
    box = [step.init(xf.TrainState.create(mlp(dims), optimizer=torch.optim.AdamW, lr=1e-3))]

    def run(batch):
        box[0], _ = step(box[0], batch)

    def layout():  # the backend's bucket plan, in MB
        params = box[0].params
        plan = _Plan(params, list(params), 0, 2, bucket_mb, False)
        return [round(n * 4 / 2**20, 2) for n in plan.sizes]

    return run, lambda: {k: v.detach() for k, v in box[0].params.items()}, layout


def _timed(run, batch, steps: int) -> tuple[float, float]:
    """Wall seconds of ``steps`` steps, and the CPU seconds of this (the calling) thread in them."""
    dist.barrier()
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        run(batch)
    return time.perf_counter() - start, time.thread_time() - cpu


def _name(kind: str, mb: float | None) -> str:
    return f"{kind} " + ("default" if mb is None else f"{mb:g} MB")


def time_worker(
    rounds: int, steps: int, warmup: int, variants: list[tuple[str, float | None]], dims, n: int, micro: int = 1
) -> dict:
    batch = batch_for(dist.get_rank(), dims, n * micro)
    runners = {_name(kind, mb): (_ddp_runner if kind == "ddp" else _xform_runner)(mb, dims, micro) for kind, mb in variants}
    for run, _, _ in runners.values():
        for _ in range(warmup):
            run(batch)
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            wall, own = _timed(runners[n][0], batch, steps)
            times[n].append(wall / steps)
            cpu[n].append(own / steps)
    # Same init, same data, same number of steps: the weights should agree to rounding.
    ref = runners[names[0]][1]()
    diff = {}
    for n, (_, weights, _) in runners.items():
        w = weights()
        diff[n] = max(float((w[k] - ref[k]).abs().max()) for k in ref)
    return {"times": times, "cpu": cpu, "diff": diff, "layout": {n: r[2]() for n, r in runners.items()}}


def profile_worker(steps: int, kind: str, bucket_mb: float | None, dims) -> str | None:
    """cProfile of ``steps`` steps on rank 0 (the other rank runs the same steps)."""
    import cProfile
    import io
    import pstats

    batch = batch_for(dist.get_rank(), dims)
    run = (_ddp_runner if kind == "ddp" else _xform_runner)(bucket_mb, dims)[0]
    for _ in range(5):
        run(batch)
    prof = cProfile.Profile() if dist.get_rank() == 0 else None
    dist.barrier()
    if prof:
        prof.enable()
    for _ in range(steps):
        run(batch)
    if prof is None:
        return None
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
    return out.getvalue()


# --- collective counts ----------------------------------------------------------------------


def count_worker(strategy: str, k: int) -> dict:
    # torch 2.13 deprecates the *_tensor collectives the zero1/zero2 code calls; counted all the same
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\..*_single`")
    with counting_collectives() as calls:
        micro: list[collections.Counter[str]] = []

        def counted_step(state, batch):
            before = calls.copy()
            out = xform_step(state, batch)
            micro.append(calls - before)
            return out

        step = xf.shard(xf.accumulate(counted_step, k), strategy)
        state = step.init(xf.TrainState.create(mlp(), optimizer=torch.optim.AdamW, lr=1e-3))
        batch = batch_for(dist.get_rank(), DIMS, BATCH * k)
        state, _ = step(state, batch)  # the first step also creates the optimizer state
        micro.clear()
        before = calls.copy()
        state, _ = step(state, batch)
        total = calls - before
    after = total - sum(micro, collections.Counter())
    return {"micro": [dict(c) for c in micro], "after": dict(after)}


def _fmt(c: dict[str, int]) -> str:
    n = sum(c.values())
    return f"{n}" + (" (" + ", ".join(f"{v} {k}" for k, v in sorted(c.items())) + ")" if n else "")


def _mb(text: str) -> float | None:
    return None if text == "default" else float(text)



def _spread(xs: list[float]) -> str:
    q1, q2, q3 = quartiles(xs)
    return f"{q2:.3f} [{q1:.3f}, {q3:.3f}] range {min(xs):.3f}-{max(xs):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (median over them)")
    parser.add_argument("--steps", type=int, default=10, help="steps per round and variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--dims", default=",".join(map(str, DIMS)),
        help="MLP widths for the timing, or WxN for N widths of W: 64x101 (200 small tensors) shows per-parameter "
        "costs; or lenet (LeNet-5 on 28x28 images, e.g. with --batch 4)",
    )
    parser.add_argument("--batch", type=int, default=BATCH, help="batch per process for the timing")
    parser.add_argument("--ddp-buckets", default="default,2", help="DDP bucket_cap_mb values ('default': DDP's own)")
    parser.add_argument("--buckets", default="25,2", help="xform Replicate(bucket_mb=...) values")
    parser.add_argument("--accumulate", type=int, default=4, help="k for the collective counts")
    parser.add_argument(
        "--micro", type=int, default=1,
        help="time steps of MICRO micro-batches of --batch rows: xf.shard(xf.accumulate(step, MICRO)) against DDP "
        "with no_sync on all but the last",
    )
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--no-counts", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile DDP's and xform's steps on rank 0")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 steps: checks the script runs")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup = 3, 2, 1
    torch.set_num_threads(1)

    from xform.distributed.procs import ProcessPool

    dims = parse_dims(args.dims)
    n_params = sum(p.numel() for p in mlp(dims).parameters())
    summary: list[str] = []
    with ProcessPool(2, timeout_s=600) as pool:
        if not args.no_timing:
            variants = [("ddp", _mb(b)) for b in args.ddp_buckets.split(",")]
            variants += [("xform", _mb(b)) for b in args.buckets.split(",")]
            n_tensors = len(list(mlp(dims).parameters()))
            print(
                f"{'LeNet-5' if dims == 'lenet' else 'MLP ' + args.dims} ({n_params / 1e6:.2f}M params in {n_tensors} "
                f"tensors, {n_params * 4 / 2**20:.1f} MiB of fp32 grads), "
                f"batch {args.batch}/process" + (f" x {args.micro} micro-batches (accumulate; DDP: no_sync)" if args.micro > 1 else "")
                + ", AdamW foreach, 2 gloo processes x 1 thread"
            )
            print(
                f"{args.rounds} interleaved rounds x {args.steps} steps after {args.warmup} warm-up steps; "
                "per-round ms/step of the slower rank"
            )
            res = pool.run(time_worker, args.rounds, args.steps, args.warmup, variants, dims, args.batch, args.micro)
            names = list(res[0]["times"])
            per_round = {n: [max(r["times"][n][i] for r in res) for i in range(args.rounds)] for n in names}
            cpu_round = {n: [sum(r["cpu"][n][i] for r in res) / len(res) for i in range(args.rounds)] for n in names}
            ref = names[0]
            print(
                f"{'variant':18s} {'median ms':>9s} {'q1 ms':>7s} {'q3 ms':>7s}  "
                f"{'paired / ' + ref + ': median [q1, q3] range':>45s}  {'cpu ms':>6s}  {'max|w-w0|':>9s}  buckets (MB)"
            )
            for n in names:
                q1, med, q3 = quartiles(per_round[n])
                paired = [a / b for a, b in zip(per_round[n], per_round[ref])]
                print(
                    f"{n:18s} {med * 1e3:9.2f} {q1 * 1e3:7.2f} {q3 * 1e3:7.2f}  {_spread(paired):>45s}  "
                    f"{quartiles(cpu_round[n])[1] * 1e3:6.3f}  {res[0]['diff'][n]:9.1e}  {res[0]['layout'][n]}"
                )
            pairs = [("defaults", "ddp default", "xform 25 MB")]  # xform's default: Replicate(bucket_mb=25)
            pairs += [("same bucket size", d, "xform" + d[3:]) for d in names if d.startswith("ddp") and d != "ddp default"]
            summary.append(f"shard(step, 'replicate') / DistributedDataParallel, {args.rounds} paired rounds:")
            summary.append(f"  {'pair':62s} {'median [q1, q3] of the paired ratios, range':>45s}")
            for what, d, x in pairs:
                if d in per_round and x in per_round:
                    for label, table in (("step time", per_round), ("own CPU", cpu_round)):
                        paired = [a / b for a, b in zip(table[x], table[d])]
                        summary.append(f"  {what + ': ' + x + ' / ' + d + ', ' + label:62s} {_spread(paired):>45s}")
        if args.profile:
            for kind, mb in (("ddp", None), ("xform", 25.0)):
                print(f"--- cProfile, rank 0, 50 steps of {_name(kind, mb)}")
                print(pool.run(profile_worker, 50, kind, mb, dims)[0])
        if not args.no_counts:
            k = args.accumulate
            print(f"\ncollectives per micro-batch of xf.shard(xf.accumulate(step, {k}), strategy), 2 processes, 2nd step, rank 0:")
            summary.append(f"collectives of xf.shard(xf.accumulate(step, {k}), strategy), 2nd step, rank 0:")
            summary.append(f"  {'strategy':9s} {f'mb0-mb{k - 2} (sum)':>18s} {f'mb{k - 1}':>16s} {'after':>6s}")
            for strategy in ("replicate", "zero1", "zero2", "zero3"):
                per_rank = pool.run(count_worker, strategy, k)
                r = per_rank[0]
                if any(other != r for other in per_rank):
                    print(f"  (the ranks differ: {per_rank})")
                cells = "  ".join(f"mb{i}: {_fmt(c)}" for i, c in enumerate(r["micro"]))
                print(f"{strategy:9s} {cells}  after: {_fmt(r['after'])}")
                early = sum(sum(c.values()) for c in r["micro"][:-1])
                last = sum(r["micro"][-1].values()) if r["micro"] else 0
                summary.append(f"  {strategy:9s} {early:18d} {last:16d} {sum(r['after'].values()):6d}")
    if summary:
        print("\n== ddp: summary ==")
        print("\n".join(summary))


if __name__ == "__main__":
    main()
