"""The XLA backend on PJRT CPU (4 devices, one process, SPMD): the step equals the native
CPU step, compiles once, skips non-finite updates like the eager step, and its
checkpoints are the native format."""

import warnings

import pytest
import torch
import torch.nn.functional as F
import torch_xla

import xform as xf
from xform.backends.xla import compilations
from xform.testing import assert_states_close


def make(seed=0, optimizer=torch.optim.AdamW, **kw):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    return xf.TrainState.create(model, optimizer=optimizer, lr=kw.pop("lr", 1e-2), seed=seed, **kw)


def step(state, batch):
    def loss_fn(p):
        return F.cross_entropy(xf.apply(state, p, batch["x"]), batch["y"])

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def data(n=6, rows=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(rows, 8, generator=g), "y": torch.randint(0, 4, (rows,), generator=g)} for _ in range(n)]


def init(fn, state):
    return fn.init(state) if hasattr(fn, "init") else state


def run(fn, state, batches):
    for b in batches:
        state, metrics = fn(state, b)
    return state, metrics


def on_cpu(state):
    return xf.tree.map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, state)


CASES = [
    # (strategy, wrap, optimizer kwargs, rtol): the bug each catches is in the test's docstring
    ("replicate", lambda f: f, dict(optimizer=torch.optim.SGD, lr=0.5), 1e-5),
    ("replicate", lambda f: xf.accumulate(f, 2), dict(max_grad_norm=0.5), 1e-5),
    ("zero1", lambda f: f, dict(max_grad_norm=0.5), 1e-5),
    ("zero3", lambda f: xf.accumulate(f, 2), dict(optimizer=torch.optim.SGD, lr=0.5, momentum=0.9), 1e-5),
    ("zero3", lambda f: f, dict(), 1e-5),
]


@pytest.mark.parametrize("strategy,wrap,kw,rtol", CASES)
def test_the_xla_step_equals_the_native_cpu_step(strategy, wrap, kw, rtol):
    """After 6 steps on 16-row batches sharded over 4 devices, params and optimizer state
    equal the native single-process step on the global batch. SGD cases catch a gradient
    scaled by the device count (a batch mean taken per shard, or a sum over replicas);
    clipping catches a norm computed over one shard; accumulate(2) catches a lost
    micro-batch inside the graph; zero3 catches a param sharding that changes values."""
    ref_step = wrap(step)
    ref, _ = run(ref_step, init(ref_step, make(**kw)), data())
    s = xf.shard(wrap(step), strategy, backend="xla")
    out, metrics = run(s, s.init(make(**kw)), data())
    assert metrics["loss"].device.type == "xla"  # metrics stay on the device until read
    assert out.step == ref.step == 6
    assert_states_close(on_cpu(out), ref, rtol=rtol, atol=1e-7)


def test_bf16_on_xla_is_close_to_bf16_on_cpu():
    """mixed_precision('bf16') inside the graph: the autocast region and fp32 masters as on
    the CPU; a lost cast (fp32 compute) or a bf16 master would exceed the bound."""
    ref_step = xf.mixed_precision(step, "bf16")
    ref, _ = run(ref_step, ref_step.init(make()), data())
    s = xf.shard(xf.mixed_precision(step, "bf16"), "replicate", backend="xla")
    out, _ = run(s, s.init(make()), data())
    assert all(p.dtype == torch.float32 for p in out.params.values())
    assert_states_close(on_cpu(out), ref, rtol=2e-2, atol=2e-3)


def test_a_step_compiles_once_after_warm_up_and_a_new_shape_warns():
    """The classic XLA bug, a graph compiled per step, shows as a rising compile count
    after warm-up (3 steps: the eager first update and the first traced steps)."""
    s = xf.shard(xf.accumulate(xf.mixed_precision(step, "bf16"), 2), "zero3", backend="xla")
    state = s.init(make())
    batches = data(n=10)
    state, _ = run(s, state, batches[:3])
    before = compilations()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recompilation warning would fail here
        state, _ = run(s, state, batches[3:])
    assert compilations() == before
    with pytest.warns(RuntimeWarning, match=r"step 11 compiled 1 new XLA graph"):
        state, _ = s(state, data(n=1, rows=8)[0])


def test_a_non_finite_gradient_skips_the_update_as_the_eager_step_does():
    """The select in the graph: a NaN batch leaves params, optimizer state (Adam's step
    count included, kept on the host) and ``step`` unchanged and counts the skip; a select
    that kept the new values, or a host step count advanced anyway, fails."""
    batches = data(n=5)
    bad = {"x": torch.full((16, 8), float("nan")), "y": batches[0]["y"]}
    seq = batches[:3] + [bad] + batches[3:]
    ref, _ = run(step, make(), seq)
    s = xf.shard(step, "replicate", backend="xla")
    out, _ = run(s, s.init(make()), seq)
    assert out.step == ref.step == 5
    assert out.transforms["nonfinite"] == ref.transforms["nonfinite"] == {"skipped": 1, "consecutive": 0}
    assert_states_close(on_cpu(out), ref, rtol=1e-5, atol=1e-7)


def test_a_checkpoint_saved_on_xla_loads_on_the_cpu_and_back(tmp_path):
    """The same format on both backends: save on XLA after 3 steps, load on the native CPU
    backend and on XLA, continue 3 steps: both equal the uninterrupted XLA run. A lost
    optimizer state, step count or data position on either side fails."""
    s = xf.shard(step, "zero3", backend="xla")
    batches = data()
    state, _ = run(s, s.init(make()), batches[:3])
    xf.save(state, tmp_path / "ck")
    whole, _ = run(s, state, batches[3:])
    cpu = xf.load(tmp_path / "ck", like=make())
    assert (cpu.step, cpu.data["consumed"]) == (3, 3)
    cpu, _ = run(step, cpu, batches[3:])
    back = xf.load(tmp_path / "ck", like=s.init(make()))
    assert next(iter(back.params.values())).device.type == "xla"
    back, _ = run(s, back, batches[3:])
    assert_states_close(cpu, on_cpu(whole), rtol=1e-5, atol=1e-7)
    assert_states_close(on_cpu(back), on_cpu(whole), rtol=0, atol=0)


def test_zero3_shards_params_and_the_batch_over_the_devices():
    """SPMD placement: zero3 params with rows divisible by 4 and the batch carry a sharding
    over the 4 devices; replicate params carry none (replicated)."""
    spec = torch_xla._XLAC._get_xla_sharding_spec
    z = xf.shard(step, "zero3", backend="xla").init(make())
    r = xf.shard(step, "replicate", backend="xla").init(make())
    assert "devices=[4,1]" in spec(z.params["0.weight"])
    assert spec(r.params["0.weight"]) in ("", "{replicated}")


def test_bad_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="'zero2' is not built on XLA"):
        xf.shard(step, "zero2", backend="xla")
    with pytest.raises(ValueError, match="'hsdp' is not built on XLA"):
        xf.shard(step, "hsdp", backend="xla")
    s = xf.shard(step, "replicate", backend="xla")
    state = s.init(make())
    with pytest.raises(ValueError, match=r"the batch has 6 rows, which do not divide over the 4 XLA devices"):
        s(state, data(n=1, rows=6)[0])


def test_configure_with_the_xla_backend_equals_the_transforms_by_hand():
    """xf.configure / xform launch --backend xla choose this backend from the one table:
    the configured step is shard(accumulate(mixed_precision(step))) on XLA; a setting lost
    on the way (accumulation, precision) changes the result."""
    from xform.cli._config import LaunchConfig

    cfg = LaunchConfig(backend="xla", strategy="zero3", precision="bf16", accumulation_steps=2)
    configured = xf.configure(step, cfg)
    by_hand = xf.shard(xf.accumulate(xf.mixed_precision(step, "bf16"), 2), "zero3", backend="xla")
    a, _ = run(configured, configured.init(make()), data(n=3))
    b, _ = run(by_hand, by_hand.init(make()), data(n=3))
    assert configured.xform.names == ("mixed_precision", "accumulate", "shard")
    assert_states_close(on_cpu(a), on_cpu(b), rtol=0, atol=0)


def test_the_benchmark_runs_and_prints_its_ratio():
    import pathlib
    import re
    import subprocess
    import sys

    script = pathlib.Path(__file__).parents[1] / "bench" / "xla.py"
    out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"ratio xla/eager \(paired per round\): [\d.]+ \[[\d.]+, [\d.]+\]", out.stdout), out.stdout
    counts = re.search(r"XLA compilations: (\d+) after warm-up, (\d+) at the end", out.stdout)
    assert counts and counts[1] == counts[2], out.stdout
