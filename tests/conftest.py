"""Shared fixtures: repository paths and tiny tokenizers (built locally, no model hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from polar_train.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer

# Text the tiny tokenizer learns its merges from (any string still encodes: it is byte-level).
TINY_TEXTS = [
    "What is the capital of China?", "Beijing.", "Shanghai.", "What is 7 + 5?", "The answer is 12.",
    "It is 13.", "Pick a number from 1 to 9.", "Name a fruit.", "apple", "pear", "You are a helpful assistant.",
] * 4


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository checkout (the folder holding polar_train/, tests/, data/)."""
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def fixture_dir(repo_root: Path) -> Path:
    """The tiny random InternLM2 reward checkpoint with its expected rewards (SPEC 4)."""
    return repo_root.parent / "shared" / "fixtures" / "internlm2-reward-tiny"


@pytest.fixture(scope="session")
def demo_tokenizer(repo_root: Path) -> PreTrainedTokenizerBase:
    """The shipped demo tokenizer, ``data/tokenizer`` (600 tokens, ``<|reward|>`` = 3, reward token = 4)."""
    return load_tokenizer(repo_root / "data" / "tokenizer")


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a 300-token byte-level BPE tokenizer built by ``build_tokenizer``."""
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    save_tokenizer(build_tokenizer(TINY_TEXTS, vocab_size=300), folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer in ``tiny_tokenizer_path``, loaded the way training loads one."""
    return load_tokenizer(tiny_tokenizer_path)


@pytest.fixture(scope="session")
def sharp_tiny_model(demo_tokenizer: PreTrainedTokenizerBase):
    """Factory: a tiny random reward model sized to the demo tokenizer, its 2-D weights scaled x8
    over the 0.02 init so that rewards differ clearly from sequence to sequence."""
    import torch

    from polar_train.model import InternLM2RewardModel, ModelConfig
    from polar_train.tokenizer import special_token_ids

    def build(*, seed: int, num_layers: int = 2, intermediate_size: int = 64):
        config = ModelConfig.fresh(hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=intermediate_size,
                                   vocab_size=len(demo_tokenizer),
                                   reward_token_id=special_token_ids(demo_tokenizer, None)[1])
        model = InternLM2RewardModel(config)
        model.init_weights(seed)
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 2:
                    param.mul_(8.0)
        return model

    return build
