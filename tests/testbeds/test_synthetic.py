"""Synthetic families: real HF directories, experts near the base, deterministic bytes, cached rebuilds."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from evomerge.errors import UserError
from evomerge.testbeds.synthetic import ARCHITECTURES, Family, build_family, mlp_module

HF_ARCHS = tuple(a for a in ARCHITECTURES if a != "mlp")
CAUSAL_ARCHS = ("llama", "gpt2")
VOCAB = 64


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def _weight_files(family: Family) -> list[Path]:
    return [d / "model.safetensors" for d in (family.base, *family.experts.values())]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_family_layout_and_expert_distance(tmp_path: Path, arch: str) -> None:
    scale = 0.02
    fam = build_family(tmp_path / "fam", arch, n_experts=3, seed=1, expert_scale=scale)

    assert fam.arch == arch
    assert fam.base == tmp_path / "fam" / "base"
    assert fam.experts == {f"e{i}": tmp_path / "fam" / f"e{i}" for i in range(3)}
    assert (tmp_path / "fam" / "family.json").is_file()
    for d in (fam.base, *fam.experts.values()):
        assert (d / "model.safetensors").is_file()
        assert (d / "config.json").is_file() == (arch != "mlp")
        # Experts carry no tokenizer, like many real fine-tunes.
        assert (d / "tokenizer.json").is_file() == (arch != "mlp" and d == fam.base)

    base = _read(fam.base)
    assert len(base) > 0
    experts = {name: _read(path) for name, path in fam.experts.items()}
    for tensors in experts.values():
        assert list(tensors) == list(base)
        for name, t in tensors.items():
            assert t.shape == base[name].shape and t.dtype == base[name].dtype == torch.float32
            # Every tensor moved, norms and biases included, by about expert_scale of its size.
            assert scale / 2 < _rel(t, base[name]) < scale * 2, name
        flat_e = torch.cat([t.flatten() for t in tensors.values()])
        flat_b = torch.cat([t.flatten() for t in base.values()])
        assert scale / 2 < _rel(flat_e, flat_b) < scale * 2

    # Different experts moved in different directions: their distance is about sqrt(2) * expert_scale.
    names = list(experts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            flat_a = torch.cat([t.flatten() for t in experts[a].values()])
            flat_b = torch.cat([t.flatten() for t in experts[b].values()])
            flat_base = torch.cat([t.flatten() for t in base.values()])
            d = float((flat_a - flat_b).norm() / flat_base.norm())
            assert scale * math.sqrt(2) / 2 < d < scale * math.sqrt(2) * 2


def test_tensor_layouts(tmp_path: Path) -> None:
    llama = _read(build_family(tmp_path / "llama", "llama").base)
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} <= set(llama)
    assert "model.layers.3.self_attn.k_proj.weight" in llama and "model.layers.4.mlp.up_proj.weight" not in llama
    assert llama["model.embed_tokens.weight"].shape == (VOCAB, 32)
    assert llama["model.layers.0.self_attn.k_proj.weight"].shape == (16, 32)  # 2 kv heads of 8

    gpt2 = _read(build_family(tmp_path / "gpt2", "gpt2").base)
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} <= set(gpt2)
    assert "transformer.h.3.attn.c_attn.weight" in gpt2
    assert "lm_head.weight" not in gpt2  # tied to wte, as HF saves GPT-2

    bert = _read(build_family(tmp_path / "bert", "bert").base)
    assert {"bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight", "classifier.weight"} <= set(bert)
    assert "bert.encoder.layer.1.attention.self.query.weight" in bert

    mlp = _read(build_family(tmp_path / "mlp", "mlp").base)
    assert {k: tuple(v.shape) for k, v in mlp.items()} == {
        "0.weight": (256, 64), "0.bias": (256,), "2.weight": (10, 256), "2.bias": (10,)
    }
    module = mlp_module()
    module.load_state_dict(mlp)
    assert module(torch.randn(3, 64)).shape == (3, 10)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, arch: str) -> None:
    a = build_family(tmp_path / "a", arch, seed=7)
    b = build_family(tmp_path / "b", arch, seed=7)
    c = build_family(tmp_path / "c", arch, seed=8)
    for fa, fb, fc in zip(_weight_files(a), _weight_files(b), _weight_files(c)):
        assert fa.read_bytes() == fb.read_bytes()
        assert fa.read_bytes() != fc.read_bytes()
    # Experts of one family differ from each other and from the base.
    blobs = [f.read_bytes() for f in _weight_files(a)]
    assert len(set(blobs)) == len(blobs)


def test_second_call_is_cached(tmp_path: Path) -> None:
    out = tmp_path / "fam"
    first = build_family(out, "llama")
    files = [*_weight_files(first), out / "family.json", first.base / "config.json", first.base / "tokenizer.json"]
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    messages: list[str] = []

    start = time.perf_counter()
    second = build_family(out, "llama", progress=messages.append)
    elapsed = time.perf_counter() - start

    assert second == first
    assert elapsed < 0.1
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    assert len(messages) == 1 and "up to date" in messages[0]
    assert json.loads((out / "family.json").read_text())["arch"] == "llama"


def test_changed_arguments_rebuild(tmp_path: Path) -> None:
    out = tmp_path / "fam"
    first = build_family(out, "gpt2", n_experts=3, expert_scale=0.02)
    e0_before = (first.experts["e0"] / "model.safetensors").read_bytes()

    second = build_family(out, "gpt2", n_experts=2, expert_scale=0.05)
    assert set(second.experts) == {"e0", "e1"}
    assert not (out / "e2").exists()  # the old family's extra expert does not linger
    assert (second.experts["e0"] / "model.safetensors").read_bytes() != e0_before
    base = _read(second.base)
    e0 = _read(second.experts["e0"])
    assert all(0.025 < _rel(e0[k], base[k]) < 0.1 for k in base)


def test_incomplete_family_is_rebuilt(tmp_path: Path) -> None:
    out = tmp_path / "fam"
    fam = build_family(out, "mlp")
    (fam.experts["e1"] / "model.safetensors").unlink()
    fam = build_family(out, "mlp")
    assert (fam.experts["e1"] / "model.safetensors").is_file()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "mlp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes(tmp_path: Path, arch: str, dtype: torch.dtype) -> None:
    fam = build_family(tmp_path / "fam", arch, dtype=dtype)
    base = _read(fam.base)
    for path in fam.experts.values():
        tensors = _read(path)
        assert all(t.dtype == dtype for t in tensors.values())
        assert all(torch.isfinite(t.float()).all() for t in tensors.values())
        flat_e = torch.cat([t.float().flatten() for t in tensors.values()])
        flat_b = torch.cat([t.float().flatten() for t in base.values()])
        assert 0.01 < _rel(flat_e, flat_b) < 0.04
    if arch != "mlp":
        assert json.loads((fam.base / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_causal_models_load_offline_and_run(tmp_path: Path, arch: str) -> None:
    from transformers import AutoModelForCausalLM

    fam = build_family(tmp_path / "fam", arch)
    ids = torch.tensor([[1, 10, 20, 30, 2]])
    for path in (fam.base, *fam.experts.values()):
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert logits.shape == (1, 5, VOCAB)
        assert torch.isfinite(logits).all()
    # The loaded weights are the saved ones (nothing re-initialised as "missing").
    model = AutoModelForCausalLM.from_pretrained(fam.experts["e0"], local_files_only=True)
    saved = _read(fam.experts["e0"])
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


def test_bert_loads_offline_and_runs(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    fam = build_family(tmp_path / "fam", "bert")
    model = AutoModelForSequenceClassification.from_pretrained(fam.experts["e1"], local_files_only=True)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 11, 8, 15, 2]])).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_tokenizer_loads_offline_and_fits_vocab(tmp_path: Path, arch: str) -> None:
    from transformers import AutoTokenizer

    fam = build_family(tmp_path / "fam", arch)
    tok = AutoTokenizer.from_pretrained(fam.base, local_files_only=True)
    ids = tok("hello")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1
    assert len(ids) == 6 and all(0 <= i < VOCAB for i in ids)
    assert len(tok) == VOCAB
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2 and tok.unk_token_id == 3
    assert tok.decode(tok("Hi, there!\n")["input_ids"], skip_special_tokens=True) == "hi, there!\n"
    assert tok("\u00e9")["input_ids"] == [1, tok.unk_token_id]


def test_without_tokenizer(tmp_path: Path) -> None:
    fam = build_family(tmp_path / "fam", "llama", with_tokenizer=False)
    assert not (fam.base / "tokenizer.json").exists()
    assert not (fam.base / "tokenizer_config.json").exists()


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_mergekit_merges_the_family(tmp_path: Path, arch: str) -> None:
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    fam = build_family(tmp_path / "fam", arch)
    config = MergeConfiguration.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(fam.base),
            "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in fam.experts.values()],
            "dtype": "float32",
        }
    )
    out = tmp_path / "merged"
    run_merge(config, str(out), MergeOptions(quiet=True, write_model_card=False))

    merged = _read(out)
    base = _read(fam.base)
    experts = [_read(p) for p in fam.experts.values()]
    assert set(merged) == set(base)
    for name, b in base.items():
        expected = b + sum(0.5 * (e[name] - b) for e in experts)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_100m_llama_parameter_count(tmp_path: Path) -> None:
    # Measured at about 3-4 s on a 2-core CPU, so it stays in the unit suite.
    from transformers import AutoConfig

    fam = build_family(tmp_path / "fam", "llama", size="100m", n_experts=1, with_tokenizer=False)
    with safe_open(str(fam.base / "model.safetensors"), framework="pt") as f:
        total = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    assert 90_000_000 <= total <= 110_000_000
    config = AutoConfig.from_pretrained(fam.base, local_files_only=True)
    assert config.model_type == "llama" and config.num_hidden_layers == 12
    assert (fam.experts["e0"] / "model.safetensors").stat().st_size == (fam.base / "model.safetensors").stat().st_size


def test_global_rng_untouched(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_family(tmp_path / "fam", "llama")
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"arch": "t5"}, "arch"),
        ({"size": "1b"}, "size"),
        ({"arch": "gpt2", "size": "100m"}, "size"),
        ({"n_experts": 0}, "n_experts"),
        ({"expert_scale": -0.1}, "expert_scale"),
        ({"expert_scale": float("nan")}, "expert_scale"),
        ({"dtype": torch.int8}, "dtype"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, where: str) -> None:
    with pytest.raises(UserError) as err:
        build_family(tmp_path / "fam", **kwargs)
    assert err.value.where == where
    assert not (tmp_path / "fam").exists()
