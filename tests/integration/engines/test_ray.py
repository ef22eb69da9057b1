"""The shared HTTP contract suite (imported from test_server.py, test_oip.py and
test_field_inputs.py) run against the Ray Serve engine, plus what only Ray has: replicas.
Production behaviour on Ray: test_ray_production.py. Skipped, with the reason, when the ray extra
is not installed."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'timmserve[ray]'")

from tests.integration.engines.test_production import scrape  # noqa: E402
from tests.integration.engines.test_server import (  # noqa: E402, F401  (collected again here, on Ray)
    BATCHED,
    predict_raw,
    test_bad_input_gets_the_same_4xx_on_every_engine,
    test_built_in_model_classifies_real_photos,
    test_json_body_is_the_litserve_contract,
    test_multipart_body,
    test_one_garbage_image_in_a_batch_fails_only_itself,
    test_predictions_alone_equal_predictions_in_a_batch,
    test_raw_image_body_with_top_k,
)
from tests.integration.http.test_field_inputs import (  # noqa: E402, F401  (collected again here, on Ray)
    MAX_QUEUE,
    test_a_multi_picture_jpeg_from_a_phone_is_served,
    test_an_image_that_breaks_the_resize_costs_only_its_own_request,
    test_an_oip_request_larger_than_the_queue_is_a_413_naming_the_limit,
    test_an_oip_shape_of_strings_is_a_400_naming_the_field,
)
from tests.integration.http.test_oip import (  # noqa: E402, F401  (collected again here, on Ray)
    client,
    test_a_bad_image_in_a_triton_batch_is_a_400_naming_it,
    test_demo_page_replaces_the_plain_index,
    test_kserve_documented_json_request,
    test_openapi_documents_every_endpoint,
    test_protocol_errors_use_the_error_format,
    test_tritonclient_health_and_metadata,
    test_tritonclient_infers_a_batch_of_photos,
    test_tritonclient_json_outputs_and_top_k,
    test_unknown_model_is_404,
)


@pytest.fixture(scope="module")
def ray_server(start_module_server):
    """The same model code on Ray Serve: two replicas, batching and limits as in test_server.py, the
    queue bound as in test_field_inputs.py."""
    return start_module_server("--engine", "ray", "--workers-per-device", "2", *BATCHED, "--max-queue", str(MAX_QUEUE))


@pytest.fixture(scope="module")
def server(ray_server):
    return ray_server


@pytest.fixture(scope="module")
def batched_server(ray_server):
    return ray_server


def test_two_ray_replicas_both_serve_and_metrics_count_both(ray_server, photos):
    """/metrics merges the replicas' own metrics, whichever replica answers the scrape."""
    answered = 'timmserve_requests_total{endpoint="/predict",status="200"}'
    before = scrape(ray_server.url).get(answered, 0)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: predict_raw(ray_server.url, photos["cat"]), range(48)))
    assert {r.status_code for r in responses} == {200}
    assert len({r.headers["X-Timmserve-Replica"] for r in responses}) == 2
    assert all(scrape(ray_server.url)[answered] == before + 48 for _ in range(4))
    assert httpx.get(f"{ray_server.url}/info").json()["model"]["config"]["engine"] == "ray"
