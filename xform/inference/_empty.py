"""``init_empty``: build a module without allocating its weights."""

from __future__ import annotations

import functools
import threading
from typing import Callable, TypeVar

import torch
from torch import nn

T = TypeVar("T")
_LOCK = threading.Lock()


def init_empty(fn: Callable[[], T], *, buffers: bool = True) -> T:
    """Calls ``fn()`` without allocating its weights: its tensors are made on the ``meta``
    device (shapes and dtypes, no storage), and initializers do nothing on them.

    With ``buffers=True`` (the default) every tensor ``fn`` makes is a meta tensor, buffers
    included: nothing is allocated, whatever the size. Buffers a checkpoint does not hold
    (non-persistent ones computed in ``__init__``, like a rotary embedding's frequencies)
    then have no values: ``xf.load_weights`` names them. With ``buffers=False`` the
    module is built on the CPU and each parameter is moved to ``meta`` as it is registered
    (before ``reset_parameters`` runs, so no time goes into a random init, and the pages of
    the ``torch.empty`` behind it are never touched); buffers keep their computed values.
    That mode wraps ``nn.Module.register_parameter`` while ``fn`` runs, under a lock.

    Args:
        fn: builds the module, e.g. ``lambda: GPT(config)``.
        buffers: make buffers on ``meta`` too (else only parameters).

    Returns:
        What ``fn`` returns.

    Example:
        >>> import torch, xform as xf
        >>> m = xf.init_empty(lambda: torch.nn.Linear(100_000, 100_000))  # 40 GB in fp32
        >>> m.weight.device, m.weight.shape
        (device(type='meta'), torch.Size([100000, 100000]))
    """
    if not callable(fn):
        raise TypeError(f"init_empty: expected a function that builds the module (e.g. lambda: Model()), got {type(fn).__name__}")
    if buffers:
        with torch.device("meta"):
            return fn()
    register_parameter = nn.Module.register_parameter

    @functools.wraps(register_parameter)
    def on_meta(self, name, param):
        register_parameter(self, name, param)
        if param is not None and param.device.type != "meta":
            meta = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            self._parameters[name] = meta

    with _LOCK:
        nn.Module.register_parameter = on_meta
        try:
            return fn()
        finally:
            nn.Module.register_parameter = register_parameter
