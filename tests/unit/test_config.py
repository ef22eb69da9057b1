from __future__ import annotations

from pathlib import Path

import pytest

from timmserve.config import ServeConfig, read_config_file
from timmserve.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"max_batch_size": 0}, "max batch size"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"port": 80}, "port must be between"),
        ({"host": "10.0.0.1"}, "host must be one of"),
        ({"checkpoint": Path("w.safetensors")}, "--model ARCH --checkpoint FILE"),
        ({"model": "resnet18", "checkpoint": Path("w.pth"), "random_weights": True}, "contradict"),
        ({"precision": "fp16", "accelerator": "cpu"}, "fp16 needs a CUDA device"),
        ({"batch_timeout": -1}, "batch timeout"),
        ({"grace_period": -1}, "grace period"),
        ({"log_format": "xml"}, "log format must be one of"),
        ({"api_key_env": " "}, "needs a variable name"),
        ({"engine": "triton"}, "engine must be one of"),
        ({"backend": "tensorrt"}, "backend must be one of"),
        ({"backend": "openvino", "accelerator": "cuda"}, "openvino runs on the CPU"),
        ({"ray_address": "auto"}, "need --engine ray"),
        ({"engine": "ray", "workers_per_device": 2, "ray_max_replicas": 1}, "at least the starting replica count"),
    ],
)
def test_invalid_settings_are_one_clear_error(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        ServeConfig(**kwargs)


def test_from_mapping_accepts_dashes_and_rejects_unknown_keys():
    config = ServeConfig.from_mapping({"max-batch-size": 16, "labels": "l.txt"})
    assert config.max_batch_size == 16 and config.labels == Path("l.txt")
    with pytest.raises(ConfigError, match="unknown setting 'max_bach_size'"):
        ServeConfig.from_mapping({"max_bach_size": 16})
    with pytest.raises(ConfigError, match="invalid setting"):
        ServeConfig.from_mapping({"max_batch_size": "lots"})


def test_threads_are_shared_between_workers(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert ServeConfig().torch_threads_per_worker(2) == 4
    assert ServeConfig().torch_threads_per_worker(16) == 1
    assert ServeConfig(torch_threads=3).torch_threads_per_worker(2) == 3


def test_config_file_is_toml(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text('max_batch_size = 32\nprecision = "bf16"\n')
    assert read_config_file(path) == {"max_batch_size": 32, "precision": "bf16"}
    path.write_text("max_batch_size = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_config_file(path)


def test_command_line_values_use_toml_literals():
    from timmserve.config import parse_setting

    assert parse_setting("1") == 1 and parse_setting("0.5") == 0.5 and parse_setting("true") is True
    assert parse_setting("bf16") == "bf16" and parse_setting('"8"') == "8"


def test_bench_config_is_json_ready():
    import json

    from timmserve.config import BenchConfig

    values = BenchConfig(images=Path(__file__)).as_dict()
    assert values["concurrency"] == [1, 8, 32, 64] and values["images"] == __file__
    assert values["serve"]["max_batch_size"] == 8
    json.dumps(values)


def test_queue_limit_defaults_to_four_batches_per_worker_and_at_least_128():
    assert ServeConfig().queue_limit() == 128
    assert ServeConfig(max_batch_size=64, workers_per_device=2).queue_limit() == 512
    assert ServeConfig(max_queue=3).queue_limit() == 3
    with pytest.raises(ConfigError, match="max queue"):
        ServeConfig(max_queue=0)


def test_the_api_key_comes_from_the_named_variable_only(monkeypatch):
    assert ServeConfig().api_key() is None
    monkeypatch.setenv("MY_KEY", " k3y\n")
    config = ServeConfig(api_key_env="MY_KEY")
    assert config.api_key() == "k3y"
    assert "k3y" not in " ".join(config.to_cli_args())  # the name travels, never the key
    monkeypatch.setenv("MY_KEY", "")
    with pytest.raises(ConfigError, match="MY_KEY: that environment variable is unset or empty"):
        config.api_key()


def test_cli_args_reproduce_the_config_including_switched_off_defaults():
    from timmserve.cli import cli

    config = ServeConfig(
        backend="auto", fast_decode=False, channels_last=True, cache_dir=Path("/tmp/c"), batch_timeout=0.0
    )
    args = config.to_cli_args()
    assert "--no-fast-decode" in args and "--channels-last" in args and "--no-channels-last" not in args
    context = cli.commands["serve"].make_context("serve", args)
    params = {name: value for name, value in context.params.items() if name != "config_file"}
    assert ServeConfig.from_mapping(params) == config


def test_the_artifact_cache_follows_xdg_unless_set(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ServeConfig().artifact_cache() == tmp_path / "timmserve"
    assert ServeConfig(cache_dir=Path("/srv/cache")).artifact_cache() == Path("/srv/cache")
