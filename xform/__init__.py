"""xform: PyTorch training with the programming model of JAX.

Write one pure step ``step(state, batch) -> (state, metrics)``; transform it with
``mixed_precision``, ``accumulate`` (and ``shard``, ``offload``); keep all training state
in one immutable pytree, ``TrainState``.
"""

from xform import distributed, tree
from xform._accumulate import accumulate
from xform._batch_size import find_executable_batch_size
from xform._checkpoint import CheckpointManager, load, save
from xform._configure import configure, launch_config
from xform._data import DataLoader
from xform._mean import Mean
from xform._memory import MemoryEstimate, estimate_memory, measure_activations
from xform._mixed_precision import DynamicLossScale, NoOpLossScale, Policy, StaticLossScale, mixed_precision
from xform._monitor import Monitor
from xform._notebook import notebook_launcher
from xform._profile import profile
from xform._progress import progress
from xform._primitives import apply, value_and_grad
from xform._shard import FullyShard, HybridShard, Replicate, TensorParallel, ZeRO, mesh, shard
from xform._state import DonatedStateError, TrainState
from xform._tracking import (
    CSVTracker,
    JSONLinesTracker,
    TensorBoardTracker,
    Tracker,
    Trackers,
    WandbTracker,
    make_tracker,
    to_host,
)
from xform._transform import Step, TransformedStep

__version__ = "0.1.0"

__all__ = [
    "CSVTracker",
    "CheckpointManager",
    "DataLoader",
    "DonatedStateError",
    "DynamicLossScale",
    "FullyShard",
    "HybridShard",
    "JSONLinesTracker",
    "Mean",
    "MemoryEstimate",
    "Monitor",
    "NoOpLossScale",
    "Policy",
    "Replicate",
    "StaticLossScale",
    "Step",
    "TensorBoardTracker",
    "TensorParallel",
    "Tracker",
    "Trackers",
    "TrainState",
    "TransformedStep",
    "WandbTracker",
    "ZeRO",
    "accumulate",
    "apply",
    "configure",
    "distributed",
    "estimate_memory",
    "find_executable_batch_size",
    "launch_config",
    "load",
    "make_tracker",
    "measure_activations",
    "mesh",
    "mixed_precision",
    "notebook_launcher",
    "profile",
    "progress",
    "save",
    "shard",
    "to_host",
    "tree",
    "value_and_grad",
]
