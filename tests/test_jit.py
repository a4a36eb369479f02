"""``xf.jit``: the whole transformed step, update included, compiled as one graph.

Equivalence is checked bit for bit against the eager step with the ``aot_eager`` backend
(the traced graph run op by op: the same kernels as eager, so any difference is a bug of
the tracing: a lost micro-batch, a cast missed, a skipped update reaching the params).
One ``inductor`` compilation (the slow one, ~15-35 s here) is shared by the tests that
need fused kernels; its bound against eager is stated where it is checked.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import xform as xf
from xform.testing import assert_states_close

from _util import batch, good, init, make_state, scaled_step, token_step


def counting(backend: str):
    """A ``torch.compile`` backend that counts the graphs it compiles, then runs ``backend``."""
    from torch._dynamo.backends.registry import lookup_backend

    def compile_graph(gm, example_inputs):
        compile_graph.graphs += 1
        return lookup_backend(backend)(gm, example_inputs)

    compile_graph.graphs = 0
    return compile_graph


def nan(seed=0):
    return {**batch(seed=seed), "mult": torch.tensor(math.nan)}


def assert_same_step(i, state, metrics, eager, eager_metrics):
    """Step ``i`` of a compiled run equals the eager run's bit for bit: step and data
    position, skip counters, loss (NaN alike), params, optimizer state."""
    assert state.step == eager.step and state.data == eager.data, i
    assert state.transforms["nonfinite"] == eager.transforms["nonfinite"], i
    assert torch.equal(metrics["loss"], eager_metrics["loss"]) or (
        math.isnan(float(metrics["loss"])) and math.isnan(float(eager_metrics["loss"]))
    ), i
    for k in state.params:
        assert torch.equal(state.params[k], eager.params[k]), (i, k)
    assert_states_close(state.opt_state, eager.opt_state, rtol=0, atol=0)


VARIANTS = {
    "plain": lambda s: s,
    "bf16": lambda s: xf.mixed_precision(s, "bf16"),
    "accumulate(2)": lambda s: xf.accumulate(s, 2),
    "accumulate(bf16, 2)": lambda s: xf.accumulate(xf.mixed_precision(s, "bf16"), 2),
    "bf16(accumulate(4))": lambda s: xf.mixed_precision(xf.accumulate(s, 4), "bf16"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_jitted_step_equals_the_eager_step_bit_for_bit(variant):
    """Catches tracing bugs the compiler would carry into every step: a micro-batch's
    gradient lost or counted twice (accumulate's handler resolved wrongly at trace time),
    a wrong gradient scale, the bf16 casts missing from the graph, SGD's momentum buffer
    not carried from one step to the next, an update on a NaN batch reaching the params
    (the select that replaces the host read), and a recompilation per step (the step
    counter or data position baked into the graph). SGD with momentum, where AdamW's
    normalization would hide a scale bug; four batches, one of them NaN."""
    wrapped = VARIANTS[variant](scaled_step)
    backend = counting("aot_eager")
    fast = xf.jit(wrapped, backend=backend)
    state = init(wrapped, make_state(optimizer=torch.optim.SGD, lr=0.1, momentum=0.9))
    eager = state.copy()
    batches = [good(0), good(1), nan(2), good(3), good(4)]
    for i, b in enumerate(batches):
        state, metrics = fast(state, b)
        eager, eager_metrics = wrapped(eager, b)
        assert_same_step(i, state, metrics, eager, eager_metrics)
    assert state.transforms["nonfinite"] == {"skipped": 1, "consecutive": 0}
    assert fast.compilations == 1 and backend.graphs == 1  # the first step runs eagerly, then one graph


@pytest.mark.parametrize("variant", ["plain", "accumulate(bf16, 2)"])
def test_torch_compile_of_a_step_runs_and_equals_the_eager_step(variant):
    """``torch.compile(step)`` on a transformed step (no ``xf.jit``) must run, give the eager
    step's results bit for bit on the ``aot_eager`` backend, skip the NaN batch's update
    and compile nothing new after the second step. Catches dynamo tracing into the frozen
    state's bookkeeping (it raised FrozenInstanceError), a memoized count it would trace
    wrongly (the micro-batch fractions), and a guard on the step counter or data position
    (a recompilation per step). Dynamo breaks the graph at the host bookkeeping; ``xf.jit``
    is the one-graph path."""
    wrapped = VARIANTS[variant](scaled_step)
    backend = counting("aot_eager")
    compiled = torch.compile(wrapped, backend=backend)
    state = init(wrapped, make_state(optimizer=torch.optim.SGD, lr=0.1, momentum=0.9))
    eager = state.copy()
    batches = [good(0), good(1), nan(2), good(3), good(4), good(5)]
    graphs = []
    for i, b in enumerate(batches):
        state, metrics = compiled(state, b)
        eager, eager_metrics = wrapped(eager, b)
        graphs.append(backend.graphs)
        assert_same_step(i, state, metrics, eager, eager_metrics)
    assert state.transforms["nonfinite"] == eager.transforms["nonfinite"] == {"skipped": 1, "consecutive": 0}
    assert graphs[0] > 0, "torch.compile compiled no graph: the step ran eagerly"
    # new graphs only for new paths: the first update (it creates the optimizer state), the
    # second (the direct update), the first after a skip (the counter's reset); then none
    assert graphs[-1] == graphs[-2] == graphs[-3], f"graphs compiled after each step: {graphs} (a recompilation per step)"


def test_token_count_losses_over_uneven_micro_batches_equal_eager():
    """Catches the token counts (tensors, different per micro-batch and per step) being
    baked into the graph at trace time: later steps would divide by the first step's
    count. ``xf.Mean`` losses, accumulate(2), masked labels varying per step."""
    wrapped = xf.accumulate(token_step, 2)
    fast = xf.jit(wrapped, backend="aot_eager")
    state = make_state(optimizer=torch.optim.SGD, lr=0.1)
    eager = state.copy()
    for i in range(4):
        b = batch(seed=i)
        b["y"][: 2 * i + 1] = -100  # 1, 3, 5, 7 masked: uneven counts between micro-batches and steps
        state, metrics = fast(state, b)
        eager, eager_metrics = wrapped(eager, b)
        assert torch.equal(metrics["loss"].total, eager_metrics["loss"].total)
        assert int(metrics["loss"].count) == int(eager_metrics["loss"].count) == 8 - (2 * i + 1)
        assert all(torch.equal(state.params[k], eager.params[k]) for k in state.params), i
    assert fast.compilations == 1


@pytest.fixture(scope="module")
def inductor_run():
    """One inductor compilation of accumulate(mixed_precision(bf16), 2) with AdamW, shared."""
    wrapped = xf.accumulate(xf.mixed_precision(scaled_step, "bf16"), 2)
    backend = counting("inductor")
    fast = xf.jit(wrapped, backend=backend)
    state = init(wrapped, make_state(optimizer=torch.optim.AdamW, lr=1e-2))
    eager = state.copy()
    unique = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    log = []
    for b in [good(0), good(1), good(2), nan(3), good(4), good(5)]:
        state, metrics = fast(state, b)
        eager, eager_metrics = wrapped(eager, b)
        log.append((float(metrics["loss"]), float(eager_metrics["loss"])))
    unique = torch._dynamo.utils.counters["stats"]["unique_graphs"] - unique
    return fast, backend, state, eager, log, unique


def test_inductor_step_is_close_to_eager_and_compiles_once(inductor_run):
    """Catches the fused kernels computing another update than the eager step beyond
    rounding (a wrong bias correction of AdamW's compiled path, a missed cast), the NaN
    batch reaching the params or moving AdamW's step count, and any recompilation.
    Bound: inductor keeps bf16 intermediates in float32 where eager rounds each op to
    bf16, so gradients differ by about bf16's epsilon (2**-8) relative; AdamW's update is
    about lr per step, so after 5 updates params are within 5 * lr * 2**-8 = 2e-4 of eager
    (measured: 4e-5; in fp32 the compiled AdamW, with its bias correction on the device,
    is within 4e-7 of eager). Losses agree within bf16 rounding of the logits (1e-2)."""
    fast, backend, state, eager, log, unique = inductor_run
    assert fast.compilations == 1 and backend.graphs == 1 and unique == 1
    assert state.step == eager.step == 5 and state.transforms["nonfinite"] == {"skipped": 1, "consecutive": 0}
    for ours, theirs in log:
        assert (math.isnan(ours) and math.isnan(theirs)) or abs(ours - theirs) <= 1e-2
    for k in state.params:
        torch.testing.assert_close(state.params[k], eager.params[k], rtol=0, atol=5 * 1e-2 * 2**-8)
    for k, v in state.opt_state["state"].items():
        assert float(v["step"]) == float(eager.opt_state["state"][k]["step"]) == 5.0


def test_the_compiled_graph_has_no_graph_break(inductor_run):
    """Catches a handler, the optimizer or the non-finite check leaving Python in the
    traced graph (dynamo would split it: more than one graph, breaks > 0)."""
    fast, _, state, _, _, _ = inductor_run
    explained = fast.explain(state, good(0))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_a_host_read_in_the_step_is_refused_naming_the_line():
    """Catches a data-dependent branch in the user's step being baked into the graph
    with the value it had while tracing (silently wrong later steps)."""

    def branchy(state, b):
        def loss_fn(p):
            loss = F.cross_entropy(xf.apply(state, p, b["x"]), b["y"])
            if loss > 100:  # the offending line
                loss = loss / 2
            return loss

        loss, grads = xf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    fast = xf.jit(branchy, backend="aot_eager")
    state, _ = fast(make_state(), batch())  # the first update runs eagerly
    with pytest.raises(xf.JitError, match=r"test_jit\.py:\d+ `if loss > 100:  # the offending line`"):
        fast(state, batch(seed=2))
    assert not state.donated  # nothing ran


def test_dropout_is_deterministic_per_position():
    """Catches dropout masks drawn from wherever the global generator happens to be
    (two runs from the same state and batch would differ) and the jitted step leaving
    the global generator advanced."""
    fast = xf.jit(xf.accumulate(scaled_step, 2), backend="aot_eager")
    state = make_state(dropout=0.5)
    state, _ = fast(state, good(0))
    a, b = state.copy(), state.copy()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, ma = fast(a, good(1))
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(7)
    b, mb = fast(b, good(1))
    assert torch.equal(ma["loss"], mb["loss"])
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="xf.jit: backend must be one of"):
        xf.jit(scaled_step, backend="tensorrt")
    with pytest.raises(ValueError, match=r"xf.jit: shard\(strategy=.*\) is not supported yet, only 'replicate'"):
        xf.jit(xf.shard(scaled_step, strategy="zero2"))
    fast = xf.jit(scaled_step, backend="aot_eager")
    state, _ = fast(make_state(lr=lambda step: 0.1 / (1 + step)), good(0))
    with pytest.raises(ValueError, match="xf.jit: a learning-rate schedule"):
        fast(state, good(1))
    assert xf.jit(fast) is fast


# --- shard("replicate"): run in two gloo processes ----------------------------------------


def _replicate_run(k: int):
    """On each process: the jitted and the eager shard(accumulate(step, k), "replicate")
    from the same state on this process's half of the same global batches (one NaN)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    wrapped = xf.shard(xf.accumulate(scaled_step, k), "replicate")
    backend = counting("aot_eager")
    fast = xf.jit(wrapped, backend=backend)
    state = wrapped.init(make_state(optimizer=torch.optim.SGD, lr=0.1, momentum=0.9))
    eager = state.copy()
    out = []
    for i, b in enumerate([good(0), good(1), nan(2), good(3)]):
        n = b["x"].shape[0] // world
        mine = {**b, "x": b["x"][rank * n : (rank + 1) * n], "y": b["y"][rank * n : (rank + 1) * n]}
        state, m = fast(state, mine)
        eager, me = wrapped(eager, mine)
        out.append((state.step, eager.step, float(m["loss"]), float(me["loss"])))
    same = all(torch.equal(state.params[k], eager.params[k]) for k in state.params)
    params = {k: v.detach().clone() for k, v in state.params.items()}
    return out, same, fast.compilations, backend.graphs, params


def test_replicate_jitted_equals_replicate_eager_in_two_processes():
    """Catches the gradient all-reduce missing from the compiled graph (each process would
    train on its half: params differ between processes and from eager), a sum not divided
    by the world size, the NaN of one step reaching the params, and a recompilation per
    step. SGD with momentum; accumulate(2) inside shard, as the common path nests them."""
    from xform.distributed.procs import ProcessPool

    with ProcessPool(2, timeout_s=300) as pool:
        results = pool.run(_replicate_run, 2)
    for out, same, compilations, graphs, _ in results:
        assert same and compilations == 1 and graphs == 1
        assert [o[0] for o in out] == [o[1] for o in out] == [1, 2, 2, 3]
    (_, _, _, _, p0), (_, _, _, _, p1) = results
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
