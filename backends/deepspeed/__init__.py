"""The DeepSpeed backend: ZeRO 1/2/3 (with CPU offload) through DeepSpeed's engine.

``xf.shard(step, xf.DeepSpeed(stage=2))`` chooses it (the strategy object names its
backend); ``xf.configure`` with ``backend="deepspeed"`` maps ``zero1``/``zero2``/``zero3``
to ``DeepSpeed(stage=k)``. The engine's config is generated from the transforms
(``config.py``); how the step runs through the engine: ``layout.py``; checkpoints:
``checkpoint.py``. DeepSpeed itself is imported only when a layout is initialized.
"""

from __future__ import annotations

from typing import Any

from xform.core.strategies import DeepSpeed, FullyShard, HybridShard, ZeRO

from .layout import DeepSpeedLayout, engine_of, full_params

__all__ = ["DeepSpeedBackend", "DeepSpeedLayout", "engine_of", "full_params"]


class DeepSpeedBackend:
    name = "deepspeed"

    def layout(self, strategy: Any, mesh: Any, *, inner: Any = None) -> DeepSpeedLayout:
        if isinstance(strategy, ZeRO):
            strategy = DeepSpeed(stage=strategy.stage)
        elif isinstance(strategy, FullyShard) and not isinstance(strategy, HybridShard):
            strategy = DeepSpeed(stage=3)
        if not isinstance(strategy, DeepSpeed):
            raise ValueError(
                f"shard: the deepspeed backend runs ZeRO stages only, got {strategy!r}; use xf.DeepSpeed(stage=1|2|3) "
                "or 'zero1'/'zero2'/'zero3' (or the torch backend for this strategy)"
            )
        if mesh is not None:
            raise ValueError("shard: the deepspeed backend shards over all processes; pass no mesh")
        return DeepSpeedLayout(strategy, inner)
