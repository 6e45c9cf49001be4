"""Loading and building models and tokenizers.

Every stage loads with `from_pretrained`, so a hub id (gpt2, Qwen/Qwen2.5-0.5B, ...), a local folder written by an
earlier stage and an `s3://` folder (downloaded once into the local cache, `rlhf.storage.fetch`) are interchangeable.
With no base model the pipeline builds its own: a byte-level BPE tokenizer trained on the corpus and a small
GPT-2-style decoder.
"""

from __future__ import annotations

from collections.abc import Iterable

from rlhf.config import ArchitectureParams, ConfigError, TokenizerParams
from rlhf.storage import fetch

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

# A plain Human/Assistant template for conversational data. The {% generation %} markers let TRL compute the loss on
# assistant turns only (`assistant_only_loss`).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant:' }}"
    "{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], params: TokenizerParams):
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on `texts`, with eos and pad tokens and a chat template."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts,
        vocab_size=params.vocab_size,
        min_frequency=params.min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        show_progress=False,
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_causal_lm(tokenizer, arch: ArchitectureParams):
    """A freshly initialised GPT-2-style decoder sized by `arch`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=arch.n_positions,
        n_embd=arch.n_embd,
        n_layer=arch.n_layer,
        n_head=arch.n_head,
        resid_pdrop=arch.dropout,
        embd_pdrop=arch.dropout,
        attn_pdrop=arch.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def load_tokenizer(name_or_path: str):
    """Loads a tokenizer and makes sure it can pad (falling back to eos, as most base models ship without pad)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(fetch(name_or_path))
    except OSError as exc:
        # from_pretrained treats a missing local folder as a Hub id; say both in one line.
        raise ConfigError(
            f"{name_or_path}: no model folder here, and the Hub could not provide it ({str(exc).splitlines()[0]})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_causal_lm(name_or_path: str, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fetch(name_or_path))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_reward_model(name_or_path: str, tokenizer):
    """A sequence classifier with one output, the scalar reward; its head is new when loading from a causal LM."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(fetch(name_or_path), num_labels=1)
    # Sequence classifiers score the last non-pad token, so they must know which token pads.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
