"""CPU and GPU use, sampled through a level in a background thread.

CPU figures are percent of the whole machine (all cores = 100): the machine, the server's process
tree (API servers, workers, their helpers) and the load generator's own process tree. GPU figures
come from NVML (nvidia-ml-py) per device; without a GPU or NVML they are None.
"""

from __future__ import annotations

import os
import threading
import time
from statistics import fmean
from typing import Any

import psutil


class Monitor:
    def __init__(self, server_pid: int | None = None, *, interval: float = 0.25) -> None:
        self.interval = interval
        self._trees = {"server": server_pid, "client": os.getpid()}
        self._processes: dict[int, psutil.Process] = {}
        self._samples: dict[str, list[tuple[float, float]]] = {
            "cpu": [],
            "server": [],
            "client": [],
            "gpu": [],
            "gpu_mem": [],
        }  # (wall-clock time, value)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._gpus = _nvml_devices()
        self._cpus = psutil.cpu_count() or 1

    def __enter__(self) -> Monitor:
        psutil.cpu_percent(interval=None)  # the first calls only set the reference points
        self._sample_trees()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, window: tuple[float, float] | None = None) -> dict[str, Any]:
        """Means over the samples taken inside `window` (wall-clock start, end); all if None."""
        start, end = window or (float("-inf"), float("inf"))

        def values(key: str) -> list[float]:
            return [value for stamp, value in self._samples[key] if start <= stamp <= end]

        def mean(key: str) -> float | None:
            return round(fmean(values(key)), 1) if values(key) else None

        return {
            "cpu_percent": mean("cpu"),
            "server_cpu_percent": mean("server") if self._trees["server"] else None,
            "client_cpu_percent": mean("client"),
            "gpu_percent": mean("gpu"),
            "gpu_memory_mb": max(values("gpu_mem")) if values("gpu_mem") else None,
            "samples": len(values("cpu")),
        }

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.time()
            self._samples["cpu"].append((now, psutil.cpu_percent(interval=None)))
            server, client = self._sample_trees()
            if self._trees["server"]:
                self._samples["server"].append((now, server))
            self._samples["client"].append((now, client))
            if self._gpus:
                import pynvml

                utilisation = fmean(pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._gpus)
                used = sum(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in self._gpus)
                self._samples["gpu"].append((now, utilisation))
                self._samples["gpu_mem"].append((now, round(used / 2**20)))

    def _sample_trees(self) -> tuple[float, float]:
        """CPU % (of the machine) since the last call: the server's process tree, and this
        process's tree without the server (the server is started as our child)."""
        server = _tree(self._trees["server"])
        client = [p for p in _tree(self._trees["client"]) if p.pid not in {q.pid for q in server}]
        return self._percent(server), self._percent(client)

    def _percent(self, processes: list[psutil.Process]) -> float:
        total = 0.0
        for process in processes:
            # One Process object per PID: cpu_percent() measures from that object's last call.
            known = self._processes.setdefault(process.pid, process)
            try:
                total += known.cpu_percent(interval=None)
            except psutil.NoSuchProcess:
                continue
        return total / self._cpus


def _tree(pid: int | None) -> list[psutil.Process]:
    if not pid:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _nvml_devices() -> list[Any]:
    try:
        import pynvml

        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no package, no driver, no device: GPU figures stay None
        return []
