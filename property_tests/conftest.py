"""Hypothesis profiles for the property tests.

- ``ci`` (the default, and whenever ``CI`` is set): derandomized, so a CI run is
  reproducible and never flaky; 20 examples per property; no deadline (CPU timings vary).
- ``dev`` (``HYPOTHESIS_PROFILE=dev``): random search with 200 examples per property, for
  local runs that look harder for counterexamples.
- ``mutation`` (set by ``tests/test_mutations.py``): the ``ci`` examples, but a failure is
  reported as found, without shrinking it: the mutation check only needs to know that a
  property fails, and shrinking would cost minutes per mutation.

An explicit ``HYPOTHESIS_PROFILE`` wins over ``CI``.
"""

import os

import torch
from hypothesis import HealthCheck, Phase, settings

torch.set_num_threads(1)  # bit-reproducible results, no oversubscription of 2 cores

_COMMON = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, database=None, max_examples=20, **_COMMON)
settings.register_profile("dev", max_examples=200, **_COMMON)
settings.register_profile(
    "mutation", derandomize=True, database=None, max_examples=20,
    phases=[Phase.explicit, Phase.reuse, Phase.generate], **_COMMON,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or "ci")
