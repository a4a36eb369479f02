"""xf.launch_config / xf.configure: the launch settings drive the transforms, from the
environment ``xform launch`` sets, from the config file, or given explicitly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import xform as xf
from xform.cli._config import LaunchConfig, save_config

from _util import batch, make_state, step


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for k in ("XFORM_LAUNCH_CONFIG", "XFORM_CONFIG", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config-home"))  # no saved config: the defaults


def test_launch_config_reads_what_xform_launch_resolved(monkeypatch):
    monkeypatch.setenv("XFORM_LAUNCH_CONFIG", json.dumps(LaunchConfig(precision="bf16", strategy="zero2").to_dict()))
    cfg = xf.launch_config()
    assert (cfg.precision, cfg.strategy) == ("bf16", "zero2")


def test_launch_config_falls_back_to_the_config_file(monkeypatch, tmp_path):
    path = save_config(LaunchConfig(accumulation_steps=4), tmp_path / "c.json")
    monkeypatch.setenv("XFORM_CONFIG", str(path))
    assert xf.launch_config().accumulation_steps == 4


def test_a_corrupt_launch_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("XFORM_LAUNCH_CONFIG", json.dumps({"precision": "fp8"}))
    with pytest.raises(ValueError, match=r"xf.launch_config: \$XFORM_LAUNCH_CONFIG holds settings that are not valid"):
        xf.launch_config()


def test_configure_applies_the_transforms_in_order():
    configured = xf.configure(step, LaunchConfig(precision="fp16", accumulation_steps=2, strategy="zero3"))
    assert configured.xform.names == ("mixed_precision", "accumulate", "shard")
    assert configured.xform.setting("shard", "strategy") == xf.FullyShard()
    assert xf.configure(step, LaunchConfig()).xform.names == ("shard",)


def test_configured_step_on_one_process_equals_the_same_transforms_by_hand():
    cfg = LaunchConfig(precision="bf16", accumulation_steps=2, strategy="zero2")
    by_hand = xf.accumulate(xf.mixed_precision(step, "bf16"), 2)
    configured = xf.configure(step, cfg)
    a, _ = by_hand(by_hand.init(make_state()), batch(n=8))
    b, _ = configured(configured.init(make_state()), batch(n=8))
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name])


def test_a_strategy_the_backend_does_not_run_is_refused_clearly():
    with pytest.raises(ValueError, match="the deepspeed backend runs ZeRO stages only"):
        xf.configure(step, LaunchConfig(backend="deepspeed"))


SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, xform as xf
    rt = xf.distributed.initialize()
    def step(state, batch):
        loss, grads = xf.value_and_grad(lambda p: xf.apply(state, p, batch).square().mean())(state.params)
        return state.apply_gradients(grads), {"loss": loss}
    s = xf.configure(step)
    torch.manual_seed(0)
    state = s.init(xf.TrainState.create(torch.nn.Linear(4, 4), optimizer=torch.optim.SGD, lr=0.1))
    state, _ = s(state, torch.ones(4, 4))
    x = s.xform
    sys.stdout.write(json.dumps({"rank": rt.rank, "transforms": x.names, "strategy": x.setting("shard", "strategy").name,
                                 "policy": str(x.setting("mixed_precision", "policy")),
                                 "steps": x.setting("accumulate", "steps"), "step": state.step}) + "\\n")
    sys.stdout.flush()
    xf.distributed.shutdown()
    """
)


def test_xform_launch_flags_reach_configure(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "XFORM_LAUNCH_CONFIG")}
    out = subprocess.run(
        [sys.executable, "-m", "xform.cli", "launch", "--nproc", "2", "--precision", "bf16", "--strategy", "zero2",
         "--accumulation-steps", "2", "--timeout", "120", str(script)],
        capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = sorted((json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")), key=lambda d: d["rank"])
    assert [d["rank"] for d in lines] == [0, 1]
    for d in lines:
        assert d["transforms"] == ["mixed_precision", "accumulate", "shard"]
        assert (d["strategy"], d["steps"], d["step"]) == ("zero2", 2, 1)
        assert "compute=bfloat16" in d["policy"]
