"""Typed stage configs built from params.yaml plus `--set section.key=value` overrides.

Every section of params.yaml is validated before any stage starts, so a typo or an out-of-range value anywhere
fails fast with a message naming the key, not an hour into training.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlhf.steps import STEP_NAMES


class ConfigError(ValueError):
    """A params file or override that cannot be used; the message names the file and key."""


class Section(BaseModel):
    # Unknown keys are errors (a misspelt key must not silently fall back to its default).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _require_local(section: Section, *keys: str) -> None:
    """Metrics and verdict files are small local files that DVC and the gates read; s3:// is for data and models."""
    for key in keys:
        if str(getattr(section, key)).startswith("s3://"):
            raise ValueError(
                f"{key}: metrics, verdicts and registry records are local files (DVC reads them); "
                "s3:// is for datasets, models and reports"
            )


Dtype = Literal["auto", "bf16", "fp16", "fp32"]


class ModelLoading(Section):
    """How a stage loads the models it is given (TRL's ModelConfig keys)."""

    dtype: Dtype = Field(
        "fp32",
        description="weights' dtype on load: fp32 (train with `bf16: true` for mixed "
        "precision), bf16, fp16, or auto (as stored)",
    )
    trust_remote_code: bool = Field(
        False, description="run model code shipped with a Hub model (only for sources you trust)"
    )


class TrainingParams(ModelLoading):
    """Optimisation settings shared by every trainer-based stage."""

    seed: int = 42
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="-1: derived from epochs")
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(32, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(5e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(128, ge=8)
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(100, ge=1, description="checkpoint every N steps, for resume after an interruption")
    eval_steps: int | None = Field(
        None, ge=1, description="held-out loss (and accuracy) every N steps, and at the end; null: every save_steps"
    )
    gradient_checkpointing: bool = False
    bf16: bool = False


# The defects a faithful-task summary can carry (`rlhf.data.demo.faithful_summary`).
PairDefect = Literal[
    "flipped_tone", "wrong_adjective", "wrong_genre", "invented_aspect", "dropped_aspect", "swapped_aspect"
]


class DemoConfig(Section):
    """The demo task: generated movie reviews, their summaries and simulated preference pairs (`rlhf.data.demo`)."""

    task: Literal["sentiment", "faithful"] = Field(
        "sentiment",
        description="sentiment: VADER prefers the more positive summary; faithful: the rubric prefers the faithful one",
    )
    seed: int = 1234
    corpus_size: int = Field(6000, ge=10)
    sft_size: int = Field(3000, ge=10)
    preference_size: int = Field(3000, ge=10)
    rl_prompts: int = Field(512, ge=1)
    eval_prompts: int = Field(128, ge=1)
    preference_margin: float = Field(0.2, ge=0, le=2, description="sentiment task: min VADER gap for a pair to be kept")
    corpus_defect_share: float = Field(
        0.0, ge=0, le=1, description="faithful task: share of the corpus's summaries with one defect"
    )
    sft_defect_share: float = Field(
        0.5, ge=0, le=1, description="faithful task: share of the SFT summaries with one defect"
    )
    label_noise: float = Field(
        0.01,
        ge=0,
        lt=0.5,
        description="faithful task: share of preference labels flipped (annotators who disagree with the rubric)",
    )
    # Which defects the preference pairs teach, by weight. Spotting a wrong tone, genre or aspect means reading the
    # review beside the summary, and a reward model needs many pairs for it; an added or dropped aspect changes the
    # summary's length, and a few suffice. A swapped aspect the reward model cannot see is what PPO learns to write
    # (docs/benchmarks.md: swaps 24 -> 49 of 256 answers with a swap weight of 1, gold gain +0.010; with 3, +0.036).
    pair_defects: dict[PairDefect, float] = Field(
        default_factory=lambda: {
            "flipped_tone": 2.0,
            "wrong_adjective": 2.0,
            "wrong_genre": 2.0,
            "invented_aspect": 0.5,
            "dropped_aspect": 0.5,
            "swapped_aspect": 3.0,
        },
        description="faithful task: the weight of each defect kind among the preference pairs' rejected summaries",
    )

    @field_validator("pair_defects")
    @classmethod
    def _some_defect_weighs(cls, weights: dict[str, float]) -> dict[str, float]:
        if any(weight < 0 for weight in weights.values()):
            raise ValueError("weights are >= 0")
        if not any(weight > 0 for kind, weight in weights.items() if kind != "dropped_aspect"):
            raise ValueError("a kind other than dropped_aspect (which a one-aspect review cannot take) must weigh > 0")
        return weights


class TokenizerParams(Section):
    vocab_size: int = Field(1024, ge=300, le=200_000)
    min_frequency: int = Field(2, ge=1)


class ArchitectureParams(Section):
    """A GPT-2-style decoder, sized for CPU demos by default."""

    n_layer: int = Field(2, ge=1)
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(128, ge=8)
    n_positions: int = Field(256, ge=16)
    dropout: float = Field(0.0, ge=0, lt=1)
    # Tied input and output embeddings (GPT-2's default) can collapse the tokens a corpus makes interchangeable: in
    # a faithful-summary demo the aspect nouns reached cosine 0.95 and the model copied them at chance (0.08); untied,
    # it copied 0.50-0.82 of them.
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ArchitectureParams:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class PretrainConfig(TrainingParams):
    enabled: bool = Field(True, description="false: save base_model unchanged as the stage output")
    base_model: str | None = Field(None, description="hub id or path; none trains a tokenizer and model from scratch")
    corpus: str = "data/corpus.jsonl"
    output_dir: str = "models/pretrained"
    packing: bool = Field(
        True,
        description="true: the corpus is concatenated and cut into max_length blocks "
        "(TRL's wrapped packing, no padding); false: one document per sequence, whole",
    )
    tokenizer: TokenizerParams = TokenizerParams()
    architecture: ArchitectureParams = ArchitectureParams()

    @model_validator(mode="after")
    def _skip_needs_base(self) -> PretrainConfig:
        if not self.enabled and not self.base_model:
            raise ValueError("enabled=false needs base_model: there is nothing to skip to")
        if not self.base_model and self.max_length > self.architecture.n_positions:
            # A model built here has no position beyond n_positions (a base model's window is checked on loading).
            raise ValueError(
                f"max_length ({self.max_length}) exceeds architecture.n_positions ({self.architecture.n_positions})"
            )
        return self


class LoraParams(Section):
    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class SFTConfig(TrainingParams):
    model: str = "models/pretrained"
    dataset: str = "data/sft.jsonl"
    output_dir: str = "models/sft"
    lora: LoraParams = LoraParams()


class RewardConfig(TrainingParams):
    base_model: str = Field("models/sft", description="initial weights: the SFT model by default")
    dataset: str = "data/preferences.jsonl"
    output_dir: str = "models/reward"
    center_rewards_coefficient: float | None = Field(None, ge=0)
    lora: LoraParams = Field(
        LoraParams(),
        description="adapters on the backbone (the scoring head trains in full), merged into the saved model",
    )


class PPOConfig(ModelLoading):
    """PPO against the reward model with a KL penalty to the reference (the SFT model)."""

    policy_model: str = "models/sft"
    reward_model: str = "models/reward"
    value_model: Literal["reward", "policy_head"] = Field(
        "reward", description="critic initialised from the reward model, or a value head on the policy"
    )
    prompts: str = "data/prompts.jsonl"
    eval_prompts: str = "data/eval_prompts.jsonl"
    output_dir: str = "models/ppo"
    seed: int = 42
    # Schedule: each step samples `rollout_batch_size` prompts per process, then runs `ppo_epochs` passes over them.
    total_episodes: int = Field(2048, ge=1)
    rollout_batch_size: int = Field(64, ge=1)
    mini_batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    ppo_epochs: int = Field(2, ge=1)
    learning_rate: float = Field(1e-4, gt=0, le=1)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    # Sampling
    max_new_tokens: int = Field(24, ge=1)
    # null: the model's generation_config (plain sampling if it sets nothing)
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=0, description="0: off")
    top_p: float | None = Field(None, gt=0, le=1)
    missing_eos_penalty: float | None = Field(
        1.0, ge=0, description="subtracted from the score of a response without EOS"
    )
    # Objective
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_coef: float = Field(0.05, ge=0)
    target_kl: float | None = Field(None, gt=0, description="set: adapt kl_coef towards this KL (nats per response)")
    kl_horizon: int = Field(10000, ge=1)
    kl_budget: float = Field(6.0, gt=0, description="the KL (nats per response) the run must stay within")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    whiten_rewards: bool = False
    # Bookkeeping
    logging_steps: int = Field(1, ge=1)
    sample_steps: int = Field(10, ge=1, description="log a table of (query, response, score) every N steps")
    save_steps: int = Field(10, ge=1)
    eval_steps: int = Field(8, ge=1, description="answer the held-out prompts every N steps (RM and gold vs KL)")
    eval_batch_size: int = Field(64, ge=1)
    gold_annotator: str = Field(
        "vader", description="held-out gold scorer: vader, rubric (the demo's summary rubric), none or module:function"
    )
    lora: LoraParams = LoraParams()
    bf16: bool = False
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _batches_divide(self) -> PPOConfig:
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of mini_batch_size")
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError("mini_batch_size must be a multiple of gradient_accumulation_steps")
        return self


class EvaluateConfig(ModelLoading):
    """The policy against the SFT model on held-out prompts, sampled under the same seed, plus the reward model's
    pairwise accuracy on the preference pairs the reward stage held out."""

    policy_model: str = "models/ppo"
    sft_model: str = Field("models/sft", description="the baseline, and the reference for KL")
    reward_model: str = "models/reward"
    eval_prompts: str = "data/eval_prompts.jsonl"
    preferences: str = "data/preferences.jsonl"
    # Must repeat the reward stage's split (checked below), or the accuracy would include training pairs.
    preferences_eval_fraction: float = Field(0.1, gt=0, lt=1)
    preferences_seed: int = 42
    output_dir: str = Field("reports/evaluation", description="report.md, report.html, plots, samples")
    seed: int = 42
    max_new_tokens: int = Field(24, ge=1)
    # null: the model's generation_config (plain sampling if it sets nothing)
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    batch_size: int = Field(64, ge=1)
    gold_annotator: str = Field(
        "vader", description="vader, rubric (the demo's summary rubric), none or module:function"
    )
    dtype: Dtype = Field("auto", description="weights' dtype on load: auto (as stored), bf16, fp16 or fp32")
    sample_rows: int = Field(12, ge=0, description="rows of the report's sample table")
    best_of_n: int = Field(
        0,
        ge=0,
        description="n >= 2: also answer with the best of n SFT samples by the reward "
        "model, the baseline PPO should beat for its KL (Gao et al. 2022); 0: off",
    )

    @model_validator(mode="after")
    def _best_of_n_takes_two(self) -> EvaluateConfig:
        if self.best_of_n == 1:
            raise ValueError("best_of_n: 1 is the SFT model itself; use 0 (off) or n >= 2")
        return self


class GatesConfig(Section):
    """Thresholds between stages. null turns a check off; gold-score checks are skipped without a gold annotator.

    Proportions (the reward model's accuracy, win rates) are judged by the lower end of their Wilson interval at
    `confidence`, so a small evaluation set cannot pass a gate by luck; 0 judges the point estimates.
    """

    confidence: float = Field(0.95, ge=0, lt=1)
    min_rm_accuracy: float | None = Field(0.75, ge=0, le=1)
    min_win_rate_rm: float | None = Field(0.6, ge=0, le=1, description="PPO beats SFT by the reward model")
    min_win_rate_gold: float | None = Field(0.55, ge=0, le=1, description="PPO beats SFT by the gold annotator")
    min_rm_gain: float | None = Field(0.25, description="PPO minus SFT mean reward-model score, in SFT std")
    min_gold_gain: float | None = Field(0.05, description="PPO minus SFT mean gold score")
    max_kl: float | None = Field(6.0, gt=0, description="KL of PPO to SFT on the held-out prompts, nats/response")
    min_eos_rate: float | None = Field(0.9, ge=0, le=1)
    max_repetition: float | None = Field(0.2, ge=0, le=1, description="mean share of repeated bigrams per response")
    max_gold_drop: float | None = Field(
        0.05,
        ge=0,
        description="over-optimisation: how far PPO's held-out gold may fall from its peak while the "
        "reward model's score rises",
    )
    reward_metrics: str = "metrics/reward.json"
    reward_model: str = Field("models/reward", description="its rlhf_run.json names the MLflow run to tag")
    evaluation_metrics: str = "metrics/evaluate.json"
    evaluation_report: str = Field("reports/evaluation", description="its rlhf_run.json names the run to tag")
    output_dir: str = Field("gates", description="one verdict JSON per gate")

    @model_validator(mode="after")
    def _local_files(self) -> GatesConfig:
        _require_local(self, "reward_metrics", "evaluation_metrics", "output_dir")
        return self


class RegistryConfig(Section):
    """MLflow model registry: names, what to register, and how the registered models generate when served."""

    sft_name: str = "rlhf-sft"
    reward_name: str = "rlhf-reward"
    policy_name: str = "rlhf-policy"
    sft_model: str = "models/sft"
    reward_model: str = "models/reward"
    policy_model: str = "models/ppo"
    evaluation_metrics: str = "metrics/evaluate.json"
    gates_dir: str = "gates"
    output: str = Field("registry/registered.json", description="the versions and aliases this run produced")
    decision_dir: str = Field(
        "reports/decision",
        description="the decision page: verdicts, the champion beside the policy, what was registered",
    )
    prompt_template: str | None = Field(None, description="served models wrap inputs in it, e.g. 'Q: {prompt}\\nA:'")
    max_new_tokens: int = Field(24, ge=1)
    do_sample: bool = Field(False, description="served generation: greedy by default, so answers are repeatable")
    trust_remote_code: bool = False
    register_experiments: bool = Field(
        False,
        description="register under `dvc exp run` too (by default an "
        "experiment registers nothing: each would add versions)",
    )

    @model_validator(mode="after")
    def _template_has_slot(self) -> RegistryConfig:
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{prompt}'")
        _require_local(self, "evaluation_metrics", "gates_dir", "output")
        return self


class ResourceParams(Section):
    """Kubernetes resources of one component (limits). Unset: the cluster's defaults."""

    cpu: str | None = Field(None, description='e.g. "4" or "500m"')
    memory: str | None = Field(None, description='e.g. "16G"')
    accelerator_type: str | None = Field(None, description='e.g. "nvidia.com/gpu"')
    accelerator_count: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _count_needs_type(self) -> ResourceParams:
        if self.accelerator_count and not self.accelerator_type:
            raise ValueError("accelerator_count needs accelerator_type (e.g. nvidia.com/gpu)")
        return self


UNPUBLISHED_IMAGE = "rlhf-pipeline:latest"


class KubeflowConfig(Section):
    """How the pipeline runs on Kubeflow: image, resources per step, retries, caching, Kubernetes settings."""

    pipeline_name: str = "rlhf-pipeline"
    image: str = Field(
        UNPUBLISHED_IMAGE,
        description="the project's image (CPU variant), REGISTRY/NAME:TAG, for every step without an accelerator",
    )
    cuda_image: str | None = Field(
        None, description="the CUDA variant, for steps whose resources request an accelerator (required by them)"
    )
    mlflow_integration: bool = Field(
        False,
        description="the cluster's Kubeflow MLflow integration injects "
        "MLFLOW_RUN_ID, MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_ID into every task",
    )
    allow_local_tracking: bool = Field(
        False,
        description="compile or submit although tracking would go to a SQLite file inside each pod (lost with it)",
    )
    data_source: str = Field("demo", description="demo: generate the demo data; else a folder of dataset files")
    experiment: str = Field("rlhf", description="Kubeflow experiment that `rlhf pipeline submit` files runs under")
    retries: int = Field(2, ge=0, description="retries of a failed step (transient failures: preemption, network)")
    caching: bool = True
    secret: str | None = Field(None, description="a Kubernetes secret exposed to every step as environment variables")
    secret_env: list[str] = Field(
        default_factory=lambda: [
            "MLFLOW_TRACKING_URI",
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_S3_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_ENDPOINT_URL",
            "AWS_DEFAULT_REGION",
            "HF_TOKEN",
        ],
        description="keys of the secret, each set as the environment variable of the same name (missing keys: unset)",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="plain environment variables of every step, e.g. "
        "RLHF_CHECKPOINT_DIR: s3://bucket/checkpoints (non-secret settings)",
    )
    pipeline_root: str | None = Field(
        None,
        description="where the cluster keeps the steps' artifacts, e.g. "
        "s3://bucket/pipeline-root (default: the cluster's own)",
    )
    model_cache_pvc: str | None = Field(None, description="a PVC mounted as the Hugging Face cache (HF_HOME)")
    model_cache_path: str = "/home/rlhf/.cache/huggingface"
    node_selector: dict[str, str] = Field(default_factory=dict)
    resources: dict[str, ResourceParams] = Field(default_factory=dict, description="per step, or 'default'")

    @model_validator(mode="after")
    def _known_steps(self) -> KubeflowConfig:
        unknown = set(self.resources) - {*STEP_NAMES, "default"}
        if unknown:
            raise ValueError(f"resources: unknown step(s) {sorted(unknown)}; steps are {', '.join(STEP_NAMES)}")
        gpu_steps = [step for step in self.resources if self.resources[step].accelerator_type]
        if gpu_steps and not self.cuda_image:
            raise ValueError(
                f"resources.{gpu_steps[0]} requests {self.resources[gpu_steps[0]].accelerator_type} but "
                "cuda_image is not set: the default image is the CPU build; build the CUDA variant "
                "(rlhf image build --variant cuda --tag REGISTRY/rlhf-pipeline:TAG-cuda --push) and "
                "set kubeflow.cuda_image"
            )
        return self

    def step_image(self, step: str) -> str:
        """The CUDA image for a step that requests an accelerator, else the CPU one."""
        resources = self.resources.get(step) or self.resources.get("default")
        return self.cuda_image if resources is not None and resources.accelerator_type else self.image

    def tracking_problem(self) -> str | None:
        """Why the steps would track to a SQLite file inside their pods, or None when a server is configured."""
        if self.mlflow_integration or self.allow_local_tracking:
            return None
        uri = self.env.get("MLFLOW_TRACKING_URI")
        if uri:
            in_the_pod = uri.startswith(("sqlite:", "file:")) or "://" not in uri
            return f"env.MLFLOW_TRACKING_URI is {uri}, a file inside each pod" if in_the_pod else None
        if self.secret and "MLFLOW_TRACKING_URI" in self.secret_env:
            return None
        return "no tracking server is set, so every step would track to a SQLite file inside its own pod"


class Params(Section):
    """All of params.yaml: one section per stage, plus the gates and the registry."""

    demo: DemoConfig = DemoConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sft: SFTConfig = SFTConfig()
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gates: GatesConfig = GatesConfig()
    registry: RegistryConfig = RegistryConfig()
    kubeflow: KubeflowConfig = KubeflowConfig()

    @model_validator(mode="after")
    def _evaluation_pairs_are_held_out(self) -> Params:
        same_split = (self.evaluate.preferences_eval_fraction, self.evaluate.preferences_seed) == (
            self.reward.eval_fraction,
            self.reward.seed,
        )
        same_file = Path(self.evaluate.preferences).resolve() == Path(self.reward.dataset).resolve()
        if same_file and not same_split:
            raise ValueError(
                "evaluate.preferences_eval_fraction and preferences_seed must equal reward.eval_fraction "
                "and reward.seed, or the accuracy would count pairs the reward model trained on"
            )
        return self


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if child is None:  # a section with every key commented out reads as None
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    # YAML parsing gives `--set sft.epochs=2` an int and `--set pretrain.base_model=null` a None.
    node[leaf] = yaml.safe_load(value) if value.strip() else ""


def _describe(error: ValidationError, source: str) -> str:
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif "input" in item and not isinstance(item["input"], dict):
            message += f" (got {item['input']!r})"
        problems.append(f"{key}: {message}")
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{source}: {problems[0]}{more}"


DEFAULTS_HINT = "pass --params FILE, or --defaults for the built-in defaults"


def load_params(
    path: str | Path | None = "params.yaml",
    overrides: list[str] | tuple[str, ...] = (),
    *,
    sections: tuple[str, ...] = (),
    defaults: bool = False,
) -> Params:
    """Reads a params file, applies overrides and validates everything.

    A missing or empty file, or one without a section named in `sections` (what the command reads), is an error:
    the built-in defaults differ from the shipped params.yaml, and running on them by accident wastes a run. With
    `defaults` the built-in defaults fill in whatever the file lacks; `path=None` means the built-in defaults.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None and Path(path).is_file():
        source = str(path)
        try:
            # utf-8-sig: a byte-order mark (Windows editors write one) is read past, not taken for content.
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{path}: not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
            ) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        if not loaded and not defaults:
            raise ConfigError(f"{path}: empty; {DEFAULTS_HINT}")
        raw = {key: {} if value is None else value for key, value in copy.deepcopy(loaded or {}).items()}
        missing = [section for section in sections if section not in raw]
        if missing and not defaults:
            raise ConfigError(
                f"{path}: no {', '.join(missing)} section{'s' if len(missing) > 1 else ''}; "
                f"add {'them' if len(missing) > 1 else 'it'}, or pass --defaults for the built-in ones"
            )
    elif path is not None and not defaults:
        where = "" if Path(path).is_absolute() else f" in {Path.cwd()}"
        raise ConfigError(f"{path}: params file not found{where}; {DEFAULTS_HINT}")
    for assignment in overrides:
        _apply_override(raw, assignment)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source + (" with --set overrides" if overrides else ""))) from None


def flatten(section: BaseModel, prefix: str) -> dict[str, Any]:
    """`{"sft.lora.r": 8, ...}`: the form MLflow params and run tags take."""
    flat: dict[str, Any] = {}
    for key, value in section.model_dump().items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                flat[f"{name}.{sub_key}"] = sub_value
        else:
            flat[name] = value
    return flat


def config_hash(section: BaseModel) -> str:
    """A short stable hash of a section, naming checkpoint folders so a changed config never resumes an old run."""
    canonical = json.dumps(section.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


# kfp cannot carry null inside a struct parameter (its compiler rejects None), yet null is meaningful here (a gate
# check turned off). Sections travel to Kubeflow components with null spelled as this marker, and back.
KFP_NULL = "<null>"


def to_kfp(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: to_kfp(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_kfp(item) for item in value]
    return KFP_NULL if value is None else value


def from_kfp(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: from_kfp(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_kfp(item) for item in value]
    return None if value == KFP_NULL else value
