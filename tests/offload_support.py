"""Functions the offload tests run in subprocesses and pool processes (importable by
spawned workers), and the resident-memory probe (``python tests/offload_support.py MODE DIR``)."""

from __future__ import annotations

import ctypes
import gc
import json
import sys

import torch
import torch.nn.functional as F

import xform as xf
from xform.transforms import offload as offload_module

WIDTH, DEPTH = 1024, 8  # 8.4M params: 32 MiB of params, 64 MiB of AdamW state
CHUNK_MB = 4


def wide(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH)])


def mse_step(state, batch):
    def loss_fn(params):
        return F.mse_loss(xf.apply(state, params, batch["x"]), batch["y"])

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def small() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 33), torch.nn.Tanh(), torch.nn.Linear(33, 3))


def replicated(directory: str | None) -> dict[str, torch.Tensor]:
    """Four AdamW steps (clipped) of ``shard(accumulate(step, 2), "replicate")`` on this
    process's half of each global batch, with ``offload(optimizer="disk", params="disk")``
    outside when ``directory`` is given; returns the params."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    step = xf.shard(xf.accumulate(mse_step, 2), "replicate")
    if directory is not None:
        step = xf.offload(step, optimizer="disk", params="disk", dir=f"{directory}/{rank}", chunk_mb=1e-3)
    state = step.init(xf.TrainState.create(small(), optimizer=torch.optim.AdamW, lr=1e-2, max_grad_norm=0.5))
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        b = {"x": torch.randn(8, 5, generator=g), "y": torch.randn(8, 3, generator=g)}
        n = 8 // world
        state, _ = step(state, {k: v[rank * n : (rank + 1) * n] for k, v in b.items()})
    return {k: v.detach().clone() for k, v in state.params.items()}


def _status(field: str) -> int:
    """A ``/proc/self/status`` figure, in bytes (VmRSS: resident now; VmHWM: its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size (Linux >= 4.0)
        f.write("5")


def resident_probe(mode: str, directory: str, steps: int = 3) -> dict[str, int]:
    """Peak resident memory of ``steps`` AdamW steps of ``wide()``, plain or with the
    optimizer state (``optimizer``) or params and state (``both``) on disk, counted from
    the process's resident size before the model exists (``params``: params on disk only)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(4, WIDTH, generator=g), "y": torch.randn(4, WIDTH, generator=g)} for _ in range(steps)]
    gc.collect()
    before = _status("VmRSS")
    step = mse_step
    if mode == "optimizer":
        step = xf.offload(mse_step, optimizer="disk", dir=directory, chunk_mb=CHUNK_MB)
    elif mode == "params":
        step = xf.offload(mse_step, params="disk", dir=directory, chunk_mb=CHUNK_MB)
    elif mode == "both":
        step = xf.offload(mse_step, params="disk", optimizer="disk", dir=directory, chunk_mb=CHUNK_MB)
    state = xf.TrainState.create(wide(), optimizer=torch.optim.AdamW, lr=1e-3)
    state = getattr(step, "init", lambda s: s)(state)
    with torch.no_grad():  # binds the module to the state's (moved) params: the originals are freed now
        xf.apply(state, state.params, batches[0]["x"][:1])
    for p in state.params.values():  # file-backed params: their pages leave as a step leaves them
        offload_module._drop(p)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system: "start" counts live memory
    _reset_peak()  # TrainState.create's placeholders of the optimizer state are not counted
    start = _status("VmRSS")
    for b in batches:
        state, metrics = step(state, b)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    end = _status("VmRSS")  # what stays resident between steps
    params = sum(p.numel() * p.element_size() for p in state.params.values())
    opt = sum(v.numel() * v.element_size() for e in state.opt_state["state"].values() for v in e.values())
    return {"before": before, "start": start, "end": end, "peak": _status("VmHWM"), "params": params, "opt": opt,
            "loss": float(metrics["loss"])}


if __name__ == "__main__":
    print(json.dumps(resident_probe(sys.argv[1], sys.argv[2])))
