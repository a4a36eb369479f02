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

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
import zlib
from typing import Any, Iterator, Literal

import attrs
import torch
import torch.distributed as dist

from xform import tree as _tree

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

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
TIMEOUT_ENV = "XFORM_TIMEOUT"  # seconds; ``xform launch --timeout`` sets it for its workers
_LAUNCH_ENV = ("RANK", "WORLD_SIZE")
# Backends that communicate host memory: their collectives run on CPU copies.
_HOST_BACKENDS = frozenset({"gloo", "mpi"})


class DistributedError(RuntimeError):
    """A collective or the rendezvous failed: a peer exited, hung past the timeout, or
    the processes disagree on what they exchange."""


@attrs.frozen
class Runtime:
    """Where this process stands: a frozen value returned by ``initialize``.

    Attributes:
        rank, world_size: this process's index among all processes, and their number.
        local_rank, local_world_size: the same within this node.
        device: the device this process computes on (``cuda:LOCAL_RANK`` or ``cpu``).
        backend: the process group's backend (``"gloo"``, ``"nccl"``), or None when no
            group exists (a single process).
        timeout: how long a collective waits for its peers before failing, when known.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str | None
    timeout: datetime.timedelta | None = None

    @property
    def distributed(self) -> bool:
        """Whether a process group exists (also true for a group of one)."""
        return self.backend is not None

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main_process(self) -> bool:
        return self.local_rank == 0


# The runtime of this process, keyed by the default group it describes (None: no group).
# A cache of torch.distributed's own process-wide state, not training state: it is
# recomputed whenever the default group changes under it.
_cache: tuple[Any, Runtime] | None = None


def _group_up() -> bool:
    return dist.is_available() and dist.is_initialized()


def _default_group() -> Any:
    return dist.group.WORLD if _group_up() else None


def runtime() -> Runtime:
    """This process's ``Runtime``: the one ``initialize`` returned, or, when the default
    group was made elsewhere (or not at all), one read from ``torch.distributed``."""
    global _cache
    group = _default_group()
    if _cache is not None and _cache[0] is group:
        return _cache[1]
    rt = _derive(group)
    _cache = (group, rt)
    return rt


def _derive(group: Any) -> Runtime:
    if group is None:
        cuda = torch.cuda.is_available()
        dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return Runtime(rank=0, world_size=1, local_rank=0, local_world_size=1, device=dev, backend=None)
    r, ws = dist.get_rank(), dist.get_world_size()
    backend = str(dist.get_backend())
    host = backend in _HOST_BACKENDS or not torch.cuda.is_available()
    dev = torch.device("cpu") if host else torch.device("cuda", torch.cuda.current_device())
    return Runtime(
        rank=r,
        world_size=ws,
        local_rank=int(os.environ.get("LOCAL_RANK", r)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", ws)),
        device=dev,
        backend=backend,
    )


# --- initialize / shutdown ------------------------------------------------------------------


def _timeout(api: str, timeout: Any) -> datetime.timedelta | None:
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        td = timeout
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        td = datetime.timedelta(seconds=timeout)
    else:
        raise TypeError(
            f"{api}: timeout must be a datetime.timedelta or seconds as a number, got {timeout!r}"
        )
    if td.total_seconds() <= 0:
        raise ValueError(f"{api}: timeout must be positive, got {timeout!r}; e.g. timeout=600 (seconds)")
    return td


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"xf.distributed.initialize: environment variable {name}={value!r} is not an integer; "
            "launch with `xform launch` (or torchrun), which sets it"
        ) from None


def _launch_env() -> tuple[int, int, int, int] | None:
    """``(rank, world_size, local_rank, local_world_size)`` set by a launcher, or None."""
    present = [k for k in _LAUNCH_ENV if k in os.environ]
    if not present:
        return None
    if len(present) != len(_LAUNCH_ENV):
        missing = [k for k in _LAUNCH_ENV if k not in os.environ]
        raise ValueError(
            f"xf.distributed.initialize: the environment sets {present} but not {missing}; a launcher "
            "sets both RANK and WORLD_SIZE. Launch with `xform launch --nproc N script.py`, or unset "
            f"{present} to run as a single process"
        )
    r, ws = _env_int("RANK"), _env_int("WORLD_SIZE")
    if not (ws >= 1 and 0 <= r < ws):
        raise ValueError(f"xf.distributed.initialize: RANK={r} is not in [0, WORLD_SIZE={ws})")
    lr = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else r
    lws = _env_int("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in os.environ else ws
    return r, ws, lr, lws


def _resolve_device(device: Any, local_rank: int) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"xf.distributed.initialize: device={device!r} is not a device; pass e.g. 'cpu' or 'cuda'"
        ) from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ValueError(
            f"xf.distributed.initialize: device={device!r} but CUDA is not available here; pass device='cpu'"
        )
    if dev.index is not None:
        return dev
    count = torch.cuda.device_count()
    if local_rank < count:
        return torch.device("cuda", local_rank)
    if count == 1:  # one GPU made visible to each process (CUDA_VISIBLE_DEVICES per rank)
        return torch.device("cuda", 0)
    raise ValueError(
        f"xf.distributed.initialize: LOCAL_RANK={local_rank} but this node has {count} CUDA devices; "
        f"launch at most {count} processes per node (xform launch --nproc {count})"
    )


def _resolve_backend(backend: Any, dev: torch.device) -> str:
    if backend is None:
        table = dist.Backend.default_device_backend_map
        if dev.type not in table:
            raise ValueError(
                f"xf.distributed.initialize: no default backend for device {dev}; pass backend= "
                f"(one of {sorted(set(table.values()))})"
            )
        return table[dev.type]
    if not isinstance(backend, str):
        raise TypeError(f"xf.distributed.initialize: backend must be a string such as 'gloo', got {backend!r}")
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError(
            f"xf.distributed.initialize: backend='nccl' needs a CUDA device, got device={str(dev)!r}; "
            "use backend='gloo' on the CPU"
        )
    return backend


def initialize(
    *,
    backend: str | None = None,
    device: str | torch.device | None = None,
    timeout: datetime.timedelta | float | None = None,
    init_method: str | None = None,
) -> Runtime:
    """Joins the default process group described by the launch environment.

    Under ``xform launch`` or ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set), every
    process calls this once at start; it returns when all have joined. Without a launch
    environment it creates no group and returns the single-process ``Runtime``.

    Calling it again is harmless: when a group already exists (made by an earlier call,
    or by ``torch.distributed.init_process_group`` directly) it returns that group's
    ``Runtime``, after checking that the settings given here agree with it; settings left
    out are not compared. Call ``shutdown()`` before exiting.

    Args:
        backend: ``"nccl"``, ``"gloo"``, ...; by default torch's backend for ``device``
            (NCCL for CUDA, gloo for the CPU).
        device: the device of this process; by default ``cuda:LOCAL_RANK`` when CUDA is
            available (and made current), else ``cpu``. ``"cuda"`` without an index means
            ``cuda:LOCAL_RANK``.
        timeout: how long a collective or the rendezvous waits for the other processes
            before raising (a ``timedelta`` or seconds); by default ``$XFORM_TIMEOUT``
            seconds (set by ``xform launch --timeout``), else 10 minutes. A peer that
            dies or hangs then turns into an error on the others instead of a hang. With
            NCCL the watchdog enforces it by tearing the process down
            (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, torch's default 3; do not set it to 0).
        init_method: how to rendezvous: by default ``"env://"`` (``MASTER_ADDR`` and
            ``MASTER_PORT``); or ``"tcp://host:port"``, ``"file:///shared/path"``.

    Returns:
        The ``Runtime``: rank, world size, local rank, device, backend.
    """
    api = "xf.distributed.initialize"
    td = _timeout(api, timeout)
    if init_method is not None and not isinstance(init_method, str):
        raise TypeError(f"{api}: init_method must be a string such as 'env://', got {init_method!r}")
    env = _launch_env()
    if _group_up():
        return _check_existing(runtime(), backend=backend, device=device, timeout=td, env=env)
    global _cache
    if env is None:
        if init_method is not None:
            raise ValueError(
                f"{api}: init_method={init_method!r} needs RANK and WORLD_SIZE in the environment; launch "
                "with `xform launch --nproc N script.py` (or torchrun), or leave init_method out to run "
                "as a single process"
            )
        dev = _resolve_device(device, 0)
        _resolve_backend(backend, dev)  # validates an explicit backend against the device
        rt = Runtime(rank=0, world_size=1, local_rank=0, local_world_size=1, device=dev, backend=None)
        _cache = (None, rt)
        return rt

    r, ws, lr, lws = env
    dev = _resolve_device(device, lr)
    be = _resolve_backend(backend, dev)
    if td is None:
        td = _timeout(f"{api} (${TIMEOUT_ENV})", float(os.environ[TIMEOUT_ENV])) if TIMEOUT_ENV in os.environ else DEFAULT_TIMEOUT
    if init_method is None:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(
                f"{api}: RANK and WORLD_SIZE are set but {missing} are not; launch with `xform launch` "
                "(or torchrun), which sets them, or pass init_method='tcp://host:port'"
            )
        init_method = "env://"
    if be == "nccl" and os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") == "0":
        warnings.warn(
            f"{api}: TORCH_NCCL_ASYNC_ERROR_HANDLING=0 disables NCCL's timeout handling: a dead or hung "
            "peer will hang this process instead of failing after the timeout; unset it",
            stacklevel=2,
        )
    kwargs: dict[str, Any] = {}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev
    try:
        dist.init_process_group(
            backend=be, init_method=init_method, timeout=td, rank=r, world_size=ws, **kwargs
        )
    except (RuntimeError, ValueError) as e:
        raise DistributedError(
            f"{api}: rank {r} of {ws} could not join the process group (backend={be!r}, "
            f"init_method={init_method!r}, timeout={td.total_seconds():g} s): {_first_line(e)}. "
            "Check that every process was started and can reach the rendezvous address"
        ) from e
    rt = Runtime(rank=r, world_size=ws, local_rank=lr, local_world_size=lws, device=dev, backend=be, timeout=td)
    _cache = (_default_group(), rt)
    return rt


def _check_existing(
    rt: Runtime, *, backend: Any, device: Any, timeout: datetime.timedelta | None, env: Any
) -> Runtime:
    api = "xf.distributed.initialize"
    diffs = []
    if backend is not None and backend != rt.backend:
        diffs.append(f"backend={backend!r} (the group has {rt.backend!r})")
    if device is not None:
        dev = _resolve_device(device, rt.local_rank)
        if dev != rt.device:
            diffs.append(f"device={str(dev)!r} (the group's is {str(rt.device)!r})")
    if timeout is not None and rt.timeout is not None and timeout != rt.timeout:
        diffs.append(
            f"timeout={timeout.total_seconds():g} s (the group's is {rt.timeout.total_seconds():g} s)"
        )
    if env is not None and (env[0], env[1]) != (rt.rank, rt.world_size):
        diffs.append(
            f"RANK={env[0]}, WORLD_SIZE={env[1]} in the environment (the group has rank {rt.rank} of "
            f"{rt.world_size})"
        )
    if diffs:
        raise ValueError(
            f"{api}: already initialized with other settings: {'; '.join(diffs)}. Call "
            "xf.distributed.shutdown() first to start over, or pass the same settings"
        )
    return rt


def shutdown() -> None:
    """Leaves and destroys the default process group; does nothing when there is none.

    Call it before the process exits: a gloo group left alive at exit can abort the
    process ("terminate called without an active exception").
    """
    global _cache
    if _group_up():
        dist.destroy_process_group()
    _cache = None


# --- accessors ----------------------------------------------------------------------------


def rank() -> int:
    """This process's rank among all processes (0 without a group)."""
    return runtime().rank


def world_size() -> int:
    """The number of processes (1 without a group)."""
    return runtime().world_size


def local_rank() -> int:
    """This process's rank within its node (0 without a group)."""
    return runtime().local_rank


def device() -> torch.device:
    """The device this process computes on."""
    return runtime().device


def is_main_process() -> bool:
    """Whether this is rank 0: the process that logs, saves and prints."""
    return runtime().rank == 0


def is_local_main_process() -> bool:
    """Whether this is the first process of its node (``local_rank() == 0``)."""
    return runtime().local_rank == 0


# --- collectives --------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _comm(api: str, rt: Runtime) -> Iterator[None]:
    """Turns a failed torch collective into a ``DistributedError`` naming the API."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:
        limit = f"{rt.timeout.total_seconds():g} s" if rt.timeout is not None else "the group's timeout"
        raise DistributedError(
            f"{api}: the collective failed on rank {rt.rank} of {rt.world_size}: {_first_line(e)}. "
            f"A peer process exited or did not reach this collective within {limit}; its own output "
            "shows why. If a rank is legitimately slow (e.g. saving a checkpoint), raise the timeout: "
            "xf.distributed.initialize(timeout=...) or `xform launch --timeout S`"
        ) from e


def _comm_device(rt: Runtime) -> torch.device:
    return torch.device("cpu") if rt.backend in _HOST_BACKENDS else rt.device


def _paths(tree: Any) -> list[str]:
    return [p for p, _ in _tree.flatten_with_path(tree)]


def _signature(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode())


def _wire_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.uint8 if dtype == torch.bool else dtype


def _pack(tensors: list[torch.Tensor], dev: torch.device) -> torch.Tensor:
    """One flat buffer on ``dev`` holding ``tensors`` (all of one dtype), detached."""
    flat = [t.detach().reshape(-1).to(dev) for t in tensors]
    buf = torch.cat(flat) if len(flat) > 1 else flat[0].clone()
    return buf.to(_wire_dtype(buf.dtype))


def _buckets(tensors: list[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    """Leaf indices grouped by dtype, so that each dtype costs one collective."""
    out: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault(t.dtype, []).append(i)
    return out


def _unpack(buf: torch.Tensor, like: list[torch.Tensor], shapes: list[torch.Size]) -> list[torch.Tensor]:
    out, at = [], 0
    for t, shape in zip(like, shapes):
        n = shape.numel()
        out.append(buf[at : at + n].reshape(shape).to(device=t.device, dtype=t.dtype))
        at += n
    return out


def _check_same(api: str, rt: Runtime, tree: Any, describe: list[Any]) -> None:
    """Raises the same clear error on every rank when the ranks' trees differ."""
    spec = str(_tree.structure(tree))
    mine = torch.tensor([_signature(spec, describe)], dtype=torch.int64, device=_comm_device(rt))
    every = [torch.empty_like(mine) for _ in range(rt.world_size)]
    with _comm(api, rt):
        dist.all_gather(every, mine)
    if all(int(s) == int(mine) for s in every):
        return
    with _comm(api, rt):
        metas = [None] * rt.world_size
        dist.all_gather_object(metas, (spec, describe, _paths(tree)))
    raise ValueError(f"{api}: the processes passed different trees; {_difference(metas)}")


def _difference(metas: list[Any]) -> str:
    spec0, desc0, paths0 = metas[0]
    for r, (spec, desc, paths) in enumerate(metas[1:], 1):
        if spec != spec0:
            return f"rank 0 has structure {spec0} but rank {r} has {spec}; pass the same structure on every rank"
        for path, a, b in zip(paths0, desc0, desc):
            if a != b:
                return (
                    f"leaf {path or '<root>'} is {a} on rank 0 but {b} on rank {r}; every rank must pass "
                    "the same dtypes and shapes"
                )
    return "their leaves differ"


def _as_tensor(api: str, path: str, leaf: Any) -> torch.Tensor:
    if isinstance(leaf, torch.Tensor):
        return leaf
    if isinstance(leaf, (bool, int, float)):
        dtype = torch.bool if isinstance(leaf, bool) else torch.int64 if isinstance(leaf, int) else torch.float64
        return torch.tensor(leaf, dtype=dtype)
    raise TypeError(
        f"{api}: leaf {path or '<root>'} is a {type(leaf).__name__}, not a tensor or number; "
        "use xf.distributed.broadcast_object/gather_object for other Python objects"
    )


_OPS = {"sum": "SUM", "mean": "SUM", "max": "MAX", "min": "MIN"}


def reduce(tree: Any, op: Literal["sum", "mean", "max", "min"] = "sum") -> Any:
    """All-reduces every leaf of ``tree`` across processes; every rank gets the result.

    Leaves are tensors (any shape, the same on every rank) or Python numbers, which come
    back as Python numbers. Leaves of one dtype travel in one message. ``op="mean"``
    divides the sum by the world size (integers become floating point). Bool leaves
    allow ``"max"`` (any) and ``"min"`` (all). Without a group the tree is returned as
    is (``"mean"`` still turns integers into floats, as on many processes).

    Example:
        >>> import torch, xform as xf
        >>> xf.distributed.reduce({"correct": torch.tensor(3), "seen": 8})   # 1 process
        {'correct': tensor(3), 'seen': 8}
    """
    api = "xf.distributed.reduce"
    if op not in _OPS:
        raise ValueError(f"{api}: op must be one of {sorted(_OPS)}, got {op!r}")
    rt = runtime()
    paths_leaves = _tree.flatten_with_path(tree)
    leaves, spec = _tree.flatten(tree)
    tensors = [_as_tensor(api, p, leaf) for p, leaf in paths_leaves]
    for (p, _), t in zip(paths_leaves, tensors):
        if t.dtype == torch.bool and op not in ("max", "min"):
            raise TypeError(
                f"{api}: leaf {p or '<root>'} is a bool tensor and op={op!r}; use op='max' (any) or "
                "op='min' (all), or convert with .int() to count"
            )
    if rt.world_size > 1:
        _check_same(api, rt, tree, [(str(t.dtype), tuple(t.shape)) for t in tensors])
        out: list[torch.Tensor] = list(tensors)
        dev, red = _comm_device(rt), getattr(dist.ReduceOp, _OPS[op])
        for idx in _buckets(tensors).values():
            group = [tensors[i] for i in idx]
            buf = _pack(group, dev)
            with _comm(api, rt), torch.no_grad():
                dist.all_reduce(buf, op=red)
            for i, t in zip(idx, _unpack(buf, group, [g.shape for g in group])):
                out[i] = t
        tensors = out
    elif op != "mean":
        return tree
    if op == "mean":
        ws = rt.world_size
        tensors = [t / ws if (ws > 1 or not t.is_floating_point()) else t for t in tensors]
    new = [
        t.item() if not isinstance(leaf, torch.Tensor) else t for leaf, t in zip(leaves, tensors)
    ]
    return _tree.unflatten(spec, new)


def gather(tree: Any) -> Any:
    """All-gathers every tensor leaf of ``tree`` along dim 0, in rank order.

    The ranks may hold different numbers of rows (dim 0); the other dims and the dtypes
    must agree. A 0-d tensor counts as one row, so it gathers into shape
    ``(world_size,)``. Leaves of one dtype travel in one message. Without a group each
    leaf comes back as is (0-d ones as one row).

    Example:
        >>> import torch, xform as xf
        >>> xf.distributed.gather({"pred": torch.tensor([1, 2]), "loss": torch.tensor(0.5)})
        {'pred': tensor([1, 2]), 'loss': tensor([0.5000])}
    """
    api = "xf.distributed.gather"
    rt = runtime()
    paths_leaves = _tree.flatten_with_path(tree)
    _, spec = _tree.flatten(tree)
    tensors = []
    for p, leaf in paths_leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{api}: leaf {p or '<root>'} is a {type(leaf).__name__}, not a tensor; wrap numbers with "
                "torch.tensor(...) or use xf.distributed.gather_object"
            )
        tensors.append(leaf.reshape(1) if leaf.dim() == 0 else leaf)
    if rt.world_size == 1:
        return _tree.unflatten(spec, tensors)
    meta = (str(spec), [(str(t.dtype), tuple(t.shape)) for t in tensors])
    metas: list[Any] = [None] * rt.world_size
    with _comm(api, rt):
        dist.all_gather_object(metas, meta)
    spec0, desc0 = metas[0]
    paths = [p for p, _ in paths_leaves]
    for r, (s, desc) in enumerate(metas):
        if s != spec0:
            raise ValueError(
                f"{api}: rank 0 passes structure {spec0} but rank {r} passes {s}; pass the same structure "
                "on every rank"
            )
        for path, (dt0, sh0), (dt, sh) in zip(paths, desc0, desc):
            if dt != dt0 or sh[1:] != sh0[1:]:
                raise ValueError(
                    f"{api}: leaf {path or '<root>'} is {dt0} of shape (n, {', '.join(map(str, sh0[1:]))}) "
                    f"on rank 0 but {dt} of shape {sh} on rank {r}; only dim 0 may differ between ranks"
                )
    dev = _comm_device(rt)
    rows = [[sh[0] for _, sh in desc] for _, desc in metas]  # rows[rank][leaf]
    out: list[Any] = list(tensors)
    for idx in _buckets(tensors).values():
        group = [tensors[i] for i in idx]
        inner = [t.shape[1:].numel() for t in group]
        sizes = [sum(rows[r][i] * n for i, n in zip(idx, inner)) for r in range(rt.world_size)]
        buf = _pack(group, dev)
        padded = torch.zeros(max(sizes), dtype=buf.dtype, device=dev)
        padded[: buf.numel()] = buf
        recv = [torch.empty_like(padded) for _ in range(rt.world_size)]
        with _comm(api, rt), torch.no_grad():
            dist.all_gather(recv, padded)
        parts: list[list[torch.Tensor]] = [[] for _ in idx]
        for r, b in enumerate(recv):
            shapes = [torch.Size((rows[r][i], *tensors[i].shape[1:])) for i in idx]
            for k, t in enumerate(_unpack(b[: sizes[r]], group, shapes)):
                parts[k].append(t)
        for k, i in enumerate(idx):
            out[i] = torch.cat(parts[k])
    return _tree.unflatten(spec, out)


def gather_for_metrics(tree: Any, *, loader: Any, index: int | None = None) -> Any:
    """``gather`` for per-example outputs, without the examples the loader padded.

    With ``drop_last=False`` on several processes, ``xf.DataLoader`` pads the last global
    batch of an epoch with examples from the start of the epoch so that every rank gets
    as many; gathering would count them twice. This gathers and drops them, so metrics
    over the gathered values cover each example exactly once.

    Args:
        tree: per-example outputs of this rank's batch (predictions, labels, losses):
            every leaf has this rank's batch along dim 0.
        loader: the ``xf.DataLoader`` that served the batch.
        index: the batch's global index (``state.data["consumed"]`` when it was served);
            by default the batch that ``loader`` served last.

    Example (on each process):
        >>> for batch in loader.iterate(state):                     # doctest: +SKIP
        ...     preds = model(batch["x"]).argmax(-1)
        ...     preds, labels = xf.distributed.gather_for_metrics((preds, batch["y"]), loader=loader)
    """
    api = "xf.distributed.gather_for_metrics"
    layout = getattr(loader, "layout", None)
    if not callable(layout):
        raise TypeError(f"{api}: loader must be the xf.DataLoader that served the batch, got {type(loader).__name__}")
    rt = runtime()
    if loader.world_size != rt.world_size:
        raise ValueError(
            f"{api}: the loader splits batches over world_size={loader.world_size} but this run has "
            f"{rt.world_size} processes; build the loader after xf.distributed.initialize()"
        )
    per_rank, pad = layout(index)
    out = gather(tree)
    total = per_rank * rt.world_size
    for p, leaf in _tree.flatten_with_path(out):
        if leaf.shape[0] != total:
            raise ValueError(
                f"{api}: leaf {p or '<root>'} has {leaf.shape[0]} rows after gathering, but the global batch "
                f"has {total} ({per_rank} per process); pass per-example values (the batch on dim 0), or "
                "use xf.distributed.gather/reduce for other values"
            )
    if not pad:
        return out
    return _tree.map(lambda t: t[: total - pad], out)


def broadcast(tree: Any, src: int = 0) -> Any:
    """Every rank gets rank ``src``'s ``tree``.

    Every rank passes a tree of the same structure, with tensors of the same shapes and
    dtypes (their values are replaced; the results land on each rank's own leaf
    devices). Non-tensor leaves take ``src``'s values. Leaves of one dtype travel in one
    message. Without a group the tree is returned as is.

    Example:
        >>> import torch, xform as xf
        >>> xf.distributed.broadcast({"w": torch.ones(2)})["w"].tolist()
        [1.0, 1.0]
    """
    api = "xf.distributed.broadcast"
    rt = runtime()
    _check_src(api, src, rt)
    if rt.world_size == 1:
        return tree
    leaves, spec = _tree.flatten(tree)
    describe = [
        (str(x.dtype), tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__ for x in leaves
    ]
    _check_same(api, rt, tree, describe)
    objects = broadcast_object(
        [None if isinstance(x, torch.Tensor) else x for x in leaves], src=src
    ) if any(not isinstance(x, torch.Tensor) for x in leaves) else [None] * len(leaves)
    tensor_idx = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    tensors = [leaves[i] for i in tensor_idx]
    out = [objects[i] for i in range(len(leaves))]
    dev = _comm_device(rt)
    for idx in _buckets(tensors).values():
        group = [tensors[k] for k in idx]
        if rt.rank == src:
            buf = _pack(group, dev)
        else:
            buf = torch.empty(sum(t.numel() for t in group), dtype=_wire_dtype(group[0].dtype), device=dev)
        with _comm(api, rt), torch.no_grad():
            dist.broadcast(buf, src=src)
        if rt.rank == src:
            results = group
        else:
            results = _unpack(buf, group, [t.shape for t in group])
        for k, t in zip(idx, results):
            out[tensor_idx[k]] = t
    return _tree.unflatten(spec, out)


def _check_src(api: str, src: Any, rt: Runtime) -> None:
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < rt.world_size:
        raise ValueError(f"{api}: src must be a rank in [0, {rt.world_size}), got {src!r}")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj``, on every rank (``obj`` itself without a group).

    Example:
        >>> import xform as xf
        >>> xf.distributed.broadcast_object({"run": "a1"})
        {'run': 'a1'}
    """
    api = "xf.distributed.broadcast_object"
    rt = runtime()
    _check_src(api, src, rt)
    if rt.world_size == 1:
        return obj
    box = [obj if rt.rank == src else None]
    with _comm(api, rt):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` without a group)."""
    api = "xf.distributed.gather_object"
    rt = runtime()
    if rt.world_size == 1:
        return [obj]
    out: list[Any] = [None] * rt.world_size
    with _comm(api, rt):
        dist.all_gather_object(out, obj)
    return out


def wait_for_everyone() -> None:
    """Blocks until every process reaches this point (a barrier; nothing without a group)."""
    rt = runtime()
    if not rt.distributed:
        return
    with _comm("xf.distributed.wait_for_everyone", rt):
        dist.barrier()


@contextlib.contextmanager
def main_process_first(*, local: bool = False) -> Iterator[None]:
    """Runs the block on the main process first; the others enter it once it is done.

    For work whose result the others reuse: downloading a data set, building a cache.
    With ``local=True`` the first process of each node goes first (for node-local
    disks). If the main process fails in the block the others still run it.

    Example:
        >>> import xform as xf
        >>> with xf.distributed.main_process_first():
        ...     data = list(range(3))         # e.g. download on rank 0, read from cache elsewhere
    """
    rt = runtime()
    first = rt.is_local_main_process if local else rt.is_main_process
    if not first:
        wait_for_everyone()
    try:
        yield
    finally:
        if first:
            wait_for_everyone()


def sync_rng(*generators: torch.Generator, src: int = 0) -> None:
    """Copies rank ``src``'s random-number-generator states to every rank.

    Args:
        *generators: the ``torch.Generator`` objects to synchronize; by default torch's
            global CPU generator and, on a CUDA device, that device's default generator.
        src: the rank whose states the others take.

    ``TrainState``'s own random key needs no synchronization: it is part of the state.

    Example:
        >>> import torch, xform as xf
        >>> xf.distributed.sync_rng()                          # every rank now draws alike
        >>> xf.distributed.sync_rng(torch.Generator().manual_seed(1))
    """
    api = "xf.distributed.sync_rng"
    rt = runtime()
    for g in generators:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"{api}: expected torch.Generator objects, got {type(g).__name__}; e.g. sync_rng(gen)")
    _check_src(api, src, rt)
    if not generators:
        gens = [torch.default_generator]
        if rt.device.type == "cuda":
            gens.append(torch.cuda.default_generators[rt.device.index or 0])
    else:
        gens = list(generators)
    if rt.world_size == 1:
        return
    states = broadcast([g.get_state() for g in gens], src=src)
    for g, s in zip(gens, states):
        g.set_state(s.cpu())
