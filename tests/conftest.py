"""Shared fixtures: tiny model families (real HF directories, built offline) built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.testbeds.synthetic import Family, build_family


@pytest.fixture(scope="session")
def families_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session folder holding the shared families (one subfolder per architecture)."""
    return tmp_path_factory.mktemp("families")


def _family(root: Path, arch: str) -> Family:
    return build_family(root / arch, arch, n_experts=3, seed=0)


@pytest.fixture(scope="session")
def llama_family(families_dir: Path) -> Family:
    """LlamaForCausalLM (hidden 32, 4 layers, vocab 64): ``base`` and experts ``e0``, ``e1``, ``e2``."""
    return _family(families_dir, "llama")


@pytest.fixture(scope="session")
def gpt2_family(families_dir: Path) -> Family:
    """GPT2LMHeadModel (n_embd 32, 4 layers, vocab 64, tied head): ``base`` and experts ``e0``, ``e1``, ``e2``."""
    return _family(families_dir, "gpt2")


@pytest.fixture(scope="session")
def bert_family(families_dir: Path) -> Family:
    """BertForSequenceClassification (hidden 32, 2 layers, 2 labels): ``base`` and experts ``e0``, ``e1``, ``e2``."""
    return _family(families_dir, "bert")
