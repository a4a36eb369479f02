"""What a run is on: package versions, the machine, devices, the distributed environment.

Shared by ``xform env`` (a bug report) and the trackers (system info logged at the start
of a run). Package versions are read from their installed metadata, so nothing heavy
(deepspeed, torch_xla, wandb, tensorboard) is imported to find them.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import sys
from typing import Any

__all__ = [
    "PACKAGES", "DIST_ENV_VARS", "package_version", "package_versions", "cpu_count", "devices", "rank_and_world",
    "system_info",
]  # fmt: skip

PACKAGES = ("torch", "xform", "deepspeed", "torch_xla", "optree", "attrs", "wandb", "tensorboard", "tqdm", "numpy")

DIST_ENV_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
    "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME",
    "GLOO_SOCKET_IFNAME", "PJRT_DEVICE", "XFORM_CONFIG",
)  # fmt: skip


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    return {n: package_version(n) for n in names}


def cpu_count() -> dict[str, int | None]:
    """``{"logical": os.cpu_count(), "usable": CPUs this process may run on}``."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {"logical": os.cpu_count(), "usable": usable}


def devices() -> dict[str, Any]:
    """Accelerators torch sees, and which collective backends it was built with."""
    import torch
    import torch.distributed as dist

    out: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "cuda": []}
    out["torch_cuda_version"] = torch.version.cuda
    if out["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["cuda"].append(
                {"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}"}
            )
        out["cudnn_version"] = torch.backends.cudnn.version()
    mps = getattr(torch.backends, "mps", None)
    out["mps_available"] = bool(mps is not None and mps.is_available())
    dist_ok = dist.is_available()
    out["distributed_available"] = dist_ok
    out["gloo_available"] = bool(dist_ok and dist.is_gloo_available())
    out["nccl_available"] = bool(dist_ok and dist.is_nccl_available())
    out["mpi_available"] = bool(dist_ok and dist.is_mpi_available())
    out["nccl_version"] = None
    if out["nccl_available"] and out["cuda_available"]:
        try:
            v = torch.cuda.nccl.version()
            out["nccl_version"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:  # noqa: BLE001 - a version is nice to have, never worth failing for
            pass
    return out


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: from ``torch.distributed`` when a process
    group is initialized, else from the launcher's ``RANK``/``WORLD_SIZE``, else (0, 1)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def system_info() -> dict[str, Any]:
    """A flat, loggable summary of the run's machine: versions, host, CPUs, devices, ranks."""
    import torch

    rank, world = rank_and_world()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "xform": package_version("xform"),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_count": cpu_count()["usable"],
        "world_size": world,
        "rank": rank,
    }
    if torch.cuda.is_available():
        info["cuda_devices"] = torch.cuda.device_count()
        info["cuda_device_name"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    else:
        info["cuda_devices"] = 0
    return info
