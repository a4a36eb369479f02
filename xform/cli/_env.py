"""Print the environment for a bug report: versions, platform, CPUs, devices, CUDA and
NCCL, the distributed environment variables and the saved config. Paste the output
into the issue as it is (it is Markdown).

Package versions are read from installed metadata; no optional package is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any

from xform.toolbox.sysinfo import DIST_ENV_VARS, PACKAGES, cpu_count, devices, package_versions

__all__ = ["collect_env", "format_env"]

HELP = "print versions, devices and the distributed setup, for a bug report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")


def collect_env() -> dict[str, Any]:
    """Everything ``xform env`` prints, as a dict."""
    from xform.cli._config import config_path, read_config_file

    path = config_path()
    config: dict[str, Any] = {"path": str(path)}
    if path.is_file():
        try:
            config["settings"] = read_config_file(path)
        except ValueError as e:
            config["error"] = str(e)
    else:
        config["settings"] = None
    return {
        "python": f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": cpu_count(),
        "packages": package_versions(PACKAGES),
        "devices": devices(),
        "env": {k: os.environ.get(k) for k in DIST_ENV_VARS},
        "config": config,
    }


def _yes(b: bool) -> str:
    return "yes" if b else "no"


def format_env(info: dict[str, Any]) -> str:
    """``collect_env()`` as Markdown, ready to paste into a bug report."""
    lines = ["## xform environment", ""]
    cpus = info["cpu_count"]
    lines += [
        f"- Python: {info['python']}",
        f"- Platform: {info['platform']} ({info['machine']})",
        f"- CPUs: {cpus['logical']} logical, {cpus['usable']} usable by this process",
        "",
        "### Packages",
        "",
    ]
    width = max(len(n) for n in info["packages"])
    lines += [f"- {name + ':':<{width + 1}} {v or 'not installed'}" for name, v in info["packages"].items()]
    d = info["devices"]
    lines += ["", "### Devices", ""]
    if d["cuda"]:
        for g in d["cuda"]:
            lines.append(f"- cuda:{g['index']}: {g['name']}, {g['memory_gib']} GiB, compute capability {g['capability']}")
    else:
        lines.append("- CUDA devices: none")
    lines += [
        f"- CUDA available: {_yes(d['cuda_available'])} ("
        + (f"torch built with CUDA {d['torch_cuda_version']})" if d["torch_cuda_version"] else "torch built without CUDA)"),
    ]
    if d.get("cudnn_version"):
        lines.append(f"- cuDNN: {d['cudnn_version']}")
    lines += [
        f"- MPS available: {_yes(d['mps_available'])}",
        f"- torch.distributed: {_yes(d['distributed_available'])}; gloo: {_yes(d['gloo_available'])}, "
        f"NCCL: {_yes(d['nccl_available'])}" + (f" {d['nccl_version']}" if d.get("nccl_version") else "")
        + f", MPI: {_yes(d['mpi_available'])}",
        "",
        "### Distributed environment variables",
        "",
    ]
    width = max(len(k) for k in info["env"])
    lines += [f"- {k + ':':<{width + 1}} {'(unset)' if v is None else v}" for k, v in info["env"].items()]
    c = info["config"]
    lines += ["", f"### Saved config ({c['path']})", ""]
    if c.get("error"):
        lines.append(f"- invalid: {c['error']}")
    elif c["settings"] is None:
        lines.append("- none (defaults apply; write one with `xform config`)")
    elif not c["settings"]:
        lines.append("- empty (defaults apply)")
    else:
        lines += [f"- {k}: {v}" for k, v in c["settings"].items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = collect_env()
    print(json.dumps(info, indent=2) if args.json else format_env(info))
    return 0
