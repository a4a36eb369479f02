"""Estimate each rank's memory for training MODEL, without allocating it.

MODEL is module:callable or path/to/file.py:callable, a function or class returning a
torch.nn.Module; --args gives its arguments as JSON (an object for keywords, a list
for positional ones). It is built under torch.device("meta"), so no memory is used.

For each strategy, precision and world size N this prints the bytes on each rank of
parameters, gradients and optimizer state (Ψ parameters, Adam with two fp32 states):

  strategy    fp32              bf16/fp16 (+ fp32 master weights)
  replicate   16Ψ               16Ψ
  zero1       8Ψ + 8Ψ/N         4Ψ + 12Ψ/N
  zero2       4Ψ + 12Ψ/N        2Ψ + 14Ψ/N
  zero3       16Ψ/N             16Ψ/N

plus 4 bytes per parameter tensor for Adam's step counters, and the buffers.
Activations are measured only with --input-shape: one forward pass on the meta
device with an input of that shape (the per-rank micro-batch), adding up the tensors
autograd keeps for the backward pass, in the precision's dtype. Not counted:
communication buffers, ZeRO-3's gathered layer, the CUDA context, fragmentation.
"""

from __future__ import annotations

import argparse
import json
import traceback
from typing import Any, Callable

from xform.cli import CommandError

HELP = "estimate per-rank memory of a model under replicate/ZeRO-1/2/3, fp32/bf16/fp16"

_INPUT_DTYPES = ("float32", "int64", "int32", "bool")


def _csv(kind: Callable[[str], Any], allowed: tuple[str, ...] | None = None) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            values = [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None
        if allowed is not None:
            bad = [v for v in values if v not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
        elif any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"every value must be >= 1, got {text!r}")
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from xform.toolbox.memory import OPTIMIZERS, PRECISIONS, STRATEGIES

    parser.add_argument("model", metavar="MODEL", help="module:callable or path/to/file.py:callable returning an nn.Module")
    parser.add_argument("--args", default=None, metavar="JSON", help='arguments of the callable, e.g. \'{"hidden": 1024}\'')
    parser.add_argument("--world-sizes", type=_csv(int), default=[1, 2, 4, 8], metavar="N,N,...", help="default: 1,2,4,8")
    parser.add_argument("--strategies", type=_csv(str, STRATEGIES), default=list(STRATEGIES), metavar="S,S,...",
                        help=f"default: {','.join(STRATEGIES)}")  # fmt: skip
    parser.add_argument("--precisions", type=_csv(str, PRECISIONS), default=list(PRECISIONS), metavar="P,P,...",
                        help=f"default: {','.join(PRECISIONS)}")  # fmt: skip
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="adam", help="default: adam")
    parser.add_argument("--input-shape", type=_csv(int), default=None, metavar="B,D,...",
                        help="measure activations with an input of this shape (the per-rank micro-batch)")  # fmt: skip
    parser.add_argument("--input-dtype", choices=_INPUT_DTYPES, default="float32",
                        help="the input's dtype: float32, or int64 for token ids (default: float32)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--backend", choices=("torch", "deepspeed"), default="torch",
                        help="deepspeed: also the DeepSpeed engine's model states per process for stages 1-3 "
                        "(+ offload), its own layout")  # fmt: skip


def load_callable(spec: str) -> Callable[..., Any]:
    """``module:attr`` or ``path/to/file.py:attr`` (``attr`` may be dotted) to the object."""
    from xform.toolbox._callable import load_callable as load

    try:
        return load(spec, what="MODEL")
    except ValueError as e:
        raise CommandError(str(e)) from None


def build_on_meta(spec: str, args_json: str | None) -> Any:
    """Calls MODEL's callable with ``--args`` under ``torch.device("meta")``."""
    import torch

    factory = load_callable(spec)
    args: list = []
    kwargs: dict = {}
    if args_json:
        try:
            parsed = json.loads(args_json)
        except json.JSONDecodeError as e:
            raise CommandError(f"--args is not valid JSON ({e}): {args_json!r}") from None
        if isinstance(parsed, dict):
            kwargs = parsed
        elif isinstance(parsed, list):
            args = parsed
        else:
            raise CommandError(f"--args must be a JSON object (keywords) or list (positional), got {args_json!r}")
    try:
        with torch.device("meta"):
            model = factory(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the user's code: show its traceback, then a clear line
        traceback.print_exc()
        raise CommandError(f"building {spec} failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, torch.nn.Module):
        raise CommandError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def human(n: int | None) -> str:
    """Bytes in binary units: ``1536 -> '1.50 KiB'``."""
    if n is None:
        return "-"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _activations(model: Any, args: argparse.Namespace) -> tuple[dict[str, int | None], str]:
    import torch

    from xform.toolbox.memory import measure_activations

    if args.input_shape is None:
        return {p: None for p in args.precisions}, "not estimated (pass --input-shape to measure them)"
    x = torch.empty(args.input_shape, dtype=getattr(torch, args.input_dtype), device="meta")
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    out: dict[str, int | None] = {}
    try:
        for p in args.precisions:
            out[p] = measure_activations(model, x, dtype=dtypes[p])
    except Exception as e:  # noqa: BLE001 - an op without a meta kernel, a shape the model refuses
        return {p: None for p in args.precisions}, f"not estimated: the forward pass on meta failed ({type(e).__name__}: {e})"
    shape = "x".join(map(str, args.input_shape))
    return out, (
        f"measured: tensors saved for backward by one forward pass of a {args.input_dtype} input of shape {shape} "
        "(per rank), in each precision's dtype"
    )


def run(args: argparse.Namespace) -> int:
    from xform.toolbox.memory import estimate_memory

    model = build_on_meta(args.model, args.args)
    acts, note = _activations(model, args)
    rows = [
        estimate_memory(model, strategy=s, precision=p, world_size=n, optimizer=args.optimizer, activations=acts[p])
        for s in args.strategies
        for p in args.precisions
        for n in args.world_sizes
    ]
    first = rows[0]
    if args.json:
        print(json.dumps({
            "model": args.model,
            "num_params": first.num_params,
            "trainable_params": first.trainable_params,
            "optimizer": args.optimizer,
            "activations": note,
            "estimates": [r.to_dict() for r in rows],
        }, indent=2))  # fmt: skip
        return 0
    print(f"Model: {args.model} ({first.num_params:,} parameters, {first.trainable_params:,} trainable)")
    print(f"Optimizer: {args.optimizer}. Bytes per rank. Activations: {note}.")
    if first.buffers:
        print(f"Buffers: {human(first.buffers)} on every rank (in the totals).")
    print()
    header = ("strategy", "precision", "ranks", "params", "grads", "optimizer", "activations", "total")
    table = [header] + [
        (r.strategy, r.precision, str(r.world_size), human(r.params), human(r.grads), human(r.optimizer_state),
         human(r.activations), human(r.total))
        for r in rows
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        cells = [c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()
    print("bf16/fp16 rows: low-precision params and grads with an fp32 master copy (DeepSpeed's layout); "
          "xform's mixed_precision keeps fp32 params, see the fp32 rows.")  # fmt: skip
    if args.backend == "deepspeed":
        _deepspeed_rows(first, args)
    return 0


def _deepspeed_rows(first: Any, args: argparse.Namespace) -> None:
    """The DeepSpeed engine's model states per process (``xf.DeepSpeed(stage="auto")``
    chooses from these): it keeps an fp32 master partition in every precision."""
    from xform.backends.deepspeed.layout import estimate_stage_memory
    from xform.toolbox.memory import OPTIMIZERS

    per_param = OPTIMIZERS[args.optimizer][0]
    n = first.trainable_params
    print()
    print("DeepSpeed engine (xf.DeepSpeed), model states per process (params, grads, fp32 master, optimizer state):")
    for p in args.precisions:
        for ranks in args.world_sizes:
            cells = []
            for stage, oo, op in ((1, None, None), (2, None, None), (3, None, None), (3, "cpu", None), (3, "cpu", "cpu")):
                est = estimate_stage_memory(n, per_param, ranks, stage, low_precision=p != "fp32",
                                            offload_optimizer=oo, offload_params=op)  # fmt: skip
                label = f"zero{stage}" + ("+offload_opt" if oo else "") + ("+offload_params" if op else "")
                cells.append(f"{label} {human(est)}")
            print(f"  {p:<5} {ranks:>3} ranks: " + ", ".join(cells))
