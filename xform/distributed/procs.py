"""A pool of N local processes joined in one ``torch.distributed`` group.

Used by the multi-process tests (and ``xform.testing``) to run functions on real gloo
process groups without paying process start-up and rendezvous for every example: the
processes and their group live as long as the pool. Rendezvous goes through a
``file://`` store in a private temporary directory, so pools never clash on ports.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import tempfile
import traceback
from typing import Any, Callable

__all__ = ["ProcessPool", "RemoteError"]


class RemoteError(RuntimeError):
    """An exception raised in a pool process; the message holds its traceback."""


def _worker(rank: int, world: int, store_path: str, timeout_s: float, inbox, outbox, env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    from xform.distributed.runtime import destroy_group

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        while True:
            task = inbox.get()
            if task is None:
                break
            fn, args, kwargs = task
            try:
                outbox.put((rank, True, fn(*args, **kwargs)))
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                outbox.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        destroy_group()  # with time for gloo's threads to finish before exit


class ProcessPool:
    """``nproc`` spawned processes in one gloo group, reused across ``run`` calls.

    Example:
        >>> with ProcessPool(2) as pool:            # doctest: +SKIP
        ...     pool.run(torch.distributed.get_rank)
        [0, 1]
    """

    def __init__(self, nproc: int, *, timeout_s: float = 120.0, env: dict[str, str] | None = None):
        if nproc < 1:
            raise ValueError(f"ProcessPool: nproc must be >= 1, got {nproc}")
        self.nproc = nproc
        self.timeout_s = timeout_s
        self._dir = tempfile.TemporaryDirectory(prefix="xform-pool-")
        ctx = mp.get_context("spawn")
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(nproc)]
        store = os.path.join(self._dir.name, "store")
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, nproc, store, timeout_s, self._inboxes[r], self._outbox, dict(env or {})),
                daemon=True,
            )
            for r in range(nproc)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Runs ``fn(*args, **kwargs)`` on every process; returns the results by rank.

        ``fn`` must be importable by name (a module-level function). An exception on any
        rank is raised here as ``RemoteError`` with that rank's traceback.
        """
        for q in self._inboxes:
            q.put((fn, args, kwargs))
        results: list[Any] = [None] * self.nproc
        errors = []
        for _ in range(self.nproc):
            try:
                rank, ok, value = self._outbox.get(timeout=self.timeout_s)
            except Exception:  # queue.Empty
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                self.close(force=True)
                raise RemoteError(
                    f"ProcessPool.run: no answer within {self.timeout_s:.0f} s from {fn.__qualname__}"
                    + (f"; ranks {dead} died" if dead else "")
                ) from None
            if ok:
                results[rank] = value
            else:
                errors.append((rank, value))
        if errors:
            rank, text = min(errors)
            raise RemoteError(f"rank {rank} of {self.nproc} failed in {fn.__qualname__}:\n{text}")
        return results

    def close(self, *, force: bool = False) -> None:
        if not force:
            for q in self._inboxes:
                q.put(None)
            for p in self._procs:
                p.join(timeout=30)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join()
        self._dir.cleanup()

    def __enter__(self) -> "ProcessPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(force=exc[0] is not None)
