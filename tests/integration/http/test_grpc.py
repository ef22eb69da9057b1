"""The Open Inference Protocol over gRPC against a real server: Triton's own gRPC client, the API
key from the call's metadata, and each kind of bad message answered with its status code."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import CAT_LABELS, ONE_SLOW_WORKER, free_port
from tests.integration.engines.test_production import scrape, wait_for

MODEL = "tf_efficientnet_lite0"
API_KEY_ENV = "TIMMSERVE_GRPC_TEST_KEY"
API_KEY = "grpc-s3cret"
KEY = {"x-api-key": API_KEY}
MAX_QUEUE = 8
MAX_BODY = 1024 * 1024


@pytest.fixture(scope="module")
def server(start_module_server):
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    grpc_port = free_port()
    started = start_module_server(
        "--grpc-port", str(grpc_port), "--api-key-env", API_KEY_ENV, "--max-queue", str(MAX_QUEUE),
        "--max-body-bytes", str(MAX_BODY), "--max-batch-size", "8",
    )  # fmt: skip
    started.grpc_url = f"127.0.0.1:{grpc_port}"
    yield started
    monkeypatch.undo()


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.grpc_url) as client:
        yield client


def image_input(*images: bytes, name: str = "image") -> triton.InferInput:
    tensor = triton.InferInput(name, [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def status_of(call) -> str:
    with pytest.raises(InferenceServerException) as raised:
        call()
    return raised.value.status()


def test_tritonclient_grpc_classifies_the_photos(client, photos):
    result = client.infer(
        MODEL, [image_input(photos["cat"], photos["espresso"], photos["rocket"])], headers=KEY, request_id="r-42"
    )
    labels, probabilities = result.as_numpy("label"), result.as_numpy("probability")
    assert labels.shape == (3, 5) and probabilities.shape == (3, 5) and probabilities.dtype == np.float32
    assert labels[0, 0].decode() in CAT_LABELS
    assert labels[1, 0].decode() == "espresso"
    assert {"missile", "projectile, missile"} & {label.decode() for label in labels[2, :2]}
    assert np.all(np.diff(probabilities, axis=1) <= 0)
    assert result.get_response().id == "r-42"


def test_grpc_and_rest_give_the_same_answer(server, client, photos):
    import tritonclient.http as triton_http

    rest_input = triton_http.InferInput("image", [1], "BYTES")
    rest_input.set_data_from_numpy(np.array([photos["grace_hopper"]], dtype=np.object_))
    with triton_http.InferenceServerClient(server.url.removeprefix("http://")) as rest:
        over_rest = rest.infer(MODEL, [rest_input], headers={"X-API-Key": API_KEY})
    over_grpc = client.infer(MODEL, [image_input(photos["grace_hopper"])], headers=KEY)
    assert over_grpc.as_numpy("label").tolist() == over_rest.as_numpy("label").tolist()
    assert np.allclose(over_grpc.as_numpy("probability"), over_rest.as_numpy("probability"))


def test_top_k_and_the_requested_outputs(client, photos):
    outputs = [triton.InferRequestedOutput("label")]
    result = client.infer(
        MODEL, [image_input(photos["espresso"])], outputs=outputs, parameters={"top_k": 2}, headers=KEY
    )
    assert result.as_numpy("label").shape == (1, 2) and result.as_numpy("label")[0, 0] == b"espresso"
    assert result.as_numpy("probability") is None  # not requested


def test_the_probes_are_open_and_everything_else_needs_the_key(client, photos):
    assert client.is_server_live() and client.is_server_ready()
    assert status_of(lambda: client.is_model_ready(MODEL)) == "StatusCode.UNAUTHENTICATED"
    assert status_of(lambda: client.infer(MODEL, [image_input(photos["cat"])])) == "StatusCode.UNAUTHENTICATED"
    wrong = {"x-api-key": "not-it"}
    assert status_of(lambda: client.infer(MODEL, [image_input(photos["cat"])], headers=wrong)) == (
        "StatusCode.UNAUTHENTICATED"
    )
    bearer = {"authorization": f"Bearer {API_KEY}"}
    assert client.is_model_ready(MODEL, headers=bearer)
    metadata = client.get_model_metadata(MODEL, headers=KEY, as_json=True)
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": ["-1"]}]
    assert metadata["versions"] == ["1"]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("input not named image", "StatusCode.INVALID_ARGUMENT"),
        ("a bad image among good ones", "StatusCode.INVALID_ARGUMENT"),
        ("more images than the queue holds", "StatusCode.RESOURCE_EXHAUSTED"),
        ("a message over --max-body-bytes", "StatusCode.RESOURCE_EXHAUSTED"),
        ("top_k of 0", "StatusCode.INVALID_ARGUMENT"),
        ("an unknown model", "StatusCode.NOT_FOUND"),
        ("an unknown version", "StatusCode.NOT_FOUND"),
        ("an unknown output", "StatusCode.INVALID_ARGUMENT"),
    ],
)
def test_each_bad_message_gets_its_status_code(client, photos, case, expected):
    cat = photos["cat"]
    calls = {
        "input not named image": lambda: client.infer(MODEL, [image_input(cat, name="pixels")], headers=KEY),
        "a bad image among good ones": lambda: client.infer(MODEL, [image_input(cat, b"not an image")], headers=KEY),
        "more images than the queue holds": lambda: client.infer(MODEL, [image_input(*[cat] * 9)], headers=KEY),
        "a message over --max-body-bytes": lambda: client.infer(MODEL, [image_input(b"x" * MAX_BODY)], headers=KEY),
        "top_k of 0": lambda: client.infer(MODEL, [image_input(cat)], parameters={"top_k": 0}, headers=KEY),
        "an unknown model": lambda: client.infer("resnet50", [image_input(cat)], headers=KEY),
        "an unknown version": lambda: client.infer(MODEL, [image_input(cat)], model_version="2", headers=KEY),
        "an unknown output": lambda: client.infer(
            MODEL, [image_input(cat)], outputs=[triton.InferRequestedOutput("logits")], headers=KEY
        ),
    }
    with pytest.raises(InferenceServerException) as raised:
        calls[case]()
    assert raised.value.status() == expected, raised.value.message()
    if case == "a bad image among good ones":
        assert raised.value.message().startswith("image 1: ")


def test_raw_stubs_shape_mismatch_and_metrics(server, photos):
    """A client of the service definition without tritonclient: the raw contents' elements must
    match the shape; each RPC is counted in /metrics under its name and code."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="image", datatype="BYTES", shape=[2])
        request.raw_input_contents.append(len(photos["cat"]).to_bytes(4, "little") + photos["cat"])
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(request, metadata=tuple(KEY.items()))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not match" in raised.value.details()
    counted = scrape(server.url, headers={"X-API-Key": API_KEY})
    infer = "/inference.GRPCInferenceService/ModelInfer"
    assert counted[f'timmserve_requests_total{{endpoint="{infer}",status="INVALID_ARGUMENT"}}'] >= 1
    assert counted[f'timmserve_requests_total{{endpoint="{infer}",status="OK"}}'] >= 1


def test_a_grpc_port_in_use_is_one_clear_error_at_start_up():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = [sys.executable, "-m", "timmserve", "serve", "--model", "test_efficientnet", "--random-weights",
                 "--backend", "eager", "--port", str(free_port()), "--grpc-port", str(port)]  # fmt: skip
        result = subprocess.run(serve, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]  # after the model's warnings
    assert last_line == f"Error: --grpc-port {port}: cannot listen on 127.0.0.1 (Address already in use)"


def test_sigterm_finishes_the_rpcs_in_flight(start_server, photos):
    """The drain covers gRPC too: RPCs admitted before SIGTERM are answered, and the server exits 0."""
    grpc_port = free_port()
    server = start_server("--grpc-port", str(grpc_port), "--max-batch-size", "1", *ONE_SLOW_WORKER)
    sent = 32
    answered = 'timmserve_requests_total{endpoint="/inference.GRPCInferenceService/ModelInfer",status="OK"}'

    def all_admitted() -> bool:  # each RPC in flight or answered: none still connecting
        counted = scrape(server.url)
        return counted["timmserve_in_flight_images"] + counted.get(answered, 0) >= sent

    with triton.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client, ThreadPoolExecutor(sent) as pool:
        futures = [pool.submit(client.infer, MODEL, [image_input(photos["cat"])]) for _ in range(sent)]
        assert wait_for(all_admitted, timeout=30)
        in_flight_at_signal = scrape(server.url)["timmserve_in_flight_images"]
        os.kill(server.pid, signal.SIGTERM)
        labels = [future.result(timeout=60).as_numpy("label")[0, 0].decode() for future in futures]
    assert in_flight_at_signal > 0 and all(label in CAT_LABELS for label in labels)
    assert server.process.wait(timeout=60) == 0
