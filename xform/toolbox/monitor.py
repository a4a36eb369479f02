"""``Monitor``: step time, throughput, MFU and peak memory, as metrics a tracker logs."""

from __future__ import annotations

import sys
import time
import torch

from xform.core.group import group_up

__all__ = ["Monitor", "PEAK_FLOPS", "peak_flops_of", "peak_rss_bytes", "rss_bytes"]

# Dense bf16/fp16 tensor-core peak FLOP/s per device, matched as a substring of the device
# name in this order (the specific names first). Sparsity is not counted.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def peak_flops_of(device: torch.device | str | None = None) -> float | None:
    """The dense bf16 peak FLOP/s of a known CUDA device (``PEAK_FLOPS``), else None."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_bytes() -> int | None:
    """This process's resident set size now, from ``/proc/self/status`` (Linux), else None."""
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size (``VmHWM``; ``getrusage`` where there is no /proc)."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
    except (ImportError, OSError):
        return None


def _reset_peak_rss() -> None:
    try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Monitor:
    """Measures training speed and memory over windows of steps.

    Call ``update()`` after each step: it only adds to counters (no synchronization).
    ``metrics()`` closes the window: it synchronizes the device once, and returns for the
    steps since the previous call (or since the monitor was made):

    - ``step_time_s``, ``steps_per_s``; ``samples_per_s`` and ``tokens_per_s`` when
      ``update`` was given samples or tokens;
    - ``tflops``, the achieved TFLOP/s of this device, when the FLOPs per sample or per
      token are known, and ``mfu`` (model FLOPs utilization, achieved / peak) when the
      device's peak is known too (given, or ``PEAK_FLOPS`` for H100/H200/A100, whose
      figures are dense bf16: compare bf16 or fp16 training with them);
    - ``memory_peak_gib``: on CUDA the allocator's peak of allocated memory (and
      ``memory_reserved_peak_gib``); on CPU the process's peak RSS (``memory_rss_gib`` is
      the RSS now). With ``reset_peak`` the peak restarts at each window.

    The numbers are this rank's; ``metrics(gather=True)`` (a collective: every rank calls
    it) adds each rank's peak memory and the maximum over ranks. Keys start with
    ``prefix``. A common FLOPs figure for a decoder-only transformer with N parameters is
    ``flops_per_token=6 * N`` (forward and backward, attention not counted).

    Args:
        device: the device to measure; default CUDA when available, else CPU.
        flops_per_sample: training FLOPs per sample (forward + backward).
        flops_per_token: training FLOPs per token; used when ``update`` counts tokens.
        peak_flops: the device's peak FLOP/s; "auto" looks it up in ``PEAK_FLOPS``; None
            for no MFU.
        prefix: prepended to every key.
        reset_peak: restart the memory peak at each window.

    Example:
        >>> import torch, xform as xf
        >>> monitor = xf.Monitor(device="cpu", flops_per_sample=6 * 1000, peak_flops=1e12)
        >>> for _ in range(3):
        ...     _ = torch.randn(64, 64) @ torch.randn(64, 64)
        ...     monitor.update(samples=32)
        >>> sorted(monitor.metrics())  # doctest: +NORMALIZE_WHITESPACE
        ['perf/memory_peak_gib', 'perf/memory_rss_gib', 'perf/mfu', 'perf/samples_per_s', 'perf/step_time_s',
         'perf/steps_per_s', 'perf/tflops']
    """

    def __init__(
        self,
        *,
        device: torch.device | str | None = None,
        flops_per_sample: float | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | str | None = "auto",
        prefix: str = "perf/",
        reset_peak: bool = True,
    ):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"Monitor: device {self.device} was asked for, but CUDA is not available; use device='cpu'")
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        for name, v in (("flops_per_sample", flops_per_sample), ("flops_per_token", flops_per_token)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise ValueError(f"Monitor: {name} must be a number > 0 or None, got {v!r}")
        if peak_flops == "auto":
            peak_flops = peak_flops_of(self.device)
        elif peak_flops is not None and (
            isinstance(peak_flops, (bool, str)) or not isinstance(peak_flops, (int, float)) or not peak_flops > 0
        ):
            raise ValueError(
                f"Monitor: peak_flops must be 'auto', a number of FLOP/s > 0 (e.g. 989e12) or None, got {peak_flops!r}"
            )
        self.flops_per_sample = flops_per_sample
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.prefix = prefix
        self.reset_peak = reset_peak
        self._reset_window()

    def _reset_window(self) -> None:
        self.steps = self.samples = self.tokens = 0
        if self.reset_peak:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            elif self.device.type == "cpu":
                _reset_peak_rss()
        self._start = time.perf_counter()

    def update(self, *, samples: int = 0, tokens: int = 0, steps: int = 1) -> None:
        """Counts ``steps`` finished steps with their ``samples`` and ``tokens`` (Python ints)."""
        self.steps += steps
        self.samples += samples
        self.tokens += tokens

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "xpu" and hasattr(torch, "xpu"):
            torch.xpu.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def metrics(self, *, gather: bool = False) -> dict[str, float]:
        """The window's metrics (see the class docs); starts the next window."""
        self._sync()
        elapsed = time.perf_counter() - self._start
        out: dict[str, float] = {}
        if self.steps and elapsed > 0:
            out["step_time_s"] = elapsed / self.steps
            out["steps_per_s"] = self.steps / elapsed
            if self.samples:
                out["samples_per_s"] = self.samples / elapsed
            if self.tokens:
                out["tokens_per_s"] = self.tokens / elapsed
            flops = None
            if self.flops_per_token is not None and self.tokens:
                flops = self.flops_per_token * self.tokens
            elif self.flops_per_sample is not None and self.samples:
                flops = self.flops_per_sample * self.samples
            if flops is not None:
                achieved = flops / elapsed
                out["tflops"] = achieved / 1e12
                if self.peak_flops:
                    out["mfu"] = achieved / self.peak_flops
        peak = self._memory(out)
        if gather:
            self._gather_peak(out, peak)
        self._reset_window()
        return {self.prefix + k: v for k, v in out.items()}

    def _memory(self, out: dict[str, float]) -> float | None:
        gib = 2.0**30
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            out["memory_peak_gib"] = peak / gib
            out["memory_reserved_peak_gib"] = torch.cuda.max_memory_reserved(self.device) / gib
            return peak
        peak, now = peak_rss_bytes(), rss_bytes()
        if peak is not None:
            out["memory_peak_gib"] = peak / gib
        if now is not None:
            out["memory_rss_gib"] = now / gib
        return peak

    def _gather_peak(self, out: dict[str, float], peak: float | None) -> None:
        import torch.distributed as dist

        if not group_up():
            return
        backend = dist.get_backend()
        device = self.device if backend == "nccl" else torch.device("cpu")
        mine = torch.tensor([float(peak if peak is not None else -1)], dtype=torch.float64, device=device)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        values = torch.cat(every).tolist()  # one transfer
        for r, v in enumerate(values):
            if v >= 0:
                out[f"memory_peak_gib/rank{r}"] = v / 2.0**30
        if max(values) >= 0:
            out["memory_peak_gib/max"] = max(values) / 2.0**30
