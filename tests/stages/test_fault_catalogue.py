"""A catalogue of bad inputs and faults, each through the `rlhf` command as a user meets it.

Every case must fail the same way: a non-zero exit, exactly one line on stderr that starts with `error:` and names
the file, key or URI at fault, no traceback, nothing half-written (the project's files are as they were, MLflow's
store aside), and no MLflow run left RUNNING.
"""

from __future__ import annotations

import gzip
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from stage_helpers import Trained
from test_cli import error_lines, leftovers, rlhf

Setup = Callable[[Path], None]


@dataclass
class Case:
    id: str
    args: list[str]
    names: str  # what the error line must name: a file, a key, a URI (formatted with {project})
    setup: Setup = lambda project: None
    env: dict[str, str] = field(default_factory=dict)
    models: tuple[str, ...] = ()  # session models copied into the project first (pretrained, sft, reward)
    absent: str | None = None  # text that must not appear anywhere in the output (a secret)


def write(path: str, content: str | bytes) -> Setup:
    def setup(project: Path) -> None:
        target = project / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content, encoding="utf-8")

    return setup


def edit_line(path: str, number: int, change: Callable[[str], str]) -> Setup:
    def setup(project: Path) -> None:
        lines = (project / path).read_text(encoding="utf-8").splitlines()
        lines[number - 1] = change(lines[number - 1])
        (project / path).write_text("\n".join(lines) + "\n", encoding="utf-8")

    return setup


def keep_lines(path: str, count: int) -> Setup:
    def setup(project: Path) -> None:
        lines = (project / path).read_text(encoding="utf-8").splitlines()[:count]
        (project / path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    return setup


def params_without(section: str) -> Setup:
    def setup(project: Path) -> None:
        params = yaml.safe_load((project / "params.yaml").read_text())
        del params[section]
        (project / "params.yaml").write_text(yaml.safe_dump(params))

    return setup


def remove(path: str) -> Setup:
    def setup(project: Path) -> None:
        target = project / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return setup


def truncate(path: str, size: int) -> Setup:
    def setup(project: Path) -> None:
        with open(project / path, "r+b") as handle:
            handle.truncate(size)

    return setup


OFFLINE_SERVER = "http://127.0.0.1:9"  # nothing listens on the discard port
QUICK_WAIT = {"RLHF_TRACKING_WAIT": "3"}
SET = "--set"

CASES = [
    # -- datasets
    Case("sft-data-malformed-json", ["sft"], "data/sft.jsonl:3", edit_line("data/sft.jsonl", 3, lambda s: s[:10])),
    Case(
        "sft-data-not-utf8",
        ["sft"],
        "data/sft.jsonl:2",
        write("data/sft.jsonl", b'{"prompt": "a"}\n{"prompt": "\xff"}\n'),
    ),
    Case("sft-data-missing-field", ["sft"], "data/sft.jsonl:1", write("data/sft.jsonl", '{"prompt": "only"}\n')),
    Case("sft-data-empty-file", ["sft"], "data/sft.jsonl", write("data/sft.jsonl", "")),
    Case("sft-data-one-record", ["sft"], "data/sft.jsonl: 1 record", keep_lines("data/sft.jsonl", 1)),
    Case("sft-data-missing-file", ["sft"], "data/sft.jsonl", remove("data/sft.jsonl")),
    Case("sft-data-array-line", ["sft"], "data/sft.jsonl:1", write("data/sft.jsonl", "[1, 2]\n")),
    Case(
        "sft-data-empty-folder",
        ["sft", SET, "sft.dataset=data/empty"],
        "data/empty",
        write("data/empty/notes.txt", "x"),
    ),
    Case(
        "sft-data-unsupported-type",
        ["sft", SET, "sft.dataset=data/sft.txt"],
        "data/sft.txt",
        write("data/sft.txt", "x"),
    ),
    Case(
        "sft-data-bad-parquet",
        ["sft", SET, "sft.dataset=data/sft.parquet"],
        "data/sft.parquet",
        write("data/sft.parquet", b"not parquet"),
    ),
    Case(
        "preferences-missing-rejected",
        ["reward"],
        "data/preferences.jsonl:2",
        edit_line("data/preferences.jsonl", 2, lambda s: '{"prompt": "p", "chosen": "c"}'),
    ),
    Case(
        "preferences-not-json",
        ["reward"],
        "data/preferences.jsonl:1",
        write("data/preferences.jsonl", "chosen,rejected\n"),
    ),
    Case(
        "corpus-fake-gzip",
        ["pretrain", SET, "pretrain.corpus=data/corpus.jsonl.gz"],
        "data/corpus.jsonl.gz",
        write("data/corpus.jsonl.gz", b"plain text, not gzip"),
    ),
    Case(
        "corpus-truncated-gzip",
        ["pretrain"],
        "data/corpus.jsonl",
        write("data/corpus.jsonl", gzip.compress(b'{"text": "a review"}\n' * 50)[:40]),
    ),
    Case("prompts-malformed", ["ppo"], "data/prompts.jsonl:1", write("data/prompts.jsonl", "{\n")),
    Case("eval-prompts-missing", ["evaluate"], "data/eval_prompts.jsonl", remove("data/eval_prompts.jsonl")),
    Case("validate-wrong-kind", ["data", "validate", "data/sft.jsonl", "--kind", "preference"], "data/sft.jsonl:1"),
    # -- params
    Case("params-unknown-key", ["sft", SET, "sft.lerning_rate=0.1"], "sft.lerning_rate"),
    Case("params-wrong-type", ["sft", SET, "sft.epochs=abc"], "sft.epochs"),
    Case("params-out-of-range", ["sft", SET, "sft.learning_rate=-1"], "sft.learning_rate"),
    Case("params-bad-yaml", ["sft"], "params.yaml:", write("params.yaml", "sft:\n  epochs: [1\n")),
    Case("params-binary", ["sft"], "params.yaml", write("params.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")),
    Case("params-missing", ["sft"], "params.yaml", remove("params.yaml")),
    Case("params-empty", ["sft"], "params.yaml", write("params.yaml", "")),
    Case("params-missing-section", ["sft"], "params.yaml", params_without("sft")),
    Case("params-set-without-value", ["sft", SET, "sft.epochs"], "sft.epochs"),
    Case("params-unknown-section", ["sft", SET, "nosuch.key=1"], "nosuch"),
    Case("params-heads-do-not-divide", ["pretrain", SET, "pretrain.architecture.n_head=3"], "pretrain.architecture"),
    Case("params-ppo-batches", ["ppo", SET, "ppo.mini_batch_size=3"], "ppo"),
    Case(
        "params-pretrain-length-over-positions", ["pretrain", SET, "pretrain.architecture.n_positions=16"], "pretrain"
    ),
    Case(
        "params-sft-length-over-window", ["sft", SET, "sft.max_length=4096"], "sft.max_length", models=("pretrained",)
    ),
    Case(
        "params-reward-length-over-window",
        ["reward", SET, "reward.max_length=4096"],
        "reward.max_length",
        models=("sft",),
    ),
    Case(
        "params-ppo-new-tokens-over-window",
        ["ppo", SET, "ppo.max_new_tokens=500"],
        "ppo.max_new_tokens",
        models=("sft", "reward"),
    ),
    # -- models
    Case("model-missing", ["sft", SET, "sft.model=models/nowhere"], "sft.model"),
    Case("model-folder-without-config", ["sft"], "sft.model", write("models/pretrained/notes.txt", "x")),
    Case(
        "model-without-weights",
        ["sft"],
        "sft.model",
        remove("models/pretrained/model.safetensors"),
        models=("pretrained",),
    ),
    Case(
        "model-truncated-weights",
        ["sft"],
        "sft.model",
        truncate("models/pretrained/model.safetensors", 5000),
        models=("pretrained",),
    ),
    Case("model-is-a-file", ["sft", SET, "sft.model=data/sft.jsonl"], "sft.model"),
    Case("model-gguf-missing", ["sft", SET, "sft.model=models/none.gguf"], "sft.model"),
    Case(
        "reward-model-is-a-causal-lm", ["ppo", SET, "ppo.reward_model=models/sft"], "ppo.reward_model", models=("sft",)
    ),
    Case(
        "evaluate-reward-model-is-a-causal-lm",
        ["evaluate", SET, "evaluate.reward_model=models/sft", SET, "evaluate.policy_model=models/sft"],
        "evaluate.reward_model",
        models=("sft",),
    ),
    Case(
        "policy-is-a-reward-model",
        ["ppo", SET, "ppo.policy_model=models/reward"],
        "ppo.policy_model",
        models=("sft", "reward"),
    ),
    # -- storage
    Case(
        "output-below-a-file",
        ["data", "demo", "--params", "params.yaml", "-o", "data/sft.jsonl/demo"],
        "data/sft.jsonl",
    ),
    Case(
        "s3-unreachable",
        ["data", "validate", "s3://bucket/sft.jsonl", "--kind", "sft"],
        "s3://bucket/sft.jsonl",
        env={
            "AWS_ENDPOINT_URL": OFFLINE_SERVER,
            "AWS_ACCESS_KEY_ID": "x",
            "AWS_SECRET_ACCESS_KEY": "y",
            "AWS_MAX_ATTEMPTS": "1",
            "AWS_RETRY_MODE": "standard",
        },
    ),
    # -- tracking and the registry
    Case(
        "tracking-server-down-stage",
        ["sft"],
        OFFLINE_SERVER,
        env={"MLFLOW_TRACKING_URI": OFFLINE_SERVER, **QUICK_WAIT},
        models=("pretrained",),
    ),
    Case(
        "tracking-server-down-promote",
        ["promote", "rlhf-policy", "1"],
        OFFLINE_SERVER,
        env={"MLFLOW_TRACKING_URI": OFFLINE_SERVER, **QUICK_WAIT},
    ),
    Case(
        "tracking-server-down-rollback",
        ["rollback", "rlhf-policy"],
        OFFLINE_SERVER,
        env={"MLFLOW_TRACKING_URI": OFFLINE_SERVER, **QUICK_WAIT},
    ),
    Case(
        "tracking-server-down-lineage",
        ["lineage", "models:/rlhf-policy@champion"],
        OFFLINE_SERVER,
        env={"MLFLOW_TRACKING_URI": OFFLINE_SERVER, **QUICK_WAIT},
    ),
    Case(
        "tracking-password-redacted",
        ["promote", "rlhf-policy", "1"],
        "http://alice:***@127.0.0.1:9",
        env={"MLFLOW_TRACKING_URI": "http://alice:supersecret456@127.0.0.1:9", **QUICK_WAIT},
        absent="supersecret456",
    ),
    Case(
        "tracking-wait-not-a-number",
        ["promote", "rlhf-policy", "1"],
        "RLHF_TRACKING_WAIT",
        env={"MLFLOW_TRACKING_URI": OFFLINE_SERVER, "RLHF_TRACKING_WAIT": "soon"},
    ),
    Case(
        "tracking-store-not-a-database",
        ["promote", "rlhf-policy", "1"],
        "mlflow.db",
        write("mlflow.db", "this is not a database\n" * 10),
    ),
    Case(
        "tracking-store-read-only",
        ["sft"],
        "readonly database",
        models=("pretrained",),
        env={"MLFLOW_TRACKING_URI": "sqlite:///file:readonly.db?mode=ro&uri=true"},
        setup=lambda project: (
            sqlite3.connect(project / "readonly.db").execute("create table t (x)").connection.commit()
        ),
    ),
    Case("promote-unknown-model", ["promote", "no-such-model", "1"], "no-such-model"),
    Case("rollback-unknown-model", ["rollback", "no-such-model"], "no-such-model"),
    Case("lineage-bad-uri", ["lineage", "rlhf-policy"], "rlhf-policy"),
    Case("register-without-evaluation", ["register"], "registry.evaluation_metrics"),
    Case("gate-without-metrics", ["gate", "evaluation"], "metrics"),
]


def _mlflow_files(path: str) -> bool:
    return path.startswith(("mlflow.db", "mlruns", "readonly.db"))


def _state(project: Path) -> dict[str, bytes | None]:
    """Every file and folder of the project (MLflow's store aside) with its content: what a failed run must leave."""
    state = {}
    for path in project.rglob("*"):
        name = str(path.relative_to(project))
        if not _mlflow_files(name):
            state[name] = path.read_bytes() if path.is_file() else None
    return state


def _running_runs(project: Path) -> int:
    database = project / "mlflow.db"
    if not database.is_file() or database.stat().st_size == 0:
        return 0
    try:
        with sqlite3.connect(database) as connection:
            return connection.execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0]
    except sqlite3.DatabaseError:  # the case that writes garbage in its place
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_fails_with_one_line_naming_it_and_leaves_nothing(
    case: Case, workdir: Path, pretrained: Trained, sft_trained: Trained, reward_trained: Trained
) -> None:
    session_models = {"pretrained": pretrained.output, "sft": sft_trained.output, "reward": reward_trained.output}
    for name in case.models:
        shutil.copytree(session_models[name], workdir / "models" / name)
    case.setup(workdir)
    before = _state(workdir)

    started = time.monotonic()
    result = rlhf(*case.args, cwd=workdir, env=case.env)
    elapsed = time.monotonic() - started

    errors = error_lines(result)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr[-3000:]
    assert case.names.format(project=workdir) in errors[0], errors[0]
    if case.absent:
        assert case.absent not in result.stderr + result.stdout
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert _state(workdir) == before, "a failed run changed or left files"
    assert leftovers(workdir) == []
    assert _running_runs(workdir) == 0


def test_the_catalogue_is_wide() -> None:
    """The issue asks for at least 40 cases across datasets, params, models, storage and tracking."""
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)
