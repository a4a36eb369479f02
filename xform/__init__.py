"""xform: PyTorch training with the programming model of JAX.

Write one pure step ``step(state, batch) -> (state, metrics)``; transform it with
``mixed_precision``, ``accumulate`` (and ``shard``, ``offload``); keep all training state
in one immutable pytree, ``TrainState``.
"""

from xform import distributed, tree
from xform._accumulate import accumulate
from xform._checkpoint import CheckpointManager, load, save
from xform._data import DataLoader
from xform._mean import Mean
from xform._mixed_precision import DynamicLossScale, NoOpLossScale, Policy, StaticLossScale, mixed_precision
from xform._primitives import apply, value_and_grad
from xform._shard import FullyShard, HybridShard, Replicate, TensorParallel, ZeRO, mesh, shard
from xform._state import DonatedStateError, TrainState
from xform._transform import Step, TransformedStep

__version__ = "0.1.0"

__all__ = [
    "CheckpointManager",
    "DataLoader",
    "DonatedStateError",
    "DynamicLossScale",
    "Mean",
    "NoOpLossScale",
    "Policy",
    "StaticLossScale",
    "Step",
    "TrainState",
    "TransformedStep",
    "FullyShard",
    "HybridShard",
    "Replicate",
    "TensorParallel",
    "ZeRO",
    "accumulate",
    "apply",
    "distributed",
    "load",
    "mesh",
    "mixed_precision",
    "save",
    "shard",
    "tree",
    "value_and_grad",
]
