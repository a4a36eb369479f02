"""Checkpoints of a state laid out by DeepSpeed, in xform's own format (no pickle).

``xf.save`` of such a state writes two things into one atomic checkpoint directory:

- the state consolidated: float32 params whole (the engine's fp32 masters), buffers,
  and the optimizer state per parameter, exactly as a plain single-process state of the
  same model and optimizer holds them, with step, RNG, data position and transforms. That
  is what ``xf.load(path, like=plain_state)`` reads on one process without DeepSpeed, or
  into a native strategy (zero3, replicate, ...): the usual path, checksums and all.
- ``deepspeed/rank{r}.pt``: each process's partitions as the engine holds them (fp32
  master partitions, the optimizer's state over them, the model's low-precision tensors)
  and ``deepspeed/layout.json`` (stage, world size, the engine's counters, crc32 of every
  tensor). ``xf.load(path, like=ds_state)`` copies them back in place: the resume is
  bit-exact. Plain tensors only (``torch.load(weights_only=True)``); DeepSpeed's own
  checkpoint format is pickled objects, which xform never loads.

A native or single-process checkpoint, or a DeepSpeed one of another world size, is laid
into the engine's partitions from its consolidated state. A DeepSpeed checkpoint of
another stage is refused naming the file and the key that differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from xform.core.backend import static
from xform.core.optim import placeholder_opt_state
from xform.core.state import TrainState

from .layout import _flats, _opt_leaves, _param_leaves, full_params

__all__ = ["DeepSpeedCheckpoint", "HOOK"]

HOOK = "_xform_checkpoint"  # in the module's __dict__: what xf.save/xf.load call for this state
_DIR = "deepspeed"
_LAYOUT = "layout.json"
_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


def _crc(t: torch.Tensor) -> str:
    from xform.checkpoint import _crc_tensor

    return _crc_tensor(t)


class DeepSpeedCheckpoint:
    """The checkpoint hook of one engine (set on its module by the layout)."""

    def __init__(self, engine: Any, stage: int):
        self.engine, self.stage = engine, stage

    # --- the consolidated state -------------------------------------------------------

    def export(self, state: TrainState) -> TrainState:
        """``state`` as a plain single-process state holds it (collective)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        spec = static(state)
        engine = self.engine
        params = full_params(state)
        module_params = dict(engine.module.named_parameters())
        buffers = {k: (b.detach().float().clone() if b.is_floating_point() else b.detach().clone()) for k, b in engine.module.named_buffers()}
        opt = {"initialized": state.opt_state["initialized"], "state": placeholder_opt_state(spec.optimizer, params, spec.trainable)}
        if opt["initialized"]:
            inner = engine.optimizer.optimizer
            live = inner.state[next(iter(_flats(engine).values()))]
            for name in spec.trainable:
                entry = opt["state"][name]
                for key, ph in entry.items():
                    value = live.get(key)
                    if isinstance(value, torch.Tensor) and value.dim() == 0:  # "step": one per flat group
                        entry[key] = value.detach().clone()
                    elif isinstance(ph, torch.Tensor):
                        full = safe_get_full_optimizer_state(module_params[name], key)
                        entry[key] = full.detach().clone().to(ph.dtype).reshape(ph.shape)
        return state.replace(params=params, buffers=buffers, opt_state=opt)

    # --- save -------------------------------------------------------------------------

    def save(self, state: TrainState, path: Path, *, async_save: bool, plain_save: Callable[..., Any]) -> Any:
        if async_save:
            raise ValueError(
                "xf.save: async_save is not supported for a state laid out by DeepSpeed in this version; "
                "pass async_save=False"
            )
        plain = self.export(state)
        return plain_save(plain, path, _extra=lambda tmp: self._write(state, Path(tmp) / _DIR))

    def _tensors(self, state: TrainState) -> dict[str, torch.Tensor]:
        engine = self.engine
        out = {f"params/{k}": v for k, v in _param_leaves(engine, engine.module).items()}
        for name, entry in _opt_leaves(engine, True)["state"].items():
            for key, v in entry.items():
                if isinstance(v, torch.Tensor):
                    out[f"opt/{name}/{key}"] = v
        return {k: v.detach() for k, v in out.items()}

    def _write(self, state: TrainState, directory: Path) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        if rank == 0:
            directory.mkdir(exist_ok=True)
        dist.barrier()
        tensors = {k: v.cpu().clone() for k, v in self._tensors(state).items()}
        torch.save(tensors, directory / f"rank{rank}.pt")
        sums = [{k: _crc(v) for k, v in tensors.items()}]
        every: list[Any] = [None] * world
        dist.all_gather_object(every, sums[0])
        if rank == 0:
            counters = {k: int(getattr(self.engine, k)) for k in _COUNTERS}
            scaler = getattr(self.engine.optimizer, "cur_scale", None)
            layout = {
                "stage": self.stage, "world": world, "counters": counters,
                "loss_scale": float(scaler) if scaler is not None else None, "checksums": every,
            }
            (directory / _LAYOUT).write_text(json.dumps(layout, indent=1))

    # --- load -------------------------------------------------------------------------

    def load(self, path: Path, like: TrainState, *, plain_load: Callable[..., TrainState]) -> TrainState:
        from xform.checkpoint import CheckpointError

        directory = path / _DIR
        rank, world = dist.get_rank(), dist.get_world_size()
        if not (path / "meta.json").exists():
            return plain_load(path, like=like)  # no checkpoint there: its error (FileNotFoundError)
        if not (directory / _LAYOUT).exists():  # a native or single-process checkpoint: import it whole
            return self._import(plain_load(path, like=self.export(like)), like)
        layout = json.loads((directory / _LAYOUT).read_text())
        if layout.get("stage") != self.stage:
            raise CheckpointError(
                f"xf.load: the checkpoint at {path} differs from `like` at {_DIR}/{_LAYOUT}:stage: checkpoint "
                f"{layout.get('stage')!r}, like {self.stage!r}; resume a DeepSpeed checkpoint with the same stage, "
                "or load it into a plain state (consolidated params and optimizer state)"
            )
        plain = plain_load(path, like=self.export(like))  # checks structure, shapes, checksums
        if layout.get("world") != world:  # other partitions: import the consolidated state
            return self._import(plain, like)
        file = directory / f"rank{rank}.pt"
        try:
            saved = torch.load(file, weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"xf.load: cannot load the checkpoint at {path}: {_DIR}/{file.name}: {type(e).__name__}: {e}") from None
        want = layout["checksums"][rank]
        for key in sorted(set(want) | set(saved)):
            if key not in saved or key not in want:
                raise CheckpointError(f"xf.load: the checkpoint at {path}: {_DIR}/{file.name}: tensor {key} is missing")
            if _crc(saved[key]) != want[key]:
                raise CheckpointError(
                    f"xf.load: the checkpoint at {path}: {_DIR}/{file.name}: the checksum of {key} does not match (corrupt)"
                )
        self._restore(saved, path)
        engine = self.engine
        for k, v in layout["counters"].items():
            setattr(engine, k, v)
        if layout.get("loss_scale") is not None and hasattr(engine.optimizer, "cur_scale"):
            engine.optimizer.cur_scale = layout["loss_scale"]
            if hasattr(engine.optimizer, "loss_scaler"):
                engine.optimizer.loss_scaler.cur_scale = layout["loss_scale"]
        initialized = plain.opt_state["initialized"]
        return like.replace(
            step=plain.step, rng=plain.rng, data=plain.data, transforms=plain.transforms,
            params=_param_leaves(engine, engine.module), opt_state=_opt_leaves(engine, initialized),
        )

    def _import(self, plain: TrainState, like: TrainState) -> TrainState:
        """Lays the consolidated state ``plain`` (full fp32 params and optimizer state)
        into the engine's partitions: exact values, new partitions (another world size, or
        a native checkpoint)."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        engine = self.engine
        spec = static(plain)
        initialized = plain.opt_state["initialized"]
        inner = engine.optimizer.optimizer
        if initialized:  # the optimizer's state over each partition, then DeepSpeed's views of it
            kinds = plain.opt_state["state"][spec.trainable[0]]
            for flat in _flats(engine).values():
                entry = inner.state[flat]
                for key, v in kinds.items():
                    if isinstance(v, torch.Tensor) and v.dim() == 0:
                        entry[key] = v.detach().clone()
                    elif isinstance(v, torch.Tensor):
                        entry[key] = torch.zeros_like(flat, dtype=v.dtype)
                    else:
                        entry[key] = v
            if self.stage < 3:  # DeepSpeed links its per-param views of the state lazily, at its first step
                engine.optimizer._hp_optimizer_states_linked = False
                engine.optimizer._lazy_init_hp_params_optimizer_state()
        partitioned = engine.zero_optimization_partition_weights()
        with torch.no_grad():
            for name, p in engine.module.named_parameters():
                full = plain.params[name]
                if p.requires_grad:
                    keys = [None] + ([k for k, v in plain.opt_state["state"][name].items()
                                      if isinstance(v, torch.Tensor) and v.dim() > 0] if initialized else [])
                    for key in keys:
                        value = full if key is None else plain.opt_state["state"][name][key]
                        if partitioned:
                            self._set_z3(p, value, key)
                        elif key is None:
                            safe_set_full_fp32_param(p, value)
                        else:
                            safe_set_full_optimizer_state(p, value, key)
                if partitioned:
                    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                        p.data.copy_(full.to(p.dtype))
                else:
                    p.data.copy_(full.to(p.dtype))
            for name, b in engine.module.named_buffers():
                b.copy_(plain.buffers[name].to(b.dtype))
        engine.global_steps = plain.step
        engine.micro_steps = plain.step * engine.gradient_accumulation_steps()
        return like.replace(
            step=plain.step, rng=plain.rng, data=plain.data, transforms=plain.transforms,
            params=_param_leaves(engine, engine.module), opt_state=_opt_leaves(engine, initialized),
        )

    def _set_z3(self, param: torch.Tensor, value: torch.Tensor, key: str | None) -> None:
        """ZeRO-3's ``set_full_hp_param``, for a partition that the padding makes run past
        the tensor's end on the last process (DeepSpeed 0.19's own narrows out of range)."""
        zero = self.engine.optimizer
        part, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
        size = part.numel()
        start = size * zero._get_param_partition_rank(param)
        flat = value.detach().flatten().to(part.dtype)
        n = max(0, min(size, flat.numel() - start))
        part.data.view(-1)[:n].copy_(flat[start : start + n])

    def _restore(self, saved: dict[str, torch.Tensor], path: Path) -> None:
        from xform.checkpoint import CheckpointError

        engine = self.engine
        params = _param_leaves(engine, engine.module)
        inner = engine.optimizer.optimizer
        flats = _flats(engine)
        with torch.no_grad():
            for key, value in saved.items():
                kind, _, rest = key.partition("/")
                if kind == "params":
                    target = params.get(rest)
                else:
                    flat_name, _, field = rest.rpartition("/")
                    p = flats.get(flat_name)
                    if p is None:
                        target = None
                    elif field == "master":
                        target = p
                    else:
                        state = inner.state[p]
                        if field not in state:
                            state[field] = torch.empty_like(value, device=p.device)
                        target = state[field]
                if target is None or target.shape != value.shape or target.dtype != value.dtype:
                    raise CheckpointError(
                        f"xf.load: the checkpoint at {path} differs from `like` at {_DIR}: {key} "
                        f"({tuple(value.shape)} {value.dtype} in the checkpoint); build `like` with the same model, "
                        "optimizer, transforms and strategy"
                    )
                target.data.copy_(value)
