"""Gates between stages: thresholds from params.yaml checked against a stage's metrics.

The reward gate (after the reward stage) checks the reward model's held-out pairwise accuracy; PPO never starts on a
failing reward model. The evaluation gate (after `rlhf evaluate`) checks PPO's win rates and gains over SFT, its KL
to the reference, its EOS rate and its repetition. Each gate writes a JSON verdict (every check with its value and
threshold) and tags the MLflow run it judged. The CLI exits non-zero on a failed gate, so DVC stops; Kubeflow branches
on the returned verdict instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhf import tracking
from rlhf.config import ConfigError, GatesConfig
from rlhf.measures import wilson_interval
from rlhf.steps import GATES
from rlhf.storage import write_json

# Absent without a gold annotator (or, for over-optimisation, without PPO's held-out curve): those checks are skipped.
_GOLD_METRICS = ("win_rate/gold", "gold_gain", "gold_drop_while_rm_rose")
GateName = Literal["reward", "evaluation"]


@dataclass(frozen=True)
class Check:
    threshold: str  # the GatesConfig key of its threshold (null: the check is off)
    metric: str  # the metrics file's key it judges
    op: Literal[">=", "<="]
    sample_size: str | None = None  # a proportion's sample-size key: judged on its confidence interval's lower end


@dataclass(frozen=True)
class GateSpec:
    """One gate, as the CLI, DVC and Kubeflow run it: the GatesConfig keys of the metrics file it judges and of the
    folder of the run it judges (whose MLflow run it tags), and its checks."""

    metrics: str
    judged: str
    checks: tuple[Check, ...]


SPECS: dict[str, GateSpec] = {
    "reward": GateSpec(
        "reward_metrics", "reward_model", (Check("min_rm_accuracy", "eval_accuracy", ">=", "eval_pairs"),)
    ),
    "evaluation": GateSpec(
        "evaluation_metrics",
        "evaluation_report",
        (
            Check("min_win_rate_rm", "win_rate/rm", ">=", "prompts"),
            Check("min_win_rate_gold", "win_rate/gold", ">=", "prompts"),
            Check("min_rm_gain", "rm_gain_in_sft_std", ">="),
            Check("min_gold_gain", "gold_gain", ">="),
            Check("max_kl", "policy/kl", "<="),
            Check("min_eos_rate", "policy/eos_rate", ">="),
            Check("max_repetition", "policy/repetition", "<="),
            Check("max_gold_drop", "gold_drop_while_rm_rose", "<="),
        ),
    ),
}


def wilson_lower_bound(proportion: float, n: float, confidence: float) -> float:
    """Lower end of the Wilson score interval: what a gate trusts of a proportion measured on n samples."""
    return wilson_interval(proportion, n, confidence)[0]


def _read_metrics(path: str, key: str) -> dict[str, float]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"gates.{key}: {path} not found (run the stage it comes from first)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"gates.{key}: {path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def _check(cfg: GatesConfig, spec: Check, metrics: dict[str, float], metrics_key: str) -> dict[str, Any]:
    metrics_file = getattr(cfg, metrics_key)
    threshold, metric, size_key = getattr(cfg, spec.threshold), spec.metric, spec.sample_size
    check: dict[str, Any] = {"check": spec.threshold, "metric": metric, "threshold": threshold, "op": spec.op}
    if threshold is None:
        return check | {"status": "skipped", "reason": "threshold is null"}
    if metric not in metrics and metric in _GOLD_METRICS:
        reason = "no held-out curve with gold" if metric == "gold_drop_while_rm_rose" else "no gold annotator"
        return check | {"status": "skipped", "reason": f"{metric} not measured ({reason})"}
    for key in (metric, size_key):
        if key and key not in metrics:
            raise ConfigError(f"gates.{metrics_key}: {metrics_file} has no {key!r}; a gate cannot judge without it")
    measured = metrics[metric]
    value = measured
    if size_key and cfg.confidence > 0:
        # A proportion counts by the lower end of its confidence interval: 1.0 on 20 samples is not 1.0 on 2000.
        value = wilson_lower_bound(measured, metrics.get(size_key, 0.0), cfg.confidence)
        check["measured"] = measured
        check["judged_on"] = (
            f"lower bound of the {cfg.confidence:.0%} Wilson interval, n={metrics.get(size_key, 0):.0f}"
        )
    passed = value >= threshold if spec.op == ">=" else value <= threshold
    return check | {"value": value, "status": "pass" if passed else "fail"}


def judge(name: GateName, cfg: GatesConfig, metrics: dict[str, float]) -> dict[str, Any]:
    """One gate's verdict on `metrics`: every check with its value and threshold."""
    spec = SPECS[name]
    checks = [_check(cfg, check, metrics, spec.metrics) for check in spec.checks]
    failed = [check["check"] for check in checks if check["status"] == "fail"]
    return {"gate": name, "passed": not failed, "failed_checks": failed, "checks": checks}


def evaluate_gate(name: GateName, cfg: GatesConfig) -> dict[str, Any]:
    """Checks one gate, writes `<output_dir>/<name>.json`, tags the judged MLflow run; returns the verdict."""
    spec = SPECS[name]
    metrics = _read_metrics(getattr(cfg, spec.metrics), spec.metrics)
    judged_run = tracking.read_provenance(getattr(cfg, spec.judged)).get("mlflow_run_id")
    verdict = judge(name, cfg, metrics) | {"judged_run": judged_run}
    write_json(Path(cfg.output_dir) / f"{name}.json", verdict)
    tracking.set_run_tags(
        judged_run,
        {
            f"rlhf.gate.{name}": "passed" if verdict["passed"] else "failed",
            f"rlhf.gate.{name}.failed_checks": ",".join(verdict["failed_checks"]),
        },
    )
    return verdict


def describe(verdict: dict[str, Any]) -> list[str]:
    """One line per check, for the console."""
    lines = []
    for check in verdict["checks"]:
        if check["status"] == "skipped":
            lines.append(f"  skip  {check['check']}: {check['reason']}")
        else:
            note = f" ({check['judged_on']}; measured {check['measured']:.4g})" if "judged_on" in check else ""
            lines.append(
                f"  {check['status']}  {check['check']}: {check['metric']} = {check['value']:.4g} "
                f"{check['op']} {check['threshold']}{note}"
            )
    return lines


def failure_message(verdict: dict[str, Any]) -> str:
    failed = [check for check in verdict["checks"] if check["status"] == "fail"]
    details = "; ".join(
        f"{c['check']} ({c['metric']} {c['value']:.4g}, needs {c['op']} {c['threshold']})" for c in failed
    )
    return f"gate {verdict['gate']!r} failed: {details}; nothing downstream runs"


def read_verdicts(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Every gate's verdict from `folder`; a gate that has not run counts as failed."""
    verdicts = {}
    for name in GATES:
        path = Path(folder) / f"{name}.json"
        verdicts[name] = (
            json.loads(path.read_text())
            if path.is_file()
            else {"gate": name, "passed": False, "failed_checks": ["not run"], "checks": []}
        )
    return verdicts
