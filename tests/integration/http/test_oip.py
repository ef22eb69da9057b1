"""The Open Inference Protocol (KServe v2 REST) against a real server: Triton's own HTTP client and
KServe's documented JSON."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from tests.conftest import CAT_LABELS

MODEL = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def server(start_module_server):
    return start_module_server("--max-batch-size", "8", "--batch-timeout", "0.05")


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.url.removeprefix("http://")) as client:
        yield client


def image_input(*images: bytes, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=binary)
    return tensor


def test_tritonclient_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    metadata = client.get_model_metadata(MODEL)
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in metadata["outputs"]] == ["label", "probability"]


def test_tritonclient_infers_a_batch_of_photos(client, photos):
    result = client.infer(MODEL, [image_input(photos["cat"], photos["espresso"], photos["rocket"])])
    labels = result.as_numpy("label")
    probabilities = result.as_numpy("probability")
    assert labels.shape == (3, 5) and probabilities.shape == (3, 5) and probabilities.dtype == np.float32
    assert labels[0, 0].decode() in CAT_LABELS
    assert labels[1, 0].decode() == "espresso"
    assert {"missile", "projectile, missile"} & {label.decode() for label in labels[2, :2]}
    assert np.all(np.diff(probabilities, axis=1) <= 0)


def test_tritonclient_json_outputs_and_top_k(client, photos):
    outputs = [triton.InferRequestedOutput("label", binary_data=False)]
    result = client.infer(MODEL, [image_input(photos["espresso"])], outputs=outputs, parameters={"top_k": 2})
    assert result.as_numpy("label").shape == (1, 2)
    assert result.as_numpy("label")[0, 0] in ("espresso", b"espresso")
    assert result.as_numpy("probability") is None  # not requested


def test_kserve_documented_json_request(server, photos):
    body = {
        "id": "42",
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(photos["cat"]).decode()],
            }
        ],
    }
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["id"] == "42" and document["model_name"] == MODEL
    outputs = {o["name"]: o for o in document["outputs"]}
    assert outputs["label"]["shape"] == [1, 5] and outputs["label"]["data"][0] in CAT_LABELS
    assert outputs["probability"]["datatype"] == "FP32" and len(outputs["probability"]["data"]) == 5


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"inputs": []}, 400, "exactly one input"),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, 400, "BYTES"),
        ({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["aGk="]}]}, 400, "shape"),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}]}, 400, "image 0"),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%"]}]}, 400, "base64"),
        (
            {"inputs": [{"name": "image", "shape": [2**64], "datatype": "BYTES", "data": ["aGk="]}]},
            413,
            "admits at most",
        ),
        ({"inputs": [{"name": "foo", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}]}, 400, 'input is "image"'),
    ],
)
def test_protocol_errors_use_the_error_format(server, body, status, words):
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=60)
    assert response.status_code == status
    assert words in response.json()["error"]


def test_unknown_model_is_404(server):
    response = httpx.get(f"{server.url}/v2/models/resnet50")
    assert response.status_code == 404 and "unknown model" in response.json()["error"]


def test_a_bad_image_in_a_triton_batch_is_a_400_naming_it(client, photos):
    with pytest.raises(triton.InferenceServerException) as raised:
        client.infer(MODEL, [image_input(photos["cat"], b"garbage")])
    assert "image 1" in str(raised.value) and "not an image" in str(raised.value)
    assert raised.value.status() == "400"  # the HTTP status the client received


def test_openapi_documents_every_endpoint(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    predict = schema["paths"]["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {
        "application/json",
        "image/*",
        "application/octet-stream",
        "multipart/form-data",
    }
    assert {"200", "400", "413", "415", "503", "504"} <= set(predict["responses"])
    assert "corrupt" in predict["responses"]["400"]["content"]["application/json"]["example"]["detail"]
    infer = schema["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert {"200", "400", "404"} <= set(infer["responses"])
    assert infer["requestBody"]["content"]["application/json"]["example"]["inputs"][0]["datatype"] == "BYTES"
    for path in ("/health", "/info", "/v2/health/ready", "/v2/models/{model_name}"):
        assert schema["paths"][path]["get"]["summary"]
    docs = httpx.get(f"{server.url}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_demo_page_replaces_the_plain_index(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and "predict" in page.text


def test_tritonclient_with_model_version_1_is_served(client, photos):
    # The metadata lists version "1", and tritonclient's model_version="1" asks for
    # /v2/models/{name}/versions/1/…: each was a 404 {"detail": "Not Found"}.
    assert client.is_model_ready(MODEL, model_version="1")
    assert client.get_model_metadata(MODEL, model_version="1")["versions"] == ["1"]
    result = client.infer(MODEL, [image_input(photos["cat"])], model_version="1")
    assert result.as_numpy("label")[0, 0].decode() in CAT_LABELS
    assert result.get_response()["model_version"] == "1"


@pytest.mark.parametrize("tail", ["", "/ready", "/infer"])
def test_an_unknown_model_version_is_a_404_naming_the_versions_served(server, tail):
    url = f"{server.url}/v2/models/{MODEL}/versions/2{tail}"
    response = httpx.post(url, json={}) if tail == "/infer" else httpx.get(url)
    assert response.status_code == 404
    assert response.json() == {"error": f"unknown version '2' of model '{MODEL}'; this server has version '1'"}


def test_the_frameworks_own_errors_under_v2_use_the_error_format(server, client):
    # No such route, wrong method: FastAPI answered {"detail": …}, and tritonclient said only
    # "an exception occurred in the client while decoding the response: 'error'".
    missing = httpx.get(f"{server.url}/v2/models/{MODEL}/nope")
    assert missing.status_code == 404 and missing.json() == {"error": f"Not Found: GET /v2/models/{MODEL}/nope"}
    wrong = httpx.get(f"{server.url}/v2/models/{MODEL}/infer")
    assert wrong.status_code == 405 and wrong.headers["Allow"] == "POST"
    assert wrong.json() == {"error": f"Method Not Allowed: GET /v2/models/{MODEL}/infer (allowed: POST)"}
    with pytest.raises(triton.InferenceServerException, match="Not Found: GET /v2/models/.*/stats"):
        client.get_inference_statistics(MODEL)  # an extension this server does not have
    outside = httpx.get(f"{server.url}/nope")  # timmserve's own routes keep {"detail": …}
    assert outside.status_code == 404 and outside.json() == {"detail": "Not Found"}
