"""xform: PyTorch training with the programming model of JAX.

Write one pure step ``step(state, batch) -> (state, metrics)``; transform it with
``mixed_precision``, ``accumulate`` (and ``shard``, ``offload``); keep all training state
in one immutable pytree, ``TrainState``.
"""

from xform import distributed, tree
from xform.transforms.accumulate import accumulate
from xform.toolbox.batch_size import find_executable_batch_size
from xform.checkpoint import CheckpointError, CheckpointManager, load, save
from xform.inference import DeviceMap, device_map, dispatch, init_empty, load_weights, save_sharded
from xform.transforms.configure import configure, launch_config
from xform.transforms.jit import JitError, JittedStep, jit
from xform.data import DataLoader, PadCollate
from xform.distributed.runtime import DistributedError
from xform.core.mean import Mean
from xform.toolbox.memory import MemoryEstimate, estimate_memory, measure_activations
from xform.toolbox.plan import plan
from xform.transforms.offload import offload
from xform.transforms.fp8 import Float8
from xform.transforms.mixed_precision import DynamicLossScale, NoOpLossScale, Policy, StaticLossScale, mixed_precision
from xform.toolbox.monitor import Monitor
from xform.toolbox.notebook import notebook_launcher
from xform.toolbox.profile import profile
from xform.toolbox.progress import progress
from xform.core.primitives import apply, value_and_grad
from xform.transforms.shard import FullyShard, HybridShard, Replicate, TensorParallel, ZeRO, mesh, shard
from xform.core.strategies import Pipeline
from xform.core.state import DonatedStateError, TrainState
from xform.core.strategies import DeepSpeed
from xform.toolbox.tracking import (
    CSVTracker,
    JSONLinesTracker,
    MLflowTracker,
    TensorBoardTracker,
    Tracker,
    Trackers,
    WandbTracker,
    make_tracker,
    to_host,
)
from xform.core.transform import Step, TransformedStep

__version__ = "0.1.0"

__all__ = [
    "CSVTracker",
    "CheckpointError",
    "CheckpointManager",
    "DataLoader",
    "DeepSpeed",
    "DeviceMap",
    "DistributedError",
    "JitError",
    "JittedStep",
    "PadCollate",
    "DonatedStateError",
    "DynamicLossScale",
    "Float8",
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
    "Pipeline",
    "Tracker",
    "Trackers",
    "TrainState",
    "TransformedStep",
    "WandbTracker",
    "MLflowTracker",
    "ZeRO",
    "accumulate",
    "apply",
    "configure",
    "device_map",
    "dispatch",
    "distributed",
    "estimate_memory",
    "find_executable_batch_size",
    "init_empty",
    "jit",
    "launch_config",
    "load",
    "load_weights",
    "make_tracker",
    "measure_activations",
    "mesh",
    "mixed_precision",
    "notebook_launcher",
    "plan",
    "offload",
    "profile",
    "progress",
    "save",
    "save_sharded",
    "shard",
    "to_host",
    "tree",
    "value_and_grad",
]
