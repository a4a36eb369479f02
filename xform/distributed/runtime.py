"""The process runtime: joining the process group, and where this process stands.

Public through ``xf.distributed`` (see its docstring).
"""

from __future__ import annotations

import datetime
import os
import re
import time
import warnings
from typing import Any

import attrs
import torch
import torch.distributed as dist

from xform.core.group import group_up

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedError",
    "Runtime",
    "device",
    "initialize",
    "is_local_main_process",
    "is_main_process",
    "local_rank",
    "rank",
    "runtime",
    "shutdown",
    "step_failure",
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


_group_up = group_up  # the one probe of the process group (xform.core.group)


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


def _current_cuda() -> torch.device:
    """The current CUDA device, without creating a CUDA context just to ask."""
    return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_initialized() else 0)


def _derive(group: Any) -> Runtime:
    if group is None:
        dev = _current_cuda() if torch.cuda.is_available() else torch.device("cpu")
        return Runtime(rank=0, world_size=1, local_rank=0, local_world_size=1, device=dev, backend=None)
    r, ws = dist.get_rank(), dist.get_world_size()
    backend = str(dist.get_backend())
    host = backend in _HOST_BACKENDS or not torch.cuda.is_available()
    dev = torch.device("cpu") if host else _current_cuda()
    return Runtime(
        rank=r,
        world_size=ws,
        local_rank=int(os.environ.get("LOCAL_RANK", r)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", ws)),
        device=dev,
        backend=backend,
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --- failures inside a step ---------------------------------------------------------------

# Lower-case fragments of the messages gloo and NCCL give when a peer died, hung past the
# timeout or the network failed (torch raises them as plain RuntimeErrors).
_PEER_FAILURE_SIGNS = (
    "connection reset by peer",
    "connection closed by peer",
    "connection refused",
    "broken pipe",
    "timed out waiting",
    "gloo/transport",
    "processgroupgloo",
    "processgroupnccl",
    "nccl error",
    "ncclremoteerror",
    "remote process",
    "watchdog caught collective operation timeout",
)
# What each primitive of a step does, for the phase a collective failed in.
_PHASES = {
    "apply": "the forward pass (xf.apply)",
    "value_and_grad": "the backward pass (xf.value_and_grad)",
    "objective": "the loss (xf.value_and_grad)",
    "apply_gradients": "the gradient reduction (state.apply_gradients)",
    "update": "the optimizer update (state.apply_gradients)",
}
_RANK_IN_MESSAGE = re.compile(r"\brank\s*[:=#]?\s*(\d+)", re.IGNORECASE)


def _is_peer_failure(e: BaseException) -> bool:
    if isinstance(e, DistributedError):
        return False  # already explained (a collective of xf.distributed called in the step)
    backend_error = getattr(dist, "DistBackendError", None)
    if backend_error is not None and isinstance(e, backend_error):
        return True
    text = str(e).lower()
    return any(sign in text for sign in _PEER_FAILURE_SIGNS)


def step_failure(api: str, e: BaseException, state: Any, *, phase: str | None = None) -> DistributedError | None:
    """The ``DistributedError`` for a collective that failed inside a transformed step
    (a peer died or hung: the gradient all-reduce, the FSDP all-gather, the item count
    reduction), or None when ``e`` is not that, or no process group exists.

    It names this rank, the rank that failed where torch says (or the only peer, in a
    group of two), the step (``state.step``) and the phase: ``phase``, else the
    primitive that was running; then the innermost communication frame. Called only
    once a step has raised: nothing of this runs on the happy path.
    """
    if not _group_up() or not _is_peer_failure(e):
        return None
    rt = runtime()
    try:
        at = f" at state.step={state.step}"
    except Exception:  # noqa: BLE001 - a donated state: the step is unknown, not an error of its own
        at = ""
    limit = f"{rt.timeout.total_seconds():g} s" if rt.timeout is not None else "the group's timeout"
    return DistributedError(
        f"{api}: a collective failed on rank {rt.rank} of {rt.world_size}{at}, in {_phase(e, phase)}: "
        f"{_gist(e)}. {_culprit(e, rt)} exited or did not reach the collective within {limit}; its "
        "own output shows why. If a rank is legitimately slow (e.g. saving a checkpoint), raise the "
        "timeout: xf.distributed.initialize(timeout=...) or `xform launch --timeout S`"
    )


def _culprit(e: BaseException, rt: Runtime) -> str:
    others = {int(m) for m in _RANK_IN_MESSAGE.findall(str(e))} - {rt.rank}
    if len(others) == 1:
        return f"Rank {others.pop()} (named by torch)"
    if rt.world_size == 2:
        return f"The peer, rank {1 - rt.rank},"
    return "A peer process (torch did not say which rank)"


def _phase(e: BaseException, phase: str | None = None) -> str:
    """``phase``, else the primitive that was running (the innermost ``dispatch`` frame),
    and the innermost frame of communication code (torch.distributed or a backend), read
    off the traceback."""
    primitive = where = None
    tb = e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        path = code.co_filename.replace(os.sep, "/")
        if code.co_name == "dispatch" and path.endswith("xform/core/primitives.py"):
            primitive = tb.tb_frame.f_locals.get("name", primitive)
        if "/torch/distributed/" in path or "/backends/" in path:
            where = f"{os.path.splitext(os.path.basename(path))[0]}.{code.co_name}"
        tb = tb.tb_next
    if phase is None:
        phase = _PHASES.get(primitive, "the step") if primitive else "the step"
    return f"{phase}, at {where}" if where else phase


def _gist(e: BaseException) -> str:
    """Torch's first line without gloo's source location and boilerplate advice."""
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", _first_line(e))
    return text.split(". This is typically", 1)[0].rstrip(". ")


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
        td = _env_timeout(api)
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


def _env_timeout(api: str) -> datetime.timedelta:
    if TIMEOUT_ENV not in os.environ:
        return DEFAULT_TIMEOUT
    text = os.environ[TIMEOUT_ENV]
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{api}: ${TIMEOUT_ENV}={text!r} is not a number of seconds; e.g. {TIMEOUT_ENV}=600") from None
    return _timeout(f"{api} (${TIMEOUT_ENV})", seconds)


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
        try:  # every rank done with its collectives before any closes its connections
            dist.barrier()
        except RuntimeError:  # a peer is gone already: nothing to wait for
            pass
        destroy_group()
    _cache = None


def destroy_group() -> None:
    """``dist.destroy_process_group()``, then a moment for gloo's threads to finish (below)."""
    dist.destroy_process_group()
    # A gloo worker thread frees each finished collective's tensors after ``wait()`` has
    # returned, and freeing a tensor Python knows takes the GIL. If the interpreter is
    # finalizing by then, the thread cannot take it and the process aborts ("terminate
    # called without an active exception", about one exit in ten on 2 cores). Holding the
    # GIL released for a moment lets those threads finish first; torch has no call that
    # waits for them (pytorch/pytorch#190489).
    time.sleep(0.1)


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
