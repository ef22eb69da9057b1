from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from tests.conftest import CAT_LABELS
from timmserve.errors import InvalidImageError, ModelLoadError
from timmserve.model.backends import create_backend
from timmserve.model.classifier import Classifier, _device_decoder, backend_spec, build_classifier, warm_up_batch_sizes
from timmserve.model.factory import load_model
from timmserve.model.labels import load_labels
from timmserve.model.preprocess import DeviceJpegDecoder, Preprocessor, same_size_groups
from timmserve.model.types import ImageRequest
from timmserve.settings.config import ServeConfig


@pytest.fixture(scope="module")
def builtin():
    return load_model(ServeConfig())


def make_classifier(loaded, precision="fp32", decode_threads=2, backend="eager", device_decode=False) -> Classifier:
    spec = backend_spec(ServeConfig(precision=precision), loaded.info, torch.device("cpu"))
    preprocessor = Preprocessor(loaded.info.data_config, max_pixels=2**26)
    return Classifier(
        create_backend(backend, loaded.model, spec),
        preprocessor,
        load_labels(loaded.info.num_classes),
        device=torch.device("cpu"),
        decode_threads=decode_threads,
        # --gpu-decode's path, run on the CPU (decode_jpeg decodes on either device)
        device_decoder=DeviceJpegDecoder(preprocessor, torch.device("cpu")) if device_decode else None,
    )


def spy_on_backend(classifier: Classifier) -> list[tuple[int, ...]]:
    """Wrap the classifier's backend; the list returned fills with the shape of each batch it runs."""
    shapes: list[tuple[int, ...]] = []
    backend = classifier.backend

    def spy(batch: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(batch.shape))
        return backend(batch)

    classifier.backend = spy
    return shapes


def test_build_classifier_checks_the_label_count():
    config = ServeConfig(model="test_efficientnet", random_weights=True)
    with pytest.raises(ModelLoadError, match="1000 classes but 3 labels"):
        build_classifier(config, ["a", "b", "c"], torch.device("cpu"))


def test_a_bad_item_fails_only_its_own_slot(builtin, photos):
    classifier = make_classifier(builtin)
    batches = spy_on_backend(classifier)
    requests = [ImageRequest(photos["cat"], 3), ImageRequest(b"garbage", 3), ImageRequest(photos["espresso"], 1)]
    cat, bad, espresso = classifier.classify(requests)
    assert cat[0].label in CAT_LABELS and len(cat) == 3
    assert isinstance(bad, InvalidImageError) and bad.status_code == 400
    assert [p.label for p in espresso] == ["espresso"]
    assert [shape[0] for shape in batches] == [2]  # the good two, as one batch


def test_all_bad_batch_never_calls_the_model(builtin):
    classifier = make_classifier(builtin)
    batches = spy_on_backend(classifier)
    results = classifier.classify([ImageRequest(b"", 5), ImageRequest(b"nope", 5)])
    assert all(isinstance(r, InvalidImageError) for r in results)
    assert batches == []


def test_alone_and_batched_agree(builtin, photos):
    classifier = make_classifier(builtin)
    requests = [ImageRequest(data, 5) for data in photos.values()]
    batched = classifier.classify(requests)
    for request, in_batch in zip(requests, batched):
        (alone,) = classifier.classify([request])
        assert [p.label for p in alone] == [p.label for p in in_batch]
        assert [p.probability for p in alone] == pytest.approx([p.probability for p in in_batch], abs=1e-5)


def test_serial_and_threaded_decode_agree(builtin, photos):
    requests = [ImageRequest(data, 5) for data in photos.values()]
    serial = make_classifier(builtin, decode_threads=1).classify(requests)
    threaded = make_classifier(builtin, decode_threads=2).classify(requests)
    assert serial == threaded


def test_bf16_stays_close_to_fp32_on_real_photos(builtin, photos):
    # bf16 moves probabilities by a few points: enough to swap the cat photo's two nearly tied
    # cat classes (39% vs 36%), so top-1 is checked against fp32's top-2, not for equality.
    requests = [ImageRequest(data, 5) for data in photos.values()]
    fp32 = make_classifier(builtin).classify(requests)
    bf16 = make_classifier(builtin, precision="bf16").classify(requests)
    for reference, reduced in zip(fp32, bf16):
        assert reduced[0].label in {p.label for p in reference[:2]}
        by_label = {p.label: p.probability for p in reduced}
        for p in reference[:2]:
            assert by_label.get(p.label, 0.0) == pytest.approx(p.probability, abs=0.05)


def test_warm_up_runs_the_model_per_batch_size_then_the_photos_through_the_decode_path(builtin, photos):
    classifier = make_classifier(builtin, device_decode=True)
    batches = spy_on_backend(classifier)
    decoder = classifier.device_decoder
    decoded: list[int] = []
    classifier.device_decoder = lambda images: decoded.append(len(images)) or decoder(images)
    classifier.warm_up([1, 3])
    input_size = tuple(builtin.info.data_config["input_size"])
    assert batches == [(1, *input_size), (3, *input_size), (len(photos), *input_size)]
    assert decoded == [len(photos)]  # nvJPEG's decoder is created on its first call, not a request's


def test_warm_up_covers_every_batch_size_the_server_forms_on_cuda(builtin, tmp_path):
    eager = make_classifier(builtin).backend
    # Measured on an H200: a first call at a new batch size cost 0.6-1.7 s (mambaout_base fp32).
    assert warm_up_batch_sizes(eager, torch.device("cuda"), 64) == list(range(1, 65))
    assert warm_up_batch_sizes(eager, torch.device("cpu"), 64) == [1, 64]
    compiled = create_backend(
        "compile",
        builtin.model,
        backend_spec(ServeConfig(max_batch_size=12, cache_dir=tmp_path), builtin.info, torch.device("cpu")),
    )
    assert warm_up_batch_sizes(compiled, torch.device("cpu"), 12) == [1, 2, 4, 8, 12]


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


NO_CUDA = "no CUDA device (scripts/gpu-run.sh runs it)"
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA))


@pytest.mark.parametrize("decode_on", ["cpu", CUDA])
def test_jpegs_decoded_on_the_device_agree_with_the_cpu_path(builtin, photos, decode_on):
    # Full decode + antialiased resize against the CPU's DCT-scaled decode: the accuracy guard's
    # fp32 tolerance (top-1 equal, no probability moved by more than 0.05). On CUDA: nvJPEG.
    requests = [ImageRequest(data, 5) for data in photos.values()]
    classifier = make_classifier(builtin, device_decode=True)
    classifier.device_decoder.device = torch.device(decode_on)
    decoded = classifier.device_decoder([r.data for r in requests])
    assert all(isinstance(slot, torch.Tensor) and slot.shape == (3, 224, 224) for slot in decoded)
    assert {slot.device.type for slot in decoded} == {decode_on}
    for on_cpu, on_device in zip(make_classifier(builtin).classify(requests), classifier.classify(requests)):
        assert on_device[0].label == on_cpu[0].label
        by_label = {p.label: p.probability for p in on_device}
        for p in on_cpu[:2]:
            assert by_label.get(p.label, 0.0) == pytest.approx(p.probability, abs=0.05)


def test_the_device_decoder_resizes_same_sized_images_in_one_call(builtin, photos):
    # One resize call per photo size, not per image, with the same pixels as one at a time.
    classifier = make_classifier(builtin, device_decode=True)
    transform = classifier.preprocessor.tensor_transform
    calls: list[tuple[int, ...]] = []

    def spy(batch: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(batch.shape))
        return transform(batch)

    classifier.preprocessor.tensor_transform = spy
    images = [photos["cat"], photos["espresso"], photos["cat"], photos["cat"]]
    decoded = classifier.device_decoder(images)
    assert [shape[0] for shape in calls] == [3, 1]
    for data, pixels in zip(images, decoded):
        alone = transform(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB))
        assert torch.equal(pixels, alone)


def test_gpu_decode_for_a_model_without_a_tensor_resize_keeps_the_cpu_path(builtin, caplog):
    # On by default with CUDA: a model whose eval transform has no v2 twin (crop mode border) must
    # still start, its JPEGs decoded on the CPU as fast decode keeps PIL there.
    border = Preprocessor({**builtin.info.data_config, "crop_mode": "border"}, max_pixels=2**26)
    assert _device_decoder(ServeConfig(gpu_decode=True), border, torch.device("cpu")) is None
    assert "no tensor twin" in caplog.text
    center = Preprocessor(builtin.info.data_config, max_pixels=2**26)
    assert isinstance(_device_decoder(ServeConfig(gpu_decode=True), center, torch.device("cpu")), DeviceJpegDecoder)
    assert _device_decoder(ServeConfig(gpu_decode=False), center, torch.device("cpu")) is None


def test_same_size_groups_keep_order_and_cap_pixels():
    images = [torch.empty(3, h, w, dtype=torch.uint8) for h, w in [(4, 5), (2, 2), (4, 5), (4, 5), (2, 2)]]
    assert same_size_groups(images, max_pixels=100) == [[0, 2, 3], [1, 4]]
    assert same_size_groups(images, max_pixels=40) == [[0, 2], [3], [1, 4]]
    assert same_size_groups(images, max_pixels=1) == [[0], [2], [3], [1], [4]]  # one image at least


def test_the_device_decoder_leaves_what_it_would_decode_differently_to_the_cpu_path(builtin, photos):
    rotated = Image.Exif()
    rotated[0x0112] = 6
    cat = Image.open(io.BytesIO(photos["cat"]))
    images = {
        "jpeg": photos["cat"],
        "grey jpeg": encode(cat.convert("L"), "JPEG"),
        "png": encode(cat, "PNG"),
        "cmyk jpeg": encode(cat.convert("CMYK"), "JPEG"),
        "rotated jpeg": encode(cat, "JPEG", exif=rotated),
        "empty": b"",
    }
    classifier = make_classifier(builtin, device_decode=True)
    slots = dict(zip(images, classifier.device_decoder(list(images.values()))))
    assert isinstance(slots.pop("jpeg"), torch.Tensor) and isinstance(slots.pop("grey jpeg"), torch.Tensor)
    assert isinstance(slots.pop("empty"), InvalidImageError)  # its header's answer, as on the CPU path
    assert slots == {"png": None, "cmyk jpeg": None, "rotated jpeg": None}
    # Every image gets the answer it gets without the device decoder.
    requests = [ImageRequest(data, 3) for data in images.values()]
    with_device = classifier.classify(requests)
    without = make_classifier(builtin).classify(requests)
    for name, a, b in zip(images, with_device, without):
        if isinstance(b, InvalidImageError):
            assert type(a) is type(b) and a.detail == b.detail, name
        else:
            assert a[0].label == b[0].label, name


def test_a_corrupt_jpeg_sends_its_batch_to_the_cpu_path_and_fails_alone(builtin, photos):
    truncated = photos["espresso"][: len(photos["espresso"]) // 3]
    classifier = make_classifier(builtin, device_decode=True)
    assert classifier.device_decoder([photos["cat"], truncated]) == [None, None]
    cat, broken = classifier.classify([ImageRequest(photos["cat"], 3), ImageRequest(truncated, 3)])
    assert cat[0].label in CAT_LABELS
    assert isinstance(broken, InvalidImageError) and "corrupt or truncated" in broken.detail
