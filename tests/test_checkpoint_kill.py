"""Nothing lost: a save killed at *any* file-system operation (each mkdir, write, rename
and deletion, injected deterministically) never costs the previous checkpoint, never
leaves a listed-but-unloadable one, and leaves no garbage past the next save or manager.

Each kill point runs in a forked child whose n-th file-system operation calls
``os._exit`` (what ``kill -9`` leaves is the same: no cleanup runs); the parent then
checks what is on disk.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import xform as xf
from xform.testing import assert_states_close

from _util import batch, make_state, run, step

HOOKED = [(os, "mkdir"), (os, "rename"), (os, "unlink"), (os, "rmdir"), (torch, "save")]
KILLED = 137


def run_killed_at(n: int, fn) -> bool:
    """Runs ``fn()`` in a forked child that dies at its ``n``-th file-system operation;
    True if it died there, False if ``fn`` finished first."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            count = [0]

            def hook(real):
                def op(*args, **kwargs):
                    count[0] += 1
                    if count[0] == n:
                        os._exit(KILLED)
                    return real(*args, **kwargs)

                return op

            for module, name in HOOKED:
                setattr(module, name, hook(getattr(module, name)))
            fn()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, KILLED), f"the child failed (exit {code}) at kill point {n}"
    return code == KILLED


def every_kill_point(base, fn, check):
    """For n = 1, 2, ...: a fresh copy of ``base``, ``fn(copy)`` killed at operation n,
    then ``check(copy)``; until ``fn`` runs to the end. Returns the number of points."""
    n = 0
    while True:
        n += 1
        d = base.parent / f"{base.name}-kill{n}"
        shutil.copytree(base, d)
        killed = run_killed_at(n, lambda: fn(d))
        check(d)
        if not killed:
            return n - 1
        assert n < 200


def trained(n, seed=0):
    state = make_state(seed=seed)
    return run(step, state, [batch(seed=s) for s in range(n)])[0]


def garbage(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".") or p.name.endswith(".prev"))


def assert_all_listed_load(manager):
    for p in manager.checkpoints():
        xf.load(p, like=make_state())


def test_a_manager_save_killed_anywhere_keeps_every_good_checkpoint(tmp_path):
    """Catches: a kill while the manager deletes its oldest checkpoint leaving it listed
    but unloadable; a kill mid-save leaving temporaries forever."""
    base = tmp_path / "run"
    states = {n: trained(n) for n in (1, 2, 3, 4)}
    manager = xf.CheckpointManager(base, keep=2)
    manager.save(states[1])
    manager.save(states[2])

    def check(d):
        manager = xf.CheckpointManager(d, keep=2)  # at start: tidies
        assert garbage(d) == [], garbage(d)
        listed = [p.name for p in manager.checkpoints()]
        assert "step_000000002" in listed, listed  # the newest good one is never lost
        assert_all_listed_load(manager)
        restored = manager.restore(like=make_state())
        assert restored.step in (2, 3)
        assert_states_close(restored, states[restored.step])
        manager.save(states[4])  # and the next save leaves exactly the last two
        assert sorted(os.listdir(d)) == (["step_000000003", "step_000000004"] if restored.step == 3 else ["step_000000002", "step_000000004"])

    points = every_kill_point(base, lambda d: xf.CheckpointManager(d, keep=2).save(states[3]), check)
    assert points >= 8, points  # mkdir, write, renames, and the deletion's rename and unlinks


def test_resaving_the_same_step_killed_anywhere_restores_that_step(tmp_path):
    """Catches: a kill between the two renames of a re-save of step N leaving only
    ``step_N.prev``, so that ``restore()`` returns None (or an older step) and the run
    silently starts over."""
    base = tmp_path / "run"
    old, new = trained(2), trained(2, seed=1)
    assert old.step == new.step == 2
    xf.CheckpointManager(base, keep=2).save(old)

    def check(d):
        manager = xf.CheckpointManager(d, keep=2)
        assert garbage(d) == [], garbage(d)
        assert [p.name for p in manager.checkpoints()] == ["step_000000002"]
        restored = manager.restore(like=make_state())
        assert restored is not None and restored.step == 2
        try:
            assert_states_close(restored, old)
        except AssertionError:
            assert_states_close(restored, new)

    points = every_kill_point(base, lambda d: xf.CheckpointManager(d, keep=2).save(new), check)
    assert points >= 6, points


def test_a_plain_save_killed_anywhere_keeps_the_previous_checkpoint(tmp_path):
    base = tmp_path / "ckpts"
    old, new, newest = trained(1), trained(2), trained(3)
    xf.save(old, base / "c")

    def check(d):
        path = d / "c"
        try:
            loaded = xf.load(path, like=make_state())
        except FileNotFoundError as e:  # killed between the renames: the message says where
            assert "c.prev holds the previous one" in str(e)
            loaded = xf.load(d / "c.prev", like=make_state())
        assert loaded.step in (1, 2)
        assert_states_close(loaded, old if loaded.step == 1 else new)
        xf.save(newest, path)  # the next save to the same place removes the garbage
        assert os.listdir(d) == ["c"]
        assert_states_close(xf.load(path, like=make_state()), newest)

    assert every_kill_point(base, lambda d: xf.save(new, d / "c"), check) >= 6


def test_the_next_save_removes_what_interrupted_saves_left(tmp_path):
    """Catches: every killed save leaving its temporary directory forever (553 MB in a
    keep=2 directory in the report)."""
    state = trained(1)
    for name in (".c.tmp-0123abcd-00000000", ".c.trash-0123abcd-1", ".c.prev.trash-0123abcd-2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tensors.pt").write_bytes(b"x" * 1000)
    (tmp_path / ".other.tmp-0123abcd-0").mkdir()  # another checkpoint's: not ours to remove
    xf.save(state, tmp_path / "c")
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-0123abcd-0", "c"]


def test_a_manager_at_start_tidies_and_recovers_an_interrupted_swap(tmp_path):
    """Catches: ``step_N.prev`` holding the only good copy of step N while
    ``checkpoints()`` ignores it and temporaries stay."""
    d = tmp_path / "run"
    xf.CheckpointManager(d, keep=None).save(trained(1))
    two = trained(2)
    xf.CheckpointManager(d, keep=None).save(two)
    os.rename(d / "step_000000002", d / "step_000000002.prev")
    (d / ".step_000000002.tmp-0123abcd-0").mkdir()
    (d / ".step_000000001.trash-0123abcd-0").mkdir()
    # Listing alone (e.g. on a rank that does not tidy) already sees step 2.
    assert [p.name for p in _lister(d).checkpoints()] == ["step_000000001", "step_000000002.prev"]
    manager = xf.CheckpointManager(d, keep=None)
    assert sorted(os.listdir(d)) == ["step_000000001", "step_000000002"]
    assert_states_close(manager.restore(like=make_state()), two)


def _lister(d):
    """A manager over ``d`` that has not tidied (as on a process other than rank 0)."""
    m = object.__new__(xf.CheckpointManager)
    m.directory, m.keep = d, None
    return m


@pytest.mark.parametrize("incomplete", ["no-meta", "no-tensors"])
def test_only_complete_checkpoints_are_listed(tmp_path, incomplete):
    d = tmp_path / "run"
    manager = xf.CheckpointManager(d, keep=None)
    manager.save(trained(1))
    manager.save(trained(2))
    (d / "step_000000002" / ("meta.json" if incomplete == "no-meta" else "tensors.pt")).unlink()
    assert [p.name for p in manager.checkpoints()] == ["step_000000001"]
    assert manager.restore(like=make_state()).step == 1
