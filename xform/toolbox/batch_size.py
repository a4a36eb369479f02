"""``find_executable_batch_size``: retry with half the batch size on out-of-memory."""

from __future__ import annotations

import functools
import gc
import inspect
import logging
from typing import Any, Callable, TypeVar

import torch

__all__ = ["find_executable_batch_size", "is_out_of_memory"]

R = TypeVar("R")
_log = logging.getLogger("xform")

_OOM_MESSAGES = (
    "out of memory",  # CUDA, XPU, MPS, HIP: "CUDA out of memory. Tried to allocate ..."
    "DefaultCPUAllocator: can't allocate memory",
    "CUDNN_STATUS_NOT_SUPPORTED",  # cuDNN's answer to a too-large batch
    "CUDNN_STATUS_ALLOC_FAILED",
)


def is_out_of_memory(error: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` and the RuntimeErrors torch raises when an
    allocation fails (CUDA, CPU, cuDNN), and for Python's ``MemoryError``."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and len(error.args) == 1 and any(m in str(error.args[0]) for m in _OOM_MESSAGES)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def find_executable_batch_size(
    fn: Callable[..., R] | None = None, *, starting_batch_size: int = 128
) -> Any:
    """Calls ``fn(batch_size, ...)``, halving ``batch_size`` after each out-of-memory error.

    The decorated function takes the batch size as its first argument; call it without
    that argument. It is first called with ``starting_batch_size``; when it raises an
    out-of-memory error (``is_out_of_memory``), the references the error held are
    dropped, the caches emptied (``gc.collect``, ``torch.cuda.empty_cache``) and it is
    called again with half the batch size, until it returns. Any other error propagates
    at once. Build the model, optimizer and data inside the function, so that a retry
    starts from nothing.

    Raises:
        RuntimeError: out of memory at batch size 1 too; chained to the last error.

    Example:
        >>> import torch, xform as xf
        >>> @xf.find_executable_batch_size(starting_batch_size=64)
        ... def train(batch_size, steps):
        ...     if batch_size > 16:
        ...         raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        ...     return batch_size * steps
        >>> train(10)
        160
    """
    if isinstance(starting_batch_size, bool) or not isinstance(starting_batch_size, int) or starting_batch_size < 1:
        raise ValueError(f"find_executable_batch_size: starting_batch_size must be an int >= 1, got {starting_batch_size!r}")
    if fn is None:
        return functools.partial(find_executable_batch_size, starting_batch_size=starting_batch_size)
    if not callable(fn):
        raise TypeError(f"find_executable_batch_size: expected a function fn(batch_size, ...), got {fn!r}")
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = None
    if params is not None and (
        not params or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ):
        raise TypeError(
            f"find_executable_batch_size: {name} must take the batch size as its first positional argument, "
            f"e.g. def {getattr(fn, '__name__', 'train')}(batch_size, ...)"
        )
    first = params[0].name if params else "batch_size"

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        if first in kwargs:
            raise TypeError(
                f"find_executable_batch_size: do not pass {first}= to {name}; the decorator chooses it "
                f"(starting at {starting_batch_size})"
            )
        batch_size = starting_batch_size
        while True:
            error = None
            try:
                return fn(batch_size, *args, **kwargs)
            except BaseException as e:
                if not is_out_of_memory(e):
                    raise
                error = f"{type(e).__name__}: {e}"
                cause = e.with_traceback(None)  # drop the frames (and the tensors they hold)
            _free_memory()
            if batch_size == 1:
                raise RuntimeError(
                    f"find_executable_batch_size: {name} ran out of memory at every batch size from "
                    f"{starting_batch_size} down to 1 (last error: {error}); make the model or the sequences "
                    "smaller, or use mixed precision, sharding or activation checkpointing"
                ) from cause
            batch_size //= 2
            _log.warning("find_executable_batch_size: %s ran out of memory; retrying with batch size %d", name, batch_size)

    return wrapper
