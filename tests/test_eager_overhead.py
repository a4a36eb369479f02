"""What the eager step's fast paths must not change: handlers that ``accumulate`` and
``mixed_precision`` reuse across calls (with their handler stack and its chains) keep no
tensor from one call to the next, a call nested in a call of the same step gets its own
handler, and the generated ``TrainState`` constructor builds what ``attrs.evolve`` did."""

import gc
import weakref

import attrs
import pytest
import torch
import torch.nn.functional as F

import xform as xf
from xform.core import primitives

from _util import batch, make_state


def _step_keeping(refs):
    """The usual step, recording a weak reference to each micro-batch's gradients."""

    def step(state, b):
        def loss_fn(params):
            return F.cross_entropy(xf.apply(state, params, b["x"]), b["y"])

        loss, grads = xf.value_and_grad(loss_fn)(state.params)
        refs.extend(weakref.ref(g) for g in grads.values())
        return state.apply_gradients(grads), {"loss": loss}

    return step


@pytest.mark.parametrize("policy", ["fp32", "fp16"])
def test_a_reused_handler_holds_no_gradient_between_calls(policy):
    """Catches a pooled accumulate handler that keeps the summed gradients (a whole
    gradient's memory, held from one step to the next) or a stack cycle that only the
    garbage collector frees: without gc, every gradient of the call is gone after it."""
    refs: list[weakref.ref] = []
    step = xf.accumulate(xf.mixed_precision(_step_keeping(refs), policy), 2)
    state = step.init(make_state())
    gc.disable()
    try:
        for _ in range(2):  # the second call runs on the reused handlers and stack
            refs.clear()
            state, metrics = step(state, batch(8))
            del metrics
            alive = [r for r in refs if r() is not None]
            assert not alive, f"{len(alive)} of {len(refs)} gradient tensors outlive the call"
    finally:
        gc.enable()


def test_concurrent_calls_of_one_step_each_get_their_own_handler():
    """Catches a pooled handler shared by two calls running at once (two threads calling
    the same transformed step): one call would reset or add into the other's micro-batch
    counter and gradient sums. Each thread's run must equal the same run done alone."""
    import threading

    from _util import step

    acc = xf.accumulate(xf.mixed_precision(step, "bf16"), 2)
    batches = [batch(8, seed=s) for s in range(12)]

    def run(out, i, state):
        for b in batches:
            state, _ = acc(state, b)
        out[i] = state

    def states():  # made here: a model's init draws from the global generator, which threads share
        return [acc.init(make_state(seed=i)) for i in range(2)]

    alone: dict[int, xf.TrainState] = {}
    for i, state in enumerate(states()):
        run(alone, i, state)
    together: dict[int, xf.TrainState] = {}
    threads = [threading.Thread(target=run, args=(together, i, s)) for i, s in enumerate(states())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(together) == [0, 1], "a thread failed"
    for i in range(2):
        for k, p in alone[i].params.items():
            assert torch.equal(together[i].params[k], p), (i, k)


def test_the_generated_constructor_matches_attrs_evolve():
    """Catches a field the generated ``TrainState`` constructor drops or mixes up
    (it is built from ``attrs.fields``, as ``LEAVES`` is)."""
    from xform.core.state import _evolve

    state = make_state()
    changes = {"step": 7, "rng": 3, "data": {"seed": 1, "consumed": 9}}
    new = _evolve(state, **changes)
    ref = attrs.evolve(state, **changes)
    for f in attrs.fields(type(state)):
        assert getattr(new, f.name) is getattr(ref, f.name), f.name
    with pytest.raises(TypeError):
        _evolve(state, stepp=1)


def test_the_plain_step_installs_no_stack():
    """The fast path of a step no transform changed: nothing installed, the shared empty
    stack (with no chain) left as it was after a call."""
    from _util import step

    state = make_state()
    state, _ = step(state, batch(8))
    assert primitives.handlers() == () and primitives._HANDLERS.get() is primitives._EMPTY
    assert primitives._EMPTY.chains == {}


def test_import_xform_does_not_import_the_compiler():
    """Catches a module-level ``torch.compiler.disable`` (or any dynamo import) on the import
    path: it pulls in ``torch._dynamo`` and made ``import xform`` take ~1 s more."""
    import subprocess
    import sys

    code = "import sys, xform; print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"import xform imported {out.strip()}"
