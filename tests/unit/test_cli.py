"""The CLI as a user meets it: a subprocess, its exit code and what it prints."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from tests.conftest import DATA, free_port
from timmserve.cli import _serve_config, serve


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
        (["serve", "--max-batch-size", "0"], "Error: max batch size must be at least 1"),
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
    path.write_text('max-batch-size = 32\nprecision = "bf16"\nport = 9000\n')
    ctx = serve.make_context("serve", ["--config", str(path), "--port", "9100"])
    config = _serve_config(ctx, path, {k: v for k, v in ctx.params.items() if k != "config_file"})
    assert (config.max_batch_size, config.precision, config.port, config.top_k) == (32, "bf16", 9100, 5)
    assert isinstance(ctx, click.Context)
