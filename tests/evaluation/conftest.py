"""Fixtures for the scorers: tiny model families (real HF directories) with a character tokenizer."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from evomerge.testbeds.synthetic import Family, build_family


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """LlamaForCausalLM (hidden 32, 4 layers, 64 ids, window 64) with a character tokenizer in ``base/``."""
    return build_family(tmp_path_factory.mktemp("eval_llama"), "llama", n_experts=2, seed=0)


@pytest.fixture(scope="session")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """BertForSequenceClassification (2 labels) with the character tokenizer."""
    return build_family(tmp_path_factory.mktemp("eval_bert"), "bert", n_experts=2, seed=0)


@pytest.fixture(scope="session")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """The digits MLP 64 -> 256 -> 10 with the ``evomerge_mlp`` config.json the digits test bed writes."""
    family = build_family(tmp_path_factory.mktemp("eval_mlp"), "mlp", n_experts=2, seed=0)
    for folder in (family.base, *family.experts.values()):
        (folder / "config.json").write_text(json.dumps({"model_type": "evomerge_mlp", "layer_sizes": [64, 256, 10]}))
    return family


@pytest.fixture(scope="session")
def tokenizer(llama: Family) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama.base), local_files_only=True)


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """GPT2LMHeadModel (4 layers) whose head is tied to the token embeddings, with the character tokenizer."""
    return build_family(tmp_path_factory.mktemp("eval_gpt2"), "gpt2", n_experts=2, seed=0)
