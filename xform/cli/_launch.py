"""Run a training script on N processes per node, over torchrun (torch.distributed.run).

  xform launch --nproc 4 train.py --lr 1e-3        4 processes on this machine
  xform launch --nproc 1 train.py                  the same as `python train.py`, but
                                                   with a process group of one
  xform launch --nnodes 2 --nproc 8 --rdzv-endpoint host0:29400 --rdzv-id job1 train.py
                                                   run on each of 2 nodes (elastic
                                                   c10d rendezvous at host0:29400)
  xform launch --nnodes 2 --node-rank 1 --master-addr host0 --master-port 29500 train.py
                                                   static rendezvous, node 1 of 2

In the script, xf.distributed.initialize() joins the processes (gloo on the CPU, NCCL
on GPUs). Settings not given as flags come from the config file (`xform config`),
else the defaults; the launcher prints them to stderr before it starts. One node runs
--standalone (a private rendezvous on a free port) unless --master-addr/--master-port
or --rdzv-endpoint are given. The resolved settings reach the script as JSON in
$XFORM_LAUNCH_CONFIG, and --timeout as $XFORM_TIMEOUT (the default timeout of
xf.distributed.initialize).

On a host without a GPU the processes start with glibc's heap trimming off
(GLIBC_TUNABLES, see STEADY_MALLOC) unless GLIBC_TUNABLES is set already.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from xform.cli import CommandError
from xform.cli._config import add_launch_arguments, format_config, resolve_config_with_sources

__all__ = ["torchrun_argv"]

HELP = "run a training script on N processes per node (over torchrun)"

CONFIG_ENV = "XFORM_LAUNCH_CONFIG"
TIMEOUT_ENV = "XFORM_TIMEOUT"  # read by xf.distributed.initialize

# glibc returns freed heap memory to the system once more than 128 KB (adjusted upward
# after large frees) is free at the heap's top, and serves allocations above 128 KB from
# mmap. A CPU training step frees and allocates the same large buffers (activations,
# gradients) every step, so by default their pages are unmapped and faulted in again each
# step: on the GPT of bench/compile.py, 4,300-5,500 page faults and 39-42 ms per step against
# none and 29-31 ms with these settings, for the hand-written loop and xform alike, one process
# each (bench/malloc.py). The cost: the heap keeps its peak size (as the CUDA caching
# allocator does).
STEADY_MALLOC = "glibc.malloc.trim_threshold=4294967295:glibc.malloc.mmap_threshold=33554432"


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an int >= {lo}, got {v}")
        return v

    return parse


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be seconds > 0, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be seconds > 0, got {text!r}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.allow_abbrev = False  # the script's own options must never read as abbreviations of ours
    parser.add_argument(
        "--nproc", dest="nproc_per_node", type=_int_at_least(1), metavar="N",
        help="processes per node (the same as --nproc-per-node; default: config file, else 1)",
    )
    add_launch_arguments(parser)
    g = parser.add_argument_group("rendezvous (several nodes)")
    g.add_argument("--node-rank", type=_int_at_least(0), metavar="I", help="this node's rank, for --master-addr")
    g.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="the c10d rendezvous store, the same on every node")
    g.add_argument("--rdzv-backend", metavar="NAME", help="rendezvous backend (default: c10d with --rdzv-endpoint)")
    g.add_argument("--rdzv-id", metavar="ID", help="a job id, the same on every node")
    g.add_argument("--rdzv-conf", metavar="K=V,...", help="rendezvous options, e.g. join_timeout=900")
    g.add_argument("--standalone", action="store_true", help="one node, private rendezvous (the default on one node)")
    g.add_argument("--master-addr", metavar="HOST", help="static rendezvous: node 0's address")
    g.add_argument("--master-port", type=_int_at_least(1), metavar="PORT", help="static rendezvous: node 0's port")
    p = parser.add_argument_group("processes")
    p.add_argument("--max-restarts", type=_int_at_least(0), default=0, metavar="N",
                   help="restart all processes up to N times when one fails (default: 0)")
    p.add_argument("--timeout", type=_seconds, metavar="S",
                   help="seconds a collective waits for a dead or hung peer before failing (default: 600)")
    p.add_argument("--log-dir", metavar="DIR", help="torchrun's log directory")
    p.add_argument("--config", metavar="PATH", help="the config file (default: $XFORM_CONFIG or ~/.config/xform/config.json)")
    p.add_argument("-m", "--module", action="store_true", help="run the script as a module (python -m)")
    parser.add_argument("script", help="the training script (or module, with -m)")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's own arguments")


def _rendezvous(args: argparse.Namespace, nnodes: int) -> list[str]:
    static = args.master_addr is not None or args.master_port is not None
    elastic = args.rdzv_endpoint is not None
    if args.standalone and (static or elastic or nnodes > 1):
        raise CommandError(
            "--standalone runs one node with a private rendezvous; drop it, or drop --nnodes/"
            "--master-addr/--master-port/--rdzv-endpoint"
        )
    if static and elastic:
        raise CommandError("pass either --master-addr/--master-port (static) or --rdzv-endpoint (c10d), not both")
    if args.rdzv_backend is not None and not elastic:
        raise CommandError(f"--rdzv-backend {args.rdzv_backend} needs --rdzv-endpoint HOST:PORT")
    if not (static or elastic):
        if nnodes > 1:
            raise CommandError(
                f"--nnodes {nnodes} needs a rendezvous every node can reach: --rdzv-endpoint HOST:PORT "
                "(with --rdzv-id JOB), or --master-addr HOST --master-port PORT with --node-rank I"
            )
        return ["--standalone"]
    if elastic:
        out = ["--rdzv-backend", args.rdzv_backend or "c10d", "--rdzv-endpoint", args.rdzv_endpoint]
        if args.rdzv_id is not None:
            out += ["--rdzv-id", args.rdzv_id]
        if args.node_rank is not None:
            out += ["--node-rank", str(args.node_rank)]
        return out
    if nnodes > 1 and args.node_rank is None:
        raise CommandError(f"--nnodes {nnodes} with --master-addr needs --node-rank I (0 on the master node)")
    out = ["--master-addr", args.master_addr or "127.0.0.1", "--master-port", str(args.master_port or 29500)]
    return out + ["--node-rank", str(args.node_rank or 0)]


def torchrun_argv(args: argparse.Namespace, nproc_per_node: int, nnodes: int) -> list[str]:
    """The ``torch.distributed.run`` argument list for parsed ``xform launch`` arguments."""
    return _torchrun_options(args, nproc_per_node, nnodes) + [args.script] + _script_args(args)


def _script_args(args: argparse.Namespace) -> list[str]:
    script_args = list(args.script_args)
    return script_args[1:] if script_args[:1] == ["--"] else script_args


def _torchrun_options(args: argparse.Namespace, nproc_per_node: int, nnodes: int) -> list[str]:
    argv = ["--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node)]
    argv += _rendezvous(args, nnodes)
    if args.rdzv_conf is not None:
        argv += ["--rdzv-conf", args.rdzv_conf]
    argv += ["--max-restarts", str(args.max_restarts)]
    if args.log_dir is not None:
        argv += ["--log-dir", args.log_dir]
    if args.module:
        argv.append("--module")
    return argv


def run(args: argparse.Namespace) -> int:
    try:
        config, sources = resolve_config_with_sources(args, path=args.config)
    except (ValueError, FileNotFoundError) as e:
        raise CommandError(str(e)) from None
    if config.backend == "xla" and config.nproc_per_node * config.nnodes > 1:
        raise CommandError(
            f"--backend xla runs one process (SPMD over every XLA device of the host), not "
            f"{config.nproc_per_node * config.nnodes}; pass --nproc 1 (PJRT_DEVICE picks the devices)"
        )
    options = _torchrun_options(args, config.nproc_per_node, config.nnodes)
    argv = options + [args.script] + _script_args(args)
    if not args.module and not os.path.isfile(args.script):
        raise CommandError(f"no script at {args.script!r}; pass the path of a Python file (or -m for a module)")
    malloc = _malloc_setting()
    if args.node_rank in (None, 0):  # the main launcher of a multi-node job prints
        _print_settings(config, sources, args, argv, malloc)
    os.environ[CONFIG_ENV] = json.dumps(config.to_dict())
    if malloc[1]:
        os.environ["GLIBC_TUNABLES"] = malloc[0]
    if args.timeout is not None:
        os.environ[TIMEOUT_ENV] = f"{args.timeout:g}"

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run as torchrun

    # torchrun's parser would read the script's own options (e.g. `--nproc 9`) as
    # abbreviations of its own; the script's arguments are set after parsing instead.
    torchrun_args = parse_args(options + [args.script])
    torchrun_args.training_script_args = _script_args(args)
    try:
        torchrun(torchrun_args)
    except ChildFailedError as e:  # which rank failed, when, and its exit code or traceback
        print(f"xform launch: {e}", file=sys.stderr)
        return 1
    return 0


def _malloc_setting() -> tuple[str | None, bool]:
    """``(GLIBC_TUNABLES for the processes, whether the launcher sets it)``: the user's own
    when set; else ``STEADY_MALLOC`` on a glibc host without a GPU; else none."""
    own = os.environ.get("GLIBC_TUNABLES")
    if own is not None:
        return own, False
    import platform

    import torch

    if platform.libc_ver()[0] != "glibc" or torch.cuda.is_available():
        return None, False
    return STEADY_MALLOC, True


def _print_settings(
    config: Any, sources: Any, args: argparse.Namespace, argv: list[str], malloc: tuple[str | None, bool]
) -> None:
    err = sys.stderr
    print("xform launch: settings, for xf.configure / xf.launch_config in the script (defaults < config file < flags):", file=err)
    print(format_config(config, sources), file=err)
    timeout = f"{args.timeout:g} s" if args.timeout is not None else "default (xf.distributed.initialize)"
    print(f"  {'max_restarts':<20}{args.max_restarts}", file=err)
    print(f"  {'timeout':<20}{timeout}", file=err)
    tunables, ours = malloc
    if tunables is not None:
        why = "(CPU host: heap trimming off; set GLIBC_TUNABLES to choose)" if ours else "(from the environment)"
        print(f"  {'GLIBC_TUNABLES':<20}{tunables} {why}", file=err)
    print(f"xform launch: torchrun {' '.join(argv)}", file=err, flush=True)
