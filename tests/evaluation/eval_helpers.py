"""Helpers for the evaluation tests: a causal LM whose logits we choose, and small data-file writers.

A :class:`BigramLM` predicts from the current token only (``logits[b, t] = table[input_ids[b, t]]``), so every
log-likelihood and every greedy continuation can be worked out by hand from its table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

VOCAB = 64


class BigramLM(nn.Module):
    """A causal LM whose next-token logits depend on the current token only."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone().float())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids]


def chain_table(tokenizer: Any, successor: dict[str, str], *, default: str = "\n", strength: float = 5.0,
                seed: int = 0) -> torch.Tensor:
    """A table whose greedy successor of each character is ``successor`` (else ``default``), over small noise."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn((VOCAB, VOCAB), generator=gen) * 0.1
    ids = {ch: tokenizer.convert_tokens_to_ids(ch) for ch in tokenizer.get_vocab()}
    for token, index in ids.items():
        nxt = successor.get(token, default)
        table[index, ids[nxt] if nxt in ids else tokenizer.eos_token_id] += strength
    return table


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def objective(name: str, **task: Any) -> dict:
    return {"name": name, "task": task}
