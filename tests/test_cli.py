"""The command line: help texts, argument plumbing into kvcompile.api, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kvcompile import api
from kvcompile.cli import main
from kvcompile.errors import KVCompileError

COMMANDS = {
    "models": [],
    "profile": ["--calib", "--out", "--windows", "--seq-len", "--device"],
    "build": ["--recipe", "--out", "--budget-bits", "--window", "--sinks", "--calib", "--windows", "--seq-len",
              "--device"],
    "eval": ["--task", "--recipe", "--data", "--max-tokens", "--ctx", "--chunk", "--protocol", "--json", "--device"],
    "inspect": [],
    "export-onnx": ["--out"],
}


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("KVCOMPILE_HOME", str(tmp_path / "home"))
    return CliRunner()


def test_group_help_lists_every_command(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_help_documents_its_options(runner: CliRunner, command: str) -> None:
    result = runner.invoke(main, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for option in COMMANDS[command]:
        assert option in result.output


def test_models_lists_the_three_zoo_entries(runner: CliRunner) -> None:
    result = runner.invoke(main, ["models"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name in ("smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b"):
        assert name in result.output
    assert "yes" not in result.output  # nothing cached in an empty KVCOMPILE_HOME


def test_unknown_model_is_one_line_on_stderr_without_traceback(tmp_path: Path) -> None:
    # A real process: what a user sees, with nothing of click's test harness in between.
    command = ["profile", "does-not-exist", "--calib", "austen", "-o", str(tmp_path / "x")]
    proc = subprocess.run(
        [sys.executable, "-m", "kvcompile", *command],
        capture_output=True, text=True, env={"KVCOMPILE_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "not a folder, a zoo name" in lines[0]
    assert "hub id" in lines[0]
    assert not (tmp_path / "x").exists()


def test_unknown_text_source_fails_before_any_work(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "build", lambda *a, **k: pytest.fail("api.build must not run"))
    result = runner.invoke(main, ["build", "smollm2-135m", "-o", "out", "--calib", "no-such-text"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: text source 'no-such-text'")


def _record(monkeypatch: pytest.MonkeyPatch, name: str, returns: Any) -> list[tuple[tuple, dict]]:
    calls: list[tuple[tuple, dict]] = []

    def fake(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return returns

    monkeypatch.setattr(api, name, fake)
    return calls


def test_profile_and_build_pass_their_options_to_the_api(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _record(monkeypatch, "profile", Path("prof"))
    result = runner.invoke(main, ["profile", "smollm2-135m", "--calib", "austen", "-o", "prof", "--windows", "4",
                                  "--seq-len", "256", "--device", "auto"])
    assert result.exit_code == 0, result.output
    assert calls == [(("smollm2-135m", "austen", Path("prof")), {"windows": 4, "seq_len": 256, "device": "auto"})]

    calls = _record(monkeypatch, "build", Path("out"))
    result = runner.invoke(main, ["build", "smollm2-135m", "-o", "out", "--budget-bits", "3.5", "--sinks", "4"])
    assert result.exit_code == 0, result.output
    assert calls == [(("smollm2-135m", Path("out")), {
        "recipe": "mixed-nsep", "budget_bits": 3.5, "window": None, "sinks": 4, "calib": "austen", "windows": None,
        "seq_len": None, "device": "cpu"})]
    assert "out" in result.output


def test_eval_prints_the_result_as_a_table(runner: CliRunner, monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "kvcompile.json").write_text("{}")
    calls = _record(monkeypatch, "evaluate", {"ppl": 27.123456, "baseline": {"ppl": 26.5}, "tokens": 4096})
    result = runner.invoke(main, ["eval", str(artifact), "--task", "ppl", "--max-tokens", "4096", "--json",
                                  str(tmp_path / "r.json"), "--protocol", "simulated"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert calls == [((str(artifact), "ppl"), {
        "recipe": None, "data": "austen", "max_tokens": 4096, "ctx": 2048, "chunk": 128, "protocol": "simulated",
        "json_path": tmp_path / "r.json", "device": "cpu"})]
    assert "27.12" in result.output
    assert "baseline.ppl" in result.output
    assert "4096" in result.output


def test_eval_rejects_an_unknown_task(runner: CliRunner) -> None:
    result = runner.invoke(main, ["eval", "smollm2-135m", "--task", "bleu"])
    assert result.exit_code == 2
    assert "bleu" in result.output


@pytest.mark.parametrize(
    ("raised", "code", "message"),
    [
        (KVCompileError("artifact is tampered:\n  re-run kvcompile build"), 1,
         "error: artifact is tampered: re-run kvcompile build"),
        (NotImplementedError("kvcompile inspect is not implemented yet"), 2,
         "error: kvcompile inspect is not implemented yet"),
        (FileNotFoundError(2, "No such file or directory", "out/kvcompile.json"), 1,
         "error: No such file or directory: out/kvcompile.json"),
        (ValueError("bits must be 2, 3, 4 or 8"), 1, "error: bits must be 2, 3, 4 or 8"),
    ],
)
def test_user_errors_become_one_line(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, raised: Exception,
                                     code: int, message: str) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise raised

    monkeypatch.setattr(api, "inspect", fail)
    result = runner.invoke(main, ["inspect", "out"])
    assert result.exit_code == code
    assert result.stderr == message + "\n"
    assert "Traceback" not in result.output


def test_debug_flag_reraises(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise KVCompileError("boom")

    monkeypatch.setattr(api, "inspect", fail)
    result = runner.invoke(main, ["--debug", "inspect", "out"])
    assert isinstance(result.exception, KVCompileError)


def test_python_dash_m_runs_the_same_cli() -> None:
    proc = subprocess.run([sys.executable, "-m", "kvcompile", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stdout.startswith("kvcompile, version ")
