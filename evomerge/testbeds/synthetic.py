"""Synthetic model families built locally: a random base and experts "fine-tuned" from it.

Every family is written as real model directories (``config.json`` + ``model.safetensors`` from
``save_pretrained``, as users have them) so merges can be run by evomerge and mergekit alike, with no hub access
and no training. Layout under ``out_dir``::

    base/    the base model (plus a tiny tokenizer for the HF architectures)
    e0/ e1/  experts: base + expert_scale * a random direction per tensor
    family.json  the build arguments, written last; marks the family complete

Architectures:

- ``llama``: ``LlamaForCausalLM`` (names ``lm_head.weight``, ``model.embed_tokens.weight``,
  ``model.norm.weight``; layer tensors ``model.layers.{i}.*``).
- ``gpt2``: ``GPT2LMHeadModel`` (``transformer.wte/wpe/ln_f``; layers ``transformer.h.{i}.*``; ``lm_head`` is
  tied to ``wte`` and not stored, as with HF's own GPT-2).
- ``bert``: ``BertForSequenceClassification`` with 2 labels (``bert.embeddings.*``, ``bert.pooler.dense.*``,
  ``classifier.*``; layers ``bert.encoder.layer.{i}.*``), the layout of mergekit's
  ``bert-sequence-classification.json``.
- ``mlp``: ``Linear(64, 256) -> ReLU -> Linear(256, 10)`` saved as ``model.safetensors`` only, tensors
  ``0.weight``, ``0.bias``, ``2.weight``, ``2.bias``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from evomerge.errors import UserError

__all__ = ["ARCHITECTURES", "SIZES", "Family", "build_family", "mlp_module"]

ARCHITECTURES = ("llama", "gpt2", "bert", "mlp")
SIZES = ("tiny", "100m")

MANIFEST = "family.json"
# Bump when the generated weights or layout change, so cached families built by older code are rebuilt.
_FORMAT = 2
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

_VOCAB = 64
_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3, matching pad/bos/eos in the configs
# 60 characters; with the 4 specials the tokenizer has exactly _VOCAB ids. Text is lower-cased first.
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,!?'\"-:;()/+*=_@#$%&\n~"
assert len(_ALPHABET) == _VOCAB - len(_SPECIALS) and len(set(_ALPHABET)) == len(_ALPHABET)

_MLP_SHAPE = (64, 256, 10)


@dataclass(frozen=True)
class Family:
    """A built family: the base directory, expert directories by name (``e0``, ``e1``, ...) and the architecture."""

    base: Path
    experts: dict[str, Path]
    arch: str


def build_family(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    n_experts: int = 2,
    seed: int = 0,
    size: str = "tiny",
    expert_scale: float = 0.02,
    dtype: torch.dtype = torch.float32,
    with_tokenizer: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Family:
    """Build (or reuse) a base model and ``n_experts`` experts under ``out_dir``.

    The base is random (deterministic in ``seed``). Expert ``i`` adds to every floating tensor a random direction
    (deterministic in ``(seed, i)``) scaled to ``expert_scale`` times that tensor's RMS, so each tensor, norms
    included, moves by a relative norm of ``expert_scale``. Weights are saved in ``dtype``; same arguments give
    byte-identical files. ``size="100m"`` (llama only) gives a ~100M-parameter model for throughput benchmarks.
    ``with_tokenizer`` saves a 64-id character tokenizer into ``base/`` (ignored for ``mlp``).

    If ``out_dir/family.json`` records the same arguments and the files are present, nothing is rebuilt.
    Otherwise ``base/`` and ``e*/`` directories are replaced.
    """
    arch, dtype_name = _validate(arch, n_experts, size, expert_scale, dtype)
    out = Path(out_dir)
    say = progress or (lambda _msg: None)
    args: dict[str, Any] = {
        "format": _FORMAT,
        "arch": arch,
        "n_experts": int(n_experts),
        "seed": int(seed),
        "size": size,
        "expert_scale": float(expert_scale),
        "dtype": dtype_name,
        "with_tokenizer": bool(with_tokenizer) and arch != "mlp",
    }
    family = Family(base=out / "base", experts={f"e{i}": out / f"e{i}" for i in range(n_experts)}, arch=arch)
    if _is_cached(out, args, family):
        say(f"{arch} family in {out} is up to date")
        return family

    out.mkdir(parents=True, exist_ok=True)
    _invalidate(out)
    say(f"building {size} {arch} base in {family.base}")
    if arch == "mlp":
        _build_mlp(family, args, say)
    else:
        _build_hf(family, args, say)
    # Written last, atomically: its presence means every directory above is complete.
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(args, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / MANIFEST)
    say(f"{arch} family ready in {out}")
    return family


def _validate(arch: str, n_experts: int, size: str, expert_scale: float, dtype: torch.dtype) -> tuple[str, str]:
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}", where="arch")
    if size not in SIZES:
        raise UserError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}", where="size")
    if size == "100m" and arch != "llama":
        raise UserError(f"size '100m' exists for llama only, not {arch!r}", where="size")
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise UserError(f"need at least one expert, got {n_experts!r}", where="n_experts")
    if not (expert_scale >= 0.0 and expert_scale != float("inf")):
        raise UserError(f"must be a finite number >= 0, got {expert_scale!r}", where="expert_scale")
    names = {v: k for k, v in _DTYPES.items()}
    if dtype not in names:
        raise UserError(f"unsupported dtype {dtype}; choose one of {', '.join(_DTYPES)}", where="dtype")
    return arch, names[dtype]


def _weight_files(arch: str) -> tuple[str, ...]:
    return ("model.safetensors",) if arch == "mlp" else ("config.json", "model.safetensors")


def _is_cached(out: Path, args: dict[str, Any], family: Family) -> bool:
    try:
        recorded = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if recorded != args:
        return False
    files = [d / f for d in (family.base, *family.experts.values()) for f in _weight_files(family.arch)]
    if args["with_tokenizer"]:
        files.append(family.base / "tokenizer.json")
    return all(f.is_file() for f in files)


def _invalidate(out: Path) -> None:
    """Drop the manifest, then directories an earlier build left, so a half-finished rebuild is never cached."""
    manifest = out / MANIFEST
    try:
        old = json.loads(manifest.read_text())
        old_experts = int(old.get("n_experts", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        old_experts = 0
    manifest.unlink(missing_ok=True)
    # Only our own layout is removed: base/ and the expert directories the old manifest names.
    for name in ["base", *(f"e{i}" for i in range(old_experts))]:
        shutil.rmtree(out / name, ignore_errors=True)


def _expert_seed(seed: int, index: int) -> int:
    # A hash keeps expert streams apart from each other and from the base stream for every (seed, index).
    digest = hashlib.sha256(f"evomerge-synthetic:{seed}:expert:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _perturb(base: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    """``base`` plus a random direction whose norm is ``scale`` times ``base``'s (float32 in, float32 out)."""
    direction = torch.randn(base.shape, generator=gen, dtype=torch.float32)
    direction /= direction.square().mean().sqrt().clamp_min(1e-12)
    rms = float(base.square().mean().sqrt())
    # An all-zero tensor has no scale of its own; move it as if it had unit RMS rather than leave it fixed.
    return base + direction * (scale * (rms if rms > 0.0 else 1.0))


# --------------------------------------------------------------------------------------------------- HF models


def _hf_model(arch: str, size: str) -> nn.Module:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    pad, bos, eos = 0, 1, 2
    if arch == "llama":
        if size == "100m":
            # 12 x (GQA attention 1.57M + MLP 4.72M) + untied embeddings 2 x 12.3M = 100.09M parameters.
            dims = dict(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048)
        else:
            dims = dict(vocab_size=_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        config = LlamaConfig(**dims, tie_word_embeddings=False, pad_token_id=pad, bos_token_id=bos,
                             eos_token_id=eos)
        return LlamaForCausalLM(config)
    if arch == "gpt2":
        # GPT2Config defaults bos/eos to 50256, outside this vocabulary.
        config = GPT2Config(vocab_size=_VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                            pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)
        return GPT2LMHeadModel(config)
    if arch == "bert":
        # Not BertModel: mergekit 0.1.5 fails on bert.json (an optional tensor with aliases hits a tuple + list
        # bug in plan_tensor); bert-sequence-classification.json has no such entry and merges cleanly.
        config = BertConfig(vocab_size=_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64, pad_token_id=pad, num_labels=2)
        return BertForSequenceClassification(config)
    raise AssertionError(arch)


def _no_init_weights() -> Any:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def _random_base(model: nn.Module, seed: int, std: float) -> dict[str, torch.Tensor]:
    """Seeded float32 values for every distinct parameter (tied ones once), in ``named_parameters`` order.

    Unlike HF's init (norms exactly 1, biases exactly 0), every tensor gets spread, so the base looks trained
    and relative changes are defined for all of them.
    """
    gen = torch.Generator().manual_seed(seed)
    values: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            values[name] = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
            if _is_norm(module) and p_name == "weight":
                values[name] += 1.0
    # named_modules visits a tied parameter under each owner; keep the name HF's named_parameters reports.
    kept = {name for name, _ in model.named_parameters()}
    return {name: v for name, v in values.items() if name in kept}


def _assign(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)


def _build_hf(family: Family, args: dict[str, Any], say: Callable[[str], None]) -> None:
    dtype = _DTYPES[args["dtype"]]
    # Every parameter is overwritten below, so HF's init (about 1 s at 100M) is skipped; buffers such as rotary
    # frequencies are still computed. The seeded fork keeps anything that does draw reproducible and leaves the
    # caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]), _no_init_weights():
        torch.manual_seed(args["seed"])
        model = _hf_model(args["arch"], args["size"])
    # Skipping init also skips weight tying in transformers 5; GPT-2's lm_head must share wte as in HF's files.
    model.tie_weights()
    model.eval()
    std = float(getattr(model.config, "initializer_range", 0.02))
    base = _random_base(model, args["seed"], std)
    model.to(dtype)
    model.config.dtype = dtype

    _assign(model, base)
    _save_hf(model, family.base)
    if args["with_tokenizer"]:
        _tokenizer(model.config).save_pretrained(family.base)
    for index, (name, path) in enumerate(family.experts.items()):
        say(f"building expert {name} in {path}")
        gen = torch.Generator().manual_seed(_expert_seed(args["seed"], index))
        _assign(model, {k: _perturb(v, args["expert_scale"], gen) for k, v in base.items()})
        _save_hf(model, path)


def _save_hf(model: nn.Module, path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path, safe_serialization=True)


def _tokenizer(config: Any) -> Any:
    """A character-level tokenizer whose 64 ids fit every model built here."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    pad, bos, eos, unk = _SPECIALS
    vocab = {tok: i for i, tok in enumerate((*_SPECIALS, *_ALPHABET))}
    tok = Tokenizer(WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    # Every character is its own token, newlines and spaces included.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {eos} $B", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    max_len = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 64))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk, model_max_length=max_len
    )


# --------------------------------------------------------------------------------------------------------- MLP


def _build_mlp(family: Family, args: dict[str, Any], say: Callable[[str], None]) -> None:
    dtype = _DTYPES[args["dtype"]]
    gen = torch.Generator().manual_seed(args["seed"])
    base: dict[str, torch.Tensor] = {}
    for layer, (fan_in, fan_out) in zip((0, 2), zip(_MLP_SHAPE, _MLP_SHAPE[1:])):
        # Fan-in scaling keeps activations O(1) through the ReLU, as a trained net would.
        base[f"{layer}.weight"] = torch.randn((fan_out, fan_in), generator=gen) / fan_in**0.5
        base[f"{layer}.bias"] = torch.randn((fan_out,), generator=gen) * 0.02
    _save_mlp(base, family.base, dtype)
    for index, (name, path) in enumerate(family.experts.items()):
        say(f"building expert {name} in {path}")
        gen = torch.Generator().manual_seed(_expert_seed(args["seed"], index))
        _save_mlp({k: _perturb(v, args["expert_scale"], gen) for k, v in base.items()}, path, dtype)


def _save_mlp(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})


def mlp_module() -> nn.Sequential:
    """The ``mlp`` architecture as a module; ``load_state_dict`` of an ``mlp`` family's file fits it."""
    return nn.Sequential(nn.Linear(_MLP_SHAPE[0], _MLP_SHAPE[1]), nn.ReLU(), nn.Linear(_MLP_SHAPE[1], _MLP_SHAPE[2]))
