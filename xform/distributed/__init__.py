"""The process runtime and collectives: ``xf.distributed``.

One script runs as one process (``python train.py``) or as many (``xform launch --nproc 4
train.py``, or ``torchrun``). ``initialize()`` reads the launch environment that the
launcher sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``/``MASTER_PORT``), picks the device (``cuda:LOCAL_RANK`` when CUDA is
available, else the CPU) and the backend (NCCL for CUDA, gloo for the CPU), and joins the
default ``torch.distributed`` process group. Without a launch environment it joins
nothing and every function here answers as the only process: ``rank() == 0``,
``world_size() == 1``, ``reduce(x) is x``.

The collectives take and return pytrees (``xf.tree``, namespace ``"xform"``). They are
for user code (metrics, evaluation, setup); the gradient communication of ``xf.shard``
does not go through them. Their results are detached from autograd.

Example:
    >>> import torch, xform as xf
    >>> rt = xf.distributed.initialize()       # no launcher: one process, no group
    >>> rt.rank, rt.world_size, rt.backend
    (0, 1, None)
    >>> xf.distributed.reduce({"loss": torch.tensor(2.0)}, op="mean")["loss"].item()
    2.0
    >>> xf.distributed.shutdown()
"""

from xform.distributed.collectives import (
    broadcast,
    broadcast_object,
    gather,
    gather_for_metrics,
    gather_object,
    main_process_first,
    reduce,
    sync_rng,
    wait_for_everyone,
)
from xform.distributed.runtime import (
    DEFAULT_TIMEOUT,
    DistributedError,
    Runtime,
    device,
    initialize,
    is_local_main_process,
    is_main_process,
    local_rank,
    rank,
    runtime,
    shutdown,
    world_size,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedError",
    "Runtime",
    "broadcast",
    "broadcast_object",
    "device",
    "gather",
    "gather_for_metrics",
    "gather_object",
    "initialize",
    "is_local_main_process",
    "is_main_process",
    "local_rank",
    "main_process_first",
    "rank",
    "reduce",
    "runtime",
    "shutdown",
    "sync_rng",
    "wait_for_everyone",
    "world_size",
]
