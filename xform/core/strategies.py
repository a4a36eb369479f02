"""Parallel strategies: frozen value objects, and the one table that names them.

``xf.shard``, ``xf.configure``, the memory estimate and the CLI all read ``STRATEGIES``;
backends implement them (``xform.core.backend``).
"""

from __future__ import annotations

from typing import Callable, Mapping

import attrs
import torch

__all__ = ["Replicate", "ZeRO", "FullyShard", "HybridShard", "TensorParallel", "Pipeline", "DeepSpeed", "Strategy", "STRATEGIES", "parse_strategy"]


@attrs.frozen(kw_only=True)
class Replicate:
    """DDP semantics: params and optimizer state replicated; gradients all-reduced in
    buckets of ``bucket_mb``, started from autograd hooks as gradients become ready (when
    they all fit one bucket: one all-reduce after backward, no hooks)."""

    bucket_mb: float = 25.0
    name = "replicate"


@attrs.frozen(kw_only=True)
class ZeRO:
    """ZeRO stage 1 or 2: params replicated; optimizer state (stage 1) and gradients
    (stage 2) sharded by rows across the data-parallel processes. Stage 1 all-reduces
    gradients and keeps them whole; stage 2 reduce-scatters them as they are produced
    and keeps only this process's rows. Each process updates its rows; params are then
    all-gathered."""

    stage: int = 1
    bucket_mb: float = 25.0

    def __attrs_post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"ZeRO: stage must be 1 or 2 (use FullyShard() for stage 3), got {self.stage}")

    @property
    def name(self) -> str:
        return f"zero{self.stage}"


@attrs.frozen(kw_only=True)
class FullyShard:
    """ZeRO-3 / FSDP2 semantics: params, gradients and optimizer state sharded by rows;
    params gathered just in time per unit (each child module that holds parameters,
    or the modules ``units`` selects) and freed after forward and after backward.

    Attributes:
        reshard_after_forward: free gathered params after forward (re-gather in backward).
        units: a predicate ``module -> bool`` choosing the modules gathered together;
            default: every module that directly holds parameters. A unit never splits a
            tie: a module holding only some of the owners of a tied parameter is not made
            a unit; the tied tensor is gathered by the lowest chosen unit holding all its
            owners, or by the root.
        reduce_dtype: dtype of gradient reduce-scatter under mixed precision (fp32).
    """

    reshard_after_forward: bool = True
    units: Callable[[torch.nn.Module], bool] | None = None
    reduce_dtype: torch.dtype = torch.float32
    name = "zero3"


@attrs.frozen(kw_only=True)
class HybridShard(FullyShard):
    """HSDP: fully shard inside the mesh axis ``shard_axis``, replicate across
    ``replicate_axis`` (e.g. shard inside a node, replicate across nodes)."""

    replicate_axis: str = "replicate"
    shard_axis: str = "shard"
    name = "hsdp"


@attrs.frozen(kw_only=True)
class TensorParallel:
    """Tensor parallelism over the mesh axis ``axis``: ``plan`` maps parameter-owning
    module names (fnmatch patterns) to ``"colwise"`` or ``"rowwise"``. Composed with
    ``data_parallel`` (``None`` or ``"fsdp"``) over ``dp_axis`` on a 2-D mesh. Every process
    of a tensor-parallel group must get the same batch: give ``xf.DataLoader`` the
    data-parallel rank and size (``rank=mesh["dp"].get_local_rank(), world_size=...``)."""

    plan: Mapping[str, str]
    axis: str = "tp"
    data_parallel: str | None = None
    dp_axis: str = "dp"
    name = "tp"

    def __attrs_post_init__(self):
        bad = {k: v for k, v in self.plan.items() if v not in ("colwise", "rowwise")}
        if bad:
            raise ValueError(f"TensorParallel: plan values must be 'colwise' or 'rowwise', got {bad}")
        if self.data_parallel not in (None, "fsdp"):
            raise ValueError(
                f"TensorParallel: data_parallel must be None or 'fsdp', got {self.data_parallel!r}"
            )


_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


@attrs.frozen(kw_only=True)
class Pipeline:
    """Pipeline parallelism over the mesh axis ``axis`` (``torch.distributed.pipelining``).

    The model must be a ``torch.nn.Sequential``: its children are cut into ``stages``
    consecutive stages, before each child named in ``split``, or (no ``split``) so that
    every stage holds about the same parameter bytes. Each process of the ``axis`` group
    holds one stage (``"gpipe"``, ``"1f1b"``) or several (``"interleaved_1f1b"``: stage
    ``s`` on process ``s % pp``) and only those stages' params and optimizer state.

    In the step, ``xf.apply(state, params, x)`` inside ``xf.value_and_grad`` is the
    pipelined part; the rest of the loss function runs on the last stage, once per
    micro-batch, on that micro-batch's output (the step is called once more per
    micro-batch, up to its ``value_and_grad``, to take its loss function). The loss must
    be a mean over the batch's rows (or an ``xf.Mean``), so that the loss of the batch is
    that of its ``microbatches`` equal micro-batches pooled. Loss and metrics come back
    on every process.

    Attributes:
        stages: the number of stages in all (default: the ``axis`` size, twice that for
            ``"interleaved_1f1b"``).
        schedule: ``"gpipe"``, ``"1f1b"`` or ``"interleaved_1f1b"``.
        microbatches: micro-batches per step (the per-process batch must divide by it).
        split: names of the children that start a new stage (``len(split) + 1`` stages).
        axis: the pipeline mesh axis.
        data_parallel: ``None``, ``"replicate"`` (each stage replicated over ``dp_axis``,
            its gradients all-reduced there) or ``"fsdp"`` (each stage fully sharded over
            ``dp_axis`` with FSDP2, its gradients reduce-scattered there).
        dp_axis: the data-parallel mesh axis.
        tensor_parallel: an ``xf.TensorParallel(plan=..., axis="tp")`` applied inside each
            stage (pp x tp; the plan's names are the model's). Every process of a
            tensor-parallel group gets the same batch.

    Example:
        >>> import xform as xf
        >>> xf.Pipeline(schedule="gpipe", microbatches=4, split=("2",)).stages
        2
    """

    stages: int | None = None
    schedule: str = "1f1b"
    microbatches: int = 2
    split: tuple[str, ...] | None = attrs.field(default=None, converter=lambda v: None if v is None else tuple(v))
    axis: str = "pp"
    data_parallel: str | None = None
    dp_axis: str = "dp"
    tensor_parallel: TensorParallel | None = None
    name = "pp"

    def __attrs_post_init__(self):
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"Pipeline: schedule must be one of {list(_SCHEDULES)}, got {self.schedule!r}")
        if isinstance(self.microbatches, bool) or not isinstance(self.microbatches, int) or self.microbatches < 1:
            raise ValueError(f"Pipeline: microbatches must be an int >= 1, got {self.microbatches!r}")
        if self.stages is not None and (isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 1):
            raise ValueError(f"Pipeline: stages must be an int >= 1 or None, got {self.stages!r}")
        if self.split is not None:
            if not self.split or not all(isinstance(n, str) and n for n in self.split):
                raise ValueError(f"Pipeline: split must name children of the model (e.g. ('2', '4')), got {self.split!r}")
            if self.stages is None:
                object.__setattr__(self, "stages", len(self.split) + 1)
            elif self.stages != len(self.split) + 1:
                raise ValueError(
                    f"Pipeline: split={self.split!r} cuts {len(self.split) + 1} stages but stages={self.stages}; "
                    "give len(split) + 1 stages, or leave stages out"
                )
        if self.data_parallel not in (None, "replicate", "fsdp"):
            raise ValueError(
                f"Pipeline: data_parallel must be None, 'replicate' or 'fsdp', got {self.data_parallel!r}"
            )
        if self.tensor_parallel is not None:
            if not isinstance(self.tensor_parallel, TensorParallel):
                raise TypeError(
                    f"Pipeline: tensor_parallel must be an xf.TensorParallel(plan=...), got {type(self.tensor_parallel).__name__}"
                )
            if self.data_parallel is not None or self.tensor_parallel.data_parallel is not None:
                raise ValueError(
                    "Pipeline: tensor_parallel composes with the pipeline alone in this version (pp x tp); "
                    "leave data_parallel None on both, or drop tensor_parallel for pp x dp"
                )


Strategy = Replicate | ZeRO | FullyShard | HybridShard | TensorParallel | Pipeline

STRATEGIES: dict[str, Strategy] = {
    "replicate": Replicate(),
    "ddp": Replicate(),
    "zero1": ZeRO(stage=1),
    "zero2": ZeRO(stage=2),
    "zero3": FullyShard(),
    "fsdp": FullyShard(),
    "hsdp": HybridShard(),
}


def parse_strategy(strategy: "str | Strategy") -> Strategy:
    if isinstance(strategy, DeepSpeed):
        return strategy
    if isinstance(strategy, (Replicate, ZeRO, FullyShard, TensorParallel, Pipeline)):
        return strategy
    if isinstance(strategy, str) and strategy.lower() in STRATEGIES:
        return STRATEGIES[strategy.lower()]
    raise ValueError(
        f"shard: unknown strategy {strategy!r}; use one of {sorted(STRATEGIES)} or a strategy object "
        "(xf.Replicate(...), xf.ZeRO(stage=...), xf.FullyShard(...), xf.HybridShard(...), xf.TensorParallel(...), xf.Pipeline(...))"
    )


_OFFLOAD = (None, "cpu")


@attrs.frozen(kw_only=True)
class DeepSpeed:
    """ZeRO through the DeepSpeed engine (the ``deepspeed`` backend, chosen by this object).

    The engine's config is generated from the transforms inside ``shard``
    (``accumulate`` -> ``gradient_accumulation_steps``, ``mixed_precision`` -> the
    ``bf16``/``fp16`` sections, ``TrainState.create(max_grad_norm=...)`` ->
    ``gradient_clipping``) and from these settings; ``config`` (a dict or a JSON file's
    path) may add any other key, and a key that contradicts the transforms is refused.

    Attributes:
        stage: 1, 2, 3, or ``"auto"``: the smallest stage (then offload) whose estimated
            per-process memory fits ``memory_budget`` (default: the device's free memory).
        offload_optimizer: ``None`` or ``"cpu"``: the fp32 master weights and optimizer
            state live in host memory.
        offload_params: ``None`` or ``"cpu"`` (stage 3 only).
        config: more DeepSpeed config keys (dict, or a path to a JSON file).
        memory_budget: bytes per process for ``stage="auto"``.

    Example:
        >>> import xform as xf
        >>> xf.DeepSpeed(stage=2).name
        'deepspeed-zero2'
    """

    stage: "int | str" = 2
    offload_optimizer: str | None = None
    offload_params: str | None = None
    config: "Mapping | str | None" = None
    memory_budget: int | None = None
    backend = "deepspeed"

    def __attrs_post_init__(self):
        if self.stage not in (1, 2, 3, "auto") or isinstance(self.stage, bool):
            raise ValueError(f"DeepSpeed: stage must be 1, 2, 3 or 'auto', got {self.stage!r}")
        for key in ("offload_optimizer", "offload_params"):
            value = getattr(self, key)
            if value == "nvme":
                raise ValueError(
                    f"DeepSpeed: {key}='nvme' is not supported in this version of xform; use None or 'cpu' "
                    "(or pass the offload section through config=)"
                )
            if value not in _OFFLOAD:
                raise ValueError(f"DeepSpeed: {key} must be None or 'cpu', got {value!r}")
        if self.offload_params is not None and self.stage not in (3, "auto"):
            raise ValueError(
                f"DeepSpeed: offload_params needs stage 3 (params are only partitioned there), got stage={self.stage}; "
                "use DeepSpeed(stage=3, offload_params='cpu')"
            )
        if self.config is not None and not isinstance(self.config, (Mapping, str)) and not hasattr(self.config, "__fspath__"):
            raise TypeError(f"DeepSpeed: config must be None, a dict or a path to a JSON file, got {type(self.config).__name__}")
        if self.memory_budget is not None and (
            isinstance(self.memory_budget, bool) or not isinstance(self.memory_budget, int) or self.memory_budget <= 0
        ):
            raise ValueError(f"DeepSpeed: memory_budget must be a positive number of bytes or None, got {self.memory_budget!r}")
        if self.memory_budget is not None and self.stage != "auto":
            raise ValueError(
                f"DeepSpeed: memory_budget only chooses the stage under stage='auto', got stage={self.stage}; "
                "pass stage='auto' or leave memory_budget out"
            )

    @property
    def name(self) -> str:
        return f"deepspeed-zero{self.stage}"


Strategy = Strategy | DeepSpeed  # noqa: F811  (the union, with the DeepSpeed strategy)
