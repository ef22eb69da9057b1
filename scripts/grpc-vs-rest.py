"""OIP over gRPC against OIP over REST on one server, same time, ABBA: per-request latency at c=1 and
throughput at c=32, one photo per request, with Triton's asyncio clients (tritonclient.grpc.aio,
tritonclient.http.aio) in this process. The client shares the machine with the server: on a small
machine the numbers include the client's own CPU, alike for both transports.

    .venv/bin/python scripts/grpc-vs-rest.py [--seconds 15] [--rounds 2] [--model NAME ...serve args]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc.aio as triton_grpc
import tritonclient.http.aio as triton_http

from timmserve.bench.process import ServerProcess, free_port

PHOTO = Path(__file__).parents[1] / "tests" / "data" / "cat.jpg"


def inputs(module, data: bytes) -> list:
    tensor = module.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
    return [tensor]


async def closed_loop(client, module, model: str, concurrency: int, seconds: float) -> dict[str, float]:
    """`concurrency` clients back to back for `seconds` after a 2 s warm-up: req/s and latency."""
    data = PHOTO.read_bytes()
    latencies: list[float] = []
    measuring = False
    end = time.monotonic() + 2 + seconds

    async def one_client() -> None:
        while time.monotonic() < end:
            started = time.perf_counter()
            await client.infer(model, inputs(module, data))
            if measuring:
                latencies.append(time.perf_counter() - started)

    tasks = [asyncio.ensure_future(one_client()) for _ in range(concurrency)]
    await asyncio.sleep(2)
    measuring, began = True, time.monotonic()
    await asyncio.gather(*tasks)
    took = time.monotonic() - began
    latencies.sort()
    return {
        "req_per_s": round(len(latencies) / took, 2),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2),
        "requests": len(latencies),
    }


async def measure(server: ServerProcess, grpc_url: str, model: str, seconds: float, rounds: int) -> list[dict]:
    rows = []
    grpc_client = triton_grpc.InferenceServerClient(grpc_url)
    http_client = triton_http.InferenceServerClient(server.url.removeprefix("http://"), conn_limit=64)
    clients = {"grpc": (grpc_client, triton_grpc), "rest": (http_client, triton_http)}
    try:
        for round_ in range(rounds):
            for concurrency in (1, 32):
                for transport in (
                    ("grpc", "rest", "rest", "grpc") if round_ % 2 == 0 else ("rest", "grpc", "grpc", "rest")
                ):
                    client, module = clients[transport]
                    row = {"round": round_, "transport": transport, "concurrency": concurrency}
                    row.update(await closed_loop(client, module, model, concurrency, seconds))
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    finally:
        await grpc_client.close()
        await http_client.close()
    return rows


def summary(rows: list[dict]) -> None:
    for concurrency in (1, 32):
        for transport in ("grpc", "rest"):
            chosen = [r for r in rows if r["concurrency"] == concurrency and r["transport"] == transport]
            rates = [r["req_per_s"] for r in chosen]
            p50s = [r["p50_ms"] for r in chosen]
            print(f"c={concurrency} {transport}: req/s {rates} (median {statistics.median(rates)}), "
                  f"p50 ms {p50s} (median {statistics.median(p50s)})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    args, serve_args = parser.parse_known_args()
    grpc_port = free_port()
    with ServerProcess(["--grpc-port", str(grpc_port), "--log-level", "warning", *serve_args]) as server:
        model = Path(httpx.get(f"{server.url}/info").json()["model"]["name"]).name  # its name in /v2 URLs
        rows = asyncio.run(measure(server, f"127.0.0.1:{grpc_port}", model, args.seconds, args.rounds))
    summary(rows)


if __name__ == "__main__":
    sys.exit(main())
