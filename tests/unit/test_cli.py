"""The CLI as a user meets it: a subprocess, its exit code and what it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import DATA, free_port
from timmserve.bench.config import BenchConfig
from timmserve.cli import _bench_config, _serve_config, bench, cli, serve
from timmserve.errors import ConfigError
from timmserve.settings.config import ServeConfig


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "timmserve", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", [[], ["serve"], ["classify"]])
def test_help_everywhere(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["serve", "--model", "no_such_model_xyz", "--random-weights"], "Error: unknown timm model"),
        (["serve", "--checkpoint", str(DATA / "cat.jpg")], "Error: --checkpoint needs the architecture"),
        (["serve", "--max-batch-size", "0"], "Error: max_batch_size must be an integer ≥ 1 (got 0)"),
        (["classify", str(DATA / "cat.jpg"), "--url", "http://127.0.0.1:{port}"], "Error: no answer from"),
    ],
)
def test_user_errors_are_one_line_and_exit_1(args, words):
    args = [a.format(port=free_port()) for a in args]
    result = run_cli(*args)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # exactly one line
    assert result.stderr.startswith(words), result.stderr


def test_usage_errors_exit_2():
    result = run_cli("classify", "/no/such/image.jpg")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_flags_win_over_the_config_file_which_wins_over_defaults(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text('max-batch-size = 32\nprecision = "bf16"\nport = 9000\ntop_k = 3\n')
    ctx = serve.make_context("serve", ["--config", str(path), "--port", "9100", "--top-k", "5"])
    config = _serve_config(ctx, path, {k: v for k, v in ctx.params.items() if k != "config_file"})
    assert (config.max_batch_size, config.precision, config.port, config.decode_threads) == (32, "bf16", 9100, None)
    assert config.top_k == 5  # given on the command line, so it wins even though it is the default


def test_bench_takes_the_same_precedence_for_its_settings_and_the_serve_settings(tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text(
        'duration = 9.0\nrounds = 3\nout = "from-file"\nladder = ["baseline", "batching"]\n'
        '[serve]\nmax_batch_size = 4\ntop_k = 2\nmodel = "resnet18"\n'
        "[rungs.tiny]\nmax_batch_size = 2\n"
    )
    args = ["--config", str(path), "--duration", "1", "--model", "test_resnet", "--set", "top_k=1", "--quick"]
    ctx = bench.make_context("bench", args)
    params = ctx.params
    settings = {k: v for k, v in params.items() if k not in ("config_file", "knobs", "quick", "no_progress")}
    config = _bench_config(ctx, path, params["knobs"], params["quick"], settings)
    assert (config.duration, config.rounds, config.out) == (1.0, 3, Path("from-file"))  # flag, file, file
    assert config.ladder == ("baseline", "batching") and config.concurrency == (1, 8)  # file, --quick
    assert config.client_processes == 1  # the default
    assert (config.serve.model, config.serve.top_k, config.serve.max_batch_size) == ("test_resnet", 1, 4)
    assert config.rung_overrides == {"tiny": {"max_batch_size": 2}}


def test_bench_set_is_validated_like_a_config_file():
    ctx = bench.make_context("bench", ["--set", "fast_decode=no"])
    with pytest.raises(ConfigError, match=r"^fast_decode must be true or false \(got 'no'\)$"):
        _bench_config(ctx, None, ("fast_decode=no",), False, {})


@pytest.mark.parametrize(
    ("command", "toml", "message"),
    [
        ("serve", 'channels_last = "false"', "channels_last must be true or false (got 'false')"),
        ("bench", 'rounds = "2"', "rounds must be an integer ≥ 1 (got '2')"),
    ],
)
def test_a_config_file_with_a_bad_type_exits_1_with_one_line(tmp_path, command, toml, message):
    path = tmp_path / "settings.toml"
    path.write_text(toml + "\n")
    result = CliRunner().invoke(cli, [command, "--config", str(path)], standalone_mode=False)
    assert result.exit_code == 1 and isinstance(result.exception, ConfigError)
    assert str(result.exception) == message  # what `main` prints after "Error: "


def test_option_help_types_and_defaults_come_from_the_schema():
    params = {param.name: param for param in serve.params if param.name != "config_file"}
    assert params.keys() == ServeConfig.model_fields.keys()
    for name, field in ServeConfig.model_fields.items():
        assert params[name].help == field.description
    assert (
        params["precision"].type.choices == ("auto", "fp32", "fp16", "bf16") and params["precision"].default == "auto"
    )
    assert params["devices"].show_default == "all of the accelerator's"
    fast_decode, channels_last = params["fast_decode"], params["channels_last"]
    assert (fast_decode.opts, fast_decode.secondary_opts) == (["--fast-decode"], ["--no-fast-decode"])
    assert channels_last.is_flag and (channels_last.opts, channels_last.secondary_opts) == (["--channels-last"], [])
    rates = next(param for param in bench.params if param.name == "rates")
    assert rates.opts == ["--rate"] and rates.help == BenchConfig.model_fields["rates"].description
    concurrency = next(param for param in bench.params if param.name == "concurrency")
    assert concurrency.type.convert("1,8", None, None) == (1, 8)


def test_the_settings_reference_names_every_serve_option():
    readme = (Path(__file__).parents[2] / "docs/settings.md").read_text()
    table = readme[readme.index("| setting | default | meaning |") :].split("\n\n")[0]
    documented = set(re.findall(r"--[a-z][a-z-]*", table)) | {"--config"}  # --config: in the text above
    assert {opt for param in serve.params for opt in param.opts + param.secondary_opts} <= documented
