"""What the machine rule reads from the machine: a container's CPU quota, in both cgroup versions."""

from __future__ import annotations

from pathlib import Path

import pytest

from timmserve.errors import ConfigError
from timmserve.settings.config import ServeConfig
from timmserve.settings.machine import cpu_quota, resolve_inline, resolve_machine


def fake_cgroup(tmp_path: Path, memberships: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "cgroup-of-self").write_text(memberships)
    return tmp_path / "cgroup-of-self", root


def test_a_cgroup_v2_quota_is_read_in_cores(tmp_path):
    args = fake_cgroup(tmp_path, "0::/kubepods/pod1\n", {"kubepods/pod1/cpu.max": "150000 100000\n"})
    assert cpu_quota(*args) == 1.5
    args = fake_cgroup(tmp_path, "0::/kubepods/pod1\n", {"kubepods/pod1/cpu.max": "max 100000\n"})
    assert cpu_quota(*args) is None


def test_a_cgroup_v1_quota_is_read_from_the_processes_own_cpu_cgroup(tmp_path):
    memberships = "9:memory:/x\n4:cpu,cpuacct:/tsquota\n0::/\n"
    files = {"cpu/tsquota/cpu.cfs_quota_us": "50000\n", "cpu/tsquota/cpu.cfs_period_us": "100000\n"}
    assert cpu_quota(*fake_cgroup(tmp_path, memberships, files)) == 0.5
    files = {"cpu/tsquota/cpu.cfs_quota_us": "-1\n", "cpu/tsquota/cpu.cfs_period_us": "100000\n"}
    assert cpu_quota(*fake_cgroup(tmp_path, memberships, files)) is None


def test_no_cgroup_information_is_no_quota(tmp_path):
    assert cpu_quota(tmp_path / "missing", tmp_path) is None


def resolved(**settings) -> ServeConfig:
    """A config as resolve_machine leaves it on a CPU, before `inline` is decided."""
    return ServeConfig.from_mapping({"accelerator": "cpu", "devices": 1, "workers_per_device": 2, **settings})


def test_the_inline_lane_is_on_where_it_can_be_and_off_elsewhere():
    assert resolve_inline(resolved(torch_threads=1)).inline is True
    assert resolve_inline(resolved(torch_threads=2)).inline is False  # a forked thread pool hangs
    assert resolve_inline(resolved(torch_threads=1, accelerator="cuda")).inline is False
    assert resolve_inline(resolved(torch_threads=1, engine="ray")).inline is False
    assert resolve_inline(resolved(torch_threads=1, inline=False)).inline is False


def test_the_inline_lane_asked_for_where_it_cannot_be_is_one_clear_error():
    with pytest.raises(ConfigError) as error:
        resolve_inline(resolved(torch_threads=2, inline=True))
    assert str(error.value) == (
        "--inline needs --engine litserve on the CPU with one thread per worker (this config: litserve on "
        "cpu, 2 thread(s) per worker); drop --inline (on the CPU, or set --torch-threads 1)"
    )


def test_gpu_decode_on_the_cpu_is_one_clear_error():
    with pytest.raises(ConfigError) as error:
        resolve_machine(ServeConfig(accelerator="cpu", gpu_decode=True))
    assert str(error.value) == "--gpu-decode needs a CUDA device (nvJPEG); this config runs on the CPU"


def test_gpu_decode_is_on_where_it_can_be_unless_turned_off(monkeypatch):
    # Measured on an H200 (docs/gpu.md): faster at every level, so the CUDA default.
    assert resolve_machine(ServeConfig(accelerator="cpu")).gpu_decode is False
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    assert resolve_machine(ServeConfig(accelerator="cuda")).gpu_decode is True
    assert resolve_machine(ServeConfig(accelerator="cuda", gpu_decode=False)).gpu_decode is False
    assert resolve_machine(ServeConfig(accelerator="cuda", fast_decode=False)).gpu_decode is False


def test_gpu_decode_without_fast_decode_is_one_clear_error_before_any_worker_starts(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    assert resolve_machine(ServeConfig(accelerator="cuda", gpu_decode=True)).gpu_decode
    with pytest.raises(ConfigError) as error:
        resolve_machine(ServeConfig(accelerator="cuda", gpu_decode=True, fast_decode=False))
    assert str(error.value) == "--gpu-decode resizes with fast decode's tensor transform; drop --no-fast-decode"
