"""Runs a toolbox module's docstring examples, which use ``import xform as xf``.

The toolbox's public names are exported from ``xform/__init__.py`` separately; until
they are, the names an example needs are set on the module for the run and removed after.
"""

from __future__ import annotations

import doctest
import importlib
import types

import xform

TOOLBOX = ("_tracking", "_progress", "_notebook", "_monitor", "_batch_size", "_profile", "_memory")


def run_doctests(module: types.ModuleType) -> int:
    """Runs the examples in ``module``; fails on any failure; returns how many ran."""
    added = []
    for mod in TOOLBOX:
        m = importlib.import_module(f"xform.{mod}")
        for name in m.__all__:
            if not hasattr(xform, name):
                setattr(xform, name, getattr(m, name))
                added.append(name)
    try:
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        ran = 0
        for test in doctest.DocTestFinder().find(module):
            result = runner.run(test)
            assert result.failed == 0, f"docstring example failed in {test.name}"
            ran += result.attempted
        return ran
    finally:
        for name in added:
            delattr(xform, name)
