"""Shared settings for the unit tests: one CPU thread, so results are bit-reproducible
and the two cores of a CI machine are not oversubscribed."""

import torch

torch.set_num_threads(1)
