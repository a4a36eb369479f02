"""Per-process bytes of params + gradients + optimizer state under replicate / zero1 /
zero2 / zero3, measured, against the ZeRO paper's formulas.

fp32 AdamW on CPU (Psi = number of parameters): replicate 16 Psi (4 params + 4 grads + 8
Adam), zero1 4 Psi + 4 Psi + 8 Psi/N, zero2 4 Psi + 12 Psi/N, zero3 16 Psi/N. The
mixed-precision formulas (fp16/bf16 params and grads, fp32 master + Adam = 12 Psi) are
printed for reference: 16 Psi, 4 Psi + 12 Psi/N, 2 Psi + 14 Psi/N, 16 Psi/N.

Measured in every process of a gloo group of N (``xform.distributed.procs.ProcessPool``), on the
second real step of ``xf.shard(step, strategy)``:

- params: local bytes of ``state.params`` (a DTensor counts its ``to_local()``).
- grads: local bytes of the gradients ``xf.value_and_grad`` returned inside the step
  (the ones the strategy keeps and hands to ``apply_gradients``): whole under replicate
  and zero1, this process's rows under zero2, DTensor shards under zero3.
  The storages behind them are checked too (a note is printed where they hold more).
- optimizer: local bytes of the tensors in ``state.opt_state["state"]`` (``exp_avg``,
  ``exp_avg_sq``). The 0-dim ``step`` counters (4 bytes per parameter tensor) are left
  out of the total and shown in their own column.

Also shown, not in the total: "in-step bufs", the flat buckets that replicate/zero1/zero2
allocate for each step's gradient communication, plus zero2's reduce-scatter outputs.
Under replicate and zero1 the buckets become the returned gradients (the same bytes as
"grads"); under zero2 the whole flat gradient (4 Psi) lives while the backward pass runs,
beside the 4 Psi/N rows that it keeps. zero3's in-step memory (FSDP2's gathered params)
is not measured.

The model (an MLP 512 -> 512 -> 1024 -> 256, Psi = 1,050,368) has every first dimension
divisible by 4, so the row shards are exact. The printed ratio is measured / formula of
the process with the most bytes (all processes are listed when they differ).

Run: ``.venv/bin/python bench/memory.py`` (``--nprocs 2,4``).
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

import xform as xf
from xform.backends.torch_native import data_parallel as torch_native

DIMS = (512, 512, 1024, 256)
BATCH = 8  # per process
STRATEGIES = ("replicate", "zero1", "zero2", "zero3")


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(DIMS, DIMS[1:])):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(DIMS) - 2 else [])
    return torch.nn.Sequential(*layers)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def formulas(strategy: str, psi: int, n: int) -> tuple[float, float]:
    """(fp32 Adam bytes, mixed-precision Adam bytes) per process."""
    return {
        "replicate": (16 * psi, 16 * psi),
        "zero1": (4 * psi + 4 * psi + 8 * psi / n, 4 * psi + 12 * psi / n),
        "zero2": (4 * psi + 12 * psi / n, 2 * psi + 14 * psi / n),
        "zero3": (16 * psi / n, 16 * psi / n),
    }[strategy]


def measure_worker(strategy: str) -> dict[str, int]:
    # torch 2.13 deprecates the *_tensor collectives the zero1/zero2 code calls; not ours to measure here
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\..*_single`")
    seen: list[tuple[int, int]] = []
    peaks: dict[int, int] = {}  # per step's _Comm: peak bytes of its flat buffers (replicate/zero1/zero2)
    launch = torch_native._Comm._launch_ready

    def recording_launch(comm, *args, **kwargs):
        launch(comm, *args, **kwargs)  # called as each gradient arrives: the buffers alive now
        alive = sum(_bytes(b) for b in comm.bufs + comm.outs if b is not None)
        peaks[id(comm)] = max(alive, peaks.get(id(comm), 0))

    def step(state, batch):
        x, y = batch

        def loss_fn(params):
            return F.mse_loss(xf.apply(state, params, x), y)

        loss, grads = xf.value_and_grad(loss_fn)(state.params)
        local = [_local(g) for g in grads.values()]
        storages = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes() for g in local}
        seen.append((sum(_bytes(g) for g in local), sum(storages.values())))
        return state.apply_gradients(grads), {"loss": loss}

    sharded = xf.shard(step, strategy)
    state = sharded.init(xf.TrainState.create(mlp(), optimizer=torch.optim.AdamW, lr=1e-3))
    g = torch.Generator().manual_seed(dist.get_rank())
    batch = (torch.randn(BATCH, DIMS[0], generator=g), torch.randn(BATCH, DIMS[-1], generator=g))
    torch_native._Comm._launch_ready = recording_launch
    try:
        for _ in range(2):  # the first step creates the optimizer state
            state, _ = sharded(state, batch)
    finally:
        torch_native._Comm._launch_ready = launch
    opt = counters = 0
    for entry in state.opt_state["state"].values():
        for v in entry.values():
            if isinstance(v, torch.Tensor) and v.dim() == 0:
                counters += _bytes(v)
            elif isinstance(v, torch.Tensor):
                opt += _bytes(v)
    return {
        "params": sum(_bytes(p) for p in state.params.values()),
        "grads": seen[-1][0],
        "grad_storage": seen[-1][1],
        "opt": opt,
        "counters": counters,
        "buffers": list(peaks.values())[-1] if peaks else -1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", default="2,4", help="process counts, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from xform.distributed.procs import ProcessPool

    psi = sum(p.numel() for p in mlp().parameters())
    mb = 2**20
    print(f"MLP {'-'.join(map(str, DIMS))}: Psi = {psi:,} params; fp32 AdamW; bytes per process after step 2")
    print("opt = exp_avg + exp_avg_sq; the 0-dim `step` counters are excluded (column 'steps', bytes)")
    print(
        f"{'strategy':9s} {'N':>2s} {'params':>7s} {'grads':>7s} {'opt':>7s} {'steps':>5s} "
        f"{'measured B':>11s} {'formula (fp32)':>13s} {'formula B':>11s} {'ratio':>6s}   {'mixed-prec. formula':>19s}"
        f"  {'in-step bufs':>12s}"
    )
    print(f"{'':12s} {'(MiB)':>7s} {'(MiB)':>7s} {'(MiB)':>7s} {'(B)':>5s}")
    names_fp32 = {"replicate": "16Ψ", "zero1": "4Ψ+4Ψ+8Ψ/N", "zero2": "4Ψ+12Ψ/N", "zero3": "16Ψ/N"}
    names_mixed = {"replicate": "16Ψ", "zero1": "4Ψ+12Ψ/N", "zero2": "2Ψ+14Ψ/N", "zero3": "16Ψ/N"}
    worst = 0.0
    for n in [int(s) for s in args.nprocs.split(",")]:
        with ProcessPool(n, timeout_s=300) as pool:
            for strategy in STRATEGIES:
                per_rank = pool.run(measure_worker, strategy)
                totals = [r["params"] + r["grads"] + r["opt"] for r in per_rank]
                r = per_rank[max(range(n), key=totals.__getitem__)]
                total = max(totals)
                fp32, mixed = formulas(strategy, psi, n)
                ratio = total / fp32
                worst = max(worst, abs(ratio - 1))
                print(
                    f"{strategy:9s} {n:2d} {r['params'] / mb:7.2f} {r['grads'] / mb:7.2f} {r['opt'] / mb:7.2f} "
                    f"{r['counters']:5d} {total:11,d} {names_fp32[strategy]:>13s} {fp32:11,.0f} {ratio:6.3f}   "
                    f"{names_mixed[strategy]:>10s} = {mixed / mb:5.2f} MiB"
                    + (f"  {r['buffers'] / mb:8.2f} MiB" if r["buffers"] >= 0 else f"  {'-':>12s}")
                )
                if r["grad_storage"] != r["grads"]:
                    print(f"{'':12s} the grads' storages hold {r['grad_storage']:,} bytes, not {r['grads']:,}")
                if len(set(totals)) > 1:
                    print(f"{'':12s} totals by rank (bytes): {totals}")
    print(f"largest deviation from the fp32 formula: {worst:.2%}")


if __name__ == "__main__":
    main()
