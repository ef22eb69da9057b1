from __future__ import annotations

from pathlib import Path

import pytest

from timmserve.errors import ConfigError, ModelLoadError
from timmserve.settings.config import ServeConfig, read_config_file
from timmserve.settings.machine import resolve_machine


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be an integer ≥ 1"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"port": 80}, "port must be an integer ≥ 1024 and ≤ 65535"),
        ({"host": "10.0.0.1"}, "host must be one of"),
        ({"checkpoint": Path("w.safetensors")}, "--model ARCH --checkpoint FILE"),
        ({"model": "resnet18", "checkpoint": Path("w.pth"), "random_weights": True}, "contradict"),
        ({"grpc_port": 8000}, "--grpc-port must differ from --port"),
        ({"grpc_port": 80}, "grpc_port must be an integer ≥ 1024 and ≤ 65535"),
        ({"batch_timeout": -1}, "batch_timeout must be a number ≥ 0 and ≤ 10"),
        ({"grace_period": -1}, "grace_period must be a number ≥ 0 and ≤ 3600"),
        ({"log_format": "xml"}, "log_format must be one of text, json"),
        ({"api_key_env": " "}, "needs a variable name"),
        ({"engine": "triton"}, "engine must be one of"),
        ({"backend": "tensorrt"}, "backend must be one of"),
        ({"ray_address": "auto"}, "need --engine ray"),
    ],
)
def test_invalid_settings_are_one_clear_error(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        ServeConfig(**kwargs)


def test_from_mapping_accepts_dashes_and_rejects_unknown_keys():
    config = ServeConfig.from_mapping({"max-batch-size": 16, "labels": "l.txt"})
    assert config.max_batch_size == 16 and config.labels == Path("l.txt")
    with pytest.raises(ConfigError, match=r"^unknown setting 'max_bach_size'; known: .*, max_batch_size, "):
        ServeConfig.from_mapping({"max_bach_size": 16})
    with pytest.raises(ConfigError, match=r"^max_batch_size must be an integer ≥ 1 \(got 'lots'\)$"):
        ServeConfig.from_mapping({"max_batch_size": "lots"})


def test_the_machine_is_resolved_once_threads_shared_between_all_workers(monkeypatch):
    monkeypatch.setattr("timmserve.settings.machine.usable_cores", lambda: 8)
    resolved = resolve_machine(ServeConfig(accelerator="cpu", workers_per_device=2))
    assert (resolved.accelerator, resolved.devices, resolved.torch_threads) == ("cpu", 1, 4)
    assert resolve_machine(ServeConfig(accelerator="cpu", workers_per_device=16)).torch_threads == 1
    assert resolve_machine(ServeConfig(accelerator="cpu", torch_threads=3, workers_per_device=2)).torch_threads == 3
    with pytest.raises(ModelLoadError, match="--devices 2 was asked for, but torch sees 1 cpu device"):
        resolve_machine(ServeConfig(accelerator="cpu", devices=2))
    with pytest.raises(ConfigError, match="--ray-max-replicas 1 is below the starting replica count 2"):
        resolve_machine(ServeConfig(accelerator="cpu", engine="ray", workers_per_device=2, ray_max_replicas=1))


def test_the_machine_rule_fills_what_the_config_leaves_unset(monkeypatch):
    """CPU: one single-threaded worker per usable core (at most 8), batches of 16, one decode
    thread; CUDA: two workers per device, batches of 64, four decode threads; a pinned value stays."""
    monkeypatch.setattr("timmserve.settings.machine.usable_cores", lambda: 4)
    cpu = resolve_machine(ServeConfig(accelerator="cpu"))
    assert (cpu.workers_per_device, cpu.torch_threads, cpu.max_batch_size, cpu.decode_threads) == (4, 1, 16, 1)
    monkeypatch.setattr("timmserve.settings.machine.usable_cores", lambda: 32)
    assert resolve_machine(ServeConfig(accelerator="cpu")).workers_per_device == 8
    pinned = resolve_machine(ServeConfig(accelerator="cpu", workers_per_device=1, max_batch_size=1, decode_threads=3))
    assert (pinned.workers_per_device, pinned.torch_threads, pinned.max_batch_size, pinned.decode_threads) == (
        1, 32, 1, 3
    )  # fmt: skip
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    cuda = resolve_machine(ServeConfig(accelerator="cuda"))
    assert (cuda.devices, cuda.workers_per_device, cuda.max_batch_size, cuda.decode_threads) == (2, 2, 64, 4)


def test_config_file_is_toml(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text('max_batch_size = 32\nprecision = "bf16"\n')
    assert read_config_file(path) == {"max_batch_size": 32, "precision": "bf16"}
    path.write_text("max_batch_size = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_config_file(path)


def test_command_line_values_use_toml_literals():
    from timmserve.settings.config import parse_setting

    assert parse_setting("1") == 1 and parse_setting("0.5") == 0.5 and parse_setting("true") is True
    assert parse_setting("bf16") == "bf16" and parse_setting('"8"') == "8"


def test_bench_config_is_json_ready():
    import json

    from timmserve.bench.config import BenchConfig

    values = BenchConfig(images=Path(__file__)).as_dict()
    assert values["concurrency"] == [1, 8, 32, 64] and values["images"] == __file__
    assert values["serve"]["max_batch_size"] is None  # the machine's rule, resolved at start
    assert json.loads(json.dumps(values)) == values  # plain JSON types: no tuple or Path to convert


def test_queue_limit_defaults_to_four_batches_per_worker_and_at_least_128():
    assert ServeConfig(max_batch_size=8, workers_per_device=1, devices=1).queue_limit() == 128
    assert ServeConfig(max_batch_size=64, workers_per_device=2, devices=1).queue_limit() == 512
    assert ServeConfig(max_queue=3).queue_limit() == 3
    with pytest.raises(ConfigError, match="max_queue must be an integer ≥ 1"):
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


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('fast_decode = "no"', "fast_decode must be true or false (got 'no')"),  # not a truthy string
        ('channels_last = "false"', "channels_last must be true or false (got 'false')"),
        ("max_batch_size = 3.5", "max_batch_size must be an integer ≥ 1 (got 3.5)"),
        ("top_k = 2.5", "top_k must be an integer ≥ 1 (got 2.5)"),
        ('port = "8000"', "port must be an integer ≥ 1024 and ≤ 65535 (got '8000')"),  # never a TypeError
        ("decode_threads = true", "decode_threads must be an integer ≥ 1 (got True)"),
        ("labels = 3", "labels must be a path (got 3)"),
    ],
)
def test_a_value_of_the_wrong_type_is_one_line_naming_the_setting(tmp_path, toml, message):
    path = tmp_path / "serve.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError) as caught:
        ServeConfig.from_mapping(read_config_file(path))
    assert str(caught.value) == message


def test_toml_integers_are_numbers_and_strings_are_paths():
    config = ServeConfig.from_mapping({"batch_timeout": 1, "timeout": 5, "cache_dir": "/srv/cache"})
    assert config.batch_timeout == 1.0 and isinstance(config.batch_timeout, float)
    assert config.cache_dir == Path("/srv/cache")


def test_every_problem_is_a_line_of_one_error():
    with pytest.raises(ConfigError) as caught:
        ServeConfig.from_mapping({"top_k": 0, "fast_decode": "yes", "colour": "red"})
    lines = str(caught.value).splitlines()  # in the schema's order
    assert len(lines) == 3
    assert lines[0].startswith("fast_decode must be") and lines[1].startswith("top_k must be")
    assert lines[2].startswith("unknown setting 'colour'; known: accelerator, api_key_env, ")


def test_a_config_is_immutable_and_replace_validates_again():
    import pydantic

    config = ServeConfig(top_k=3, labels=Path("l.txt"))
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.top_k = 4
    assert config.replace(top_k=4).top_k == 4 and config.replace(top_k=4).labels == Path("l.txt")
    with pytest.raises(ConfigError, match="top_k must be an integer ≥ 1"):
        config.replace(top_k=0)
    assert config.as_dict()["labels"] == "l.txt"


def test_bench_settings_are_validated_like_serve_settings(tmp_path):
    from timmserve.bench.config import QUICK, BenchConfig

    config = BenchConfig.from_mapping({"concurrency": [2, 4], "rates": [5], "images": str(tmp_path)})
    assert config.concurrency == (2, 4) and config.rates == (5.0,) and config.images == tmp_path
    assert BenchConfig.from_mapping(QUICK).ladder == ("baseline", "best", "default")
    for values, message in [
        ({"concurrency": [0, 8]}, "concurrency must be a list, each an integer > 0 (got [0, 8])"),
        ({"concurrency": [1.5]}, "concurrency must be a list, each an integer > 0 (got [1.5])"),
        ({"rounds": 1.5}, "rounds must be an integer ≥ 1 (got 1.5)"),
        ({"duration": "4"}, "duration must be a number > 0 (got '4')"),
        ({"ladder": []}, "ladder must be a non-empty list, each a string (got [])"),
        ({"concurrency": [], "rates": []}, "give at least one concurrency or rate"),
        ({"images": str(tmp_path / "none")}, f"no image or folder at {tmp_path / 'none'}"),
    ]:
        with pytest.raises(ConfigError) as caught:
            BenchConfig.from_mapping(values)
        assert str(caught.value) == message
