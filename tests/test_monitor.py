import time

import pytest
import torch

from xform.toolbox.monitor import Monitor, peak_flops_of, peak_rss_bytes, rss_bytes


GIB = 2.0**30


def test_step_time_throughput_and_mfu_over_a_window():
    m = Monitor(device="cpu", flops_per_token=6e6, peak_flops=1e10, prefix="")
    t0 = time.perf_counter()
    for _ in range(4):
        time.sleep(0.02)
        m.update(samples=8, tokens=8 * 128)
    out = m.metrics()
    elapsed = time.perf_counter() - t0
    assert 0.02 <= out["step_time_s"] <= elapsed / 4 + 1e-6
    window = out["step_time_s"] * 4
    assert out["steps_per_s"] == pytest.approx(4 / window)
    assert out["samples_per_s"] == pytest.approx(32 / window)
    assert out["tokens_per_s"] == pytest.approx(4096 / window)
    assert out["tflops"] == pytest.approx(6e6 * 4096 / window / 1e12)
    assert out["mfu"] == pytest.approx(6e6 * 4096 / window / 1e10)
    # the next window starts empty
    assert "step_time_s" not in m.metrics()


def test_flops_per_sample_and_no_mfu_without_a_peak():
    m = Monitor(device="cpu", flops_per_sample=1e9, peak_flops=None)
    m.update(samples=10)
    out = m.metrics()
    assert "perf/tflops" in out and "perf/mfu" not in out and "perf/tokens_per_s" not in out
    assert out["perf/tflops"] == pytest.approx(1e10 / out["perf/step_time_s"] / 1e12)
    auto = Monitor(device="cpu", flops_per_sample=1e9)  # "auto": no known peak for a CPU
    assert auto.peak_flops is None


def test_cpu_peak_memory_is_per_window():
    if rss_bytes() is None:
        pytest.skip("no /proc/self/status on this platform")
    m = Monitor(device="cpu", prefix="")
    before = rss_bytes()
    big = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MiB, touched
    del big
    m.update()
    first = m.metrics()
    assert first["memory_peak_gib"] * GIB >= before + 250 * 2**20
    assert first["memory_rss_gib"] * GIB < first["memory_peak_gib"] * GIB - 200 * 2**20  # freed again
    m.update()
    second = m.metrics()  # the peak was reset at the window's start
    assert second["memory_peak_gib"] < first["memory_peak_gib"] - 200 / 1024
    assert peak_rss_bytes() >= rss_bytes() > 0


def test_peak_flops_table(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    names = {
        "NVIDIA H100 80GB HBM3": 989e12,
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H200": 989e12,
        "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA GeForce GTX 1080": None,
    }
    for name, flops in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, _n=name: _n)
        assert peak_flops_of("cuda:0") == flops, name
    assert peak_flops_of("cpu") is None


def test_arguments_are_checked():
    message = r"Monitor: peak_flops must be 'auto', a number of FLOP/s > 0 \(e.g. 989e12\) or None, got 'h100'"
    with pytest.raises(ValueError, match=message):
        Monitor(device="cpu", peak_flops="h100")
    with pytest.raises(ValueError, match="Monitor: flops_per_token must be a number > 0 or None, got 0"):
        Monitor(device="cpu", flops_per_token=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="Monitor: device cuda was asked for, but CUDA is not available"):
            Monitor(device="cuda")

