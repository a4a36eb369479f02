"""Every docstring example in the package runs, and says what it shows (STYLE: the
examples run in CI). A module is found by walking ``xform``, so a new module's examples
are run without being listed here."""

import doctest
import importlib
import pkgutil

import pytest

import xform

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(xform.__path__, "xform.") if not m.name.endswith("__main__")
)


def _examples(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    return [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, module=module) if t.examples]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in _examples(name):
        result = runner.run(test, clear_globs=True)
        assert result.failed == 0, f"docstring example failed in {test.name} (see the output above)"


def test_the_package_has_examples_to_run():
    counts = {name: sum(len(t.examples) for t in _examples(name)) for name in MODULES}
    assert sum(counts.values()) >= 60, counts
    assert {"xform.core.state", "xform.transforms.accumulate", "xform.checkpoint", "xform.toolbox.tracking"} <= {
        n for n, c in counts.items() if c
    }
