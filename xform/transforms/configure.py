"""``configure``: the transforms named by the launch settings (``xform config`` /
``xform launch`` flags), applied in the documented order."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from xform.core.backend import get_backend
from xform.transforms.accumulate import accumulate
from xform.transforms.mixed_precision import mixed_precision
from xform.transforms.shard import shard

__all__ = ["launch_config", "configure"]

_ENV = "XFORM_LAUNCH_CONFIG"  # set by ``xform launch`` for the processes it starts


def launch_config():
    """The settings this run was launched with: what ``xform launch`` resolved (defaults <
    config file < flags), or, for a plain ``python script.py``, the saved config file
    over the defaults.

    Example:
        >>> import xform as xf
        >>> xf.launch_config().precision in ("fp32", "bf16", "fp16")
        True
    """
    from xform.cli._config import LaunchConfig, load_config

    text = os.environ.get(_ENV)
    if not text:
        return load_config()
    try:
        return LaunchConfig(**json.loads(text))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"xf.launch_config: ${_ENV} holds settings that are not valid ({e}); it is written by "
            "xform launch: unset it, or launch again"
        ) from None


def configure(step: Callable[..., Any], config: Any = None):
    """``shard(accumulate(mixed_precision(step, precision), accumulation_steps), strategy)``
    with the settings of ``config`` (default: ``launch_config()``).

    One script then follows ``xform config`` and ``xform launch --precision bf16
    --strategy zero3 ...`` without code changes. Transforms whose setting is trivial are
    left out (``accumulate(step, 1) is step``); on one process ``shard`` is the plain step.

    Example:
        >>> import torch, xform as xf
        >>> from xform.cli._config import LaunchConfig
        >>> def step(state, batch):
        ...     loss, grads = xf.value_and_grad(lambda p: xf.apply(state, p, batch).square().mean())(state.params)
        ...     return state.apply_gradients(grads), {"loss": loss}
        >>> configured = xf.configure(step, LaunchConfig(precision="bf16", accumulation_steps=2))
        >>> configured.xform.names
        ('mixed_precision', 'accumulate', 'shard')
    """
    config = launch_config() if config is None else config
    get_backend(config.backend, api="xf.configure")  # refuses a backend not built in this version
    step = mixed_precision(step, config.precision)
    step = accumulate(step, config.accumulation_steps)
    return shard(step, config.strategy, backend=config.backend)
