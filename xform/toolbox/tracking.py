"""Trackers: log hyperparameters and metrics from the main process.

A tracker is anything with ``log_hparams(dict)``, ``log(metrics, step)`` and ``finish()``
(the ``Tracker`` protocol). xform ships five: ``WandbTracker`` (the ``wandb`` package,
also offline), ``MLflowTracker`` (the ``mlflow`` package, a local store or a tracking
server), ``TensorBoardTracker`` (``torch.utils.tensorboard``, needs the
``tensorboard`` package), ``JSONLinesTracker`` and ``CSVTracker`` (no dependencies).
``Trackers`` (or ``make_tracker``) fans one call out to several, your own included.

Every built-in tracker:

- writes only from the main process: rank 0 when ``torch.distributed`` is initialized,
  else the process whose ``RANK`` is 0 (or unset); elsewhere its calls return at once.
  This is decided at the first call, so a tracker may be built before the process group.
- opens its files (or its wandb run) at the first call, and logs system info (versions,
  host, devices, world size) then.
- turns the metric values to Python numbers with one device-to-host transfer per
  ``log`` call for all of them (tensors and ``xf.Mean`` values are stacked, then read
  with one ``.tolist()``), never one per metric. Call ``log`` every k steps, or give
  ``Trackers(..., every=k)``, to synchronize only every k steps.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import torch

from xform.core.mean import Mean
from xform.toolbox.sysinfo import rank_and_world, system_info

__all__ = [
    "Tracker",
    "Trackers",
    "WandbTracker",
    "MLflowTracker",
    "TensorBoardTracker",
    "JSONLinesTracker",
    "CSVTracker",
    "make_tracker",
    "is_main_process",
    "to_host",
]


@runtime_checkable
class Tracker(Protocol):
    """Where metrics go. Implement these three methods to add your own tracker.

    ``log`` receives a flat ``{name: value}`` dict whose values are Python numbers when
    it is called through ``Trackers`` (which converts them once for all trackers); a
    tracker used on its own may receive tensors and should call ``xf.to_host`` (cheap on
    numbers).
    """

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Records the run's hyperparameters (once, at the start)."""
        ...

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Records ``metrics`` at training step ``step``."""
        ...

    def finish(self) -> None:
        """Flushes and closes; no call may follow."""
        ...


def is_main_process() -> bool:
    """True on rank 0 of an initialized process group, or on ``RANK`` 0 (or unset)."""
    return rank_and_world()[0] == 0


# --- metrics to Python numbers, one transfer per device ------------------------------------


def _flatten(d: Mapping[str, Any], api: str, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if not isinstance(k, str):
            raise TypeError(f"{api}: metric names must be strings, got {k!r}")
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, api, key + "/"))
        else:
            out[key] = v
    return out


def to_host(metrics: Mapping[str, Any], *, api: str = "xf.to_host") -> dict[str, float | int]:
    """``metrics`` with every value a Python number, read with one transfer per device.

    Values may be Python or NumPy numbers, one-element tensors, or ``xf.Mean`` values.
    Nested dicts are flattened with ``/`` (``{"train": {"loss": x}}`` -> ``"train/loss"``).
    All tensor values on one device are stacked and read with a single ``.tolist()``:
    one device-to-host synchronization, however many metrics there are.

    Example:
        >>> import torch, xform as xf
        >>> xf.to_host({"loss": torch.tensor(0.5), "n": 3, "acc": xf.Mean(torch.tensor(3.0), 4)})
        {'loss': 0.5, 'n': 3, 'acc': 0.75}
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"{api}: metrics must be a dict of name to value, got {type(metrics).__name__}")
    flat = _flatten(metrics, api)
    out: dict[str, Any] = {}
    pending: dict[Any, list[tuple[str, Any, bool]]] = {}  # device -> [(name, 0-d tensor, integral)]
    for k, v in flat.items():
        if isinstance(v, bool):
            out[k] = int(v)
            continue
        if isinstance(v, (int, float)):
            out[k] = v
            continue
        if isinstance(v, Mean):
            v = v.value
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(
                    f"{api}: metric {k!r} is a tensor of shape {tuple(v.shape)}; log one number per "
                    f"name, e.g. {k}.mean() or one entry per element"
                )
            integral = not (v.is_floating_point() or v.is_complex())
            pending.setdefault(v.device, []).append((k, v.detach().reshape(()), integral))
            out[k] = None  # keep the caller's order
            continue
        if hasattr(v, "item") and hasattr(v, "dtype"):  # a NumPy scalar or 0-d array
            out[k] = v.item()
            continue
        raise TypeError(
            f"{api}: metric {k!r} has type {type(v).__name__}; log numbers, one-element tensors or xf.Mean values"
        )
    for device, items in pending.items():
        dtype = torch.float32 if device.type == "mps" else torch.float64
        values = torch.stack([t.to(dtype) for _, t, _ in items]).tolist()  # the one transfer
        for (k, _, integral), x in zip(items, values):
            out[k] = int(x) if integral else x
    return out


def _plain_hparams(hparams: Mapping[str, Any], api: str) -> dict[str, Any]:
    if not isinstance(hparams, Mapping):
        raise TypeError(f"{api}: hparams must be a dict of name to value, got {type(hparams).__name__}")
    out = {}
    for k, v in _flatten(hparams, api).items():
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif hasattr(v, "numel") and v.numel() == 1:
            out[k] = v.item()
        else:
            out[k] = str(v)
    return out


def _check_step(api: str, step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"{api}: step must be an int (e.g. state.step), got {type(step).__name__} {step!r}")
    if step < 0:
        raise ValueError(f"{api}: step must be >= 0, got {step}")
    return step


# --- the built-in trackers ------------------------------------------------------------------


class _BuiltinTracker:
    """Main-process gating, lazy opening, system info at open, finish once."""

    _api = "Tracker"

    def __init__(self, *, main_process_only: bool = True):
        self._main_process_only = bool(main_process_only)
        self._active: bool | None = None  # decided at the first call
        self._finished = False

    def _ready(self) -> bool:
        if self._finished:
            raise RuntimeError(f"{self._api}: the tracker was finished; make a new one to log again")
        if self._active is None:
            self._active = is_main_process() or not self._main_process_only
            if self._active:
                self._open()
                self._write_system(system_info())
        return self._active

    @property
    def active(self) -> bool | None:
        """Whether this process writes (None before the first call decides it)."""
        return self._active

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        plain = _plain_hparams(hparams, f"{self._api}.log_hparams")
        if self._ready():
            self._write_hparams(plain)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        api = f"{self._api}.log"
        step = _check_step(api, step)
        if self._ready():
            self._write_metrics(to_host(metrics, api=api), step)

    def finish(self) -> None:
        if self._active and not self._finished:
            self._close()
        self._finished = True

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()

    # subclasses
    def _open(self) -> None: ...
    def _write_system(self, info: dict[str, Any]) -> None: ...
    def _write_hparams(self, hparams: dict[str, Any]) -> None: ...
    def _write_metrics(self, metrics: dict[str, Any], step: int) -> None: ...
    def _close(self) -> None: ...


def _require(api: str, module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{api}: needs the {module} package, which is not installed; pip install 'xform[{extra}]'")


class JSONLinesTracker(_BuiltinTracker):
    """Writes one JSON object per line to ``path``.

    Lines: ``{"kind": "system", "time": ..., "system": {...}}`` first, then
    ``{"kind": "hparams", ...}`` and ``{"kind": "metrics", "step": 3, "time": ...,
    "metrics": {"loss": 0.25}}``. Read them with ``pandas.read_json(path, lines=True)``.

    Args:
        path: the file; its folder is created. An existing file is replaced, unless
            ``append``.
        append: add to an existing file (resuming a run).
        main_process_only: write only from the main process (see the module docs).

    Example:
        >>> import tempfile, os, torch, xform as xf
        >>> path = os.path.join(tempfile.mkdtemp(), "m.jsonl")
        >>> with xf.JSONLinesTracker(path) as t:
        ...     t.log({"loss": torch.tensor(0.5)}, step=1)
        >>> open(path).read().splitlines()[-1].endswith('"metrics": {"loss": 0.5}}')
        True
    """

    _api = "JSONLinesTracker"

    def __init__(self, path: str | os.PathLike, *, append: bool = False, main_process_only: bool = True):
        super().__init__(main_process_only=main_process_only)
        self.path = Path(path)
        self._append = append
        self._file = None

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if self._append else "w", buffering=1, encoding="utf-8")

    def _line(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, default=str) + "\n")

    def _write_system(self, info: dict[str, Any]) -> None:
        self._line({"kind": "system", "time": time.time(), "system": info})

    def _write_hparams(self, hparams: dict[str, Any]) -> None:
        self._line({"kind": "hparams", "time": time.time(), "hparams": hparams})

    def _write_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self._line({"kind": "metrics", "step": step, "time": time.time(), "metrics": metrics})

    def _close(self) -> None:
        self._file.close()


class CSVTracker(_BuiltinTracker):
    """Writes metrics as CSV rows ``step,time,<metric>...`` to ``path``.

    The columns are the metric names seen so far; a name that first appears later
    widens the file (it is rewritten once with the new column, earlier rows blank there).
    System info and hyperparameters go to ``<path stem>.hparams.json`` beside it, since
    a CSV file has one shape.

    Args:
        path: the CSV file; its folder is created and an existing file is replaced.
        main_process_only: write only from the main process (see the module docs).
    """

    _api = "CSVTracker"

    def __init__(self, path: str | os.PathLike, *, main_process_only: bool = True):
        super().__init__(main_process_only=main_process_only)
        self.path = Path(path)
        self.hparams_path = self.path.with_name(self.path.stem + ".hparams.json")
        self._columns: list[str] = []
        self._file = None
        self._writer = None
        self._side: dict[str, Any] = {}

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", newline="", encoding="utf-8")

    def _write_side(self) -> None:
        tmp = self.hparams_path.with_name(self.hparams_path.name + ".tmp")
        tmp.write_text(json.dumps(self._side, indent=1, default=str))
        os.replace(tmp, self.hparams_path)

    def _write_system(self, info: dict[str, Any]) -> None:
        self._side["system"] = info
        self._write_side()

    def _write_hparams(self, hparams: dict[str, Any]) -> None:
        self._side["hparams"] = {**self._side.get("hparams", {}), **hparams}
        self._write_side()

    def _write_metrics(self, metrics: dict[str, Any], step: int) -> None:
        new = [k for k in metrics if k not in self._columns]
        if new:
            self._widen(new)
        self._writer.writerow({"step": step, "time": f"{time.time():.3f}", **metrics})
        self._file.flush()

    def _widen(self, new: list[str]) -> None:
        rows: list[dict[str, str]] = []
        if self._columns:  # rewrite what is there under the wider header
            self._file.close()
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            self._file = open(self.path, "w", newline="", encoding="utf-8")
        self._columns += new
        self._writer = csv.DictWriter(self._file, fieldnames=["step", "time", *self._columns], restval="")
        self._writer.writeheader()
        self._writer.writerows(rows)

    def _close(self) -> None:
        self._file.close()


class TensorBoardTracker(_BuiltinTracker):
    """Writes TensorBoard event files to ``log_dir`` with ``torch.utils.tensorboard``.

    Metrics are scalars (``tensorboard --logdir runs``); hyperparameters go to the
    HParams plugin and, with the system info, to the Text tab. Needs the ``tensorboard``
    package (``pip install 'xform[tensorboard]'``), imported at the first call.

    Args:
        log_dir: the run's folder.
        main_process_only: write only from the main process (see the module docs).
        **writer_kwargs: passed to ``SummaryWriter`` (``flush_secs``, ...).
    """

    _api = "TensorBoardTracker"

    def __init__(self, log_dir: str | os.PathLike, *, main_process_only: bool = True, **writer_kwargs: Any):
        _require(self._api, "tensorboard", "tensorboard")
        super().__init__(main_process_only=main_process_only)
        self.log_dir = Path(log_dir)
        self._writer_kwargs = writer_kwargs
        self._writer = None

    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(self.log_dir), **self._writer_kwargs)

    @staticmethod
    def _table(d: dict[str, Any]) -> str:
        return "| name | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in d.items())

    def _write_system(self, info: dict[str, Any]) -> None:
        self._writer.add_text("system", self._table(info), 0)

    def _write_hparams(self, hparams: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        values = {k: ("None" if v is None else v) for k, v in hparams.items()}
        for summary in hparams_summary(values, {}):  # into this run, not a sub-run as add_hparams does
            self._writer.file_writer.add_summary(summary)
        self._writer.add_text("hparams", self._table(hparams), 0)

    def _write_metrics(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in metrics.items():
            self._writer.add_scalar(k, v, step)

    def _close(self) -> None:
        self._writer.close()


class WandbTracker(_BuiltinTracker):
    """Logs to Weights & Biases with the ``wandb`` package, imported at the first call.

    Offline: set ``WANDB_MODE=offline`` (or pass ``mode="offline"``); the run is written
    under ``dir`` and uploaded later with ``wandb sync``. Hyperparameters go to the run's
    config, system info to ``config["xform_system"]``.

    Args:
        project: the W&B project.
        name: the run's name.
        dir: where wandb writes its files (default: the working directory).
        config: initial config (more with ``log_hparams``).
        mode: ``"online"``, ``"offline"`` or ``"disabled"``; default: ``WANDB_MODE``.
        main_process_only: log only from the main process (see the module docs).
        **init_kwargs: passed to ``wandb.init`` (``entity``, ``tags``, ``settings``, ...).
    """

    _api = "WandbTracker"

    def __init__(
        self,
        project: str | None = None,
        *,
        name: str | None = None,
        dir: str | os.PathLike | None = None,  # noqa: A002 - wandb.init's name
        config: Mapping[str, Any] | None = None,
        mode: str | None = None,
        main_process_only: bool = True,
        **init_kwargs: Any,
    ):
        _require(self._api, "wandb", "wandb")
        if mode is not None and mode not in ("online", "offline", "disabled"):
            raise ValueError(f"WandbTracker: mode must be 'online', 'offline' or 'disabled', got {mode!r}")
        super().__init__(main_process_only=main_process_only)
        self._init = dict(project=project, name=name, config=dict(config or {}), mode=mode, **init_kwargs)
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
            self._init["dir"] = str(dir)
        self.run = None

    def _open(self) -> None:
        import wandb

        self.run = wandb.init(**{k: v for k, v in self._init.items() if v is not None})

    def _write_system(self, info: dict[str, Any]) -> None:
        self.run.config.update({"xform_system": info}, allow_val_change=True)

    def _write_hparams(self, hparams: dict[str, Any]) -> None:
        self.run.config.update(hparams, allow_val_change=True)

    def _write_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def _close(self) -> None:
        self.run.finish()


class MLflowTracker(_BuiltinTracker):
    """Logs to MLflow with the ``mlflow`` package, imported at the first call.

    Uses an ``MlflowClient`` of its own (never MLflow's global active run), so several
    trackers and your own MLflow code do not interfere. Hyperparameters become the run's
    params (nested dicts flattened to ``a/b`` names; MLflow params cannot change
    once logged), metrics are logged with their steps in one ``log_batch`` call per ``log``,
    system info is the artifact ``xform_system.json``, and ``log_artifact`` adds files
    (a checkpoint's ``meta.json``, say). ``finish`` ends the run as FINISHED.

    Args:
        experiment: the experiment's name, created if missing (default ``"Default"``).
        run_name: the run's name.
        tracking_uri: where runs go: a local database (``"sqlite:////abs/path/mlflow.db"``;
            MLflow 3 keeps its plain-file store ``"file:///path/mlruns"`` behind
            ``MLFLOW_ALLOW_FILE_STORE=true``) or a server (``"http://host:5000"``);
            default: ``MLFLOW_TRACKING_URI`` or MLflow's own default.
        artifact_location: where a new experiment keeps its artifacts (a folder or
            URI); default: MLflow's (``./mlartifacts`` for a local database).
        tags: the run's tags.
        main_process_only: log only from the main process (see the module docs).

    Example:
        >>> import xform as xf
        >>> tracker = xf.MLflowTracker("demo", tracking_uri="sqlite:////tmp/mlflow.db")  # doctest: +SKIP
        >>> with xf.Trackers(tracker) as trackers:  # doctest: +SKIP
        ...     trackers.log_hparams({"lr": 1e-3})
        ...     trackers.log({"loss": 0.7}, step=0)
        ...     tracker.log_artifact("ckpt/step_000000100/meta.json", "checkpoint")
    """

    _api = "MLflowTracker"

    def __init__(
        self,
        experiment: str | None = None,
        *,
        run_name: str | None = None,
        tracking_uri: str | os.PathLike | None = None,
        tags: Mapping[str, Any] | None = None,
        artifact_location: str | os.PathLike | None = None,
        main_process_only: bool = True,
    ):
        _require(self._api, "mlflow", "mlflow")
        if experiment is not None and not isinstance(experiment, str):
            raise TypeError(f"MLflowTracker: experiment must be a str, got {type(experiment).__name__}")
        super().__init__(main_process_only=main_process_only)
        self._experiment = experiment or "Default"
        self._run_name = run_name
        self._uri = None if tracking_uri is None else str(tracking_uri)
        self._tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self._artifacts = None
        if artifact_location is not None:
            self._artifacts = Path(artifact_location).resolve().as_uri() if "://" not in str(artifact_location) else str(artifact_location)
        self.client: Any = None
        self.run_id: str | None = None

    def _open(self) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self._uri)
        found = self.client.get_experiment_by_name(self._experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            experiment_id = self.client.create_experiment(self._experiment, artifact_location=self._artifacts)
        run = self.client.create_run(experiment_id, run_name=self._run_name, tags=self._tags)
        self.run_id = run.info.run_id

    def _write_system(self, info: dict[str, Any]) -> None:
        self.client.log_dict(self.run_id, info, "xform_system.json")

    def _write_hparams(self, hparams: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in hparams.items()])

    def _write_metrics(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copies the file or folder ``path`` into the run's artifacts (under
        ``artifact_path``); from the main process only, like every call."""
        if not Path(path).exists():
            raise FileNotFoundError(f"MLflowTracker.log_artifact: {str(path)!r} does not exist; pass a file or folder")
        if self._ready():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def _close(self) -> None:
        if self.run_id is not None:  # None: opening the run failed
            self.client.set_terminated(self.run_id, "FINISHED")


# --- several trackers as one ----------------------------------------------------------------


class Trackers:
    """Several trackers as one: each call goes to all of them, from the main process.

    The metric values are converted to Python numbers once (one device-to-host transfer)
    and the numbers handed to every tracker. Any object with the ``Tracker`` methods
    can be one of them.

    Args:
        *trackers: the trackers.
        every: ``log`` only at steps divisible by ``every``; at other steps it returns at
            once, without reading the metric tensors (no synchronization).
        main_process_only: call the trackers only from the main process.

    Example:
        >>> import torch, xform as xf
        >>> class Printer:
        ...     def log_hparams(self, hparams): print("hparams", hparams)
        ...     def log(self, metrics, step): print(step, metrics)
        ...     def finish(self): print("done")
        >>> with xf.Trackers(Printer(), every=2) as t:
        ...     t.log_hparams({"lr": 1e-3})
        ...     for step in range(1, 5):
        ...         t.log({"loss": torch.tensor(1.0 / step)}, step)
        hparams {'lr': 0.001}
        2 {'loss': 0.5}
        4 {'loss': 0.25}
        done
    """

    def __init__(self, *trackers: Tracker, every: int = 1, main_process_only: bool = True):
        for t in trackers:
            if not isinstance(t, Tracker):
                missing = [m for m in ("log_hparams", "log", "finish") if not callable(getattr(t, m, None))]
                raise TypeError(
                    f"Trackers: {type(t).__name__} is not a tracker: it lacks {', '.join(missing)}; a tracker "
                    "has log_hparams(hparams), log(metrics, step) and finish()"
                )
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Trackers: every must be an int >= 1, got {every!r}")
        self.trackers = tuple(trackers)
        self.every = every
        self._main_process_only = main_process_only
        self._active: bool | None = None

    def _ready(self) -> bool:
        if self._active is None:
            self._active = is_main_process() or not self._main_process_only
        return self._active

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        if self._ready():
            plain = _plain_hparams(hparams, "Trackers.log_hparams")
            for t in self.trackers:
                t.log_hparams(plain)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        step = _check_step("Trackers.log", step)
        if step % self.every or not self._ready():
            return
        numbers = to_host(metrics, api="Trackers.log")
        for t in self.trackers:
            t.log(numbers, step)

    def finish(self) -> None:
        """Finishes every tracker, even when one of them raises (the first error is re-raised)."""
        error: BaseException | None = None
        for t in self.trackers:
            try:
                t.finish()
            except BaseException as e:  # noqa: BLE001 - finish the others, then raise
                error = error or e
        if error is not None:
            raise error

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()

    def __repr__(self) -> str:
        return f"Trackers({', '.join(type(t).__name__ for t in self.trackers)}, every={self.every})"


_BY_NAME: dict[str, Callable[[Path, str | None], Tracker]] = {
    "jsonl": lambda d, project: JSONLinesTracker(d / "metrics.jsonl"),
    "csv": lambda d, project: CSVTracker(d / "metrics.csv"),
    "tensorboard": lambda d, project: TensorBoardTracker(d),
    "wandb": lambda d, project: WandbTracker(project, dir=d),
    "mlflow": lambda d, project: MLflowTracker(
        project, tracking_uri=f"sqlite:///{Path(d).resolve() / 'mlflow.db'}", artifact_location=Path(d) / "mlartifacts"
    ),
}


def make_tracker(
    *trackers: str | Tracker,
    log_dir: str | os.PathLike = "runs/xform",
    project: str | None = None,
    every: int = 1,
) -> Trackers:
    """``Trackers`` from names (``"jsonl"``, ``"csv"``, ``"tensorboard"``, ``"wandb"``, ``"mlflow"``) and objects.

    Named trackers write under ``log_dir`` (``metrics.jsonl``, ``metrics.csv``, the
    TensorBoard events, wandb's folder, MLflow's ``mlflow.db`` and ``mlartifacts``);
    ``project`` is the wandb project
    and the MLflow experiment. Objects are
    used as they are: anything with the ``Tracker`` methods.

    Example:
        >>> import tempfile, torch, xform as xf
        >>> with xf.make_tracker("jsonl", "csv", log_dir=tempfile.mkdtemp()) as tracker:
        ...     tracker.log_hparams({"lr": 1e-3, "batch_size": 64})
        ...     tracker.log({"loss": torch.tensor(0.7)}, step=0)
    """
    log_dir = Path(log_dir)
    made = []
    for t in trackers:
        if isinstance(t, str):
            if t not in _BY_NAME:
                raise ValueError(f"make_tracker: unknown tracker {t!r}; use one of {sorted(_BY_NAME)} or pass a Tracker object")
            made.append(_BY_NAME[t](log_dir, project))
        else:
            made.append(t)
    return Trackers(*made, every=every)
