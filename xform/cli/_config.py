"""Write or show the saved launch settings: backend, strategy, precision, accumulation
steps and the number of processes and nodes.

  xform config                       ask for each setting (on a terminal), then save
  xform config --precision bf16 ...  set these, keep the others, save; no questions
  xform config show                  print the settings a launch would use, and where
                                     each comes from (default < config file < flags)

The file is $XFORM_CONFIG if set, else $XDG_CONFIG_HOME/xform/config.json, else
~/.config/xform/config.json; --path overrides all three. Without a terminal on stdin
(or with --no-input) it never asks: settings not given keep their saved or default value.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

import attrs

from xform.cli import CommandError
from xform.core.backend import BACKENDS as _BACKEND_TABLE
from xform.core.dtypes import PRECISIONS as _PRECISION_TABLE
from xform.core.strategies import STRATEGIES as _STRATEGY_TABLE

__all__ = [
    "LaunchConfig",
    "BACKENDS",
    "STRATEGIES",
    "PRECISIONS",
    "config_path",
    "read_config_file",
    "load_config",
    "save_config",
    "resolve_config",
    "resolve_config_with_sources",
    "format_config",
    "print_config",
    "add_launch_arguments",
]

HELP = "write or show the saved launch settings (backend, strategy, precision, ...)"

BACKENDS = tuple(_BACKEND_TABLE)
STRATEGIES = tuple(_STRATEGY_TABLE)
PRECISIONS = tuple(_PRECISION_TABLE)
_FORMAT_VERSION = 1


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[Any, Any, Any], None]:
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")

    return check


def _positive(name: str) -> Callable[[Any, Any, Any], None]:
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}")

    return check


@attrs.frozen(kw_only=True)
class LaunchConfig:
    """The settings a launch runs with. Frozen; ``attrs.evolve`` (or ``replace``) for changes.

    Attributes:
        backend: ``"torch"``, ``"deepspeed"`` or ``"xla"``.
        strategy: ``"replicate"``, ``"zero1"``, ``"zero2"``, ``"zero3"``, ``"fsdp"`` or
            ``"hsdp"``. Whether a backend supports a strategy is the backend's to check.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        accumulation_steps: micro-batches per optimizer update, >= 1.
        nproc_per_node: processes per node, >= 1.
        nnodes: nodes, >= 1.

    Example:
        >>> from xform.cli._config import LaunchConfig
        >>> LaunchConfig(precision="bf16").to_dict()["precision"]
        'bf16'
        >>> LaunchConfig(precision="fp8")
        Traceback (most recent call last):
        ...
        ValueError: precision must be one of fp32, bf16, fp16; got 'fp8'
    """

    backend: str = attrs.field(default="torch", validator=_choice("backend", BACKENDS))
    strategy: str = attrs.field(default="replicate", validator=_choice("strategy", STRATEGIES))
    precision: str = attrs.field(default="fp32", validator=_choice("precision", PRECISIONS))
    accumulation_steps: int = attrs.field(default=1, validator=_positive("accumulation_steps"))
    nproc_per_node: int = attrs.field(default=1, validator=_positive("nproc_per_node"))
    nnodes: int = attrs.field(default=1, validator=_positive("nnodes"))

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(a.name for a in attrs.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def replace(self, **changes: Any) -> "LaunchConfig":
        return attrs.evolve(self, **changes)


_DEFAULTS = LaunchConfig()


def config_path(path: str | os.PathLike | None = None) -> Path:
    """Where the config file is: ``path``, else ``$XFORM_CONFIG``, else
    ``$XDG_CONFIG_HOME/xform/config.json``, else ``~/.config/xform/config.json``."""
    if path is not None:
        return Path(path).expanduser()
    if os.environ.get("XFORM_CONFIG"):
        return Path(os.environ["XFORM_CONFIG"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "xform" / "config.json"


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings saved in the file at ``path`` (it may hold only some), checked.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not JSON, an unknown key, or a bad value; the message names the file.
    """
    path = Path(path)
    fix = f"fix it, or rewrite it with `xform config --path {path}`"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a JSON object, not {type(data).__name__}; {fix}")
    data.pop("version", None)
    unknown = sorted(set(data) - set(LaunchConfig.fields()))
    if unknown:
        raise ValueError(
            f"config file {path} has unknown settings {unknown}; the settings are {list(LaunchConfig.fields())}; {fix}"
        )
    try:
        attrs.evolve(_DEFAULTS, **data)
    except ValueError as e:
        raise ValueError(f"config file {path}: {e}; {fix}") from None
    return data


def load_config(path: str | os.PathLike | None = None) -> LaunchConfig:
    """The saved settings over the defaults (see ``config_path`` for where the file is).

    A missing file at the default location gives the defaults; a missing file that
    was named (``path`` or ``$XFORM_CONFIG``) is an error.
    """
    return resolve_config(None, path=path)


def save_config(config: LaunchConfig, path: str | os.PathLike | None = None) -> Path:
    """Writes ``config`` to the config file (atomically) and returns its path."""
    if not isinstance(config, LaunchConfig):
        raise TypeError(f"save_config: expected a LaunchConfig, got {type(config).__name__}")
    path = config_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"version": _FORMAT_VERSION, **config.to_dict()}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _flag_values(flags: Mapping[str, Any] | argparse.Namespace | None) -> dict[str, Any]:
    if flags is None:
        return {}
    if isinstance(flags, argparse.Namespace):
        flags = vars(flags)
    return {k: v for k, v in flags.items() if k in LaunchConfig.fields() and v is not None}


def resolve_config_with_sources(
    flags: Mapping[str, Any] | argparse.Namespace | None = None, *, path: str | os.PathLike | None = None
) -> tuple[LaunchConfig, dict[str, str]]:
    """Like ``resolve_config``, and where each setting came from:
    ``"default"``, ``"config file <path>"`` or ``"flag"``."""
    where = config_path(path)
    if not where.is_file():
        if path is not None or os.environ.get("XFORM_CONFIG"):
            raise FileNotFoundError(f"no config file at {where}; write one with `xform config --path {where}`")
        where = None
    return _resolve(flags, where)


def _resolve(flags: Mapping[str, Any] | argparse.Namespace | None, where: Path | None) -> tuple[LaunchConfig, dict[str, str]]:
    saved = read_config_file(where) if where is not None else {}
    given = _flag_values(flags)
    sources = {}
    for name in LaunchConfig.fields():
        sources[name] = "flag" if name in given else (f"config file {where}" if name in saved else "default")
    try:
        config = attrs.evolve(_DEFAULTS, **{**saved, **given})
    except ValueError as e:
        raise ValueError(f"flags: {e}") from None
    return config, sources


def resolve_config(
    flags: Mapping[str, Any] | argparse.Namespace | None = None, *, path: str | os.PathLike | None = None
) -> LaunchConfig:
    """The settings to launch with: defaults < config file < ``flags``.

    Args:
        flags: settings given on the command line; None values (flags not given) and
            names that are not settings are ignored, so ``vars(args)`` can be passed.
        path: the config file; default ``config_path()``.

    Example:
        >>> import tempfile, os
        >>> from xform.cli._config import resolve_config, save_config, LaunchConfig
        >>> path = os.path.join(tempfile.mkdtemp(), "config.json")
        >>> _ = save_config(LaunchConfig(precision="bf16", nproc_per_node=4), path)
        >>> c = resolve_config({"nproc_per_node": 2, "script": "train.py"}, path=path)
        >>> (c.backend, c.precision, c.nproc_per_node)
        ('torch', 'bf16', 2)
    """
    return resolve_config_with_sources(flags, path=path)[0]


def format_config(config: LaunchConfig, sources: Mapping[str, str] | None = None) -> str:
    """One line per setting, with its source when given."""
    rows = []
    for name, value in config.to_dict().items():
        src = f"  ({sources[name]})" if sources and name in sources else ""
        rows.append(f"  {name:<20}{str(value):<12}{src}".rstrip())
    return "\n".join(rows)


def print_config(
    flags: Mapping[str, Any] | argparse.Namespace | None = None,
    *,
    path: str | os.PathLike | None = None,
    file: TextIO | None = None,
) -> LaunchConfig:
    """Prints the resolved settings (defaults < config file < flags) and where each came
    from; returns them. A launch calls this before it starts its processes."""
    config, sources = resolve_config_with_sources(flags, path=path)
    _print_resolved(config, sources, file)
    return config


def _print_resolved(config: LaunchConfig, sources: Mapping[str, str], file: TextIO | None) -> None:
    print("Settings (defaults < config file < flags):", file=file or sys.stdout)
    print(format_config(config, sources), file=file or sys.stdout)


# --- the command --------------------------------------------------------------------------


def _int_at_least_1(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {v}")
    return v


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--backend``, ``--strategy``, ``--precision``, ``--accumulation-steps``,
    ``--nproc-per-node`` and ``--nnodes`` (each None when not given), for ``resolve_config``."""
    g = parser.add_argument_group("settings")
    g.add_argument("--backend", choices=BACKENDS, help=f"default: {_DEFAULTS.backend}")
    g.add_argument("--strategy", choices=STRATEGIES, help=f"default: {_DEFAULTS.strategy}")
    g.add_argument("--precision", choices=PRECISIONS, help=f"default: {_DEFAULTS.precision}")
    g.add_argument("--accumulation-steps", type=_int_at_least_1, metavar="N", help="micro-batches per update (default: 1)")
    g.add_argument("--nproc-per-node", type=_int_at_least_1, metavar="N", help="processes per node (default: 1)")
    g.add_argument("--nnodes", type=_int_at_least_1, metavar="N", help="nodes (default: 1)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=("write", "show"), default="write", help="write (default) or show")
    parser.add_argument("--path", help="the config file (default: $XFORM_CONFIG or ~/.config/xform/config.json)")
    parser.add_argument("--no-input", action="store_true", help="never ask, even on a terminal")
    add_launch_arguments(parser)


_CHOICES = {"backend": BACKENDS, "strategy": STRATEGIES, "precision": PRECISIONS}
_QUESTIONS = {
    "backend": "Backend",
    "strategy": "Strategy",
    "precision": "Precision",
    "accumulation_steps": "Gradient accumulation steps",
    "nproc_per_node": "Processes per node",
    "nnodes": "Nodes",
}


def _ask(name: str, current: Any, read: Callable[[str], str], out: TextIO) -> Any:
    """Asks for one setting until the answer is valid; an empty answer keeps ``current``."""
    options = f" [{'/'.join(_CHOICES[name])}]" if name in _CHOICES else ""
    while True:
        try:
            answer = read(f"{_QUESTIONS[name]}{options} ({current}): ").strip()
        except EOFError:
            raise CommandError("no answer (end of input); nothing was saved") from None
        if not answer:
            return current
        value: Any = answer
        if name not in _CHOICES:
            try:
                value = int(answer)
            except ValueError:
                print(f"  {name} must be an int >= 1; got {answer!r}", file=out)
                continue
        try:
            attrs.evolve(_DEFAULTS, **{name: value})
        except ValueError as e:
            print(f"  {e}", file=out)
            continue
        return value


def run(args: argparse.Namespace) -> int:
    path = config_path(args.path)
    if args.action == "show":
        try:
            print(f"Config file: {path}" + ("" if path.is_file() else " (none; defaults apply)"))
            config, sources = _resolve(args, path if path.is_file() else None)
            _print_resolved(config, sources, None)
        except ValueError as e:
            raise CommandError(str(e)) from None
        return 0

    saved: dict[str, Any] = {}
    if path.is_file():
        try:
            saved = read_config_file(path)
        except ValueError as e:
            print(f"xform config: warning: ignoring the settings in {path}: {e}", file=sys.stderr)
    given = _flag_values(args)
    values = {**_DEFAULTS.to_dict(), **saved, **given}
    interactive = not args.no_input and sys.stdin is not None and sys.stdin.isatty()
    if interactive:
        print(f"Settings for {path}; press Enter to keep the value in parentheses.")
        for name in LaunchConfig.fields():
            if name not in given:
                values[name] = _ask(name, values[name], input, sys.stdout)
    try:
        config = LaunchConfig(**values)
    except ValueError as e:
        raise CommandError(str(e)) from None
    written = save_config(config, path)
    print(f"Saved to {written}:")
    print(format_config(config))
    return 0
