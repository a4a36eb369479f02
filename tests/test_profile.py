import json

import pytest
import torch

from xform.toolbox.profile import profile



def _step(model, x):
    model(x).sum().backward()


def test_chrome_trace_of_the_active_window(tmp_path):
    model = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16)
    with profile(tmp_path, wait=1, warmup=1, active=2) as prof:
        for _ in range(6):
            _step(model, x)
            prof.step()
    assert [p.name for p in prof.traces] == ["trace_rank0_step4.json"]
    trace = json.loads(prof.traces[0].read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"ProfilerStep#2", "ProfilerStep#3"} <= names  # the active steps
    assert not {"ProfilerStep#0", "ProfilerStep#1", "ProfilerStep#4"} & names  # wait, warmup, after
    assert "aten::addmm" in names


def test_repeat_writes_one_trace_per_window(tmp_path):
    with profile(tmp_path, wait=0, warmup=1, active=1, repeat=2) as prof:
        for _ in range(5):
            torch.randn(8, 8) @ torch.randn(8, 8)
            prof.step()
    assert [p.name for p in prof.traces] == ["trace_rank0_step2.json", "trace_rank0_step4.json"]
    assert all(p.exists() for p in prof.traces)


def test_warns_when_the_window_is_not_reached_or_not_finished(tmp_path):
    with pytest.warns(UserWarning, match=r"ended after 1 step\(\) calls, before the first active window \(steps 3..5\)"):
        with profile(tmp_path / "a", wait=1, warmup=1, active=3) as prof:
            prof.step()
    assert prof.traces == [] and list((tmp_path / "a").iterdir()) == []
    message = r"ended 1 step\(s\) into a 3-step active window; trace_rank0_step3.json holds only those"
    with pytest.warns(UserWarning, match=message):
        with profile(tmp_path / "b", wait=1, warmup=1, active=3) as prof:
            for _ in range(3):
                prof.step()
    assert [p.name for p in prof.traces] == ["trace_rank0_step3.json"]


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="profile: active must be an int >= 1, got 0"):
        profile(tmp_path, active=0)
    with pytest.raises(ValueError, match=r"profile: unknown activities \['tpu'\]"):
        profile(tmp_path, activities=["cpu", "tpu"])
    with pytest.raises(RuntimeError, match="step\\(\\) outside the `with xf.profile"):
        profile(tmp_path).step()

