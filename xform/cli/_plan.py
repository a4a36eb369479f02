"""Compare parallelism strategies on MODEL: predicted, and with --measure measured.

MODEL is module:function or path/to/file.py:function returning a torch.nn.Module (built
with torch.manual_seed(0); --args gives its keyword arguments as a JSON object). --batch is the input shape of one data-parallel replica
(float32), or --batch-factory module:function, called as f(rows, generator) -> input.

For --nproc N processes (or a --mesh such as replicate=2,shard=2 / dp=2,tp=2 / pp=2,dp=2)
this enumerates replicate, zero1, zero2, zero3, hsdp (every replicate x shard), tensor
parallel (tpT, with FSDP over dp when N > T) and pipeline parallel (ppP, replicated over
dp; the model must be an nn.Sequential), and prints for each, per process:

  pred params / grads / optim   the formulas of xform.toolbox.memory (estimate_memory)
  pred activ                    tensors saved for backward by one forward on the meta device
  pred comm/step                bytes sent per step by ring collectives (docs/plan.md)

--measure runs each candidate for --steps steps on N local processes (gloo) and adds,
marked "meas": the state's bytes (params + grads + optimizer state, with the error of the
prediction), the peak bytes alive in a step (profiler allocation replay), the step time
(median and quartiles, the slowest process per step), and the largest relative difference
of the params from the single-process step on the global batch. The step run is
loss = mean(model(x) ** 2) with --optimizer.

  xform plan examples/plan_model.py:model --batch 8,32 --nproc 2 --measure
"""

from __future__ import annotations

import argparse
import json

from xform.cli import CommandError

HELP = "compare replicate/ZeRO/hsdp/tp/pp on a model: predicted memory and comm, --measure for measured"


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated shape such as 8,64, got {text!r}") from None
    if not shape or any(n < 1 for n in shape):
        raise argparse.ArgumentTypeError(f"every size must be >= 1, got {text!r}")
    return shape


def _mesh(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in text.split(","):
        name, sep, size = item.partition("=")
        try:
            out[name.strip()] = int(size)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected axis=size pairs such as dp=2,tp=2, got {text!r}") from None
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"expected axis=size pairs such as dp=2,tp=2, got {text!r}")
    return out


def _bytes(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = units.get(t[-1:], 1)
    try:
        value = float(t[:-1] if t[-1:] in units else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 512M or 2G, got {text!r}") from None
    return int(value * scale)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from xform.toolbox.plan import FAMILIES

    parser.add_argument("model", metavar="MODEL", help="module:function or path/to/file.py:function returning an nn.Module")
    parser.add_argument("--args", default=None, metavar="JSON", help='keyword arguments of MODEL, e.g. \'{"dim": 256}\'')
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--batch", type=_shape, metavar="B,D,...", help="one replica's input shape (float32)")
    group.add_argument("--batch-factory", metavar="MODULE:FUNCTION", help="f(rows, generator) -> one replica's input")
    parser.add_argument("--nproc", type=int, default=None, metavar="N", help="world size (default: the mesh's, or 2)")
    parser.add_argument("--mesh", type=_mesh, default=None, metavar="AXIS=N,...",
                        help="only the layouts on this mesh: replicate=R,shard=S | dp=D,tp=T | pp=P[,dp=D]")  # fmt: skip
    parser.add_argument("--budget", type=_bytes, default=None, metavar="BYTES",
                        help="memory per process (e.g. 512M): larger predictions are marked and not measured")  # fmt: skip
    parser.add_argument("--strategies", default=None, metavar="S,S,...", help=f"some of {','.join(FAMILIES)} (default: all)")
    parser.add_argument("--optimizer", choices=("adamw", "adam", "sgd", "sgd-momentum"), default="adamw",
                        help="default: adamw")  # fmt: skip
    parser.add_argument("--tp-plan", default=None, metavar="JSON",
                        help='tensor parallel plan, e.g. \'{"blocks.*.0": "colwise", "blocks.*.2": "rowwise"}\'')  # fmt: skip
    parser.add_argument("--measure", action="store_true", help="run each candidate on --nproc local processes")
    parser.add_argument("--steps", type=int, default=6, help="steps per candidate with --measure (default 6, at least 3)")
    parser.add_argument("--timeout", type=float, default=300.0, metavar="S", help="seconds per candidate (default 300)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", default=None, metavar="OUT.png", help="write memory vs step time per strategy (matplotlib)")


def _json_object(flag: str, text: str | None, what: str) -> dict | None:
    """``text`` parsed as a JSON object, None when the flag was not given."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CommandError(f"{flag} is not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise CommandError(f"{flag} must be a JSON object of {what}, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    from xform.toolbox.plan import plan

    tp_plan = _json_object("--tp-plan", args.tp_plan, "module pattern -> colwise/rowwise")
    model_kwargs = _json_object("--args", args.args, "keyword arguments")
    world = args.nproc if args.nproc is not None or args.mesh is not None else 2
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()] if args.strategies else None
    try:
        result = plan(
            args.model, model_kwargs=model_kwargs, batch=args.batch or args.batch_factory, world_size=world, mesh=args.mesh, budget=args.budget,
            optimizer=args.optimizer, strategies=strategies, tp_plan=tp_plan, measure=args.measure, steps=args.steps,
            timeout_s=args.timeout,
        )  # fmt: skip
    except ValueError as e:
        raise CommandError(str(e).removeprefix("plan: ")) from None
    if args.plot:
        try:
            result.plot(args.plot)
        except ImportError:
            raise CommandError("--plot needs matplotlib: pip install matplotlib") from None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table())
        if args.plot:
            print(f"plot: {args.plot}")
    return 0
