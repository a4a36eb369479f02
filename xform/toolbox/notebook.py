"""``notebook_launcher``: run a function on N local processes with a gloo process group."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import queue as queue_mod
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from xform.core.group import group_up
from xform.distributed.runtime import destroy_group

__all__ = ["notebook_launcher"]

_ALREADY = (
    "notebook_launcher: a torch.distributed process group is already initialized in this process "
    "(rank {rank} of {world}); the launcher starts its own processes, each with its own group. Call "
    "torch.distributed.destroy_process_group() first (or restart the notebook's kernel), and keep "
    "init_process_group inside the launched function only"
)


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in a launched process, as text."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class _Forward:
    """A child's ``sys.stdout``/``sys.stderr``: whole lines go to the parent through the queue."""

    def __init__(self, q: Any, rank: int, stream: str):
        self.q, self.rank, self.stream, self.buf = q, rank, stream, ""

    def write(self, s: str) -> int:
        self.buf += s
        if "\n" in self.buf:
            lines, _, self.buf = self.buf.rpartition("\n")
            self.q.put(("out", self.rank, self.stream, lines + "\n"))
        return len(s)

    def flush(self) -> None:
        if self.buf:
            self.q.put(("out", self.rank, self.stream, self.buf))
            self.buf = ""

    def isatty(self) -> bool:
        return False


def _child(fn, args, kwargs, rank, nproc, store, backend, timeout_s, forked, q) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
        GROUP_RANK="0", NODE_RANK="0",
    )  # fmt: skip
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Forward(q, rank, "stdout"), _Forward(q, rank, "stderr")
    code = 0
    try:
        if forked:
            # A forked child cannot use its parent's OpenMP thread pool (libgomp hangs on the
            # first parallel region); one intra-op thread per process is torchrun's default too.
            torch.set_num_threads(1)
        dist.init_process_group(
            backend, init_method=f"file://{store}", rank=rank, world_size=nproc,
            timeout=datetime.timedelta(seconds=timeout_s),
        )  # fmt: skip
        result = fn(*args, **kwargs)
        try:
            payload = pickle.dumps(result)
        except Exception as e:  # noqa: BLE001
            raise TypeError(
                f"notebook_launcher: rank {rank}'s function returned a {type(result).__name__} that cannot be "
                f"pickled back to the notebook ({e}); return plain values (numbers, lists, CPU tensors)"
            ) from e
        q.put(("result", rank, payload))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent
        code = 1
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        try:
            exc = pickle.dumps(e)
            pickle.loads(exc)
        except Exception:  # noqa: BLE001 - not every exception pickles
            exc = None
        q.put(("error", rank, text, exc, f"{type(e).__name__}: {e}"))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = out, err
        if dist.is_initialized():
            try:
                destroy_group()  # gloo may abort at exit otherwise
            except Exception:  # noqa: BLE001
                pass
        q.close()
        q.join_thread()
    os._exit(code) if forked else sys.exit(code)


def _start_method(requested: str | None) -> str:
    methods = multiprocessing.get_all_start_methods()
    if requested is not None:
        if requested not in methods:
            raise ValueError(f"notebook_launcher: start_method {requested!r} is not available here; use one of {methods}")
        if requested == "fork" and torch.cuda.is_initialized():
            raise RuntimeError(
                "notebook_launcher: start_method='fork' after CUDA was initialized in this process; forked "
                "children cannot use CUDA. Use start_method='spawn', or do not touch CUDA before launching"
            )
        return requested
    if "fork" in methods and sys.platform != "darwin" and not torch.cuda.is_initialized():
        return "fork"  # the function may be defined in the notebook itself; nothing to pickle
    return "spawn"


def notebook_launcher(
    fn: Callable[..., Any],
    args: Sequence[Any] = (),
    nproc: int = 2,
    *,
    kwargs: dict[str, Any] | None = None,
    backend: str = "gloo",
    start_method: str | None = None,
    timeout_s: float = 300.0,
    prefix_output: bool = True,
) -> list[Any]:
    """Runs ``fn(*args, **kwargs)`` on ``nproc`` new processes of this machine, each in a
    ``torch.distributed`` process group of ``nproc`` ranks, and returns their results.

    Each process has ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE``
    set and an initialized process group (``backend``, gloo by default; its rendezvous is
    a file in a temporary folder, so nothing listens on the network). What the processes
    print appears here, each line prefixed with ``[rank i]``. When a process raises, the
    others are stopped and the exception is raised here, chained to the text of the
    child's traceback. The process groups are destroyed before the processes exit.

    Processes are forked when that is safe (Linux, CUDA not initialized in this process):
    ``fn`` may then be defined in the notebook, and each process uses one intra-op
    thread (a forked child cannot use its parent's OpenMP pool). Otherwise they are
    spawned and ``fn`` and ``args`` must be picklable (defined in an importable module).

    Args:
        fn: the function to run on every rank.
        args, kwargs: its arguments.
        nproc: the number of processes (ranks), >= 1.
        backend: the process group's backend, ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per
            rank; pick it in ``fn`` with ``torch.cuda.set_device(LOCAL_RANK)``).
        start_method: ``"fork"`` or ``"spawn"``; default: fork when safe, else spawn.
        timeout_s: the process group's timeout, and how long to wait for the others once
            one process has failed.
        prefix_output: prefix each forwarded line with ``[rank i]``.

    Returns:
        The return values of ``fn``, by rank.

    Raises:
        RuntimeError: a process group is already initialized in this process, or a
            process died without reporting (a crash).
        Exception: the exception a process raised (the first one reported, if several did).

    Example:
        >>> import torch, torch.distributed as dist, xform as xf
        >>> def total(x):
        ...     t = torch.tensor([x * (dist.get_rank() + 1)])
        ...     dist.all_reduce(t)
        ...     return t.item()
        >>> xf.notebook_launcher(total, args=(10.0,), nproc=2)
        [30.0, 30.0]
    """
    if not callable(fn):
        raise TypeError(f"notebook_launcher: fn must be callable, got {fn!r}")
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"notebook_launcher: nproc must be an int >= 1, got {nproc!r}")
    if not isinstance(args, (list, tuple)):
        raise TypeError(f"notebook_launcher: args must be a tuple of arguments, got {type(args).__name__}; write args=(x,)")
    if group_up():
        raise RuntimeError(_ALREADY.format(rank=dist.get_rank(), world=dist.get_world_size()))
    method = _start_method(start_method)
    ctx = multiprocessing.get_context(method)
    tmp = tempfile.mkdtemp(prefix="xform-launch-")
    store = os.path.join(tmp, "store")
    q = ctx.Queue()
    procs = []
    try:
        for rank in range(nproc):
            p = ctx.Process(
                target=_child,
                args=(fn, tuple(args), dict(kwargs or {}), rank, nproc, store, backend, timeout_s, method == "fork", q),
                name=f"xform-rank-{rank}",
                daemon=False,
            )
            p.start()
            procs.append(p)
        return _collect(procs, q, nproc, timeout_s, prefix_output)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        q.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _collect(procs, q, nproc, timeout_s, prefix_output) -> list[Any]:
    results: dict[int, Any] = {}
    errors: dict[int, tuple[str, bytes | None, str]] = {}
    reported: set[int] = set()
    failed_at: float | None = None

    def handle(msg) -> None:
        nonlocal failed_at
        kind, rank = msg[0], msg[1]
        if kind == "out":
            stream = sys.stdout if msg[2] == "stdout" else sys.stderr
            text = msg[3]
            if prefix_output:
                text = "".join(f"[rank {rank}] {line}" for line in text.splitlines(keepends=True))
            stream.write(text)
            stream.flush()
        elif kind == "result":
            results[rank] = pickle.loads(msg[2])
            reported.add(rank)
        elif kind == "error":
            errors[rank] = msg[2:]
            reported.add(rank)
            failed_at = failed_at or time.monotonic()

    while True:
        try:
            handle(q.get(timeout=0.05))
            continue
        except queue_mod.Empty:
            pass
        alive = [p for p in procs if p.is_alive()]
        for rank, p in enumerate(procs):  # died without a word: a crash
            if p.exitcode not in (None, 0) and rank not in reported and rank not in errors:
                _drain(q, handle)
                if rank not in reported:
                    errors[rank] = (None, None, f"exited with code {p.exitcode}{_signal(p.exitcode)} without reporting")
                    reported.add(rank)
                    failed_at = failed_at or time.monotonic()
        if not alive:
            _drain(q, handle)
            break
        if failed_at is not None and time.monotonic() - failed_at > min(timeout_s, 5.0):
            break  # the others are likely waiting on the failed rank in a collective
    if errors:
        rank = next(iter(errors))  # the first to fail; the others often fail because of it
        text, exc_bytes, summary = errors[rank]
        others = sorted(set(errors) - {rank})
        where = f"notebook_launcher: rank {rank} of {nproc} failed" + (f" (ranks {others} failed too)" if others else "")
        if text is None:
            raise RuntimeError(f"{where}: {summary}")
        exc = pickle.loads(exc_bytes) if exc_bytes is not None else RuntimeError(f"{where}: {summary}")
        if hasattr(exc, "add_note"):
            exc.add_note(f"({where}; its traceback is above)")
        raise exc from _RemoteTraceback(f"\n\"\"\"\n[rank {rank}] {text}\"\"\"")
    missing = [r for r in range(nproc) if r not in results]
    if missing:
        raise RuntimeError(f"notebook_launcher: ranks {missing} exited without returning a result")
    return [results[r] for r in range(nproc)]


def _drain(q, handle) -> None:
    while True:
        try:
            handle(q.get(timeout=0.2))
        except queue_mod.Empty:
            return


def _signal(code: int | None) -> str:
    if code is not None and code < 0:
        import signal

        try:
            return f" (signal {signal.Signals(-code).name})"
        except ValueError:
            return ""
    return ""
