"""Per-step time of the XLA step against the same step in eager PyTorch on the CPU, and the
time of the first steps (tracing + XLA compilation).

Runs in ``.venv-xla`` (``bash scripts/xla_env.sh``) on PJRT's CPU client:
``PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 .venv-xla/bin/python bench/xla.py``. ``--devices 1``
(``CPU_NUM_DEVICES=1``) times one device, the like-for-like comparison with one eager
process; with 4 the XLA step is SPMD over 4 CPU "devices" that share the same cores.

The model is an MLP (``--dims``, default 512-1024-1024-512, 2.1M params), AdamW with
clipping, cross-entropy, batch ``--batch`` (64). Variants: ``eager`` (the plain xform step
on CPU tensors, ``torch.set_num_threads(--threads)``) and ``xla`` (``xf.shard(step,
"replicate", backend="xla")``). Both start from the same weights and see the same data.
After 3 warm-up steps of each (the XLA step compiles during its first 2), they run in
interleaved rounds of ``--steps`` steps (order reversed every round); an XLA round ends with
``wait_device_ops`` so its time includes the execution. Printed: median per-step time
with quartiles, the paired ratio xla/eager per round with quartiles, the first steps'
times, the compile count after warm-up and at the end (equal: no recompilation), and the
largest difference of the weights after the same steps.

``--quick``: 3 rounds of 2 steps of a small model, to check that the script runs.
"""

from __future__ import annotations

import argparse
import os
import time

from _common import quartiles  # bench/ is the script's directory

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", default="512x1024x1024x512")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--devices", type=int, default=None, help="CPU_NUM_DEVICES (default: the environment's, else 4)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.dims, a.batch, a.rounds, a.steps = "32x64x16", 16, 3, 2
    if a.devices is not None:
        os.environ["CPU_NUM_DEVICES"] = str(a.devices)
    os.environ.setdefault("CPU_NUM_DEVICES", "4")

    import torch
    import torch.nn.functional as F
    import torch_xla.core.xla_model as xm

    import xform as xf
    from xform.backends.xla import XlaBackend, compilations
    from xform.core.strategies import Replicate

    XlaBackend().layout(Replicate(), None)._start()  # SPMD before any CPU backward pass
    torch.set_num_threads(a.threads)
    dims = [int(d) for d in a.dims.split("x")]

    def make():
        torch.manual_seed(0)
        layers = []
        for i, (m, n) in enumerate(zip(dims, dims[1:])):
            layers += [torch.nn.Linear(m, n)] + ([torch.nn.GELU()] if i < len(dims) - 2 else [])
        return xf.TrainState.create(torch.nn.Sequential(*layers), optimizer=torch.optim.AdamW, lr=1e-3, max_grad_norm=1.0)

    def step(state, batch):
        def loss_fn(params):
            return F.cross_entropy(xf.apply(state, params, batch["x"]), batch["y"])

        loss, grads = xf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    g = torch.Generator().manual_seed(1)
    batches = [
        {"x": torch.randn(a.batch, dims[0], generator=g), "y": torch.randint(0, dims[-1], (a.batch,), generator=g)}
        for _ in range(4)
    ]
    xla_step = xf.shard(step, "replicate", backend="xla")
    states = {"eager": make(), "xla": xla_step.init(make())}
    steps = {"eager": step, "xla": xla_step}
    first: dict[str, list[float]] = {}
    seen = {"eager": 0, "xla": 0}  # each variant sees the same batches in the same order

    def run(name: str, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            states[name], _ = steps[name](states[name], batches[seen[name] % len(batches)])
            seen[name] += 1
        if name == "xla":
            xm.wait_device_ops()
        return (time.perf_counter() - t0) / n

    for name in steps:
        first[name] = [run(name, 1) for _ in range(3)]
    compiled_after_warmup = compilations()
    times: dict[str, list[float]] = {"eager": [], "xla": []}
    for r in range(a.rounds):
        order = ("eager", "xla") if r % 2 == 0 else ("xla", "eager")
        for name in order:
            times[name].append(run(name, a.steps))
    ratios = [x / e for x, e in zip(times["xla"], times["eager"])]
    n_dev = os.environ["CPU_NUM_DEVICES"]
    params = sum(p.numel() for p in states["eager"].params.values())
    print(f"xla: MLP {a.dims} ({params / 1e6:.2f}M params), batch {a.batch}, AdamW + clipping; "
          f"{a.rounds} rounds x {a.steps} steps; eager on {a.threads} thread(s); XLA on {n_dev} PJRT CPU device(s)")
    print(f"{'variant':8} {'median ms/step':>15} {'[q1, q3]':>18}   first 3 steps (ms)")
    for name in ("eager", "xla"):
        q1, med, q3 = quartiles(times[name])
        print(f"{name:8} {med * 1e3:15.2f} [{q1 * 1e3:7.2f}, {q3 * 1e3:7.2f}]   "
              + " ".join(f"{t * 1e3:.0f}" for t in first[name]))
    q1, med, q3 = quartiles(ratios)
    print(f"ratio xla/eager (paired per round): {med:.2f} [{q1:.2f}, {q3:.2f}]")
    print(f"XLA compilations: {compiled_after_warmup} after warm-up, {compilations()} at the end")
    diff = max(
        (states["xla"].params[k].cpu() - states["eager"].params[k]).abs().max().item() for k in states["eager"].params
    )
    print(f"max |w_xla - w_eager| after the same {3 + a.rounds * a.steps} steps: {diff:.2e}")


if __name__ == "__main__":
    main()
