"""Every backend gives eager's answers on real photos; artifacts are cached by what they depend on;
`auto` keeps only a backend that agrees; impossible combinations fail with one clear message."""

from __future__ import annotations

import pytest
import timm
import torch

from timmserve.errors import ModelLoadError
from timmserve.model.backends import (
    AUTO_CANDIDATES,
    BACKENDS,
    BackendSpec,
    agreement,
    auto_candidates,
    check_supported,
    choose_backend,
    create_backend,
    openvino_capabilities,
    probability_tolerance,
)
from timmserve.model.preprocess import Normalizer, Preprocessor

ARCH = "test_efficientnet"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(ARCH, pretrained=False).eval()


@pytest.fixture(scope="module")
def inputs(model, photos) -> torch.Tensor:
    config = timm.data.resolve_data_config({}, model=model)
    preprocessor = Preprocessor(config, max_pixels=2**26)
    return Normalizer(config, torch.device("cpu"))(torch.stack([preprocessor(d) for d in photos.values()]))


def spec(cache_dir, **changes) -> BackendSpec:
    values = dict(
        device=torch.device("cpu"),
        precision="fp32",
        channels_last=False,
        input_size=(3, 160, 160),
        threads=1,
        max_batch_size=4,
        cache_dir=cache_dir,
    )
    return BackendSpec(**{**values, **changes})


@pytest.fixture(scope="module")
def reference(model, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return model(inputs)


@pytest.mark.parametrize("name", ["eager", "onnxruntime", "openvino", "compile"])
def test_every_backend_agrees_with_eager_fp32(name, model, inputs, reference, tmp_path_factory):
    backend = create_backend(name, model, spec(tmp_path_factory.mktemp(name)))
    logits = backend(inputs)  # 4 photos: `compile` runs them padded to its bucket of 4
    assert logits.shape == reference.shape and logits.dtype == torch.float32
    agreed = agreement(reference, logits, probability_tolerance("fp32"))
    assert agreed.ok and agreed.top1_agree == 4, agreed
    assert torch.allclose(logits, reference, atol=1e-4)
    if name == "compile":
        assert backend(inputs[:3]).shape[0] == 3  # padded to 4 inside, 3 answers out


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_artifacts_are_cached_by_weights(name, model, inputs, tmp_path):
    create_backend(name, model, spec(tmp_path))
    first = sorted(p.name for p in tmp_path.iterdir())
    assert first and not any(p.startswith(".export-") for p in first)  # no staging folder left behind
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    create_backend(name, model, spec(tmp_path))  # loaded, not exported again
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes
    torch.manual_seed(1)
    other = timm.create_model(ARCH, pretrained=False).eval()
    backend = create_backend(name, other, spec(tmp_path))  # other weights: another artifact
    assert len(list(tmp_path.iterdir())) == 2 * len(first)
    with torch.inference_mode():
        assert torch.allclose(backend(inputs), other(inputs), atol=1e-4)
    create_backend(name, model, spec(tmp_path, input_size=(3, 128, 128)))  # other shape: another one
    assert len(list(tmp_path.iterdir())) == 3 * len(first)


def test_auto_measures_every_candidate_and_keeps_one_that_agrees(model, inputs, tmp_path):
    candidates = auto_candidates("auto", "fp32", torch.device("cpu"))
    assert candidates == [(name, "fp32") for name in AUTO_CANDIDATES]
    chosen, trials = choose_backend(model, spec(tmp_path), inputs, candidates, seconds=0.2)
    assert [(t.name, t.precision) for t in trials] == candidates
    assert chosen.agreement.ok
    assert chosen.img_per_s == max(t.img_per_s for t in trials if t.agreement and t.agreement.ok)


def test_agreement_catches_a_wrong_answer(reference):
    wrong = reference.clone()
    wrong[0] = -wrong[0]  # another top-1 for the first photo
    agreed = agreement(reference, wrong, probability_tolerance("fp32"))
    assert not agreed.ok and agreed.top1_agree == 3
    assert agreement(reference, reference * 1.001, probability_tolerance("fp32")).ok  # same order, tiny change


def test_bf16_is_within_its_tolerance_but_not_fp32s(model, inputs, reference, tmp_path):
    logits = create_backend("eager", model, spec(tmp_path, precision="bf16"))(inputs)
    assert agreement(reference, logits, probability_tolerance("bf16")).ok
    assert not torch.equal(logits, reference)


def test_impossible_combinations_are_one_clear_error_naming_what_would_run():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(ModelLoadError, match="^fp16 needs a CUDA device; on CPU use bf16 or fp32$"):
        check_supported("auto", cpu, "fp16")
    with pytest.raises(ModelLoadError, match="^fp16 needs a CUDA device"):
        check_supported("eager", cpu, "fp16")
    with pytest.raises(
        ModelLoadError, match="^--backend onnxruntime runs fp32 or fp16; for bf16 use eager, compile, openvino$"
    ):
        check_supported("onnxruntime", cpu, "bf16")
    with pytest.raises(
        ModelLoadError, match="^--backend openvino runs on cpu; on cuda use eager, compile, onnxruntime$"
    ):
        check_supported("openvino", cuda, "fp32")
    check_supported("auto", cpu, "bf16")  # auto keeps whichever candidates run bf16 here
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():  # said before any export
        with pytest.raises(ModelLoadError, match="no CUDA provider"):
            check_supported("onnxruntime", cuda, "fp32")
    if "BF16" not in openvino_capabilities():
        with pytest.raises(ModelLoadError, match="no native bf16"):
            check_supported("openvino", cpu, "bf16")


def test_the_registry_is_the_one_list_of_backends():
    from typing import get_args

    from timmserve.settings.config import Backend

    assert set(get_args(Backend)) == {*BACKENDS, "auto"}
    assert AUTO_CANDIDATES == ("eager", "onnxruntime", "openvino")  # compile: minutes per worker start
    missing = [name for name, kind in BACKENDS.items() if not kind.installed()]
    assert missing == []  # the dev extra installs every backend's package
