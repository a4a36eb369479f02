"""The suite can fail: every realistic bug in ``tests/mutations/catalog.py`` is caught.

For each mutation (one test each) the repository is copied to a temporary directory
(the files git tracks or would add: no ``.git``, virtual environment or run output), the
mutation's snippet is replaced in the copy, and the
mutation's tests run there in a fresh ``python -m pytest -x``, with the copy first on
``PYTHONPATH`` and the ``mutation`` hypothesis profile (the CI examples, no shrinking). The
test passes only if those tests FAIL: the mutation is killed. A
snippet that is not found exactly once fails loudly (the code moved: update the catalog).

The package is installed in editable mode, and ``xform.backends`` maps to the top-level
``backends/`` folder (pyproject.toml), so the copy gets ``xform/backends`` as a link to
its own ``backends/``. ``test_an_unmutated_copy_imports_itself_and_passes`` checks once
that the copy's modules are the ones imported (here and in spawned worker processes) and
that the selected tests pass on it unmutated: otherwise every mutation would look killed
(or survive) for the wrong reason.

Add a mutation: append a ``Mutation`` to the catalog, run it alone with
``python tests/test_mutations.py NAME [TEST ...]`` (prints the output of its tests, or of
TEST ..., on a mutated copy), and if it survives, strengthen a test until it is killed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600  # per mutation; a healthy run takes seconds


def _load_catalog():
    spec = importlib.util.spec_from_file_location("xform_mutation_catalog", ROOT / "tests" / "mutations" / "catalog.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


catalog = _load_catalog()
MUTATIONS = {m.name: m for m in catalog.MUTATIONS}

_SKIP = shutil.ignore_patterns(  # without git: what .gitignore names, and caches
    ".git", ".venv*", "__pycache__", ".hypothesis", ".pytest_cache", "*.egg-info", "*.pyc", ".mypy_cache",
    "runs", "ckpt", "build", "out",
)


def source_files(root: Path) -> list[str] | None:
    """The files a clean clone of ``root`` would hold plus the uncommitted ones git does
    not ignore (relative paths); None where ``root`` is not a git work tree. Never the
    ignored ones: a virtual environment (``.venv-xla`` is 7 GB), runs, checkpoints."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=root, capture_output=True, check=True, timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [p for p in out.decode().split("\0") if p and (root / p).is_file()]  # not a tracked file deleted


def copy_repo(dest: Path, root: Path = ROOT) -> Path:
    """A copy of the repository at ``dest`` whose ``import xform`` is the copy's."""
    files = source_files(root)
    if files is None:
        shutil.copytree(root, dest, ignore=_SKIP)
    else:
        for rel in files:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, dest / rel)
    link = dest / "xform" / "backends"
    if (dest / "xform").is_dir() and not link.exists():
        os.symlink("../backends", link, target_is_directory=True)
    return dest


def mutate(repo: Path, mutation) -> None:
    target = repo / mutation.path
    text = target.read_text()
    n = text.count(mutation.find)
    if n != 1:
        raise AssertionError(
            f"mutation {mutation.name}: its snippet occurs {n} times in {mutation.path} (need exactly 1); "
            f"the code moved: update tests/mutations/catalog.py. Snippet:\n{mutation.find}"
        )
    target.write_text(text.replace(mutation.find, mutation.replace))


def env_for(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST")}
    env.update(PYTHONPATH=str(repo), PYTHONDONTWRITEBYTECODE="1", HYPOTHESIS_PROFILE="mutation")
    return env


def run_tests(repo: Path, tests: "list[str] | tuple[str, ...]", *, stop_at_first: bool = True) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-x"] if stop_at_first else []), *tests]
    return subprocess.run(args, cwd=repo, env=env_for(repo), capture_output=True, text=True, timeout=TIMEOUT_S)


def _tail(proc: subprocess.CompletedProcess, n: int = 4000) -> str:
    return (proc.stdout + proc.stderr)[-n:]


# Where the copy's modules come from: in the test process and in a pool worker.
_PROBE = """
import sys
import xform, xform.core.state, xform.checkpoint
import xform.backends.torch_native.data_parallel as dp
from xform.distributed.procs import ProcessPool
print(xform.__file__); print(xform.core.state.__file__); print(dp.__file__)
with ProcessPool(1) as pool:
    (remote,) = pool.run(eval, "__import__('xform.backends.torch_native.data_parallel', fromlist=['_']).__file__")
print(remote)
"""


def test_every_mutation_names_its_file_snippet_and_tests():
    assert len(MUTATIONS) == len(catalog.MUTATIONS), "two mutations share a name"
    for m in catalog.MUTATIONS:
        text = (ROOT / m.path).read_text()
        assert text.count(m.find) == 1, (
            f"mutation {m.name}: its snippet occurs {text.count(m.find)} times in {m.path}; the code moved: "
            "update tests/mutations/catalog.py"
        )
        assert m.find != m.replace and m.tests, m.name
        for t in m.tests:
            assert (ROOT / t.split("::")[0]).is_file(), f"mutation {m.name}: no test file {t}"


def test_the_copy_holds_what_git_would_ship_and_nothing_it_ignores(tmp_path):
    """Catches a copy that takes ignored folders along: with ``.venv-xla`` (7 GB, made by
    the test command) beside the sources, 29 copies filled this machine's disk. Also
    the fallback without git skips the folders .gitignore names."""
    root = tmp_path / "src"
    (root / "xform").mkdir(parents=True)
    (root / "backends").mkdir()
    (root / "xform" / "core.py").write_text("x = 1\n")
    (root / "backends" / "b.py").write_text("y = 2\n")
    (root / ".gitignore").write_text(".venv*/\nruns/\n")
    for ignored in (".venv-xla/lib", "runs/sharded"):
        (root / ignored).mkdir(parents=True)
        (root / ignored / "big.bin").write_bytes(b"\0" * 1024)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "xform", ".gitignore"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=root, check=True)  # backends/ stays untracked, not ignored
    for dest, how in ((tmp_path / "with-git", None), (tmp_path / "without-git", "no-git")):
        if how == "no-git":
            shutil.rmtree(root / ".git")
        copy_repo(dest, root)
        got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
        assert got == [".gitignore", "backends/b.py", "xform/core.py"], (how, got)
        assert (dest / "xform" / "backends" / "b.py").read_text() == "y = 2\n"


def test_an_unmutated_copy_imports_itself_and_passes(tmp_path):
    """Guards the whole check: the copy's modules are imported (not the installed
    tree's), also by spawned workers, and every selected test passes unmutated."""
    repo = copy_repo(tmp_path / "repo")
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=tmp_path, env=env_for(repo), capture_output=True, text=True, timeout=300
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    files = probe.stdout.split()
    assert len(files) == 4 and all(f.startswith(str(repo)) for f in files), files
    selected = sorted({t for m in catalog.MUTATIONS for t in m.tests})
    proc = run_tests(repo, selected, stop_at_first=False)
    assert proc.returncode == 0, f"the unmutated copy fails the selected tests:\n{_tail(proc)}"


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutation_is_killed(name, tmp_path):
    mutation = MUTATIONS[name]
    repo = copy_repo(tmp_path / "repo")
    mutate(repo, mutation)
    proc = run_tests(repo, mutation.tests)
    if proc.returncode == 0:
        pytest.fail(
            f"mutation {name} SURVIVED: {mutation.bug}.\n{mutation.path}: {mutation.find!r} -> {mutation.replace!r}\n"
            f"tests run: {list(mutation.tests)}; strengthen them so that this bug fails them.\n{_tail(proc, 1500)}"
        )
    # 1: tests failed. Anything else (2: collection/import error, 4: bad node id, 5: none
    # collected) means the tests did not run against the mutation.
    assert proc.returncode == 1, f"mutation {name}: pytest exited {proc.returncode}, not with failed tests:\n{_tail(proc)}"


if __name__ == "__main__":
    name, *tests = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        repo = copy_repo(Path(tmp) / "repo")
        mutate(repo, MUTATIONS[name])
        proc = run_tests(repo, tests or MUTATIONS[name].tests)
        print(_tail(proc, 20000))
        print(f"exit status {proc.returncode}: {'KILLED' if proc.returncode == 1 else 'SURVIVED' if proc.returncode == 0 else 'ERROR'}")
