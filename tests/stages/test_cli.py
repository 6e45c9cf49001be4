"""The `rlhf` command run as users and DVC run it: a subprocess in the project folder."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from stage_helpers import Trained

_SCRIPT = Path(sys.executable).with_name("rlhf")
RLHF = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "rlhf.cli"]


def cli_env() -> dict[str, str]:
    # The autouse fixture already isolated os.environ (offline, no tracking server); one torch thread keeps the
    # tiny models fast on a busy 2-core machine.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def rlhf(
    *args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RLHF, *args],
        cwd=cwd,
        env={**cli_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def snapshot(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


# ---------------------------------------------------------------------------------------------- bad inputs

STAGE_INPUTS = {
    "pretrain": ("data/corpus.jsonl", "models/pretrained"),
    "sft": ("data/sft.jsonl", "models/sft"),
    "reward": ("data/preferences.jsonl", "models/reward"),
}


@pytest.mark.parametrize("stage", list(STAGE_INPUTS))
def test_malformed_input_line_fails_with_file_and_line(stage: str, workdir: Path) -> None:
    # Data is read and validated before any model is loaded, so no base model is needed to see the data error.
    data_file, output = STAGE_INPUTS[stage]
    lines = (workdir / data_file).read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]  # line 3: a record cut off mid-way
    (workdir / data_file).write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = snapshot(workdir)

    result = rlhf(stage, cwd=workdir)

    assert result.returncode != 0
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr[-3000:]
    assert f"{data_file}:3" in errors[0] and "malformed JSON" in errors[0]
    assert not (workdir / output).exists()
    assert not (workdir / "metrics" / f"{stage}.json").exists()
    assert not (workdir / "plots" / stage).exists()
    assert snapshot(workdir) == before, "a failed run left files behind"


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--set", "sft.learning_rate=-1"], "sft.learning_rate"),
        (["--set", "sft.nope=1"], "sft.nope"),
        (["--set", "sft.epochs=abc"], "sft.epochs"),
        (["--set", "sft.lora.r=0"], "sft.lora.r"),
        # Every section is validated, not only the one of the stage being run.
        (["--set", "reward.batch_size=0"], "reward.batch_size"),
    ],
)
def test_bad_params_fail_fast_naming_the_key(args: list[str], key: str, workdir: Path) -> None:
    before = snapshot(workdir)
    start = time.monotonic()
    result = rlhf("sft", *args, cwd=workdir)
    elapsed = time.monotonic() - start

    assert result.returncode != 0
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: ") and key in errors[0]
    assert elapsed < 15, f"took {elapsed:.1f}s: the params must be checked before anything heavy is imported or run"
    assert snapshot(workdir) == before, "a run with bad params wrote files"


def test_bad_value_in_params_file(workdir: Path) -> None:
    (workdir / "params.yaml").write_text(
        (workdir / "params.yaml").read_text() + "\nbogus_section:\n  x: 1\n", encoding="utf-8"
    )
    result = rlhf("pretrain", cwd=workdir)
    assert result.returncode != 0
    errors = error_lines(result)
    assert len(errors) == 1 and "params.yaml" in errors[0] and "bogus_section" in errors[0]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            None,
            "error: params.yaml: params file not found in {workdir}; pass --params FILE, or --defaults for the "
            "built-in defaults",
        ),
        ("", "error: params.yaml: empty; pass --params FILE, or --defaults for the built-in defaults"),
        (
            "pretrain:\n  seed: 1\n",
            "error: params.yaml: no ppo section; add it, or pass --defaults for the built-in ones",
        ),
    ],
)
def test_missing_or_empty_params_is_one_line_and_writes_nothing(
    params: str | None, expected: str, workdir: Path
) -> None:
    """No params.yaml, an empty one or one without the stage's section is an error, not silent built-in defaults
    (which differ from the shipped file: kl_coef 0.05 against 0.1); `--defaults` asks for them."""
    (workdir / "params.yaml").unlink()
    if params is not None:
        (workdir / "params.yaml").write_text(params, encoding="utf-8")
    before = snapshot(workdir)
    result = rlhf("ppo", cwd=workdir)
    assert result.returncode == 2
    assert error_lines(result) == [expected.format(workdir=workdir)]
    assert snapshot(workdir) == before
    with_defaults = rlhf("gate", "reward", "--defaults", cwd=workdir)  # reaches the gate: defaults were taken
    assert "params" not in with_defaults.stderr, with_defaults.stderr


def test_missing_base_model_is_a_one_line_error(workdir: Path) -> None:
    result = rlhf("sft", cwd=workdir)
    assert result.returncode == 2
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: ") and "models/pretrained" in errors[0]
    assert not (workdir / "models").exists() and not (workdir / "metrics").exists()


def offline_env(**extra: str) -> dict[str, str]:
    """No Hub cache, no HF_HUB_OFFLINE: the loader must find out by itself that the Hub is out of reach."""
    env = {key: value for key, value in cli_env().items() if key != "HF_HUB_OFFLINE"}
    return {**env, **extra}


@contextlib.contextmanager
def hub_endpoint(kind: str) -> Iterator[str]:
    """A stand-in for the Hugging Face Hub on 127.0.0.1: `closed` (connection refused), `silent` (accepts, never
    answers: the probe must time out), `empty` (answers 404 for every model)."""
    if kind == "closed":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        yield f"http://127.0.0.1:{port}"
        return
    if kind == "silent":
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            yield f"http://127.0.0.1:{server.getsockname()[1]}"
        return

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("base_model", "hub", "expected"),
    [
        ("gpt2", "closed", "the Hub cannot be reached"),
        ("gpt2", "silent", "the Hub cannot be reached"),  # no answer at all: the probe gives up after 4 s
        ("gpt2", "empty", "has no model of that name (HTTP 404)"),
        ("models/pretraind", "closed", "the Hub cannot be reached"),  # a typo reads as a Hub id
        ("./models/pretraind", "closed", "no such model folder or file"),
        ("models/base.gguf", "closed", "no such GGUF file"),
    ],
)
def test_a_model_that_is_not_here_fails_in_seconds_offline(
    base_model: str, hub: str, expected: str, workdir: Path, tmp_path: Path
) -> None:
    with hub_endpoint(hub) as endpoint:
        env = offline_env(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"))
        started = time.monotonic()
        result = subprocess.run(
            [*RLHF, "pretrain", "--set", f"pretrain.base_model={base_model}"],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        elapsed = time.monotonic() - started

    assert result.returncode == 2, result.stderr[-3000:]
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"error: pretrain.base_model: {base_model}") and expected in errors[0]
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert not (workdir / "models").exists() and not (workdir / "mlflow.db").exists()


def test_hub_offline_setting_is_named_in_the_error(workdir: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [*RLHF, "sft", "--set", "sft.model=HuggingFaceTB/SmolLM2-135M-Instruct"],
        cwd=workdir,
        env={**cli_env(), "HF_HOME": str(tmp_path / "hf-home")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert error_lines(result) == [
        f"error: sft.model: HuggingFaceTB/SmolLM2-135M-Instruct: no such folder here and not in the Hugging Face "
        f"cache ({tmp_path / 'hf-home' / 'hub'}), and HF_HUB_OFFLINE is set"
    ]


def test_a_folder_without_a_model_is_named(workdir: Path) -> None:
    (workdir / "models" / "empty").mkdir(parents=True)
    result = rlhf("sft", "--set", "sft.model=models/empty", cwd=workdir)
    assert result.returncode == 2
    assert error_lines(result) == ["error: sft.model: models/empty is a folder but not a model (it has no config.json)"]


@pytest.mark.parametrize(("stage", "key"), [("ppo", "ppo.reward_model"), ("evaluate", "evaluate.reward_model")])
def test_a_causal_lm_given_as_the_reward_model_is_refused(
    stage: str, key: str, workdir: Path, sft_trained: Trained, reward_trained: Trained
) -> None:
    models = {
        "ppo.policy_model": sft_trained.output,
        "evaluate.sft_model": sft_trained.output,
        "evaluate.policy_model": sft_trained.output,
    }
    overrides = [f"--set={name}={path}" for name, path in models.items()] + [f"--set={key}={sft_trained.output}"]
    result = rlhf(stage, *overrides, cwd=workdir)

    assert result.returncode == 2, result.stderr[-3000:]
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0] == (
        f"error: {key}: {sft_trained.output} is GPT2LMHeadModel, not a reward model (a sequence "
        "classifier with one output); give the reward stage's output"
    )
    assert not (workdir / "models").exists() and not (workdir / "metrics").exists()
    assert not (workdir / "reports").exists()


def test_a_reward_model_given_as_the_policy_is_refused(workdir: Path, reward_trained: Trained) -> None:
    result = rlhf(
        "ppo",
        f"--set=ppo.policy_model={reward_trained.output}",
        f"--set=ppo.reward_model={reward_trained.output}",
        cwd=workdir,
    )
    assert result.returncode == 2
    assert error_lines(result) == [
        f"error: ppo.policy_model: {reward_trained.output} is a reward model "
        "(GPT2ForSequenceClassification); expected a causal language model"
    ]


# ---------------------------------------------------------------------------------------------- resume


@dataclass
class TrackedRun:
    run_id: str
    loss_history: list[Any]


def finished_sft_runs(project: Path) -> list[TrackedRun]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlhf")
    runs = client.search_runs(
        [experiment.experiment_id], "tags.`rlhf.stage` = 'sft' and attributes.status = 'FINISHED'"
    )
    return [TrackedRun(run.info.run_id, client.get_metric_history(run.info.run_id, "loss")) for run in runs]


def sft_run_statuses(project: Path) -> dict[str, list[str | None]]:
    """The sft runs by status, each as the run that superseded it (None if none did)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlhf")
    statuses: dict[str, list[str | None]] = {}
    for run in client.search_runs([experiment.experiment_id], "tags.`rlhf.stage` = 'sft'"):
        statuses.setdefault(run.info.status, []).append(run.data.tags.get("rlhf.superseded_by"))
    return statuses


@pytest.mark.slow
def test_ctrl_c_ends_a_stage_with_one_line_and_a_failed_run(workdir: Path, pretrained: Trained) -> None:
    """Ctrl-C stops a stage with one line, not a KeyboardInterrupt traceback."""
    shutil.copytree(pretrained.output, workdir / "models" / "pretrained")
    # Ctrl-C as a terminal delivers it: a suite started in the background (`pytest &`) inherits SIGINT ignored, and
    # Python leaves an ignored SIGINT ignored, so the stage would never see it.
    process = subprocess.Popen(
        [*RLHF, "sft", "--set", "sft.save_steps=2", "--set", "sft.epochs=3"],
        cwd=workdir,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while not list(workdir.glob("checkpoints/sft-*/checkpoint-*")):  # well into training
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)

    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "error: interrupted; nothing was half-written (rerun the same command to resume)"
    )
    assert sum(line.startswith("error:") for line in err.splitlines()) == 1
    assert not (workdir / "models" / "sft").exists() and leftovers(workdir) == []
    assert sft_run_statuses(workdir) == {"FAILED": [None]}


@pytest.mark.slow
def test_interrupted_sft_resumes_from_checkpoint(workdir: Path, pretrained: Trained) -> None:
    from rlhf.config import load_params
    from rlhf.stages import sft

    shutil.copytree(pretrained.output, workdir / "models" / "pretrained")
    args = ["sft", "--set", "sft.save_steps=2", "--set", "sft.epochs=2"]

    def complete_checkpoints() -> list[Path]:
        # trainer_state.json is the last file a checkpoint gets, written in place: complete once it parses.
        complete = []
        for state in workdir.glob("checkpoints/sft-*/checkpoint-*/trainer_state.json"):
            try:
                json.loads(state.read_text())
            except (OSError, ValueError):
                continue
            complete.append(state.parent)
        return complete

    # 1. Start, wait for a complete checkpoint, SIGKILL.
    log = (workdir / "first-run.log").open("w")
    process = subprocess.Popen([*RLHF, *args], cwd=workdir, env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not complete_checkpoints():
            assert process.poll() is None, (
                "the run ended before writing a checkpoint: " + (workdir / "first-run.log").read_text()[-3000:]
            )
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        log.close()
    assert process.returncode == -signal.SIGKILL, "the first run finished before it could be interrupted"
    assert not (workdir / "models" / "sft").exists()
    assert not (workdir / "metrics" / "sft.json").exists()
    assert leftovers(workdir / "models") == []
    (stage_checkpoints,) = workdir.glob("checkpoints/sft-*")
    # Killed between two checkpoints (if this fails, the kill landed inside the next checkpoint's save, the case
    # test_resume_skips_a_half_written_checkpoint covers; the rerun below would then fail on it).
    newest = max(stage_checkpoints.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[-1]))
    assert newest in complete_checkpoints(), f"{newest} is half-written"

    # 2. The same command resumes and completes.
    result = rlhf(*args, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from checkpoint {stage_checkpoints.resolve()}" in result.stdout
    assert (workdir / "models" / "sft" / "config.json").exists()
    assert json.loads((workdir / "metrics" / "sft.json").read_text())["eval_loss"] > 0
    assert not stage_checkpoints.exists()
    assert not list(workdir.glob("checkpoints/sft-*"))

    (resumed_run,) = finished_sft_runs(workdir)  # the killed run never finished
    # The killed attempt's run does not stay RUNNING: the attempt that resumed closed it.
    assert sft_run_statuses(workdir) == {"KILLED": [resumed_run.run_id], "FINISHED": [None]}

    # 3. It trained exactly as many steps as an uninterrupted run, and its loss history (restored from the
    #    checkpoint, then continued) has the same rows.
    reference = sft.run(
        load_params(overrides=["sft.save_steps=2", "sft.epochs=2", "sft.output_dir=models/sft-reference"]).sft
    )
    train_rows = json.loads((workdir / "plots" / "sft" / "train.json").read_text())
    eval_rows = json.loads((workdir / "plots" / "sft" / "eval.json").read_text())
    assert [row["step"] for row in train_rows] == [row["step"] for row in reference.history if "loss" in row]
    assert [row["step"] for row in eval_rows] == [row["step"] for row in reference.history if "eval_loss" in row]
    assert train_rows[-1]["step"] == max(row["step"] for row in reference.history)

    # 4. It really resumed rather than retraining from step 0 (which would give the same files, training being
    #    deterministic): the resumed run's MLflow run only logged the steps after the checkpoint it resumed from.
    resumed_from = int(newest.name.split("-")[-1])
    logged = {metric.step for metric in resumed_run.loss_history}
    assert logged == {row["step"] for row in reference.history if "loss" in row and row["step"] > resumed_from}

    # 5. And it continued where it stopped, with the same optimizer, schedule, data order and RNG: the losses match.
    assert [row["loss"] for row in train_rows] == pytest.approx(
        [row["loss"] for row in reference.history if "loss" in row], rel=1e-4
    )
    metrics = json.loads((workdir / "metrics" / "sft.json").read_text())
    assert metrics["eval_loss"] == pytest.approx(reference.metrics["eval_loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------------- data commands


def test_data_validate(workdir: Path) -> None:
    from rlhf.data.io import fingerprint, read_rows

    ok = rlhf("data", "validate", "data/sft.jsonl", "--kind", "sft", cwd=workdir)
    assert ok.returncode == 0, ok.stderr
    records = read_rows(workdir / "data" / "sft.jsonl").records
    expected = fingerprint(records)[:16]
    assert ok.stdout.strip() == f"data/sft.jsonl: {len(records)} valid sft records, fingerprint {expected}"

    wrong_kind = rlhf("data", "validate", "data/sft.jsonl", "--kind", "preference", cwd=workdir)
    assert wrong_kind.returncode == 2
    assert error_lines(wrong_kind) == [
        f"error: data/sft.jsonl:1: missing field 'chosen' (and {len(records) - 1} more bad records)"
    ]

    path = workdir / "data" / "preferences.jsonl"
    lines = path.read_text().splitlines()
    record = json.loads(lines[6])
    del record["rejected"]
    lines[6] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    bad_record = rlhf("data", "validate", "data/preferences.jsonl", "--kind", "preference", cwd=workdir)
    assert bad_record.returncode == 2
    assert error_lines(bad_record) == ["error: data/preferences.jsonl:7: missing field 'rejected'"]

    missing = rlhf("data", "validate", "data/nope.jsonl", "--kind", "text", cwd=workdir)
    assert missing.returncode == 2
    assert error_lines(missing) == ["error: data/nope.jsonl: no such file or folder"]

    bad_kind = rlhf("data", "validate", "data/sft.jsonl", "--kind", "images", cwd=workdir)
    assert bad_kind.returncode == 2 and "invalid choice" in bad_kind.stderr


def test_data_demo_is_byte_identical(workdir: Path, tiny_demo_data: Path) -> None:
    first = rlhf("data", "demo", "-o", "out1", cwd=workdir)
    second = rlhf("data", "demo", "-o", "out2", cwd=workdir)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    names = sorted(p.name for p in (workdir / "out1").iterdir())
    assert names == ["corpus.jsonl", "eval_prompts.jsonl", "preferences.jsonl", "prompts.jsonl", "sft.jsonl"]
    assert names == sorted(p.name for p in (workdir / "out2").iterdir())
    for name in names:
        data = (workdir / "out1" / name).read_bytes()
        assert data and data == (workdir / "out2" / name).read_bytes(), name
        # Same params as the session's demo data (generated in-process): same bytes.
        assert data == (tiny_demo_data / name).read_bytes(), name
    assert f"out1/sft.jsonl: {len((workdir / 'out1' / 'sft.jsonl').read_text().splitlines())} rows" in first.stdout
