"""The digits test bed: the data contract, the models' quality, merges worth searching, caching, determinism."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import UserError
from evomerge.merging import ModelSet, Recipe
from evomerge.testbeds import TESTBEDS, build, digits, read_manifest, verify

MODELS = ["base", *digits.SEEDS, *digits.EXPERTS]


def _arrays(bed: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(bed / name) as data:
        return data["x"], data["y"]


def _accuracy(folder: Path, bed: Path, task: str) -> float:
    model = digits.mlp()
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    x, y = _arrays(bed, f"test_{task}.npz")
    return digits.accuracy(model, torch.from_numpy(x), torch.from_numpy(y))


# ------------------------------------------------------------------------------------------------ the contract


def test_npz_files_hold_float32_images_and_int64_labels(digits_bed: Path) -> None:
    for task in digits.TASKS:
        for split in ("search", "test"):
            x, y = _arrays(digits_bed, f"{split}_{task}.npz")
            assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == 64
            assert y.dtype == np.int64 and y.shape == (x.shape[0],)
            assert 0.0 <= x.min() and x.max() <= 16.0  # raw pixels, as the M2N2 reference feeds them


def test_splits_are_the_first_80_percent_and_the_last_20(digits_bed: Path) -> None:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x, y = _arrays(digits_bed, "search_all.npz")
    xt, yt = _arrays(digits_bed, "test_all.npz")
    assert (len(y), len(yt)) == (1437, 360)
    np.testing.assert_array_equal(x, images[:1437].astype(np.float32))
    np.testing.assert_array_equal(yt, labels[1437:])


def test_label_subsets_partition_the_splits(digits_bed: Path) -> None:
    for split, total in (("search", 1437), ("test", 360)):
        _, low = _arrays(digits_bed, f"{split}_0_4.npz")
        _, high = _arrays(digits_bed, f"{split}_5_9.npz")
        assert set(low) == {0, 1, 2, 3, 4} and set(high) == {5, 6, 7, 8, 9}
        assert len(low) + len(high) == total


def test_transformed_tasks_move_the_pixels_of_the_same_images(digits_bed: Path) -> None:
    x, y = _arrays(digits_bed, "test_all.npz")
    for task in ("rot", "flip"):
        xt, yt = _arrays(digits_bed, f"test_{task}.npz")
        np.testing.assert_array_equal(yt, y)
        np.testing.assert_array_equal(np.sort(xt, axis=1), np.sort(x, axis=1))
        assert not np.array_equal(xt, x)


def test_every_model_is_the_mlp_layout_with_its_config(digits_bed: Path) -> None:
    shapes = {"0.weight": (256, 64), "0.bias": (256,), "2.weight": (10, 256), "2.bias": (10,)}
    for name in MODELS:
        tensors = load_file(str(digits_bed / name / "model.safetensors"))
        assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
        assert all(v.dtype == torch.float32 for v in tensors.values())
        config = json.loads((digits_bed / name / "config.json").read_text())
        assert config == {"model_type": "evomerge_mlp", "architectures": ["EvomergeMLP"],
                          "layer_sizes": [64, 256, 10], "activation": "relu"}


# ---------------------------------------------------------------------------------------------------- quality
# Measured at seed 0 (see docs/testbeds.md); the bounds leave room for noise but not for a broken recipe.


def test_seeds_are_specialists_like_the_papers(digits_bed: Path) -> None:
    seed_low, seed_high = digits_bed / "seeds/seed_0_4", digits_bed / "seeds/seed_5_9"
    assert _accuracy(seed_low, digits_bed, "0_4") >= 0.8          # measured 0.87
    assert _accuracy(seed_low, digits_bed, "5_9") <= 0.05         # measured 0.0
    assert _accuracy(seed_high, digits_bed, "5_9") >= 0.8         # measured 0.91
    assert _accuracy(seed_high, digits_bed, "0_4") <= 0.05
    assert _accuracy(seed_low, digits_bed, "all") <= 0.5          # neither seed covers all digits


def test_seeds_do_not_share_an_initialisation(digits_bed: Path) -> None:
    low = load_file(str(digits_bed / "seeds/seed_0_4/model.safetensors"))["0.weight"]
    high = load_file(str(digits_bed / "seeds/seed_5_9/model.safetensors"))["0.weight"]
    # Ten Adam steps of 3e-3 move a weight by at most ~0.03; separate N(0, 0.01) draws stay uncorrelated.
    assert abs(torch.corrcoef(torch.stack([low.flatten(), high.flatten()]))[0, 1]) < 0.5


def test_base_is_weak_and_experts_are_strong_on_their_task(digits_bed: Path) -> None:
    assert _accuracy(digits_bed / "base", digits_bed, "all") <= 0.75          # measured 0.60
    own = {"expert_0_4": 0.9, "expert_5_9": 0.9, "expert_rot": 0.85, "expert_flip": 0.85}  # measured .95 .96 .89 .90
    for expert, floor in own.items():
        assert _accuracy(digits_bed / expert, digits_bed, digits.EXPERTS[expert]) >= floor, expert
    # One 10-way head: each half-digit expert forgets the other half.
    assert _accuracy(digits_bed / "expert_0_4", digits_bed, "5_9") <= 0.05
    assert _accuracy(digits_bed / "expert_5_9", digits_bed, "0_4") <= 0.05


def test_task_arithmetic_of_the_two_half_experts_beats_each_on_all_digits(digits_bed: Path) -> None:
    experts = {e: digits_bed / e for e in ("expert_0_4", "expert_5_9")}
    models = ModelSet.load(digits_bed / "base", experts)
    model = digits.mlp()
    recipe = Recipe.model_validate({"merge_method": "task_arithmetic", "base_model": "base",
                                    "models": [{"model": e, "parameters": {"weight": 0.5}} for e in experts]})
    models.merge_into(model, recipe)
    x, y = _arrays(digits_bed, "test_all.npz")
    merged = digits.accuracy(model, torch.from_numpy(x), torch.from_numpy(y))
    alone = max(_accuracy(path, digits_bed, "all") for path in experts.values())   # ~0.48
    assert merged >= alone + 0.2                                                   # measured 0.81
    assert merged >= _accuracy(digits_bed / "base", digits_bed, "all") + 0.1


def test_manifest_reports_the_measured_accuracies_and_merges(digits_bed: Path) -> None:
    quality = read_manifest(digits_bed)["quality"]
    assert quality["accuracy"]["expert_0_4"]["0_4"] == pytest.approx(_accuracy(digits_bed / "expert_0_4",
                                                                                digits_bed, "0_4"), abs=1e-4)
    pair = quality["merge_0_4_5_9"]
    assert pair["task_arithmetic_best"] > max(quality["accuracy"][e]["all"] for e in ("expert_0_4", "expert_5_9"))
    assert pair["ties_best"] > 0.7
    four = quality["merge_four_experts"]
    # Interference: λ = 1 over four experts is poor; per-expert coefficients find much more than one λ.
    assert four["task_arithmetic_lambda_1"] < 0.6
    assert four["per_expert_best"] >= four["task_arithmetic_best"] + 0.1


# ------------------------------------------------------------------------------------- caching and determinism


def test_a_second_build_with_the_same_arguments_is_a_cache_hit(digits_bed: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in digits_bed.rglob("*") if p.is_file()}
    messages: list[str] = []
    started = time.perf_counter()
    assert build("digits", digits_bed, seed=0, size="ci", progress=messages.append) == digits_bed
    assert time.perf_counter() - started < 0.5
    assert {p: p.stat().st_mtime_ns for p in digits_bed.rglob("*") if p.is_file()} == before
    assert messages == [f"digits test bed in {digits_bed} is up to date"]
    assert verify(digits_bed) == []


def test_same_seed_gives_identical_bytes_and_another_seed_rebuilds(digits_bed: Path, tmp_path: Path) -> None:
    out = digits.build(tmp_path / "again", seed=0, size="ci")
    files = read_manifest(digits_bed)["files"]
    assert read_manifest(out)["files"] == files
    assert len(files) == 2 * len(MODELS) + 2 * len(digits.TASKS)

    digits.build(out, seed=1, size="ci")
    reseeded = read_manifest(out)
    assert reseeded["arguments"]["seed"] == 1 and verify(out) == []
    changed = {rel for rel in files if reseeded["files"][rel] != files[rel]}
    assert changed == {f"{m}/model.safetensors" for m in MODELS}   # the data does not depend on the seed


def test_a_killed_build_never_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = digits.build(tmp_path / "bed", seed=0)

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(digits, "_train_models", killed)
    with pytest.raises(KeyboardInterrupt):
        digits.build(out, seed=2)
    assert read_manifest(out) is None
    assert not (out / "base").exists()
    monkeypatch.undo()
    digits.build(out, seed=0)
    assert verify(out) == [] and read_manifest(out)["arguments"]["seed"] == 0


def test_a_missing_file_forces_a_rebuild(tmp_path: Path) -> None:
    out = digits.build(tmp_path / "bed", seed=0)
    (out / "expert_rot" / "model.safetensors").unlink()
    digits.build(out, seed=0)
    assert verify(out) == []


def test_the_package_dispatches_by_name_and_rejects_unknown_beds(tmp_path: Path) -> None:
    assert TESTBEDS == ("digits", "tinylm")
    with pytest.raises(UserError, match="digits, tinylm") as error:
        build("mnist", tmp_path)
    assert error.value.where == "testbed"


@pytest.mark.parametrize(("kwargs", "where"), [({"size": "huge"}, "size"), ({"seed": -1}, "seed"),
                                                ({"seed": True}, "seed")])
def test_bad_arguments_are_user_errors(tmp_path: Path, kwargs: dict, where: str) -> None:
    with pytest.raises(UserError) as error:
        digits.build(tmp_path / "bed", **kwargs)
    assert error.value.where == where
    assert not (tmp_path / "bed").exists()


def test_out_dir_must_be_a_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file") as error:
        digits.build(tmp_path / "file")
    assert error.value.where == "out_dir"


def test_a_folder_with_other_files_keeps_them(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    digits.build(tmp_path, seed=0)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_folder_holding_the_users_own_models_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_text("precious")
    with pytest.raises(UserError, match=r"out_dir: .* already holds base, which no test bed build wrote"):
        digits.build(tmp_path, seed=0)
    assert (tmp_path / "base" / "model.safetensors").read_text() == "precious"
    assert not (tmp_path / "testbed.json").exists()


def test_an_unusable_folder_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="out_dir: "):
        digits.build(tmp_path / "file" / "bed", seed=0)  # a folder under a file
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match="out_dir: "):
        digits.build(tmp_path / "dangling", seed=0)


def test_an_interrupted_build_is_resumed_in_the_same_folder(tmp_path: Path) -> None:
    from evomerge.testbeds.manifest import BUILDING

    digits.build(tmp_path, seed=0)
    (tmp_path / "testbed.json").unlink()  # as if killed before the manifest was written
    (tmp_path / BUILDING).write_text("")
    digits.build(tmp_path, seed=0)
    assert (tmp_path / "testbed.json").exists() and not (tmp_path / BUILDING).exists()


def test_a_file_changed_in_place_is_rebuilt(tmp_path: Path) -> None:
    digits.build(tmp_path, seed=0)
    target = tmp_path / "expert_rot" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    target.write_bytes(bytes(data))
    assert verify(tmp_path) == ["expert_rot/model.safetensors"]
    digits.build(tmp_path, seed=0)
    assert verify(tmp_path) == []
