"""CPU and GPU use, sampled through a level in a background thread.

CPU figures are percent of the whole machine (all cores = 100): the machine, the server's process
tree (API servers, workers, their helpers), the load generator's own process tree (this bench
process and its load processes), and what is left: foreign CPU, used by processes that are none
of these (another program, another user's job), which the bench did not cause and which makes a
measurement not the machine's own. GPU figures come from NVML (nvidia-ml-py) per device; without a
GPU or NVML they are None.
"""

from __future__ import annotations

import os
import threading
import time
from statistics import fmean
from typing import Any

import psutil


class Monitor:
    def __init__(self, server_pid: int | None = None, *, unseen_server: bool = False, interval: float = 0.25) -> None:
        """`server_pid`: the root of the server's process tree; None when no server runs (the
        ceilings) or when it is not ours: `unseen_server` (a `--url` run) says so, and then foreign
        CPU is None, as the server's CPU cannot be told apart from it. `interval`: seconds between
        samples."""
        self.interval = interval
        self._unseen_server = unseen_server
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
        """Means over the samples taken inside `window` (wall-clock start, end); all if None. CPU
        in % of the machine; foreign CPU = machine − server tree − load generator tree, ≥ 0."""
        start, end = window or (float("-inf"), float("inf"))

        def values(key: str) -> list[float]:
            return [value for stamp, value in self._samples[key] if start <= stamp <= end]

        def mean(key: str) -> float | None:
            return round(fmean(values(key)), 1) if values(key) else None

        machine, server, client = mean("cpu"), mean("server"), mean("client")
        foreign = None
        if machine is not None and client is not None and not self._unseen_server:
            # Each part is sampled over slightly different instants: noise either way, hence ≥ 0.
            foreign = round(max(0.0, machine - (server or 0.0) - client), 1)
        return {
            "cpu_percent": machine,
            "server_cpu_percent": server if self._trees["server"] else None,
            "client_cpu_percent": client,
            "foreign_cpu_percent": foreign,
            "gpu_percent": mean("gpu"),
            "gpu_memory_mb": max(values("gpu_mem")) if values("gpu_mem") else None,
            "samples": len(values("cpu")),
        }

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()
        self._sample()  # the part since the last one: a window shorter than `interval` has a sample too

    def _sample(self) -> None:
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
