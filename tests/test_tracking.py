import csv
import glob
import json
import struct
import subprocess
import sys
import time

import pytest
import torch

import xform
from xform.toolbox.tracking import (
    CSVTracker,
    JSONLinesTracker,
    TensorBoardTracker,
    Tracker,
    Trackers,
    WandbTracker,
    make_tracker,
    to_host,
)



@pytest.fixture
def transfers(monkeypatch):
    """Counts the ways a tensor can reach the host: tolist, item, float."""
    counts = {"tolist": 0, "item": 0, "float": 0}
    for name, key in (("tolist", "tolist"), ("item", "item"), ("__float__", "float")):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _key=key, **k):
            counts[_key] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


class Recorder:
    def __init__(self):
        self.calls = []

    def log_hparams(self, hparams):
        self.calls.append(("hparams", dict(hparams)))

    def log(self, metrics, step):
        self.calls.append(("log", dict(metrics), step))

    def finish(self):
        self.calls.append(("finish",))


def test_to_host_reads_every_tensor_with_one_transfer(transfers):
    metrics = {
        "loss": torch.tensor(0.25),
        "acc": xform.Mean(torch.tensor(3.0), 4),
        "grad_norm": torch.tensor([2.0]),
        "tokens": torch.tensor(1024),
        "half": torch.tensor(1.5, dtype=torch.bfloat16),
        "lr": 1e-3,
        "epoch": 2,
        "train": {"ppl": torch.tensor(8.0)},
    }
    out = to_host(metrics)
    assert transfers == {"tolist": 1, "item": 0, "float": 0}
    assert out == {
        "loss": 0.25, "acc": 0.75, "grad_norm": 2.0, "tokens": 1024, "half": 1.5, "lr": 1e-3, "epoch": 2, "train/ppl": 8.0
    }  # fmt: skip
    assert list(out) == ["loss", "acc", "grad_norm", "tokens", "half", "lr", "epoch", "train/ppl"]
    assert isinstance(out["tokens"], int) and isinstance(out["loss"], float)


def test_to_host_refuses_what_is_not_one_number():
    with pytest.raises(ValueError, match=r"metric 'logits' is a tensor of shape \(2, 3\).*logits.mean\(\)"):
        to_host({"logits": torch.zeros(2, 3)})
    with pytest.raises(TypeError, match="metric 'name' has type str"):
        to_host({"name": "abc"})
    with pytest.raises(TypeError, match="metrics must be a dict"):
        to_host([1.0])


def test_jsonlines_tracker_writes_system_hparams_and_metrics(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    t = JSONLinesTracker(path)
    assert not path.exists()  # opened at the first call
    t.log_hparams({"lr": 1e-3, "optimizer": torch.optim.AdamW, "model": {"depth": 3}})
    t.log({"loss": torch.tensor(0.5), "acc": xform.Mean(torch.tensor(1.0), 4)}, step=1)
    t.log({"loss": torch.tensor(0.25)}, step=2)
    t.finish()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["system", "hparams", "metrics", "metrics"]
    assert records[0]["system"]["torch"] == torch.__version__ and records[0]["system"]["world_size"] == 1
    assert records[1]["hparams"] == {"lr": 1e-3, "optimizer": str(torch.optim.AdamW), "model/depth": 3}
    assert records[2]["step"] == 1 and records[2]["metrics"] == {"loss": 0.5, "acc": 0.25}
    assert records[3]["metrics"] == {"loss": 0.25}
    with pytest.raises(RuntimeError, match="JSONLinesTracker: the tracker was finished"):
        t.log({"loss": 1.0}, step=3)


def test_csv_tracker_widens_for_new_metrics(tmp_path):
    path = tmp_path / "metrics.csv"
    with CSVTracker(path) as t:
        t.log_hparams({"lr": 0.1})
        t.log({"loss": torch.tensor(2.0)}, step=0)
        t.log({"loss": torch.tensor(1.0), "acc": 0.5}, step=1)
        t.log({"acc": 0.75}, step=2)
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["step", "time", "loss", "acc"]
    assert [(r["step"], r["loss"], r["acc"]) for r in rows] == [("0", "2.0", ""), ("1", "1.0", "0.5"), ("2", "", "0.75")]
    side = json.loads((tmp_path / "metrics.hparams.json").read_text())
    assert side["hparams"] == {"lr": 0.1} and side["system"]["python"] == sys.version.split()[0]


def test_tensorboard_tracker_event_files_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = TensorBoardTracker(tmp_path / "tb")
    t.log_hparams({"lr": 1e-3, "batch_size": 64, "schedule": None})
    for step in range(3):
        t.log({"loss": torch.tensor(1.0 / (step + 1)), "train/acc": 0.5 + step / 10}, step)
    t.finish()
    files = glob.glob(str(tmp_path / "tb" / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, files  # hparams in the same run, not a sub-run
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    assert [(s.step, round(s.value, 6)) for s in ea.Scalars("loss")] == [(0, 1.0), (1, 0.5), (2, 0.333333)]
    assert [round(s.value, 6) for s in ea.Scalars("train/acc")] == [0.5, 0.6, 0.7]
    assert "_hparams_/session_start_info" in ea.PluginTagToContent("hparams")
    assert {"system/text_summary", "hparams/text_summary"} <= set(ea.Tags()["tensors"])
    text = ea.Tensors("system/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| torch | " + torch.__version__ in text


def _wandb_records(path):
    """The records of a .wandb file (LevelDB log format: 32 KiB blocks of crc, length, type, data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf + chunk)
            out.append(record)
            buf = b""
        else:
            buf += chunk
    return out


def _wandb_records_written(path, timeout_s=60.0):
    """The records of the run's .wandb file once wandb's service has written it to the
    end (its ``exit`` record). ``finish()`` can return before the service's writer is
    done: once, under the full suite's load, the file held no history yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = _wandb_records(path)
        except Exception:  # a record being written: read again
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def test_wandb_tracker_offline_run_holds_config_and_history(tmp_path, monkeypatch):
    import wandb  # noqa: F401  (a test dependency: fail, never skip, when it is missing)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing outside tmp_path
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    t = WandbTracker("xform-test", dir=tmp_path, name="t1")
    t.log_hparams({"lr": 0.01})
    t.log({"loss": torch.tensor(1.5)}, step=0)
    t.log({"loss": torch.tensor(0.5), "acc": xform.Mean(torch.tensor(3.0), 4)}, step=1)
    run_id = t.run.id
    t.finish()
    (path,) = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    records = _wandb_records_written(path)
    history = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json) for i in r.history.item}
            history.append({k: v for k, v in items.items() if not k.startswith("_")} | {"step": items["_step"]})
    assert history == [{"loss": 1.5, "step": 0}, {"loss": 0.5, "acc": 0.75, "step": 1}]
    config = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        updates = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        for item in updates:
            config[item.nested_key[0] if item.nested_key else item.key] = json.loads(item.value_json)
    assert config["lr"] == 0.01
    assert config["xform_system"]["torch"] == torch.__version__


def test_trackers_convert_once_and_fan_out(tmp_path, transfers):
    a, b = Recorder(), Recorder()
    t = Trackers(a, b, JSONLinesTracker(tmp_path / "m.jsonl"))
    t.log_hparams({"lr": 0.1})
    t.log({"loss": torch.tensor(0.5), "acc": torch.tensor(0.25)}, 7)
    assert transfers["tolist"] == 1 and transfers["item"] == transfers["float"] == 0
    t.finish()
    assert a.calls == b.calls == [("hparams", {"lr": 0.1}), ("log", {"loss": 0.5, "acc": 0.25}, 7), ("finish",)]
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])["metrics"] == {"loss": 0.5, "acc": 0.25}


def test_trackers_every_k_steps_skips_without_reading_tensors(transfers):
    rec = Recorder()
    t = Trackers(rec, every=3)
    for step in range(7):
        t.log({"loss": torch.tensor(float(step))}, step)
    assert [c[2] for c in rec.calls] == [0, 3, 6]
    assert transfers["tolist"] == 3


def test_trackers_refuse_a_non_tracker_and_finish_all_on_error():
    class NoFinish:
        def log_hparams(self, h): ...
        def log(self, m, s): ...

    with pytest.raises(TypeError, match="Trackers: NoFinish is not a tracker: it lacks finish"):
        Trackers(NoFinish())
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        Trackers(every=0)

    class Broken(Recorder):
        def finish(self):
            raise OSError("disk full")

    rec = Recorder()
    assert isinstance(rec, Tracker)
    with pytest.raises(OSError, match="disk full"):
        Trackers(Broken(), rec).finish()
    assert rec.calls == [("finish",)]


def test_only_the_main_process_logs(tmp_path, monkeypatch, transfers):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rec = Recorder()
    jl = JSONLinesTracker(tmp_path / "m.jsonl")
    t = Trackers(rec, jl)
    t.log_hparams({"lr": 0.1})
    t.log({"loss": torch.tensor(0.5)}, 1)
    jl.log({"loss": torch.tensor(0.5)}, 1)
    t.finish()
    assert rec.calls == [("finish",)]
    assert jl.active is False and not (tmp_path / "m.jsonl").exists()
    assert transfers["tolist"] == 0
    everywhere = JSONLinesTracker(tmp_path / "r1.jsonl", main_process_only=False)
    everywhere.log({"loss": 1.0}, 0)
    everywhere.finish()
    assert json.loads((tmp_path / "r1.jsonl").read_text().splitlines()[0])["system"]["rank"] == 1


def test_make_tracker_from_names_and_objects(tmp_path):
    rec = Recorder()
    t = make_tracker("jsonl", "csv", rec, log_dir=tmp_path)
    assert [type(x).__name__ for x in t.trackers] == ["JSONLinesTracker", "CSVTracker", "Recorder"]
    with t:
        t.log({"loss": 1.0}, 0)
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "metrics.csv").exists()
    assert rec.calls[-1] == ("finish",)
    message = r"make_tracker: unknown tracker 'neptune'; use one of \['csv', 'jsonl', 'mlflow', 'tensorboard', 'wandb'\]"
    with pytest.raises(ValueError, match=message):
        make_tracker("neptune")


def test_step_is_checked(tmp_path):
    t = JSONLinesTracker(tmp_path / "m.jsonl")
    with pytest.raises(TypeError, match=r"JSONLinesTracker.log: step must be an int \(e.g. state.step\), got Tensor"):
        t.log({"loss": 1.0}, torch.tensor(3))
    with pytest.raises(ValueError, match="step must be >= 0"):
        Trackers(Recorder()).log({"loss": 1.0}, -1)


def test_importing_the_toolbox_imports_no_optional_package():
    # torch itself imports tqdm when it is installed (torch.hub); count only what xform adds
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import xform, xform.cli, xform.toolbox.tracking, xform.toolbox.progress, xform.toolbox.notebook, xform.toolbox.monitor, "
        "xform.toolbox.profile, xform.toolbox.memory, xform.toolbox.batch_size\n"
        "new = set(sys.modules) - before\n"
        "print(sorted(m for m in new if m.split('.')[0] in ('wandb', 'tensorboard', 'tqdm', 'mlflow') or 'tensorboard' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"



def test_mlflow_tracker_logs_a_run_that_mlflow_reads_back(tmp_path):
    """Params, metrics with their steps, system info and an artifact (a checkpoint's
    meta.json), read back through MLflow's own client from a local file store."""
    from mlflow.tracking import MlflowClient

    from xform.toolbox.tracking import MLflowTracker

    # a local store: MLflow 3 refuses its plain-file store (maintenance mode), so SQLite
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    meta = tmp_path / "ckpt" / "meta.json"
    meta.parent.mkdir()
    meta.write_text('{"format": "xform-checkpoint-2"}')
    tracker = MLflowTracker("exp", run_name="r1", tracking_uri=uri, artifact_location=tmp_path / "artifacts")
    with Trackers(tracker) as trackers:
        trackers.log_hparams({"lr": 1e-3, "model": {"width": 8}})
        trackers.log({"loss": torch.tensor(0.5), "acc": 0.25}, step=0)
        trackers.log({"loss": torch.tensor(0.25)}, step=3)
        tracker.log_artifact(meta, "checkpoint")
        run_id = tracker.run_id
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "exp"
    assert run.data.params["lr"] == "0.001" and run.data.params["model/width"] == "8"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(0, 0.5), (3, 0.25)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "acc")] == [(0, 0.25)]
    paths = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "checkpoint")}
    assert {"checkpoint/meta.json", "xform_system.json"} <= paths
    local = client.download_artifacts(run_id, "checkpoint/meta.json", str(tmp_path / "down"))
    assert json.loads(open(local).read()) == {"format": "xform-checkpoint-2"}


def test_mlflow_tracker_off_the_main_process_writes_nothing(tmp_path, monkeypatch):
    import mlflow  # noqa: F401  (a test dependency: fail, never skip, when it is missing)
    from xform.toolbox.tracking import MLflowTracker

    monkeypatch.setenv("RANK", "1")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with MLflowTracker("exp", tracking_uri=uri, artifact_location=tmp_path / "artifacts") as tracker:
        tracker.log_hparams({"lr": 1.0})
        tracker.log({"loss": 1.0}, step=0)
        tracker.log_artifact(__file__)
    assert tracker.active is False and list(tmp_path.iterdir()) == []
