"""The native backend: ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Strategies and how they are built:

- replicate, zero1, zero2 (``DataParallel``): own c10d code. The step takes gradients with
  ``torch.autograd.grad``; hooks on the parameters copy each gradient into a flat bucket
  as autograd produces it and start an async all-reduce (replicate, zero1) or
  reduce-scatter (zero2) when a bucket is full, so communication overlaps the rest of
  the backward pass, as DDP does. Buckets are launched strictly in order, so every
  process issues the same collectives in the same order. A model whose gradients fit one
  all-reduced bucket has nothing to overlap: no hooks, the gradients copied in after
  backward in one call. The buckets are kept between steps, as DDP keeps its own.
- zero3/fsdp, hsdp (``FullyShardLayout``): ``torch.distributed.fsdp.fully_shard`` (FSDP2). Its
  per-module gather/free and reduce-scatter are module hooks that fire during
  ``.backward()``, so under these strategies ``value_and_grad`` takes gradients with
  ``.backward()`` (``Handler.uses_backward``) and reads the sharded ``.grad``s. Rewriting
  FSDP2's prefetching and memory management for ``autograd.grad`` would duplicate it for
  no gain in semantics.
- tensor parallel (``TensorParallelLayout``): DTensor ``parallelize_module``, optionally with
  FSDP2 over the data-parallel mesh axis.
- pipeline (``PipelineLayout``): ``torch.distributed.pipelining`` schedules over stages cut
  from an ``nn.Sequential``, optionally replicated over a data-parallel mesh axis.
"""

from __future__ import annotations

from typing import Any

from xform.core.strategies import FullyShard, Pipeline, Replicate, TensorParallel, ZeRO

from .data_parallel import DataParallel
from .fully_shard import FullyShardLayout
from .pipeline import PipelineLayout
from .tensor_parallel import TensorParallelLayout

__all__ = ["TorchBackend"]


class TorchBackend:
    name = "torch"

    def layout(self, strategy: Any, mesh: Any, *, inner: Any = None):
        if isinstance(strategy, (Replicate, ZeRO)):
            return DataParallel(strategy, mesh)
        if isinstance(strategy, FullyShard):
            return FullyShardLayout(strategy, mesh, inner)
        if isinstance(strategy, TensorParallel):
            return TensorParallelLayout(strategy, mesh, inner)
        if isinstance(strategy, Pipeline):
            return PipelineLayout(strategy, mesh, inner)
        raise TypeError(f"shard: the torch backend has no strategy {strategy!r}")
