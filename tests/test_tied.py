"""Tied parameters (one tensor held by several modules) under every strategy.

The subject is ``hf_support.TiedLM``: an output head tied to the embedding (owners in
different subtrees, as GPT-2's ``lm_head``/``wte``) and two linear layers of one block
sharing a weight (a tie whose lowest common owner is not the root). Each test names the
bug it catches.
"""

from __future__ import annotations

import json

import pytest
import torch

import hf_support as hs
from xform.distributed.procs import ProcessPool

STEPS = 4
CASE = {"model": "tiny", "loss": "out.loss", "global_batch": 4, "steps": STEPS, "optimizer": "sgd"}

# Tolerance: the same fp32 math in another summation order (two halves of the batch
# reduced across processes instead of one batch). Each gradient entry then differs by a
# few ulps (~1e-7 relative); with SGD's momentum 0.9 and lr 0.5 over 4 steps, parameters
# of size ~1 move by ~1e-6 at most from rounding. A wrong normalization (a factor 2), a
# lost gradient contribution of one owner of a tie (the head's or the embedding's share)
# or an untied copy moves them by lr * grad ~1e-2: four orders of magnitude above.
RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def pool2():
    with ProcessPool(2, timeout_s=300) as pool:
        yield pool


@pytest.fixture(scope="module")
def reference():
    return hs.train(CASE)


def _assert_equal_to(reference, result, what):
    assert result["names"] == reference["names"], what  # the tied tensor appears once, under one name
    for name, want in reference["params"].items():
        torch.testing.assert_close(result["params"][name], want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} {name}: {m}")
    assert result["tied"] and result["inner_tied"], f"{what}: the module's weights were untied"


def test_the_reference_keeps_its_ties():
    # Catches: the state storing a tied tensor twice, or an update moving one owner only.
    out = hs.train({**CASE, "steps": 1})
    assert out["tied"] and out["inner_tied"]
    assert len(out["names"]) == len({id(p) for p in hs.TiedLM().parameters()})
    assert "head.weight" not in out["names"] and "block.b.weight" not in out["names"]


@pytest.mark.parametrize(
    "strategy, mesh",
    [("replicate", None), ("zero1", None), ("zero2", None), ("zero3", None), ("hsdp", (1, 2)), ("hsdp", (2, 1))],
)
def test_tied_weights_under_every_strategy_equal_the_single_process_step(pool2, reference, strategy, mesh):
    # Catches: zero3/hsdp making each module with parameters its own FSDP unit, which
    # shards the embedding and the head (and block.a, block.b) separately: the tie breaks
    # and the first step fails with KeyError 'head.weight' (GPT-2: 'lm_head.weight').
    case = {**CASE, "strategy": strategy, "mesh": mesh}
    for rank, result in enumerate(pool2.run(hs.train, case)):
        _assert_equal_to(reference, result, f"{strategy} {mesh or ''} rank {rank}")


def test_a_tied_weight_is_saved_once_and_retied_on_load_and_resharding_load(pool2, tmp_path):
    # Catches: a checkpoint holding the tied tensor twice (or under the untied name), and
    # a load that restores one owner only: after load the head must again be the
    # embedding, and training on must equal an uninterrupted run.
    full = hs.train(CASE)
    path = str(tmp_path / "ckpt")
    pool2.run(hs.phase, {**CASE, "strategy": "zero3"}, path, 0, 2)
    leaves = [e["path"] for e in json.loads((tmp_path / "ckpt" / "meta.json").read_text())["leaves"]]
    params = [p for p in leaves if p.startswith("params")]
    assert len(params) == len(full["names"]), params
    assert not any("head.weight" in p or "block.b.weight" in p for p in leaves), leaves
    resumed = [hs.phase(CASE, None, 2, STEPS, path)]  # 2 processes (zero3) -> 1 (no process group)
    resumed += pool2.run(hs.phase, {**CASE, "strategy": "replicate"}, None, 2, STEPS, path)  # zero3 -> replicate
    resumed += pool2.run(hs.phase, {**CASE, "strategy": "zero3"}, None, 2, STEPS, path)  # zero3 -> zero3
    for i, r in enumerate(resumed):
        assert r["step"] == STEPS and r["tied_after_load"], i
        for name, want in full["params"].items():
            torch.testing.assert_close(r["params"][name], want, rtol=RTOL, atol=ATOL, msg=lambda m: f"resume {i} {name}: {m}")


@pytest.mark.parametrize("data_parallel", [None, "fsdp"])
def test_tensor_parallel_refuses_to_split_a_tie(pool2, data_parallel):
    # Catches: a plan that splits the head (tied to the embedding) untying it silently:
    # the head became a sharded copy, the embedding stayed whole, and the state's names
    # no longer matched its tensors.
    for text in pool2.run(hs.error_of, "tp_planning_a_tied_module", data_parallel):
        assert text.startswith("ValueError: shard(tp): 'head' shares its weight with ['embed'] (tied weights)"), text
        assert "leave 'head' out of the plan" in text, text
