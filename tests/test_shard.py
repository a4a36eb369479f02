"""shard: resharding resume through checkpoints, refusals with clear errors.

The equivalence of every strategy with the single-process step is property-tested in
property_tests/test_shard_properties.py.
"""

from __future__ import annotations

import pytest
import torch

import shard_support as sup
import xform as xf
from xform.distributed.procs import ProcessPool


@pytest.fixture(scope="module")
def pool2():
    with ProcessPool(2, timeout_s=300) as pool:
        yield pool


def _close(results, reference):
    for params, step in results:
        assert step == 4
        for name, want in reference.items():
            torch.testing.assert_close(params[name], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "first, second",
    [
        ("replicate", None),  # 2 processes -> 1
        (None, "zero2"),  # 1 -> 2
        ("zero3", "replicate"),  # sharded -> replicated
        ("zero1", "zero3"),
        ("zero2", "zero2"),
    ],
)
def test_resume_on_another_world_size_or_strategy_equals_an_uninterrupted_run(pool2, tmp_path, first, second):
    reference, _ = sup.phase(None, None, 0, 4)
    path = str(tmp_path / "ckpt")
    run = (lambda *a: [sup.phase(*a)]) if first is None else (lambda *a: pool2.run(sup.phase, *a))
    run(first, path, 0, 2)
    run2 = (lambda *a: [sup.phase(*a)]) if second is None else (lambda *a: pool2.run(sup.phase, *a))
    _close(run2(second, None, 2, 4, path), reference)


def test_a_sharded_checkpoint_is_written_once_atomically(pool2, tmp_path):
    path = tmp_path / "ckpt"
    pool2.run(sup.phase, "zero3", str(path), 0, 1)
    assert (path / "meta.json").exists() and (path / "dcp").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left


@pytest.mark.parametrize(
    "case, message",
    [
        ("hsdp_without_mesh", "needs a mesh with axes 'replicate' and 'shard'"),
        ("tp_plan_matches_nothing", "matches no module"),
        ("tp_uneven_split", "'0' has 7 output features, which the 2 processes of mesh axis 'tp' cannot split evenly"),
        ("mesh_of_wrong_size", "hold 3 processes but the world has 2"),
        ("init_after_training", "before training"),
        ("apply_with_other_params_under_zero3", "xf.apply must be given the params"),
    ],
)
def test_misuse_is_refused_with_a_clear_error(pool2, case, message):
    for text in pool2.run(sup.error_of, case):
        assert message in text, text


def test_wrap_time_errors():
    with pytest.raises(ValueError, match="unknown strategy 'zero4'.*one of"):
        xf.shard(sup.step, "zero4")
    with pytest.raises(ValueError, match="already sharded"):
        xf.shard(xf.shard(sup.step, "replicate"), "zero1")
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        xf.ZeRO(stage=3)
    with pytest.raises(ValueError, match="'colwise' or 'rowwise'"):
        xf.TensorParallel(plan={"0": "diagonal"})
    with pytest.raises(TypeError, match="expected a step function"):
        xf.shard(3)


def test_without_a_process_group_shard_is_the_plain_step():
    ref, _ = sup.phase(None, None, 0, 2)
    got, _ = sup.phase("zero2", None, 0, 2)
    for name in ref:
        assert torch.equal(ref[name], got[name])


def test_world_size_without_group_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    s = xf.shard(sup.step, "replicate")
    with pytest.raises(RuntimeError, match="xf.distributed.initialize"):
        s.init(xf.TrainState.create(sup.model(), optimizer=torch.optim.SGD, lr=0.1))


@pytest.mark.parametrize("strategy", [None, "replicate", "zero3"])
def test_async_save_captures_the_state_at_the_call(pool2, tmp_path, strategy):
    path = str(tmp_path / "ckpt")
    results = [sup.async_save_then_train(None, path)] if strategy is None else pool2.run(sup.async_save_then_train, strategy, path)
    for at_save, loaded in results:
        for name in at_save:
            assert torch.equal(at_save[name], loaded[name]), name


BUCKETS = [("replicate", 25.0), ("replicate", 1e-5), ("zero1", 25.0), ("zero2", 25.0), ("zero2", 1e-5)]


@pytest.mark.parametrize("strategy, bucket_mb", BUCKETS)
def test_gradients_a_step_returned_are_not_overwritten_by_the_next_step(pool2, strategy, bucket_mb):
    """Catches a reused gradient bucket overwriting gradients that the caller still holds
    (the reduced gradients are views of the buckets, which the backend keeps between
    steps): one bucket (no hooks), one per tensor (hooks), reduce-scattered rows."""
    for at_return, kept in pool2.run(sup.kept_gradients, strategy, bucket_mb):
        for i, (was, now) in enumerate(zip(at_return, kept)):
            for name in was:
                assert torch.equal(was[name], now[name]), (i, name)
        assert not torch.equal(at_return[0]["0.weight"], at_return[1]["0.weight"])  # the steps differ


@pytest.mark.parametrize("strategy, bucket_mb", BUCKETS)
def test_the_buckets_are_reused_unless_a_gradient_is_kept(pool2, strategy, bucket_mb):
    """Catches buckets allocated afresh every step (a page fault per page of a large bucket
    on CPU) and a kept gradient missed by the check that decides the reuse."""
    for reused, fresh, was, kept in pool2.run(sup.bucket_reuse, strategy, bucket_mb):
        assert reused and fresh
        for name in was:
            assert torch.equal(was[name], kept[name]), name


@pytest.mark.parametrize("ks", [(3,), (2, 2)])
def test_accumulated_sums_reach_the_all_reduce_alike_with_or_without_hooks(pool2, ks):
    """Catches the earlier micro-batches' gradient sums missing from, added twice to, or
    added in another order to the last micro-batch's gradient when the model fits one
    bucket (no hooks: the sums are added before the all-reduce), against a model cut into
    one bucket per tensor (the sums folded in by autograd hooks): bitwise equal params.
    Nested accumulate: two sums to add."""
    one = pool2.run(sup.folded_params, ks, 25.0)
    many = pool2.run(sup.folded_params, ks, 1e-5)
    for a, b in zip(one, many):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    plain = sup.folded_params(ks, 25.0)  # one process, the whole batch
    for name in plain:
        torch.testing.assert_close(one[0][name], plain[name], rtol=1e-5, atol=1e-6)
