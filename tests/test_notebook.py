import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from xform.toolbox.monitor import Monitor
from xform.toolbox.notebook import notebook_launcher
from xform.toolbox.progress import progress
from xform.toolbox.tracking import JSONLinesTracker



def _train_like(tmp):
    rank = dist.get_rank()
    print(f"hello from rank {rank}")
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    tracker = JSONLinesTracker(Path(tmp) / "metrics.jsonl")  # one path for both ranks: rank 0 alone writes
    tracker.log({"sum": t}, step=0)
    tracker.finish()
    for _ in progress(range(2), enabled=True, renderer="plain", file=sys.stdout, desc="bar"):
        pass
    monitor = Monitor(device="cpu")
    monitor.update(samples=4)
    metrics = monitor.metrics(gather=True)
    return {
        "rank": rank,
        "world": dist.get_world_size(),
        "backend": dist.get_backend(),
        "sum": t.item(),
        "env": (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]),
        "peak_keys": sorted(k for k in metrics if k.startswith("perf/memory_peak_gib/")),
    }


def _fail_on_rank_1():
    if dist.get_rank() == 1:
        raise ValueError("bad shard on rank 1")
    return "ok"


def _crash_on_rank_1():
    if dist.get_rank() == 1:
        sys.stdout.flush()
        os._exit(3)
    return "ok"


def _world():
    return dist.get_world_size()


def test_two_processes_with_a_real_process_group(tmp_path, capsys):
    results = notebook_launcher(_train_like, args=(str(tmp_path),), nproc=2)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 and r["backend"] == "gloo" and r["sum"] == 3.0 for r in results)
    assert [r["env"] for r in results] == [("0", "0", "2"), ("1", "1", "2")]
    assert results[0]["peak_keys"] == ["perf/memory_peak_gib/max", "perf/memory_peak_gib/rank0", "perf/memory_peak_gib/rank1"]
    out = capsys.readouterr().out
    assert "[rank 0] hello from rank 0\n" in out and "[rank 1] hello from rank 1\n" in out
    bar_lines = [line for line in out.splitlines() if "bar: 2/2" in line]
    assert bar_lines and all(line.startswith("[rank 0]") for line in bar_lines)  # rank 1's bar is quiet
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["system", "metrics"]
    assert records[0]["system"]["rank"] == 0 and records[0]["system"]["world_size"] == 2
    assert records[1]["metrics"] == {"sum": 3.0}
    assert not dist.is_initialized()  # nothing leaked into this process


def test_a_child_exception_is_raised_here_with_its_traceback():
    with pytest.raises(ValueError, match="bad shard on rank 1") as info:
        notebook_launcher(_fail_on_rank_1, nproc=2)
    cause = info.value.__cause__
    assert type(cause).__name__ == "_RemoteTraceback"
    assert "[rank 1] Traceback (most recent call last)" in str(cause)
    assert "in _fail_on_rank_1" in str(cause) and 'raise ValueError("bad shard on rank 1")' in str(cause)
    assert any("notebook_launcher: rank 1 of 2 failed" in note for note in info.value.__notes__)


def test_a_crashed_child_is_reported():
    with pytest.raises(RuntimeError, match="notebook_launcher: rank 1 of 2 failed: exited with code 3 without reporting"):
        notebook_launcher(_crash_on_rank_1, nproc=2)


def test_refuses_when_a_process_group_exists_here(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match=r"already initialized in this process \(rank 0 of 1\).*destroy_process_group"):
            notebook_launcher(_world, nproc=2)
    finally:
        dist.destroy_process_group()


def test_spawn_start_method():
    assert notebook_launcher(_world, nproc=2, start_method="spawn") == [2, 2]


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="nproc must be an int >= 1, got 0"):
        notebook_launcher(_world, nproc=0)
    with pytest.raises(TypeError, match=r"args must be a tuple of arguments, got str; write args=\(x,\)"):
        notebook_launcher(_world, args="x")
    with pytest.raises(ValueError, match="start_method 'threads' is not available"):
        notebook_launcher(_world, start_method="threads")

