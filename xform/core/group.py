"""The one probe of the process group: is this process part of a ``torch.distributed``
group, and which rank of how many. Everything that asks goes through here."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["group_up", "default_group"]


def group_up() -> bool:
    """Whether a default ``torch.distributed`` process group exists in this process."""
    return dist.is_available() and dist.is_initialized()


def default_group() -> tuple[Any, int, int]:
    """``(group, rank, world)`` of the default process group; ``(None, 0, 1)`` without one.

    Example:
        >>> default_group()
        (None, 0, 1)
    """
    if group_up():
        return dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    return None, 0, 1
