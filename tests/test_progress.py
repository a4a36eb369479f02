import io

import pytest
import torch

from xform.toolbox.progress import progress



class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def _no_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("RANK", raising=False)


@pytest.fixture
def tolist_calls(monkeypatch):
    calls = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or original(self))
    return calls


def batches(n, size=8):
    return [{"x": torch.zeros(size, 3), "y": torch.zeros(size)} for _ in range(n)]


def test_plain_bar_shows_step_rates_and_metrics():
    out = io.StringIO()
    bar = progress(batches(4), desc="train", enabled=True, renderer="plain", file=out, refresh_s=0, tokens=lambda b: 16)
    seen = 0
    for i, _ in enumerate(bar):
        seen += 1
        bar.set_metrics({"loss": torch.tensor(1.0 / (i + 1)), "lr": 0.01})
    assert seen == 4
    text = out.getvalue()
    last = text.split("\r")[-1]
    assert last.startswith("train: 4/4 (100%)") and last.endswith("\n")
    assert "step/s" in last and "samples/s" in last and "tokens/s" in last
    assert "loss=0.25" in last and "lr=0.01" in last
    assert text.count("\r") == 5  # one refresh per step, and the final line


def test_quiet_when_not_a_terminal_or_in_ci(monkeypatch):
    out = io.StringIO()
    items = list(progress(range(5), file=out))
    assert items == [0, 1, 2, 3, 4] and out.getvalue() == ""

    term = FakeTerminal()
    list(progress(range(3), file=term, renderer="plain", refresh_s=0))
    assert "3/3" in term.getvalue()

    monkeypatch.setenv("CI", "true")
    term = FakeTerminal()
    bar = progress(range(3), file=term, renderer="plain")
    assert not bar.enabled and list(bar) == [0, 1, 2] and term.getvalue() == ""
    forced = FakeTerminal()
    list(progress(range(3), file=forced, renderer="plain", enabled=True))
    assert "3/3" in forced.getvalue()


def test_quiet_off_the_main_process_even_when_forced(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    term = FakeTerminal()
    bar = progress(range(3), file=term, enabled=True, renderer="plain")
    assert not bar.enabled and list(bar) == [0, 1, 2] and term.getvalue() == ""


def test_metrics_are_read_at_refreshes_not_steps(tolist_calls):
    out = io.StringIO()
    bar = progress(batches(6), enabled=True, renderer="plain", file=out, refresh_s=3600)
    for batch in bar:
        bar.set_metrics({"loss": batch["y"].sum(), "acc": batch["y"].mean()})
    assert len(tolist_calls) == 1  # the final line only, both metrics in one transfer
    tolist_calls.clear()
    bar = progress(batches(6), enabled=True, renderer="plain", file=io.StringIO(), refresh_s=0)
    for batch in bar:
        bar.set_metrics({"loss": batch["y"].sum()})
    assert len(tolist_calls) == 7  # refresh_s=0 asks for every step: 6 refreshes and the final line


def test_samples_from_the_batch_or_given():
    bar = progress(batches(3, size=5), enabled=True, renderer="plain", file=io.StringIO(), refresh_s=3600)
    list(bar)
    assert (bar.n, bar.samples_seen, bar.tokens_seen) == (3, 15, 0)
    bar = progress(range(4), enabled=True, renderer="plain", file=io.StringIO(), samples=32, tokens=lambda b: b)
    list(bar)
    assert (bar.n, bar.samples_seen, bar.tokens_seen) == (4, 128, 0 + 1 + 2 + 3)


def test_manual_updates_without_an_iterable():
    out = io.StringIO()
    with progress(total=10, enabled=True, renderer="plain", file=out, refresh_s=0) as bar:
        for _ in range(4):
            bar.update(samples=2, tokens=20)
    assert "4/10 ( 40%)" in out.getvalue() and out.getvalue().endswith("\n")
    with pytest.raises(TypeError, match="no iterable to iterate over; call update"):
        next(iter(progress(total=3, enabled=True, file=io.StringIO())))


def test_tqdm_renderer():
    import tqdm  # noqa: F401  (a test dependency: fail, never skip, when it is missing)
    out = io.StringIO()
    bar = progress(batches(3), desc="fit", enabled=True, renderer="tqdm", file=out, refresh_s=0)
    for _ in bar:
        bar.set_metrics({"loss": torch.tensor(0.5)})
    text = out.getvalue()
    assert "fit" in text and "3/3" in text and "loss=0.5" in text and "samples/s" in text


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="progress: renderer must be 'auto', 'tqdm' or 'plain', got 'rich'"):
        progress(range(3), renderer="rich")
    with pytest.raises(TypeError, match="progress: samples must be an int per step, a function batch -> int, or None"):
        progress(range(3), samples="8")
    with pytest.raises(ValueError, match="progress: total must be an int >= 0"):
        progress(range(3), total=-1)

