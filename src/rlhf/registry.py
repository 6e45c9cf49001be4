"""The MLflow model registry: register the SFT, reward and PPO models, promote champions, roll back, trace lineage.

Every version is an `mlflow.transformers` model (so `mlflow.pyfunc.load_model("models:/…")` and `mlflow models
serve` work), tagged with where it came from: data.dvc md5, params hash, git commit, training run, datasets, the
pipeline run, the upstream versions (the policy names its SFT and reward versions) and the gate verdicts.

Aliases: a new version becomes `candidate`. It becomes `champion` only if every gate of its run passed and it beats
the current champion's score (the gold score, or the reward-model score without a gold annotator); the displaced
champion becomes `previous`. A model folder already registered (same content hash) is not registered again, so
re-running `rlhf register` for the same pipeline run leaves the registry as it was.

`register` also writes the decision page (`registry.decision_dir`): the gates' verdicts read from their files, the
champion the policy was measured against, and what happened to each model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

from rlhf import tracking
from rlhf.config import ConfigError, RegistryConfig, flatten
from rlhf.console import progress_as_lines
from rlhf.gates import read_verdicts
from rlhf.modeling import require_causal_lm, require_reward_model
from rlhf.report import Decision, write_decision
from rlhf.s3 import hash_file
from rlhf.steps import ROLES
from rlhf.storage import atomic_dir, fetch, lock, write_json

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous"
TAG = "rlhf."


class RegistryError(ValueError):
    """A registry request that cannot be carried out; the message names the model and version."""


# Files beside a model that describe its run, not the model (the PPO history holds wall-clock timings).
_NOT_THE_MODEL = {tracking.PROVENANCE_FILE, tracking.HISTORY_FILE}


def content_hash(folder: str | Path) -> str:
    """sha256 over a model folder's file names and contents: the identity of a trained model."""
    digest = hashlib.sha256()
    for file in sorted(Path(folder).rglob("*")):
        if file.is_file() and file.name not in _NOT_THE_MODEL:
            digest.update(file.relative_to(folder).as_posix().encode())
            hash_file(digest, file)
    return digest.hexdigest()


def _find_version(client, name: str, model_hash: str):
    versions = client.search_model_versions(f"name = '{name}' and tags.`{TAG}model_sha256` = '{model_hash}'")
    return min(versions, key=lambda v: int(v.version), default=None)


def _absent(exc) -> bool:
    """Whether an MLflow error says that what was asked for does not exist (as opposed to a store that failed)."""
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if _absent(exc):
            raise RegistryError(f"{name}: no registered model of that name") from None
        raise


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _absent(exc):
            return None
        raise


_DESCRIPTIONS = {
    "sft": "supervised fine-tuned model (the PPO reference)",
    "reward": "reward model: one scalar score per prompt + answer, trained on preference pairs",
    "policy": "PPO policy, trained against the reward model with a KL penalty to the SFT model",
}


def _log_model(role: str, name: str, folder: str, tags: dict[str, str], cfg: RegistryConfig):
    """Logs one model folder as an MLflow transformers model in the active run; returns its ModelInfo."""
    import mlflow
    from huggingface_hub import ModelCard

    from rlhf.modeling import load_causal_lm, load_reward_model, load_tokenizer, uses_chat_template

    # An absolute path: MLflow looks a relative model name up on the Hugging Face Hub (license), even offline.
    folder = str(Path(folder).resolve())
    key, loading = f"registry.{role}_model", {"dtype": "auto", "trust_remote_code": cfg.trust_remote_code}
    tokenizer = load_tokenizer(folder, key, cfg.trust_remote_code)
    # Our own card: without one MLflow asks the Hugging Face Hub for a card named after the local folder.
    card = ModelCard(
        f"---\nlibrary_name: transformers\ntags: [rlhf, {role}]\n---\n"
        f"# {name}\n\n{_DESCRIPTIONS[role]}, built by the rlhf pipeline.\n\n"
        + "".join(f"- {key}: {value}\n" for key, value in sorted(tags.items()))
    )
    # Explicit requirements: MLflow's inference imports torchvision, which this stack does not use.
    requirements = [
        f"{package}=={installed_version(package)}"
        for package in ("mlflow", "transformers", "tokenizers", "torch", "accelerate")
    ]
    common = dict(name=role, model_card=card, pip_requirements=requirements)
    if role == "reward":
        return mlflow.transformers.log_model(
            {"model": load_reward_model(folder, tokenizer, key, **loading), "tokenizer": tokenizer},
            task="text-classification",
            model_config={"function_to_apply": "none"},
            **common,
        )
    generation = {"model": load_causal_lm(folder, tokenizer, key, **loading), "tokenizer": tokenizer}
    if uses_chat_template(tokenizer):
        # A chat model serves OpenAI-style chat requests ({"messages": [...]}) through its own chat template.
        return mlflow.transformers.log_model(
            generation,
            task="llm/v1/chat",
            model_config={"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample},
            **common,
        )
    return mlflow.transformers.log_model(
        generation,
        task="text-generation",
        prompt_template=cfg.prompt_template,
        model_config={"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample},
        **common,
    )


@contextlib.contextmanager
def _training_run(client, run_id: str | None) -> Iterator[None]:
    """The MLflow run that trained a model, reopened for the block: the model is logged in it (an MLflow 3 logged
    model with that run's metrics) and the version registered from it names it as its source run. The run keeps its
    status and end time. Without such a run in this tracking store (a model trained elsewhere) the model is logged in
    the register run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        trained = client.get_run(run_id) if run_id else None
    except MlflowException:
        trained = None
    if trained is None or trained.info.lifecycle_stage != "active":
        yield
        return
    try:
        mlflow.start_run(run_id=run_id, nested=True)
    except MlflowException:  # e.g. a run in another experiment than the register run's
        yield
        return
    try:
        yield
    finally:
        mlflow.end_run()
        client.set_terminated(run_id, trained.info.status, end_time=trained.info.end_time)


def _score(role: str, metrics: dict[str, float]) -> tuple[str, float | None]:
    """What champions are compared on: the SFT model's own score; the policy's for the policy and for the reward
    model (a reward model is as good as the policy it trains)."""
    metric = "gold_score" if "policy/gold_score" in metrics else "rm_score"
    model = "sft" if role == "sft" else "policy"
    return metric, metrics.get(f"{model}/{metric}")


def _beats_champion(client, name: str, metric: str, score: float | None) -> tuple[bool, Any, str]:
    champion = _alias_version(client, name, CHAMPION)
    if score is None:
        return False, champion, "no score"
    if champion is None:
        return True, None, "no champion yet"
    their_metric, their_score = champion.tags.get(f"{TAG}score_metric"), champion.tags.get(f"{TAG}score")
    if their_metric != metric or their_score is None:
        return False, champion, f"champion v{champion.version} is scored on {their_metric}, not {metric}"
    if score > float(their_score):
        return True, champion, f"{metric} {score:.4g} > champion v{champion.version}'s {float(their_score):.4g}"
    return (
        False,
        champion,
        f"{metric} {score:.4g} does not beat champion v{champion.version}'s {float(their_score):.4g}",
    )


def champion_report(name: str, metrics: dict[str, float]) -> dict[str, Any]:
    """What the decision page shows of registered model `name`'s champion: its version and tags (None and {} when
    there is none yet), and whether a policy with these evaluation `metrics` would replace it (as `register` judges,
    gates aside)."""
    metric, score = _score("policy", metrics)
    replaces, champion, reason = _beats_champion(tracking.client(), name, metric, score)
    tags = (
        {}
        if champion is None
        else {key.removeprefix(TAG): value for key, value in champion.tags.items() if key.startswith(TAG)}
    )
    return {
        "version": None if champion is None else champion.version,
        "tags": tags,
        "replaces": replaces,
        "reason": reason,
        "metric": metric,
        "score": score,
    }


def _champion(
    cfg: RegistryConfig, policy_folder: str, metrics: dict[str, float], verdicts: dict[str, dict]
) -> tuple[str, list[list[str]]]:
    """The registered champion beside this policy (version, score, gates, run, commit, data) and whether this policy
    replaces it: the registry crowns a policy whose gates passed and whose score beats the champion's."""
    seen = champion_report(cfg.policy_name, metrics)
    gates_passed = all(verdict["passed"] for verdict in verdicts.values())
    if seen["version"] is None:
        return (
            f"none yet (models:/{cfg.policy_name}@champion): the first policy registered with its gates "
            "passed becomes champion"
        ), []
    replaces = seen["replaces"] and gates_passed
    note = (
        f"{cfg.policy_name} v{seen['version']}; this policy {'replaces' if replaces else 'does not replace'} "
        f"it: {seen['reason']}" + ("" if gates_passed else "; and its gates fail")
    )
    tags, mine = seen["tags"], tracking.read_provenance(policy_folder)
    theirs, score = tags.get("score"), seen["score"]
    rows = [
        [
            f"score ({seen['metric']})",
            "–" if theirs is None else f"{float(theirs):.4g}",
            "–" if score is None else f"{score:.4g}",
        ],
        ["gates", tags.get("gates", "–"), "passed" if gates_passed else "failed"],
        ["trained in MLflow run", tags.get("training_run_id", "–"), mine.get("mlflow_run_id") or "–"],
        ["commit", tags.get("git_commit", "–")[:12], (mine.get("git_commit") or "–")[:12]],
        [
            "data (sha256)",
            ", ".join(
                f"{key.removeprefix('data.')} {value[:12]}"
                for key, value in sorted(tags.items())
                if key.startswith("data.")
            )
            or "–",
            ", ".join(f"{name} {fp[:12]}" for name, fp in sorted(mine.get("datasets", {}).items())) or "–",
        ],
    ]
    return note, rows


def _write_decision(cfg: RegistryConfig, decision: Decision, logged: bool = True) -> None:
    """The decision page, whole or not at all; `logged`: also into the register step's MLflow run."""
    with atomic_dir(cfg.decision_dir) as staging:
        write_decision(staging, decision)
        if logged:
            tracking.log_artifacts(staging, "decision")
    if not progress_as_lines():  # a local pipeline run names the page's copy under reports/ at its end
        print(f"decision page: {cfg.decision_dir.rstrip('/')}/decision.html")


def _reward_started_from_sft(folders: dict[str, str]) -> bool:
    """Whether the reward model was trained from this SFT model (the policy always is): its provenance names the run
    of the model it started from. Folders saved before it did so are taken to have started from the SFT model."""
    reward = tracking.read_provenance(folders["reward"])
    return "base_run_id" not in reward or (
        reward["base_run_id"] is not None
        and reward["base_run_id"] == tracking.read_provenance(folders["sft"]).get("mlflow_run_id")
    )


def _crown(client, name: str, version: str, champion) -> None:
    """`version` becomes champion; the champion it displaces becomes previous."""
    if champion is not None and champion.version != version:
        client.set_registered_model_alias(name, PREVIOUS, champion.version)
    client.set_registered_model_alias(name, CHAMPION, version)


def _read_json(path: str, key: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ConfigError(f"registry.{key}: {path} not found (run `rlhf evaluate` first)")
    return json.loads(Path(path).read_text())


def _version_tags(
    role: str,
    model_hash: str,
    pipeline_run_id: str,
    folder: str,
    score: tuple[str, float | None],
    verdicts: dict[str, dict[str, Any]],
) -> dict[str, str]:
    """Where a version came from: the tags it is created with (its upstream versions are added at creation)."""
    provenance = tracking.read_provenance(folder)
    metric, value = score
    tags = {
        "model_sha256": model_hash,
        "pipeline_run_id": pipeline_run_id,
        "role": role,
        "training_run_id": provenance.get("mlflow_run_id"),
        "params_hash": provenance.get("params_hash"),
        "git_commit": provenance.get("git_commit") or tracking.git_commit(),
        "data_dvc_md5": provenance.get("data_dvc_md5") or tracking.data_dvc_md5(),
        "gates": "passed" if all(v["passed"] for v in verdicts.values()) else "failed",
        "score_metric": metric,
        "score": value,
        **{f"gate.{gate}": "passed" if v["passed"] else "failed" for gate, v in verdicts.items()},
        **{f"data.{dataset}": fp for dataset, fp in provenance.get("datasets", {}).items()},
    }
    return {TAG + key: str(value) for key, value in tags.items() if value is not None}


def _model_card(
    client, role: str, tags: dict[str, str], verdicts: dict[str, dict[str, Any]], metrics: dict[str, float]
) -> str:
    """The version's description in the MLflow UI (Markdown): what it is, the run that trained it, its upstream
    versions, data and code, its gate verdicts and the held-out metrics it was judged on."""
    from mlflow.exceptions import MlflowException

    def tag(key: str) -> str | None:
        return tags.get(TAG + key)

    lines = [f"**{_DESCRIPTIONS[role]}**, from the rlhf pipeline's run `{tag('pipeline_run_id')}`.", ""]
    run_id = tag("training_run_id")
    if run_id:
        try:
            run_link = f"#/experiments/{client.get_run(run_id).info.experiment_id}/runs/{run_id}"
            lines.append(f"- trained in MLflow run [{run_id}]({run_link})")
        except MlflowException:  # the training run was tracked elsewhere
            lines.append(f"- trained in MLflow run `{run_id}`")
    for key, reference in sorted(tags.items()):
        if key.startswith(TAG + "upstream."):
            name, version = reference.rsplit("/", 1)
            lines.append(f"- built on [{name} v{version}](#/models/{name}/versions/{version})")
    lines += [
        f"- data: {key.removeprefix(TAG + 'data.')} sha256 `{value[:16]}`"
        for key, value in sorted(tags.items())
        if key.startswith(TAG + "data.")
    ]
    lines += [
        f"- code: git commit `{tag('git_commit')}`" if tag("git_commit") else "- code: git commit unknown",
        f"- score: {tag('score_metric')} = {tag('score')}",
        "",
        "**Gates**",
        "",
    ]
    for gate, verdict in verdicts.items():
        lines.append(f"- {gate}: {'passed' if verdict['passed'] else 'failed'}")
        lines += [
            f"  - {check['check']}: {check['metric']} = {check['value']:.4g} {check['op']} {check['threshold']}"
            for check in verdict["checks"]
            if check.get("status") in ("pass", "fail")
        ]
    headline = ("win_rate/rm", "win_rate/gold", "rm_gain_in_sft_std", "gold_gain", "policy/kl", "rm_accuracy")
    lines += ["", "**Held-out evaluation**", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {metrics[key]:.4g} |" for key in headline if key in metrics]
    return "\n".join(lines)


def _place(
    client,
    name: str,
    version: str,
    score: tuple[str, float | None],
    gates_passed: bool,
    verdicts: dict[str, dict[str, Any]],
) -> str:
    """A new version becomes candidate, and champion if its gates passed and it beats the champion; says which."""
    client.set_registered_model_alias(name, CANDIDATE, version)
    promote_it, champion, reason = _beats_champion(client, name, *score)
    if gates_passed and promote_it:
        _crown(client, name, version, champion)
        return f"new version; champion ({reason})"
    why = (
        "gates failed: "
        + ", ".join(f"{gate}: {', '.join(v['failed_checks'])}" for gate, v in verdicts.items() if not v["passed"])
        if not gates_passed
        else reason
    )
    return f"new version; candidate only ({why})"


def register(cfg: RegistryConfig, pipeline_run_id: str | None = None) -> dict[str, Any]:
    """Registers the three models of one pipeline run; returns, per role, the version and what happened to it.
    `pipeline_run_id` names the run (Kubeflow passes its own); by default the three models' content names it.

    In three steps, so that a failure (a lost storage endpoint, say) leaves the registry as it was or consistent:
    every new model is uploaded first (the slow part); then each version is created with all its tags in one call;
    then the aliases move.
    """
    import mlflow

    experiment = os.environ.get("DVC_EXP_NAME") or os.environ.get("DVC_EXP_BASELINE_REV")
    if experiment and not cfg.register_experiments:
        reason = (
            f"a DVC experiment ({experiment}) registers nothing; set registry.register_experiments: true to "
            "register it, or promote what you keep with `rlhf register` after `dvc exp apply`"
        )
        print(f"register: skipped: {reason}")
        summary = {"skipped": reason, "versions": {}}
        _write_decision(
            cfg,
            Decision(verdicts=list(read_verdicts(cfg.gates_dir).values()), champion_note=f"not asked: {reason}"),
            logged=False,
        )
        write_json(cfg.output, summary)
        return summary
    metrics = _read_json(cfg.evaluation_metrics, "evaluation_metrics")
    verdicts = read_verdicts(cfg.gates_dir)
    gates_passed = all(verdict["passed"] for verdict in verdicts.values())
    configured = {"sft": cfg.sft_model, "reward": cfg.reward_model, "policy": cfg.policy_model}
    names = {"sft": cfg.sft_name, "reward": cfg.reward_name, "policy": cfg.policy_name}
    folders = {role: fetch(folder) for role, folder in configured.items()}  # s3:// models: a verified local copy
    for role, folder in folders.items():
        if not Path(folder).is_dir():
            raise ConfigError(f"registry.{role}_model: {folder} is not a model folder")
        check = require_reward_model if role == "reward" else require_causal_lm
        check(folder, f"registry.{role}_model", cfg.trust_remote_code)
    hashes = {role: content_hash(folder) for role, folder in folders.items()}
    pipeline_run_id = pipeline_run_id or "local-" + hashlib.sha256("".join(hashes.values()).encode()).hexdigest()[:16]
    client = tracking.client()
    with (
        _registration_lock(),
        tracking.stage_run("register", flatten(cfg, "registry") | {"pipeline_run_id": pipeline_run_id}),
    ):
        # The champion as it stood before this run: what the decision page sets beside the policy.
        champion_note, champion_rows = _champion(cfg, folders["policy"], metrics, verdicts)
        existing = {role: _find_version(client, names[role], hashes[role]) for role in ROLES}
        new_roles = [role for role in ROLES if existing[role] is None]
        scores = {role: _score(role, metrics) for role in new_roles}
        tags = {
            role: _version_tags(role, hashes[role], pipeline_run_id, folders[role], scores[role], verdicts)
            for role in new_roles
        }
        logged = {}
        for role in new_roles:
            with _training_run(client, tags[role].get(f"{TAG}training_run_id")):
                logged[role] = _log_model(role, names[role], folders[role], tags[role], cfg)

        versions = {role: existing[role].version for role in ROLES if existing[role] is not None}
        upstream_roles = {"reward": ["sft"] if _reward_started_from_sft(folders) else [], "policy": ["sft", "reward"]}
        for role in ROLES:  # upstream first: the reward version names its SFT version, the policy both
            if role in logged:
                upstream = {f"{TAG}upstream.{up}": f"{names[up]}/{versions[up]}" for up in upstream_roles.get(role, [])}
                version = mlflow.register_model(logged[role].model_uri, names[role], tags=tags[role] | upstream).version
                first = _find_version(client, names[role], hashes[role])
                if first is not None and first.version != version:
                    # A concurrent `rlhf register` of the same model (on a tracking server, which no file lock
                    # reaches) created a version first: one version per content, so this one goes.
                    client.delete_model_version(names[role], version)
                    versions[role] = first.version
                    del logged[role]
                    continue
                versions[role] = version
                client.update_model_version(
                    names[role],
                    versions[role],
                    description=_model_card(client, role, tags[role] | upstream, verdicts, metrics),
                )

        results: dict[str, Any] = {}
        for role in ROLES:
            name, version = names[role], versions[role]
            outcome = (
                "already registered; unchanged"
                if role not in logged
                else _place(client, name, version, scores[role], gates_passed, verdicts)
            )
            results[role] = {"model": name, "version": int(version), "outcome": outcome}
            print(f"{name} v{version}: {outcome}")
        tracking.log_dict({"pipeline_run_id": pipeline_run_id, "versions": results}, "registered.json")
        registered_rows = [[entry["model"], str(entry["version"]), entry["outcome"]] for entry in results.values()]
        decision = Decision(
            verdicts=list(verdicts.values()),
            champion_note=champion_note,
            champion_rows=champion_rows,
            registered_rows=registered_rows,
        )
        _write_decision(cfg, decision)
    summary = {"pipeline_run_id": pipeline_run_id, "gates_passed": gates_passed, "versions": results}
    write_json(cfg.output, summary)
    return summary


def _registration_lock():
    """Registrations into one SQLite store take turns (a file lock beside it), so that concurrent ones find each
    other's versions instead of creating duplicates. A tracking server is shared by machines no lock reaches:
    there each new version is checked after its creation instead (`register`)."""
    database = tracking.sqlite_path(tracking.tracking_uri())
    return lock(database.resolve()) if database is not None else contextlib.nullcontext()


def _version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    _registered_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if _absent(exc):
            raise RegistryError(f"{name} v{version}: no such registered model version") from None
        raise


def promote(name: str, version: str, alias: str = CHAMPION, force: bool = False) -> str:
    """Points `alias` at a version; refuses a version whose gates failed unless forced."""
    client = tracking.client()
    target = _version(client, name, version)
    if target.tags.get(f"{TAG}gates") != "passed" and not force:
        failed = [
            key.removeprefix(f"{TAG}gate.")
            for key, value in target.tags.items()
            if key.startswith(f"{TAG}gate.") and value != "passed"
        ]
        raise RegistryError(
            f"{name} v{version}: its gates did not pass ({', '.join(failed) or 'no verdict'}); "
            "use --force to promote it anyway"
        )
    from mlflow.exceptions import MlflowException

    try:
        if alias == CHAMPION:
            _crown(client, name, target.version, _alias_version(client, name, CHAMPION))
        else:
            client.set_registered_model_alias(name, alias, target.version)
    except MlflowException as exc:  # a reserved or malformed alias name
        raise RegistryError(f"{name}: cannot set alias {alias!r}: {exc.message}") from None
    if force:
        client.set_model_version_tag(name, target.version, f"{TAG}forced_promotion", alias)
    return f"{name} v{target.version} is now {alias}"


def rollback(name: str) -> str:
    """champion <- previous. The rolled-back version is tagged; `previous` is cleared (one level of undo)."""
    client = tracking.client()
    _registered_model(client, name)
    previous = _alias_version(client, name, PREVIOUS)
    if previous is None:
        raise RegistryError(f"{name}: no 'previous' version to roll back to")
    champion = _alias_version(client, name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, previous.version)
    client.delete_registered_model_alias(name, PREVIOUS)
    if champion is not None:
        client.set_model_version_tag(name, champion.version, f"{TAG}rolled_back", "true")
    return f"{name}: champion is v{previous.version} again" + (f" (was v{champion.version})" if champion else "")


def _parse_uri(uri: str) -> tuple[str, str, bool]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (name, alias or version, is_alias)."""
    if not uri.startswith("models:/"):
        raise RegistryError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias, True
    name, _, version = rest.rpartition("/")
    if not name or not version.isdigit():
        raise RegistryError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, version, False


def lineage(uri: str) -> dict[str, Any]:
    """The version behind `uri`, what it was trained from, and (recursively) its upstream versions."""
    client = tracking.client()
    name, ref, is_alias = _parse_uri(uri)
    if is_alias:
        _registered_model(client, name)
    version = _alias_version(client, name, ref) if is_alias else _version(client, name, ref)
    if version is None:
        raise RegistryError(f"{uri}: {name} has no version with alias {ref!r}")
    tags = {key.removeprefix(TAG): value for key, value in version.tags.items() if key.startswith(TAG)}
    node: dict[str, Any] = {
        "model": name,
        "version": int(version.version),
        "aliases": sorted(version.aliases),
        "source": version.source,
        "run_id": version.run_id,
        **{
            key: tags.get(key)
            for key in (
                "role",
                "gates",
                "score_metric",
                "score",
                "training_run_id",
                "params_hash",
                "git_commit",
                "data_dvc_md5",
                "pipeline_run_id",
                "model_sha256",
            )
        },
        "gate_verdicts": {key.removeprefix("gate."): value for key, value in tags.items() if key.startswith("gate.")},
        "datasets": {key.removeprefix("data."): value for key, value in tags.items() if key.startswith("data.")},
        "upstream": {},
    }
    for key, value in sorted(tags.items()):
        if key.startswith("upstream."):
            up_name, _, up_version = value.rpartition("/")
            node["upstream"][key.removeprefix("upstream.")] = lineage(f"models:/{up_name}/{up_version}")
    return node


def format_lineage(node: dict[str, Any], indent: str = "") -> list[str]:
    aliases = f" [{', '.join(node['aliases'])}]" if node["aliases"] else ""
    score = f"{float(node['score']):.4g}" if node["score"] is not None else "none"
    verdicts = ", ".join(f"{gate} {verdict}" for gate, verdict in sorted(node["gate_verdicts"].items()))
    lines = [
        f"{indent}{node['model']} v{node['version']}{aliases}  {node['score_metric']} {score}  "
        f"gates {node['gates']} ({verdicts})"
    ]
    detail = indent + "    "
    lines.append(f"{detail}pipeline run {node['pipeline_run_id']}; trained in MLflow run {node['training_run_id']}")
    lines.append(
        f"{detail}params {node['params_hash']}, commit {(node['git_commit'] or '?')[:12]}, "
        f"data.dvc md5 {node['data_dvc_md5']}"
    )
    for dataset, fingerprint in node["datasets"].items():
        lines.append(f"{detail}dataset {dataset}: sha256 {fingerprint[:16]}")
    for role, upstream in node["upstream"].items():
        lines.append(f"{detail}{role}:")
        lines += format_lineage(upstream, detail + "  ")
    return lines
