"""The training stages called in-process (`rlhf.stages.<stage>.run(cfg)`), on tiny models and data.

The session fixtures in conftest.py train one pretrain -> SFT -> reward chain that several tests inspect; tests
that need another configuration train in their own `workdir`, starting from the session models.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from stage_helpers import Trained, state_dict

from rlhf.config import load_params
from rlhf.s3 import StorageError
from rlhf.tracking import read_provenance

pytestmark = pytest.mark.slow


def leftovers(folder: Path) -> list[str]:
    """Staging or retired folders/files `rlhf.storage` leaves behind if an atomic write is not cleaned up."""
    if not folder.exists():
        return []
    return sorted(str(p) for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


def changed_and_unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> tuple[set, set]:
    assert before.keys() == after.keys()
    unchanged = {name for name in before if torch.equal(before[name], after[name])}
    return set(before) - unchanged, unchanged


def trainable_names(path: Path, kind: str = "causal") -> set[str]:
    """Parameter names (not buffers; tied weights once) of a saved model."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    loader = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    return {name for name, _ in loader.from_pretrained(str(path)).named_parameters()}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------- pretrain


def test_pretrain_from_scratch(pretrained: Trained, stage_params: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(pretrained.output))
    model = AutoModelForCausalLM.from_pretrained(str(pretrained.output))

    # The tokenizer can pad and stop, with distinct tokens (were pad == eos, padding and stopping would be
    # indistinguishable, and the reward model, which scores the last non-pad token, would skip a final EOS).
    assert tokenizer.eos_token is not None and tokenizer.pad_token is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.chat_template, "conversational SFT needs a chat template saved with the tokenizer"
    assert 256 < len(tokenizer) <= stage_params["pretrain"]["tokenizer"]["vocab_size"]

    arch = stage_params["pretrain"]["architecture"]
    config = model.config
    assert (config.n_layer, config.n_head, config.n_embd, config.n_positions) == (
        arch["n_layer"],
        arch["n_head"],
        arch["n_embd"],
        arch["n_positions"],
    )
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id

    metrics = pretrained.result.metrics
    for key in ("train_loss", "eval_loss", "eval_perplexity"):
        assert math.isfinite(metrics[key]), key
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    # It learned something: better than a uniform guess over the vocabulary, and the training loss went down.
    assert metrics["eval_loss"] < math.log(len(tokenizer))
    losses = [row["loss"] for row in pretrained.result.history if "loss" in row]
    assert len(losses) >= 3 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
    assert any("eval_loss" in row for row in pretrained.result.history)
    assert metrics["parameters"] == sum(p.numel() for p in model.parameters())

    # A finished stage removes its checkpoints and leaves no staging folders.
    project = pretrained.output.parents[1]
    assert not list((project / "checkpoints").glob("pretrain-*"))
    assert leftovers(project / "models") == []


def test_continued_pretraining_from_base_model(workdir: Path, pretrained: Trained) -> None:
    from transformers import AutoTokenizer

    from rlhf.stages import pretrain

    cfg = load_params(
        overrides=[
            f"pretrain.base_model={pretrained.output}",
            "pretrain.output_dir=models/continued",
            "pretrain.max_steps=4",
        ]
    ).pretrain
    result = pretrain.run(cfg)

    output = workdir / "models" / "continued"
    assert result.output_dir == "models/continued"
    # The base tokenizer is reused, not retrained on this corpus.
    assert (
        AutoTokenizer.from_pretrained(str(output)).get_vocab()
        == AutoTokenizer.from_pretrained(str(pretrained.output)).get_vocab()
    )
    _, unchanged = changed_and_unchanged(state_dict(pretrained.output), state_dict(output))
    trainable = trainable_names(output)
    assert trainable & unchanged == set(), f"not trained further: {sorted(trainable & unchanged)}"
    assert math.isfinite(result.metrics["eval_loss"])
    assert max(row["step"] for row in result.history) == 4


def test_pretrain_with_untied_embeddings_trains_and_keeps_both_matrices(workdir: Path) -> None:
    """`architecture.tie_word_embeddings: false`: the output projection is a matrix of its own, saved and loaded
    apart from the input embeddings (tied, they are one tensor)."""
    from transformers import AutoModelForCausalLM

    from rlhf.stages import pretrain

    cfg = load_params(
        overrides=[
            "pretrain.architecture.tie_word_embeddings=false",
            "pretrain.max_steps=3",
            "pretrain.output_dir=models/untied",
        ]
    ).pretrain
    pretrain.run(cfg)
    model = AutoModelForCausalLM.from_pretrained(str(workdir / "models" / "untied"))
    assert model.config.tie_word_embeddings is False
    embeddings, projection = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embeddings.data_ptr() != projection.data_ptr() and not torch.equal(embeddings, projection)


def test_pretrain_without_packing_trains_on_whole_documents(workdir: Path, pretrained: Trained) -> None:
    """`packing: false`: one document per sequence, so an epoch takes a step per batch of documents; packed, the
    corpus is cut into fewer max_length blocks that split documents."""
    from rlhf.data.formats import load_dataset, split
    from rlhf.stages import pretrain

    cfg = load_params(overrides=["pretrain.packing=false", "pretrain.output_dir=models/unpacked"]).pretrain
    result = pretrain.run(cfg)
    documents = len(split(load_dataset(cfg.corpus, "text")[0], cfg.eval_fraction, cfg.seed, cfg.corpus)[0])
    steps = max(row["step"] for row in result.history)
    assert steps == math.ceil(documents / cfg.batch_size)
    assert steps > max(row["step"] for row in pretrained.result.history)  # packed: fewer, longer rows
    assert math.isfinite(result.metrics["eval_loss"])


def test_pretrain_disabled_saves_base_unchanged(workdir: Path, pretrained: Trained) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.stages import pretrain

    cfg = load_params(overrides=["pretrain.enabled=false", f"pretrain.base_model={pretrained.output}"]).pretrain
    result = pretrain.run(cfg)

    output = workdir / "models" / "pretrained"
    before, after = state_dict(pretrained.output), state_dict(output)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(output)).parameters())
    assert result.metrics == {"skipped": 1.0, "parameters": float(parameters)}
    assert (
        AutoTokenizer.from_pretrained(str(output)).get_vocab()
        == AutoTokenizer.from_pretrained(str(pretrained.output)).get_vocab()
    )
    assert not (workdir / "checkpoints").exists() or not list((workdir / "checkpoints").iterdir())


# --------------------------------------------------------------------------------------------------- SFT


def test_sft_updates_every_parameter(pretrained: Trained, sft_trained: Trained) -> None:
    # TRL's trainer tests check that every trainable parameter moved. Nothing is exempt here: GPT-2 has no frozen
    # parameters, lm_head is tied to wte (one parameter), and the attention mask is a buffer, not a parameter. (Rows
    # of wpe past max_length and the pad row of wte get no gradient, but each tensor as a whole must change.)
    changed, _ = changed_and_unchanged(state_dict(pretrained.output), state_dict(sft_trained.output))
    trainable = trainable_names(sft_trained.output)
    assert trainable <= changed, f"SFT did not update: {sorted(trainable - changed)}"
    metrics = sft_trained.result.metrics
    assert all(math.isfinite(metrics[key]) for key in ("train_loss", "eval_loss", "eval_perplexity"))
    assert 0 <= metrics["eval_mean_token_accuracy"] <= 1
    assert [row for row in sft_trained.result.history if "loss" in row]
    project = sft_trained.output.parents[1]
    assert not list((project / "checkpoints").glob("sft-*"))


def test_sft_loss_covers_completion_tokens_only(sft_trained: Trained, session_project: Path) -> None:
    from rlhf.data.formats import load_dataset, split

    trainer = sft_trained.extra["trainer"]
    tokenizer = trainer.processing_class
    eos = tokenizer.eos_token
    cfg = load_params(session_project / "params.yaml").sft
    train, _ = split(
        load_dataset(str(session_project / cfg.dataset), "sft")[0], cfg.eval_fraction, cfg.seed, cfg.dataset
    )

    for dataset in (trainer.train_dataset, trainer.eval_dataset):
        assert "labels" in dataset.column_names
        for example in dataset:
            ids, labels = example["input_ids"], example["labels"]
            prompt_ids = tokenizer(example["prompt"])["input_ids"]
            n = len(prompt_ids)
            assert ids[:n] == prompt_ids, "the prompt is not the start of the training sequence"
            assert labels[:n] == [-100] * n, "prompt tokens contribute to the loss"
            assert labels[n:] == ids[n:], "completion tokens are masked"
            assert tokenizer.decode(ids[n:]) == example["completion"]
            assert example["completion"].endswith(eos)
    # Nothing was silently dropped (e.g. by truncation to max_length leaving only prompt tokens).
    assert len(trainer.train_dataset) == len(train)

    # The collator keeps those labels and masks padding too.
    examples = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(examples)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        assert batch["labels"][row, :length].tolist() == example["labels"]
        assert (batch["labels"][row, length:] == -100).all()
        assert (batch["attention_mask"][row, length:] == 0).all()


def test_sft_examples_end_with_eos(sft_trained: Trained) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    trainer = sft_trained.extra["trainer"]
    eos_id = trainer.processing_class.eos_token_id
    for example in trainer.train_dataset:
        assert example["input_ids"][-1] == eos_id
        assert example["labels"][-1] == eos_id, "the EOS token must be learned, not masked"
    # The saved policy stops on that same token when generating.
    tokenizer = AutoTokenizer.from_pretrained(str(sft_trained.output))
    assert tokenizer.eos_token_id == eos_id
    generation = GenerationConfig.from_pretrained(str(sft_trained.output))
    stops = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert eos_id in stops


def test_sft_with_lora_saves_merged_plain_model(workdir: Path, pretrained: Trained) -> None:
    from transformers import AutoModelForCausalLM

    from rlhf.stages import sft

    cfg = load_params(overrides=[f"sft.model={pretrained.output}", "sft.lora.enabled=true", "sft.max_steps=4"]).sft
    sft.run(cfg)

    output = workdir / "models" / "sft"
    assert not (output / "adapter_config.json").exists()
    assert not list(output.glob("adapter_model*"))
    AutoModelForCausalLM.from_pretrained(str(output))  # a plain model, no PEFT needed
    before, after = state_dict(pretrained.output), state_dict(output)
    assert before.keys() == after.keys(), "merged model must have the base model's parameter names (no lora_*)"
    changed, _ = changed_and_unchanged(before, after)
    # all-linear LoRA on GPT-2 adapts the Conv1D projections (c_attn, c_proj, c_fc) but not lm_head; the merged
    # weights of those differ from the base, and everything LoRA does not touch (embeddings, norms, biases) does not.
    adapted = {name for name in before if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))}
    assert adapted and adapted <= changed, f"LoRA not merged into: {sorted(adapted - changed)}"
    assert changed <= adapted, f"frozen base weights changed: {sorted(changed - adapted)}"


def test_conversational_sft_and_reward(workdir: Path, pretrained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    import trl
    from transformers import AutoModelForSequenceClassification

    from rlhf.stages import reward, sft

    chats = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"].strip()},
            ]
        }
        for r in read_jsonl(workdir / "data" / "sft.jsonl")
    ]
    (workdir / "data" / "chat_sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    pairs = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
            "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
        }
        for r in read_jsonl(workdir / "data" / "preferences.jsonl")
    ]
    (workdir / "data" / "chat_preferences.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))

    trainers: list[Any] = []

    class Recording(trl.SFTTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(trl, "SFTTrainer", Recording)
    params = load_params(
        overrides=[
            f"sft.model={pretrained.output}",
            "sft.dataset=data/chat_sft.jsonl",
            "sft.output_dir=models/chat-sft",
            "sft.max_steps=3",
            "reward.base_model=models/chat-sft",
            "reward.dataset=data/chat_preferences.jsonl",
            "reward.max_steps=3",
        ]
    )
    sft_result = sft.run(params.sft)
    assert math.isfinite(sft_result.metrics["eval_loss"])

    # Loss on assistant turns only: the unmasked tokens are exactly the assistant's reply and its EOS.
    trainer = trainers[0]
    tokenizer = trainer.processing_class
    for example in trainer.train_dataset.select(range(8)):
        learned = [token for token, label in zip(example["input_ids"], example["labels"]) if label != -100]
        assert learned[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(learned).strip() == example["messages"][-1]["content"] + tokenizer.eos_token
        assert "Human:" not in tokenizer.decode(learned)

    reward_result = reward.run(params.reward)
    assert all(math.isfinite(reward_result.metrics[key]) for key in ("train_loss", "eval_loss", "eval_accuracy"))
    model = AutoModelForSequenceClassification.from_pretrained(str(workdir / "models" / "reward"))
    assert model.config.num_labels == 1


def test_sft_same_seed_same_weights(workdir: Path, pretrained: Trained, sft_trained: Trained) -> None:
    from rlhf.stages import sft

    # The session SFT ran in another folder; same seed, data and base model here must give bit-identical weights.
    result = sft.run(load_params(overrides=[f"sft.model={pretrained.output}"]).sft)
    first, second = state_dict(sft_trained.output), state_dict(workdir / "models" / "sft")
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert different == []
    assert result.metrics["eval_loss"] == sft_trained.result.metrics["eval_loss"]
    assert result.history == sft_trained.result.history


# --------------------------------------------------------------------------------------------------- reward


def test_reward_model_updates_every_parameter(sft_trained: Trained, reward_trained: Trained) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(reward_trained.output))
    tokenizer = AutoTokenizer.from_pretrained(str(reward_trained.output))
    assert model.config.num_labels == 1
    assert tuple(model.score.weight.shape) == (1, model.config.n_embd)
    # Sequence classifiers score the last non-pad token: they must know the pad id.
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None

    initial = reward_trained.extra["initial"]
    # The backbone started from the SFT model (and only the score head is new).
    sft_weights = state_dict(sft_trained.output)
    backbone = {name for name in initial if name.startswith("transformer.")}
    assert backbone and all(torch.equal(initial[name], sft_weights[name]) for name in backbone)
    assert set(initial) - backbone == {"score.weight"}
    # Its provenance names the run of the model it started from (the registry's lineage follows it).
    started_from = read_provenance(reward_trained.output)["base_run_id"]
    assert started_from is not None and started_from == read_provenance(sft_trained.output)["mlflow_run_id"]

    changed, _ = changed_and_unchanged(initial, state_dict(reward_trained.output, "reward"))
    # As for SFT every parameter, the new score head included, must have moved, with one exception: the final layer
    # norm's bias b adds the same w.b to every reward (w: the score head), which cancels in the Bradley-Terry loss
    # -log sigmoid(r_chosen - r_rejected), so its gradient is exactly zero (no center_rewards_coefficient here).
    cannot_change = {"transformer.ln_f.bias"}
    trainable = trainable_names(reward_trained.output, "reward") - cannot_change
    assert trainable <= changed, f"reward training did not update: {sorted(trainable - changed)}"

    metrics = reward_trained.result.metrics
    assert all(math.isfinite(metrics[key]) for key in ("train_loss", "eval_loss", "eval_accuracy", "eval_margin"))
    assert 0 <= metrics["eval_accuracy"] <= 1


def test_reward_model_with_lora_saves_merged_adapters_and_a_trained_head(workdir: Path, sft_trained: Trained) -> None:
    """LoRA on the backbone, the scoring head in full; the saved (merged) model scores the held-out pairs exactly as
    the trainer evaluated them, so the stages that load it (PPO, evaluation, gates) judge the model that trained."""
    from transformers import AutoModelForSequenceClassification

    from rlhf.data.formats import load_dataset, split
    from rlhf.evaluation import pairwise_accuracy
    from rlhf.modeling import load_tokenizer
    from rlhf.stages import reward

    cfg = load_params(
        overrides=[
            f"reward.base_model={sft_trained.output}",
            "reward.lora.enabled=true",
            "reward.lora.r=4",
            "reward.learning_rate=0.01",
        ]
    ).reward
    result = reward.run(cfg)

    output = workdir / "models" / "reward"
    saved = AutoModelForSequenceClassification.from_pretrained(str(output)).eval()
    assert not any("lora_" in name or "modules_to_save" in name for name, _ in saved.named_parameters())
    sft = state_dict(sft_trained.output)
    changed = [
        name for name, tensor in saved.state_dict().items() if name in sft and not torch.equal(tensor, sft[name])
    ]
    assert changed and all(name.endswith(".weight") for name in changed)  # adapters merged into the linear layers
    assert saved.score.weight.abs().sum() > 0

    tokenizer = load_tokenizer(str(output))
    tokenizer.padding_side = "right"
    pairs = split(load_dataset(cfg.dataset, "preference")[0], cfg.eval_fraction, cfg.seed, cfg.dataset)[1]
    assert result.metrics["eval_pairs"] == len(pairs)  # none longer than max_length here
    with torch.no_grad():
        accuracy = pairwise_accuracy(saved, tokenizer, pairs, 16, "cpu")
    assert accuracy == pytest.approx(result.metrics["eval_accuracy"])


# --------------------------------------------------------------------------------------------------- failures


def _failed_stage_runs(workdir: Path) -> list[str]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlhf")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return [run.info.status for run in runs]


def test_reward_with_invalid_record_writes_nothing(workdir: Path, sft_trained: Trained) -> None:
    from rlhf.data.io import DataError
    from rlhf.stages import reward

    path = workdir / "data" / "preferences.jsonl"
    lines = path.read_text().splitlines()
    record = json.loads(lines[4])
    record["rejected"] = record["chosen"]
    lines[4] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError, match=r"preferences\.jsonl:5: 'chosen' is identical to 'rejected'"):
        reward.run(load_params(overrides=[f"reward.base_model={sft_trained.output}"]).reward)
    assert not (workdir / "models").exists() or not list((workdir / "models").iterdir())


def test_stage_failing_in_training_leaves_no_output(
    workdir: Path, pretrained: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rlhf.stages.sft as sft_stage

    def crash(trainer: Any, checkpoints: Path) -> dict[str, float]:
        raise RuntimeError("simulated crash during training")

    monkeypatch.setattr(sft_stage, "train_resuming", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sft_stage.run(load_params(overrides=[f"sft.model={pretrained.output}"]).sft)
    assert not (workdir / "models" / "sft").exists()
    assert leftovers(workdir) == []
    assert _failed_stage_runs(workdir) == ["FAILED"]


def test_stage_failing_while_saving_keeps_previous_output(
    workdir: Path, pretrained: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import PreTrainedModel

    from rlhf.stages import sft

    # A previous, complete output that a failed rerun must leave as it was.
    previous = workdir / "models" / "sft"
    shutil.copytree(pretrained.output, previous)
    before = sorted((p.name, p.read_bytes()) for p in previous.iterdir())

    original = PreTrainedModel.save_pretrained

    def save_then_fail(self: Any, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        original(self, save_directory, *args, **kwargs)
        if ".sft.tmp-" in str(save_directory):  # the stage output, not the trainer's own checkpoints
            # What a full disk raises from safetensors: no path in it.
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_fail)
    # One line naming the output, and that it is as it was.
    with pytest.raises(
        StorageError,
        match=r"^models/sft: not written \(No space left on device\); the previous "
        r"contents are unchanged$",
    ):
        sft.run(load_params(overrides=[f"sft.model={pretrained.output}", "sft.max_steps=1"]).sft)

    assert sorted((p.name, p.read_bytes()) for p in previous.iterdir()) == before
    assert leftovers(workdir) == []


def test_a_stage_failing_before_its_first_checkpoint_leaves_no_checkpoints_folder(
    workdir: Path, pretrained: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed stage leaves no empty `checkpoints/<stage>-…` folder behind."""
    from transformers import Trainer

    from rlhf.stages import sft

    def fails(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated failure in the first step")

    monkeypatch.setattr(Trainer, "training_step", fails)
    with pytest.raises(RuntimeError, match="simulated"):
        sft.run(load_params(overrides=[f"sft.model={pretrained.output}"]).sft)
    assert not list(workdir.glob("checkpoints/sft-*"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward"])
def test_a_resumed_stage_writes_the_metrics_of_an_uninterrupted_one(
    stage: str, workdir: Path, pretrained: Trained, sft_trained: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed run reports the train_loss of the whole training (not of its last leg), so DVC sees no change that
    is not one: killed after its first checkpoint and run again, each trainer stage writes the metrics file an
    uninterrupted run writes, byte for byte."""
    from transformers import Trainer

    from rlhf import cli

    upstream = {"sft": pretrained.output, "reward": sft_trained.output}
    if stage in upstream:
        shutil.copytree(upstream[stage], workdir / "models" / upstream[stage].name)
    args = [stage, "--set", f"{stage}.save_steps=2", "--set", f"{stage}.logging_steps=2"]
    metrics = workdir / "metrics" / f"{stage}.json"

    assert cli.main(args) == 0
    uninterrupted = metrics.read_text()
    metrics.unlink()

    original = Trainer._save_checkpoint

    def killed_after_the_first_checkpoint(self: Any, model: Any, trial: Any) -> None:
        original(self, model, trial)
        raise KeyboardInterrupt  # as Ctrl-C (or a kill) lands between two steps

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save_checkpoint", killed_after_the_first_checkpoint)
        assert cli.main(args) == 130
    assert not metrics.exists()
    (checkpoints,) = workdir.glob(f"checkpoints/{stage}-*")
    assert [folder.name for folder in checkpoints.glob("checkpoint-*")] == ["checkpoint-2"]

    assert cli.main(args) == 0
    assert metrics.read_text() == uninterrupted


@pytest.mark.parametrize(
    "trainer_state",
    [None, "", '{"best_global_step": null, "best_metric'],
    ids=["state-missing", "state-empty", "state-cut-short"],
)
def test_resume_skips_a_half_written_checkpoint(
    workdir: Path, pretrained: Trained, monkeypatch: pytest.MonkeyPatch, trainer_state: str | None
) -> None:
    from transformers import Trainer

    from rlhf.stages import sft

    cfg = load_params(overrides=[f"sft.model={pretrained.output}", "sft.save_steps=2", "sft.max_steps=6"]).sft
    original = Trainer._save_checkpoint

    def killed_while_saving_step_6(self: Any, model: Any, trial: Any) -> None:
        if self.state.global_step < 6:
            return original(self, model, trial)
        # What a SIGKILL part-way through `_save_checkpoint` leaves: the folder and weights, and no trainer state
        # or the start of one (it is written last, in place).
        folder = Path(self.args.output_dir) / "checkpoint-6"
        self.save_model(str(folder), _internal_call=True)
        if trainer_state is not None:
            (folder / "trainer_state.json").write_text(trainer_state)
        raise KeyboardInterrupt("simulated kill while saving checkpoint-6")

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save_checkpoint", killed_while_saving_step_6)
        with pytest.raises(KeyboardInterrupt):
            sft.run(cfg)
    (checkpoints,) = workdir.glob("checkpoints/sft-*")
    assert (checkpoints / "checkpoint-4" / "trainer_state.json").exists()
    assert (checkpoints / "checkpoint-6" / "trainer_state.json").exists() == (trainer_state is not None)

    result = sft.run(cfg)  # must resume from checkpoint-4, the newest complete one

    assert (workdir / "models" / "sft" / "config.json").exists()
    assert max(row["step"] for row in result.history) == 6


def test_reward_evaluates_every_eval_steps_apart_from_its_checkpoints_and_once_at_the_end(
    workdir: Path, sft_trained: Trained
) -> None:
    """`eval_steps` sets the held-out evaluation's frequency apart from the checkpoints'; the final metrics are still
    the trained model's, measured at the last step."""
    from rlhf.stages import reward

    overrides = [f"reward.base_model={sft_trained.output}", "reward.max_steps=7", "reward.save_steps=2"]
    result = reward.run(load_params(overrides=[*overrides, "reward.eval_steps=3"]).reward)

    evaluated = {row["step"]: row["eval_loss"] for row in result.history if "eval_loss" in row}
    assert sorted(evaluated) == [3, 6, 7]  # not at the checkpoints' 2, 4, 6 only; and the last step's
    assert result.metrics["eval_loss"] == pytest.approx(evaluated[7], abs=1e-6)
    assert 0 <= result.metrics["eval_accuracy"] <= 1
