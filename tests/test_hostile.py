"""A hostile user's combinations: frozen, unused and 0-dim parameters under every
strategy, clipping with a NaN, fp16 overflows inside accumulate inside shard, checkpoints
resumed into another strategy. Each test names the bug it catches."""

from __future__ import annotations

import pytest

import hostile_support as sup
from xform.distributed.procs import ProcessPool


@pytest.fixture(scope="module")
def pool2():
    with ProcessPool(2, timeout_s=60) as pool:
        yield pool


@pytest.mark.parametrize("strategy", ["zero3", "hsdp"])
def test_a_0_dim_parameter_under_fsdp_is_refused_before_the_module_changes(pool2, strategy):
    """Catches FSDP2's own error for a 0-dim parameter (a learned temperature, a scalar
    gate) surfacing from deep inside torch after some units were already converted: the
    user's module was left half sharded, unusable for a retry with another strategy."""
    for text, untouched in pool2.run(sup.zero3_scalar_error, strategy):
        assert text.startswith(f"ValueError: shard({strategy!r}): parameter 'scale' is 0-dim"), text
        assert "shape (1,)" in text and "'zero2'" in text, text
        assert untouched, text
