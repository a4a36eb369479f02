"""``progress``: a progress bar for a training loop, from the main process only."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, TextIO

import torch

from xform.toolbox.tracking import is_main_process, to_host

__all__ = ["progress", "Progress"]

Count = int | Callable[[Any], int] | None


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _leading_dim(batch: Any) -> int | None:
    """The batch size of a tensor, or of the first tensor in a dict/list/tuple batch."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for x in batch:
            if isinstance(x, torch.Tensor) and x.dim():
                return x.shape[0]
    return None


def _fmt_time(s: float) -> str:
    s = int(s)
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


def _fmt_rate(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


class _Plain:
    """A one-line renderer: ``\\r`` and the line, padded over the previous one."""

    def __init__(self, file: TextIO, desc: str | None, total: int | None):
        self.file, self.desc, self.total, self.width = file, desc, total, 0

    def draw(self, n: int, elapsed: float, rate: float | None, postfix: str, final: bool = False) -> None:
        parts = [f"{self.desc}:" if self.desc else ""]
        if self.total:
            parts.append(f"{n}/{self.total} ({100 * n / self.total:3.0f}%)")
        else:
            parts.append(f"step {n}")
        if rate:
            parts.append(f"{_fmt_rate(rate)} step/s")
        if postfix:
            parts.append(postfix)
        eta = f"<{_fmt_time((self.total - n) / rate)}" if (rate and self.total and n < self.total) else ""
        parts.append(f"[{_fmt_time(elapsed)}{eta}]")
        line = " ".join(p for p in parts if p)
        pad = max(0, self.width - len(line))
        self.width = len(line)
        self.file.write("\r" + line + " " * pad + ("\n" if final else ""))
        self.file.flush()

    def close(self) -> None:
        pass


class _Tqdm:
    """Renders through tqdm, updated only when ``Progress`` refreshes (not every step)."""

    def __init__(self, file: TextIO, desc: str | None, total: int | None):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, file=file, unit="step", dynamic_ncols=True, mininterval=0, leave=True)

    def draw(self, n: int, elapsed: float, rate: float | None, postfix: str, final: bool = False) -> None:
        self.bar.set_postfix_str(postfix, refresh=False)
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)  # tqdm's own rate estimate sees every refresh
        else:
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class Progress:
    """A progress bar over ``iterable`` (see ``progress``)."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        total: int | None = None,
        *,
        desc: str | None = None,
        samples: Count = None,
        tokens: Count = None,
        enabled: bool | None = None,
        renderer: str = "auto",
        file: TextIO | None = None,
        refresh_s: float = 0.5,
    ):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 0):
            raise ValueError(f"progress: total must be an int >= 0 or None, got {total!r}")
        for name, c in (("samples", samples), ("tokens", tokens)):
            if c is not None and not callable(c) and (isinstance(c, bool) or not isinstance(c, int) or c < 0):
                raise TypeError(f"progress: {name} must be an int per step, a function batch -> int, or None; got {c!r}")
        if renderer not in ("auto", "tqdm", "plain"):
            raise ValueError(f"progress: renderer must be 'auto', 'tqdm' or 'plain', got {renderer!r}")
        if renderer == "tqdm" and importlib.util.find_spec("tqdm") is None:
            raise ImportError("progress: renderer='tqdm' needs the tqdm package; pip install tqdm, or use renderer='plain'")
        if not refresh_s >= 0:
            raise ValueError(f"progress: refresh_s must be >= 0, got {refresh_s!r}")
        self.iterable, self.total, self.desc = iterable, total, desc
        self._samples, self._tokens = samples, tokens
        self.file = sys.stdout if file is None else file
        if not is_main_process():
            enabled = False
        elif enabled is None:
            isatty = getattr(self.file, "isatty", None)
            enabled = bool(isatty and isatty()) and not _in_ci()
        self.enabled = bool(enabled)
        if renderer == "auto":
            renderer = "tqdm" if importlib.util.find_spec("tqdm") is not None else "plain"
        self.renderer = renderer
        self.refresh_s = refresh_s
        self.n = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        self._metrics: Mapping[str, Any] | None = None
        self._view = None
        self._closed = False
        self._start = self._last_t = time.perf_counter()
        self._last = (0, 0, 0)  # n, samples, tokens at the last refresh

    # --- the user's side ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("progress: no iterable to iterate over; call update() after each step instead")
        if not self.enabled:
            yield from self.iterable
            return
        self._open()
        try:
            for batch in self.iterable:
                yield batch  # the loop body runs here; the step is done when the next batch is asked for
                self.update(1, samples=self._count(self._samples, batch, True), tokens=self._count(self._tokens, batch, False))
        finally:
            self.close()

    def update(self, n: int = 1, *, samples: int | None = None, tokens: int | None = None) -> None:
        """Counts ``n`` finished steps (and their samples and tokens); refreshes at most every ``refresh_s``."""
        if not self.enabled:
            return
        self._open()
        self.n += n
        self.samples_seen += samples or 0
        self.tokens_seen += tokens or 0
        if time.perf_counter() - self._last_t >= self.refresh_s:
            self.refresh()

    def set_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Shows ``metrics`` from the next refresh on. Only a reference is kept: tensors are
        read at the refresh (one transfer for all), not at every step."""
        if self.enabled:
            self._metrics = metrics

    def refresh(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        dt = now - self._last_t
        n0, s0, t0 = self._last
        if final:  # the whole run's averages
            dt, n0, s0, t0 = now - self._start, 0, 0, 0
        rate = (self.n - n0) / dt if dt > 0 and self.n > n0 else None
        parts = []
        if self.samples_seen and dt > 0:
            parts.append(f"{_fmt_rate((self.samples_seen - s0) / dt)} samples/s")
        if self.tokens_seen and dt > 0:
            parts.append(f"{_fmt_rate((self.tokens_seen - t0) / dt)} tokens/s")
        if self._metrics:
            values = to_host(self._metrics, api="progress.set_metrics")
            parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()]
        self._open()
        self._view.draw(self.n, now - self._start, rate, " ".join(parts), final=final)
        self._last_t, self._last = now, (self.n, self.samples_seen, self.tokens_seen)

    def _open(self) -> None:
        if self._view is None:  # the clocks start with the first step
            self._view = (_Tqdm if self.renderer == "tqdm" else _Plain)(self.file, self.desc, self.total)
            self._start = self._last_t = time.perf_counter()

    def close(self) -> None:
        """Draws the final line (whole-run averages) and ends it."""
        if self._closed or not self.enabled:
            self._closed = True
            return
        self._closed = True
        self.refresh(final=True)
        self._view.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _count(self, c: Count, batch: Any, infer: bool) -> int | None:
        if c is None:
            return _leading_dim(batch) if infer else None
        return c(batch) if callable(c) else c


def progress(
    iterable: Iterable[Any] | None = None,
    total: int | None = None,
    *,
    desc: str | None = None,
    samples: Count = None,
    tokens: Count = None,
    enabled: bool | None = None,
    renderer: str = "auto",
    file: TextIO | None = None,
    refresh_s: float = 0.5,
) -> Progress:
    """A progress bar over a training loop: step, steps/s, samples/s, tokens/s, metrics.

    Shown only on the main process (rank 0), and only when ``file`` (stdout by default)
    is a terminal and the ``CI`` environment variable is unset; ``enabled=True`` forces
    it on (still main process only), ``enabled=False`` off. When it is off, iterating
    yields the items of ``iterable`` and nothing else happens. It renders with tqdm
    when that is installed, else with a one-line built-in renderer (``renderer=``
    ``"tqdm"`` or ``"plain"`` to choose).

    Metrics given to ``set_metrics`` are read only when the bar refreshes (every
    ``refresh_s`` seconds), with one device-to-host transfer for all of them: a step
    never waits for the bar.

    Args:
        iterable: what to loop over; its ``len`` is the default ``total``. None to count
            steps yourself with ``update()``.
        total: the number of steps, for the percentage and ETA.
        desc: a label in front of the bar.
        samples: samples per step, as an int or a function ``batch -> int``; by default
            the leading dimension of the batch (of its first tensor for a dict or tuple).
        tokens: tokens per step, as an int or a function ``batch -> int`` returning a
            Python int; no tokens/s is shown without it.
        enabled: None (auto), True (force on) or False.
        renderer: ``"auto"``, ``"tqdm"`` or ``"plain"``.
        file: where to draw; default ``sys.stdout``.
        refresh_s: the least time between two refreshes.

    Example:
        >>> import io, torch, xform as xf
        >>> out = io.StringIO()
        >>> bar = xf.progress([torch.zeros(8, 2)] * 3, enabled=True, renderer="plain", file=out, refresh_s=0)
        >>> for batch in bar:
        ...     bar.set_metrics({"loss": batch.sum()})
        >>> "3/3 (100%)" in out.getvalue() and "samples/s" in out.getvalue() and "loss=0" in out.getvalue()
        True
    """
    return Progress(
        iterable, total, desc=desc, samples=samples, tokens=tokens, enabled=enabled,
        renderer=renderer, file=file, refresh_s=refresh_s,
    )  # fmt: skip
