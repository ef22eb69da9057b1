"""The inline lane (inline.py) on a real server: a one-image JPEG request that arrives while nothing
else is in flight is classified in the API server itself; anything else goes to the workers."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.conftest import slow_image
from tests.integration.engines.test_production import predict, scrape, wait_for

MODEL = "test_efficientnet"
# Two single-threaded workers: the configuration the lane is for, whatever the machine's cores. A full
# decode (no DCT scaling), so that a large JPEG holds the lane for a while.
INLINE = ("--model", MODEL, "--random-weights", "--workers-per-device", "2", "--torch-threads", "1", "--no-fast-decode")
INLINE_IMAGES = "timmserve_inline_images_total"
CLASSIFIED = 'timmserve_images_total{outcome="classified"}'


def slow_jpeg() -> bytes:
    """A 1 MB JPEG of 8000×8000 pixels: about 0.65 s to decode and resize in full here."""
    data = io.BytesIO()
    Image.new("RGB", (8000, 8000), (120, 30, 200)).save(data, "JPEG", quality=90)
    return data.getvalue()


def oip_probabilities(url: str, *images: bytes) -> list[list[float]]:
    """Each image's top probabilities from `/v2/models/…/infer` (its images go to the workers
    when there are several)."""
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": [len(images)],
                "datatype": "BYTES",
                "data": [base64.b64encode(image).decode() for image in images],
            }
        ]
    }
    response = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    [output] = [o for o in response.json()["outputs"] if o["name"] == "probability"]
    width = output["shape"][1]
    return [output["data"][i * width : (i + 1) * width] for i in range(len(images))]


@pytest.fixture(scope="module")
def server(start_module_server):
    return start_module_server(*INLINE)


def test_an_idle_server_classifies_one_image_requests_itself_with_the_workers_answers(server, photos):
    before = scrape(server.url)
    for _ in range(5):
        assert predict(server.url, photos["cat"]).status_code == 200
    [inline] = oip_probabilities(server.url, photos["espresso"])
    after = scrape(server.url)
    assert after[INLINE_IMAGES] - before.get(INLINE_IMAGES, 0) == 6
    assert after[CLASSIFIED] - before.get(CLASSIFIED, 0) == 6  # counted as every classified image
    # Two images in one request are a batch for a worker: the same answer as the lane's.
    [from_worker, _] = oip_probabilities(server.url, photos["espresso"], photos["cat"])
    assert scrape(server.url)[INLINE_IMAGES] == after[INLINE_IMAGES]
    assert from_worker == pytest.approx(inline, abs=1e-5)


def test_an_image_arriving_while_another_is_in_flight_goes_to_a_worker_at_once(server, photos):
    before = scrape(server.url).get(INLINE_IMAGES, 0)
    slow, slow_done = slow_jpeg(), threading.Event()

    def send_slow() -> None:
        assert predict(server.url, slow).status_code == 200
        slow_done.set()

    sender = threading.Thread(target=send_slow)
    sender.start()
    try:
        assert wait_for(lambda: scrape(server.url)["timmserve_in_flight_images"] == 1, timeout=10)
        started = time.monotonic()
        assert predict(server.url, photos["cat"]).status_code == 200
        # Answered by a worker while the lane still decodes: not queued behind the slow image.
        assert not slow_done.is_set(), f"the cat took {time.monotonic() - started:.2f} s"
    finally:
        sender.join(timeout=60)
    assert slow_done.is_set()
    assert scrape(server.url)[INLINE_IMAGES] == before + 1  # the slow one


def test_only_jpegs_take_the_lane(server, photos):
    # Pillow's WebP decoder holds the GIL (the API server's event loop would stop meanwhile); other
    # formats go with it to the workers.
    before = scrape(server.url)
    png = io.BytesIO()
    Image.open(io.BytesIO(photos["cat"])).save(png, "PNG")
    for image in (png.getvalue(), slow_image(1000)):
        assert predict(server.url, image).status_code == 200
    after = scrape(server.url)
    assert after.get(INLINE_IMAGES, 0) == before.get(INLINE_IMAGES, 0)
    assert after[CLASSIFIED] - before[CLASSIFIED] == 2


def test_while_the_workers_hold_images_a_one_image_request_joins_them(server, photos):
    before = scrape(server.url).get(INLINE_IMAGES, 0)
    slow = slow_image(6000)
    with ThreadPoolExecutor(1) as pool:
        pair = pool.submit(oip_probabilities, server.url, slow, slow)  # two images: to the workers
        assert wait_for(lambda: scrape(server.url)["timmserve_in_flight_images"] == 2, timeout=10)
        assert predict(server.url, photos["cat"]).status_code == 200
        pair.result(timeout=60)
    assert scrape(server.url)[INLINE_IMAGES] == before  # the lane was idle, but the server was not


def test_the_request_timeout_covers_the_lane_which_frees_itself_once_done(start_server, photos):
    server = start_server(*INLINE, "--api-servers", "1", "--timeout", "0.15")
    response = predict(server.url, slow_jpeg())
    assert response.status_code == 504 and "request timeout of 0.15 s" in response.json()["detail"]
    assert scrape(server.url)["timmserve_in_flight_images"] == 0
    # The lane still decodes the slow image: the next request goes to a worker, not behind it.
    assert predict(server.url, photos["cat"]).status_code == 200
    assert scrape(server.url).get(INLINE_IMAGES, 0) == 0

    def lane_serves_again() -> bool:
        assert predict(server.url, photos["cat"]).status_code == 200
        return scrape(server.url)[INLINE_IMAGES] == 2  # the slow image (classified), then a cat

    assert wait_for(lane_serves_again, timeout=30, interval=0.2)


def test_without_the_lane_every_image_goes_to_a_worker(start_server, photos):
    server = start_server(*INLINE, "--no-inline")
    for _ in range(3):
        assert predict(server.url, photos["cat"]).status_code == 200
    metrics = scrape(server.url)
    assert metrics.get(INLINE_IMAGES, 0) == 0 and metrics[CLASSIFIED] == 3
