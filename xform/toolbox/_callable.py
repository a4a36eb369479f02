"""``module:attr`` or ``path/to/file.py:attr`` to the object it names: how the CLI's
``estimate-memory`` and ``plan`` (and ``xf.plan``) take a model factory."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable


def load_callable(spec: str, *, what: str = "MODEL", kind: str = "callable") -> Callable[..., Any]:
    """The callable ``spec`` names (``attr`` may be dotted). A file is imported once per path
    (its directory first on ``sys.path``, so it can import its neighbours); a module name is
    imported with the working directory on ``sys.path``, as ``python -m`` does. Raises
    ``ValueError`` with a message naming ``what`` and ``spec`` (callers add their own prefix)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"{what} must be module:{kind} or path/to/file.py:{kind}, got {spec!r}")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"no such file {target!r} (from {what} {spec!r})")
        name = f"_xform_model_{path.stem}_{abs(hash(str(path)))}"
        module = sys.modules.get(name)
        if module is None:
            sys.path.insert(0, str(path.parent))
            mod_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            mod_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise ValueError(f"cannot import {target!r} (from {what} {spec!r}): {e}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{target!r} has no attribute {attr!r} (from {what} {spec!r})") from None
    if not callable(obj):
        raise ValueError(f"{what} {spec!r} is a {type(obj).__name__}, not a {kind}")
    return obj
