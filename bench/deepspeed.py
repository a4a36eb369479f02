"""DeepSpeed ZeRO-1/2/3 (``xf.DeepSpeed(stage=k)``) against the native ``zero1``/``zero2``/``zero3``:
per-step time and measured per-process memory, on the same model, data and processes.

Setup: two processes in one gloo group (``xform.distributed.procs.ProcessPool``, one thread
each), DeepSpeed's CPU accelerator. The model is an MLP 512-1024-1024-512 (2.1M params),
batch 32 per process, fp32, AdamW (foreach; DeepSpeed gets the same torch optimizer as a
client optimizer), MSE loss. Every variant starts from the same weights and sees the same
batch; the weights agree after the same steps (``max|w-w0|``, fp32 rounding).

Time: inside the same processes, the six variants run in interleaved rounds of
``--steps`` steps (the order reverses every round) after ``--warmup`` steps each; a
round's time is the slower rank's. Each round gives a paired ratio DeepSpeed / native for
each stage (both ran in the same round, so drift in the machine's load hits both): the
table gives the median of the per-round times, and the median of the paired ratios with
their quartiles ``[q1, q3]`` and range.

Memory, per variant in the same processes, one variant alive at a time: "between" is
the bytes of the CPU storages of every tensor Python can reach before a step (after
``gc.collect()``), less those reachable before the variant was built: what the layout
keeps (params, masters, optimizer state, the engine's flat buffers). "peak" adds the
largest live count of the step's own allocations, replayed in order from
``torch.profiler`` (``profile_memory=True``) allocation and free events on the profiled
thread (``bench/memory.py``'s ``replay``). Medians over ``--mem-steps`` steps and both ranks.

Run: ``.venv/bin/python bench/deepspeed.py`` (``--rounds 10 --steps 5``). ``--quick``: a
small model, 2 rounds of 2 steps: checks that the script runs, not for figures.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == HERE:  # this file is called deepspeed.py: never shadow the package
    sys.path.pop(0)
sys.path.append(str(HERE))  # last: for bench/_stats.py only

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import xform as xf  # noqa: E402
from _common import mse_step, quartiles  # noqa: E402

DIMS = (512, 1024, 1024, 512)
QUICK_DIMS = (64, 128, 64)
BATCH = 32
STAGES = (1, 2, 3)
NATIVE = {1: "zero1", 2: "zero2", 3: "zero3"}


def mlp(dims) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(dims) - 2 else [])
    return torch.nn.Sequential(*layers)


step = mse_step


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def _runner(kind: str, stage: int, dims):
    strategy = xf.DeepSpeed(stage=stage) if kind == "deepspeed" else NATIVE[stage]
    sharded = xf.shard(step, strategy)
    box = [sharded.init(xf.TrainState.create(mlp(dims), optimizer=torch.optim.AdamW, lr=1e-3))]

    def run(batch):
        box[0], _ = sharded(box[0], batch)

    def weights():
        if kind == "deepspeed":
            from xform.backends.deepspeed import full_params

            return full_params(box[0])
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in box[0].params.items()}

    return run, weights


def _batch(dims):
    g = torch.Generator().manual_seed(1000 + dist.get_rank())
    return torch.randn(BATCH, dims[0], generator=g), torch.randn(BATCH, dims[-1], generator=g)


def time_worker(rounds: int, steps: int, warmup: int, dims) -> dict:
    _quiet()
    batch = _batch(dims)
    runners = {f"{kind} {s}": _runner(kind, s, dims) for s in STAGES for kind in ("native", "deepspeed")}
    for run, _ in runners.values():
        for _ in range(warmup):
            run(batch)
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            run = runners[n][0]
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                run(batch)
            times[n].append((time.perf_counter() - start) / steps)
    ref = runners[names[0]][1]()
    diff = {}
    for n, (_, weights) in runners.items():
        w = weights()
        diff[n] = max(float((w[k] - ref[k]).abs().max()) for k in ref)
    return {"times": times, "diff": diff}


def _reachable_bytes() -> int:
    """Bytes of the CPU storages of every tensor Python can reach (each storage once)."""
    gc.collect()
    seen: dict[int, int] = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor):
            t = o._local_tensor if hasattr(o, "_local_tensor") else o
            if t.device.type == "cpu":
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _membench():
    """bench/memory.py, for its profiler replay (loaded by path: this directory is not on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("xform_bench_memory", HERE / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def memory_worker(kind: str, stage: int, steps: int, dims) -> dict:
    _quiet()
    from torch.profiler import ProfilerActivity, profile, record_function

    replay = _membench().replay
    base = _reachable_bytes()
    run, _ = _runner(kind, stage, dims)
    batch = _batch(dims)
    run(batch)  # creates the optimizer state
    between, peaks = [], []
    for _ in range(steps):
        held = _reachable_bytes() - base
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with record_function("xform-bench: step"):
                run(batch)
        span = replay(prof, ["xform-bench: step"], {})["xform-bench: step"]
        between.append(held)
        peaks.append(held + span["peak"] - span["before"])
    return {"between": between, "peaks": peaks}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mem-steps", type=int, default=3, help="measured steps for memory (after a first one)")
    parser.add_argument("--quick", action="store_true", help="small model, 2 rounds of 2 steps: checks the script runs")
    args = parser.parse_args()
    dims = DIMS
    if args.quick:
        dims, args.rounds, args.steps, args.warmup, args.mem_steps = QUICK_DIMS, 2, 2, 1, 1
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from xform.distributed.procs import ProcessPool

    psi = sum(p.numel() for p in mlp(dims).parameters())
    print(f"MLP {'-'.join(map(str, dims))}: {psi:,} params; fp32 AdamW, batch {BATCH}/process, 2 processes (gloo, CPU)")
    memory = {}
    with ProcessPool(2, timeout_s=900) as pool:
        per_rank = pool.run(time_worker, args.rounds, args.steps, args.warmup, dims)
        for kind in ("native", "deepspeed"):
            for s in STAGES:
                res = pool.run(memory_worker, kind, s, args.mem_steps, dims)
                memory[f"{kind} {s}"] = (
                    statistics.median(b for r in res for b in r["between"]),
                    statistics.median(p for r in res for p in r["peaks"]),
                )
    names = list(per_rank[0]["times"])
    rounds = {n: [max(r["times"][n][i] for r in per_rank) for i in range(args.rounds)] for n in names}
    print(f"\n{'variant':<14}{'ms/step median':>16}{'between MiB':>13}{'peak MiB':>10}{'max|w-w0|':>11}")
    for n in names:
        between, peak = memory[n]
        print(f"{n:<14}{1e3 * statistics.median(rounds[n]):>16.2f}{between / 2**20:>13.2f}{peak / 2**20:>10.2f}"
              f"{per_rank[0]['diff'][n]:>11.1e}")
    print("\n== deepspeed: DeepSpeed / native, per stage (time: paired per-round ratios, median [q1, q3] range; memory: medians)")
    for s in STAGES:
        ratios = [d / n for d, n in zip(rounds[f"deepspeed {s}"], rounds[f"native {s}"])]
        q1, med, q3 = quartiles(ratios)
        mem_b = memory[f"deepspeed {s}"][0] / memory[f"native {s}"][0]
        mem_p = memory[f"deepspeed {s}"][1] / memory[f"native {s}"][1]
        print(f"zero{s}: time {med:.2f} [{q1:.2f}, {q3:.2f}] range {min(ratios):.2f}-{max(ratios):.2f}; "
              f"memory between {mem_b:.2f}, peak {mem_p:.2f}")


if __name__ == "__main__":
    main()
