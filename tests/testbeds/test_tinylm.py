"""The tinylm test bed: tokenizer and file contracts, experts that learn, merges that interfere, determinism.

Quality is asserted on the "ci" size (2 layers, hidden 64, experts upper and rot13), whose numbers are close to
the full bed's for these two tasks (docs/testbeds.md); the thresholds are the full bed's requirements.
"""

from __future__ import annotations

import string
import time
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaForCausalLM

from evomerge.errors import UserError
from evomerge.merging import ModelSet, Recipe
from evomerge.testbeds import build, read_manifest, tinylm, verify

CI = tinylm.PLANS["ci"]
# A plan that trains for a handful of steps: for the mechanics (determinism, caching), not for quality.
MICRO = replace(CI, hidden=32, intermediate=64, base_steps=6, expert_steps=4, rows=8, lambdas=(0.5, 1.0),
                coefficient_grid=(0.0, 1.0))


def _rows(bed: Path, name: str) -> list[dict]:
    return tinylm.read_rows(bed / name)


def _exact_match(bed: Path, model_dir: str, task: str, split: str = "test") -> float:
    tok = AutoTokenizer.from_pretrained(bed / model_dir)
    model = LlamaForCausalLM.from_pretrained(bed / model_dir).eval()
    return tinylm.exact_match(model, *tinylm.encode_rows(_rows(bed, f"{task}_{split}.jsonl"), tok))


# ------------------------------------------------------------------------------------------------ contracts


def test_tokenizer_is_character_level_and_adds_bos_only(tinylm_bed: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tinylm_bed / "expert_upper")
    text = "Hello, World! 42\n" + string.punctuation
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.unk_token_id not in ids
    assert tok(text, add_special_tokens=False)["input_ids"] == ids[1:] == tinylm.encode(text)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_models_are_small_llamas_in_hf_layout(tinylm_bed: Path) -> None:
    for name in ("base", "expert_upper", "expert_rot13"):
        folder = tinylm_bed / name
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
        model = LlamaForCausalLM.from_pretrained(folder)
        assert model.config.hidden_size <= 128 and model.config.num_hidden_layers <= 4
        assert model.config.vocab_size == len(tinylm.VOCAB)


def test_task_files_follow_the_scorer_contract(tinylm_bed: Path) -> None:
    words: dict[str, set[str]] = {"search": set(), "test": set()}
    for task in CI.experts:
        for split in ("search", "test"):
            rows = _rows(tinylm_bed, f"{task}_{split}.jsonl")
            assert len(rows) == CI.rows
            for row in rows:
                assert set(row) == {"prompt", "answer"} and "\n" not in row["answer"]
                word = row["prompt"].removeprefix(f"{task} ").removesuffix("=")
                assert row == {"prompt": tinylm.prompt(task, word), "answer": tinylm.TASKS[task].apply(word)}
                words[split].add(word)
            choices = _rows(tinylm_bed, f"{task}_mc_{split}.jsonl")
            assert [r["prompt"] for r in choices] == [r["prompt"] for r in rows]
            for row, mc in zip(rows, choices):
                assert set(mc) == {"prompt", "choices", "answer"} and len(set(mc["choices"])) == 4
                assert mc["choices"][mc["answer"]] == row["answer"]
    assert not words["search"] & words["test"]
    # Distractors sit at every position, so always answering one index cannot score well.
    answers = [r["answer"] for r in _rows(tinylm_bed, "upper_mc_test.jsonl")]
    assert max(answers.count(i) for i in range(4)) < 0.5 * len(answers)


def test_teacher_forced_exact_match_equals_greedy_generation(tinylm_bed: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tinylm_bed / "expert_rot13")
    model = LlamaForCausalLM.from_pretrained(tinylm_bed / "expert_rot13").eval()
    rows = _rows(tinylm_bed, "rot13_test.jsonl")[:12] + _rows(tinylm_bed, "upper_test.jsonl")[:12]
    for row in rows:
        ids = tok(row["prompt"], return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tinylm.VOCAB["\n"])
        generated = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        greedy = generated.endswith("\n") and generated.strip() == row["answer"]
        assert tinylm.exact_match(model, *tinylm.encode_rows([row], tok)) == float(greedy), row


# ---------------------------------------------------------------------------------------------------- quality


def test_each_expert_learns_its_task_and_the_base_does_not(tinylm_bed: Path) -> None:
    for task in CI.experts:
        assert _exact_match(tinylm_bed, f"expert_{task}", task) >= 0.8, task
        assert _exact_match(tinylm_bed, "base", task) <= 0.3, task


def test_manifest_shows_interference_and_room_for_a_search(tinylm_bed: Path) -> None:
    quality = read_manifest(tinylm_bed)["quality"]
    experts = quality["exact_match"]
    at_one = quality["task_arithmetic"]["lambda_1"]
    # λ = 1 is visibly worse than the expert on at least one task.
    assert any(at_one[t] <= experts[f"expert_{t}"][t] - 0.2 for t in CI.experts)
    best_single = quality["task_arithmetic"]["best_single_lambda"]["mean"]
    assert quality["per_layer"]["test"]["mean"] >= best_single + 0.1


def test_the_per_layer_recipe_reproduces_through_model_set(tinylm_bed: Path) -> None:
    per_layer = read_manifest(tinylm_bed)["quality"]["per_layer"]
    names = list(per_layer["weights"])
    models = ModelSet.load(tinylm_bed / "base", {n: tinylm_bed / n for n in names})
    model = LlamaForCausalLM.from_pretrained(tinylm_bed / "base").eval()
    recipe = tinylm.per_layer_recipe(per_layer["weights"], per_layer["groups"])
    models.merge_into(model, Recipe.model_validate({"base_model": "base", **recipe}))
    tok = AutoTokenizer.from_pretrained(tinylm_bed / "base")
    for task in CI.experts:
        rows = tinylm.encode_rows(_rows(tinylm_bed, f"{task}_test.jsonl"), tok)
        assert tinylm.exact_match(model, *rows) == pytest.approx(per_layer["test"][task], abs=1e-4)


# ------------------------------------------------------------------------------------- caching and determinism


def test_a_second_build_with_the_same_arguments_is_a_cache_hit(tinylm_bed: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in tinylm_bed.rglob("*") if p.is_file()}
    started = time.perf_counter()
    build("tinylm", tinylm_bed, seed=0, size="ci")
    assert time.perf_counter() - started < 1.0
    assert {p: p.stat().st_mtime_ns for p in tinylm_bed.rglob("*") if p.is_file()} == before


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    first = tinylm.build(tmp_path / "a", size="ci", plan=MICRO)
    second = tinylm.build(tmp_path / "b", size="ci", plan=MICRO)
    assert read_manifest(first)["files"] == read_manifest(second)["files"]
    assert verify(first) == []


def test_other_arguments_rebuild_and_a_killed_build_never_looks_complete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tinylm.build(tmp_path / "bed", size="ci", plan=MICRO)
    before = read_manifest(out)["files"]
    tinylm.build(out, seed=1, size="ci", plan=MICRO)
    after = read_manifest(out)["files"]
    assert after["base/model.safetensors"] != before["base/model.safetensors"]
    assert after["upper_test.jsonl"] != before["upper_test.jsonl"]  # evaluation words depend on the seed

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(tinylm, "_train_expert", killed)
    with pytest.raises(KeyboardInterrupt):
        tinylm.build(out, seed=0, size="ci", plan=MICRO)
    assert read_manifest(out) is None and not (out / "expert_upper").exists()


def test_bad_plans_and_sizes_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        tinylm.build(tmp_path, size="xl")
    assert error.value.where == "size"
    with pytest.raises(UserError, match="experts must be among"):
        tinylm.build(tmp_path, plan=replace(MICRO, experts=("copy",)))
    with pytest.raises(UserError, match="seq_len"):
        tinylm.build(tmp_path, plan=replace(MICRO, seq_len=12))
    assert not (tmp_path / "base").exists()


def test_a_folder_holding_the_other_bed_is_refused(digits_bed: Path) -> None:
    with pytest.raises(UserError, match="already holds the digits test bed") as error:
        tinylm.build(digits_bed, size="ci")
    assert error.value.where == "out_dir"
    assert not (digits_bed / "base" / "tokenizer.json").exists()
