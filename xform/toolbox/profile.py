"""``profile``: a Chrome trace of a window of training steps, with ``torch.profiler``."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

from xform.toolbox.sysinfo import rank_and_world

__all__ = ["profile", "Profile"]


def _check_count(name: str, v: Any, least: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise ValueError(f"profile: {name} must be an int >= {least}, got {v!r}")
    return v


class Profile:
    """The context manager ``profile`` returns; call ``step()`` after each training step."""

    def __init__(
        self,
        dir: str | os.PathLike,  # noqa: A002
        *,
        wait: int = 1,
        warmup: int = 1,
        active: int = 3,
        repeat: int = 1,
        activities: Iterable[str] | None = None,
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
    ):
        self.dir = Path(dir)
        self.wait = _check_count("wait", wait, 0)
        self.warmup = _check_count("warmup", warmup, 0)
        self.active = _check_count("active", active, 1)
        self.repeat = _check_count("repeat", repeat, 1)
        names = {"cpu": torch.profiler.ProfilerActivity.CPU, "cuda": torch.profiler.ProfilerActivity.CUDA}
        if activities is None:
            activities = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
        elif isinstance(activities, str):
            activities = [activities]
        unknown = [a for a in activities if a not in names]
        if unknown:
            raise ValueError(f"profile: unknown activities {unknown}; use 'cpu' and/or 'cuda'")
        self._activities = [names[a] for a in activities]
        self._options = dict(record_shapes=record_shapes, profile_memory=profile_memory, with_stack=with_stack)
        self.traces: list[Path] = []
        self.steps = 0
        self._prof: torch.profiler.profile | None = None

    def _on_trace_ready(self, prof: torch.profiler.profile) -> None:
        rank, _ = rank_and_world()
        path = self.dir / f"trace_rank{rank}_step{self.steps}.json"
        prof.export_chrome_trace(str(path))
        self.traces.append(path)

    def __enter__(self) -> "Profile":
        self.dir.mkdir(parents=True, exist_ok=True)
        self._prof = torch.profiler.profile(
            activities=self._activities,
            schedule=torch.profiler.schedule(wait=self.wait, warmup=self.warmup, active=self.active, repeat=self.repeat),
            on_trace_ready=self._on_trace_ready,
            **self._options,
        )
        self._prof.__enter__()
        return self

    def step(self) -> None:
        """Marks the end of a training step: moves the profiler along its schedule."""
        if self._prof is None:
            raise RuntimeError("profile: step() outside the `with xf.profile(...) as prof:` block")
        self.steps += 1
        if self.repeat == 1:
            self._prof.step()
            return
        with warnings.catch_warnings():  # each cycle is exported on its own: torch's note does not apply
            warnings.filterwarnings("ignore", message=".*Profiler clears events at the end of each cycle")
            self._prof.step()

    def __exit__(self, *exc: Any) -> None:
        prof, self._prof = self._prof, None
        prof.__exit__(*exc)  # inside an active window, torch writes what it has recorded
        cycle = self.wait + self.warmup + self.active
        if exc[0] is not None or self.steps >= cycle * self.repeat:
            return
        into = self.steps % cycle - (self.wait + self.warmup)  # steps done in an unfinished active window
        first = self.wait + self.warmup + 1
        if into >= 0:
            warnings.warn(
                f"profile: the block ended {into} step(s) into a {self.active}-step active window; "
                f"{self.traces[-1].name} holds only those",
                stacklevel=2,
            )
        elif not self.traces:
            warnings.warn(
                f"profile: the block ended after {self.steps} step() calls, before the first active window "
                f"(steps {first}..{first + self.active - 1}); no trace was written to {self.dir}. "
                f"Run at least {cycle} steps, or lower wait/warmup/active",
                stacklevel=2,
            )


def profile(
    dir: str | os.PathLike,  # noqa: A002
    *,
    wait: int = 1,
    warmup: int = 1,
    active: int = 3,
    repeat: int = 1,
    activities: Iterable[str] | None = None,
    record_shapes: bool = False,
    profile_memory: bool = False,
    with_stack: bool = False,
) -> Profile:
    """Profiles a window of training steps and writes a Chrome trace per window.

    The schedule is ``torch.profiler``'s: skip ``wait`` steps, record without keeping
    ``warmup`` steps (the profiler's own start-up), then record ``active`` steps and
    write them to ``dir/trace_rank{rank}_step{n}.json`` (open in ``chrome://tracing``
    or https://ui.perfetto.dev); ``repeat`` such windows. Call ``step()`` at the end of
    every training step; outside the active window the profiler costs almost nothing.
    The paths written are in ``.traces``.

    Args:
        dir: the folder for the traces.
        wait, warmup, active, repeat: the schedule, in steps.
        activities: ``"cpu"`` and/or ``"cuda"``; default both when CUDA is available.
        record_shapes, profile_memory, with_stack: as in ``torch.profiler.profile``.

    Example:
        >>> import tempfile, torch, xform as xf
        >>> with xf.profile(tempfile.mkdtemp(), wait=1, warmup=1, active=2) as prof:
        ...     for _ in range(4):
        ...         _ = torch.randn(32, 32) @ torch.randn(32, 32)
        ...         prof.step()
        >>> [p.name for p in prof.traces]
        ['trace_rank0_step4.json']
    """
    return Profile(
        dir, wait=wait, warmup=warmup, active=active, repeat=repeat, activities=activities,
        record_shapes=record_shapes, profile_memory=profile_memory, with_stack=with_stack,
    )  # fmt: skip
