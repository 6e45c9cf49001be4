"""The `rlhf` command's surface: --version, help text on every option, and `pipeline run`
without flags."""

from __future__ import annotations

import argparse
from importlib.metadata import version
from pathlib import Path

import pytest

from rlhf import cli


def options_without_help(parser: argparse.ArgumentParser, path: str = "rlhf") -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += options_without_help(sub, f"{path} {name}")
        elif not action.help and action.dest != "help":
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"rlhf {version('rlhf-pipeline')}"


def test_every_option_and_argument_has_help_text() -> None:
    assert options_without_help(cli.build_parser()) == []


def test_pipeline_run_needs_no_local_flag(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rlhf.pipelines import run

    calls = []

    def run_local(params, root, image=None, verbose=False):
        calls.append((root, image, verbose))
        return {"run_folder": str(tmp_path / "run"), "verdicts": {}, "registered": None}

    monkeypatch.setattr(run, "run_local", run_local)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((Path(cli.__file__).parents[2] / "params.yaml").read_text())
    assert cli.main(["pipeline", "run"]) == 0
    assert cli.main(["pipeline", "run", "--local", "-v"]) == 0
    assert calls == [("kfp-local", None, False), ("kfp-local", None, True)]
    assert "pipeline run:" in capsys.readouterr().out
