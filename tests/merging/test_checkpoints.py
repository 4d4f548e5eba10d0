"""Opening, streaming and saving checkpoints in every layout users bring."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from evomerge.errors import CheckpointError
from evomerge.merging import checkpoints
from evomerge.merging.checkpoints import open_checkpoint, save_checkpoint


def tiny_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(10, 4, generator=gen),
        "layers.0.weight": torch.randn(4, 4, generator=gen).to(torch.bfloat16),
        "layers.0.bias": torch.randn(4, generator=gen).to(torch.float16),
        "layers.1.weight": torch.randn(4, 4, generator=gen),
        "step": torch.tensor(7, dtype=torch.int64),
        "head.weight": torch.randn(3, 4, generator=gen),
    }


def assert_same(ckpt: checkpoints.Checkpoint, state: dict[str, torch.Tensor], *, ordered: bool = False) -> None:
    """Same tensors, shapes and dtypes; same order too when the files were written in ``state``'s order.

    (``safetensors.torch.save_file`` reorders tensors by dtype on disk; our own writer keeps the given order.)
    """
    assert ckpt.names() == list(state) if ordered else sorted(ckpt.names()) == sorted(state)
    for name, tensor in state.items():
        info = ckpt.infos[name]
        assert (info.shape, info.dtype) == (tuple(tensor.shape), tensor.dtype)
        read = ckpt.read(name)
        assert read.dtype == tensor.dtype and torch.equal(read, tensor)
    assert {name: t for name, t in ckpt.read_all()}.keys() == state.keys()
    for name, tensor in ckpt.read_all():
        assert torch.equal(tensor, state[name])


def write_sharded(folder: Path, state: dict[str, torch.Tensor], *, suffix: str, index: bool) -> list[Path]:
    """Two shards in HF naming, first half of the tensors in the first."""
    names = list(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    stem = "model" if suffix == ".safetensors" else "pytorch_model"
    files = []
    for i, half in enumerate(halves, start=1):
        file = folder / f"{stem}-{i:05d}-of-00002{suffix}"
        part = {n: state[n] for n in half}
        if suffix == ".safetensors":
            save_file(part, file)
        else:
            torch.save(part, file)
        files.append(file)
    if index:
        weight_map = {n: files[i].name for i, half in enumerate(halves) for n in half}
        (folder / f"{stem}{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def test_single_safetensors_file(tmp_path: Path) -> None:
    state = tiny_state()
    save_file(state, tmp_path / "weights.safetensors")
    ckpt = open_checkpoint(tmp_path / "weights.safetensors")
    assert ckpt.path == (tmp_path / "weights.safetensors").resolve()
    assert ckpt.config is None and not ckpt.is_hf_dir and ckpt.tokenizer_files() == []
    assert_same(ckpt, state)


def test_hf_dir_with_one_file_reads_config_and_tokenizer_files(tmp_path: Path) -> None:
    state = tiny_state()
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    for name in ("tokenizer.json", "vocab.txt", "chat_template.jinja", "generation_config.json", "README.md"):
        (tmp_path / name).write_text("x")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.is_hf_dir and ckpt.config == {"model_type": "llama", "hidden_size": 4}
    assert [p.name for p in ckpt.tokenizer_files()] == ["chat_template.jinja", "generation_config.json",
                                                         "tokenizer.json", "vocab.txt"]
    assert_same(ckpt, state)


def test_sharded_safetensors_with_index_follows_weight_map(tmp_path: Path) -> None:
    state = tiny_state()
    files = write_sharded(tmp_path, state, suffix=".safetensors", index=True)
    # A stray file beside an index is not part of the model.
    save_file({"lora.weight": torch.ones(2)}, tmp_path / "adapter_model.safetensors")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.config is None
    assert ckpt.infos["embed.weight"].file == files[0].resolve()
    assert ckpt.infos["head.weight"].file == files[1].resolve()
    assert_same(ckpt, state, ordered=True)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", "..", ""])
def test_an_index_naming_a_shard_outside_its_folder_is_refused(tmp_path: Path, shard: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    write_sharded(folder, tiny_state(), suffix=".safetensors", index=True)
    save_file(tiny_state(), tmp_path / "outside.safetensors")
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["embed.weight"] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="is not a file name in"):
        open_checkpoint(folder)


def test_sharded_safetensors_without_index_scans_the_shards(tmp_path: Path) -> None:
    state = tiny_state()
    write_sharded(tmp_path, state, suffix=".safetensors", index=False)
    (tmp_path / "config.json").write_text("{}")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.is_hf_dir and ckpt.config == {}
    assert_same(ckpt, state)


def test_hf_named_weights_win_over_stray_weight_files(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    save_file({"lora_A": torch.ones(2)}, tmp_path / "adapter_model.safetensors")
    assert open_checkpoint(tmp_path).names() == ["w"]
    other = tmp_path / "bin"
    other.mkdir()
    torch.save({"w": torch.ones(2)}, other / "pytorch_model.bin")
    # Trainer writes its arguments as a pickle of objects; it must not be opened at all.
    torch.save({"args": Path("x")}, other / "training_args.bin")
    assert open_checkpoint(other).names() == ["w"]


def test_plain_folder_of_safetensors_without_config(tmp_path: Path) -> None:
    state = tiny_state()
    names = list(state)
    save_file({n: state[n] for n in names[:3]}, tmp_path / "a.safetensors")
    save_file({n: state[n] for n in names[3:]}, tmp_path / "b.safetensors")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.config is None and not ckpt.is_hf_dir
    assert sorted(ckpt.names()) == sorted(names)
    for name, tensor in ckpt.read_all():
        assert torch.equal(tensor, state[name])


def test_single_bin_file_and_legacy_pickle(tmp_path: Path) -> None:
    state = tiny_state()
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same(open_checkpoint(tmp_path / "pytorch_model.bin"), state, ordered=True)
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert_same(open_checkpoint(tmp_path / "old.pt"), state, ordered=True)


def test_sharded_bin_with_index(tmp_path: Path) -> None:
    state = tiny_state()
    files = write_sharded(tmp_path, state, suffix=".bin", index=True)
    (tmp_path / "config.json").write_text("{}")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.infos["head.weight"].file == files[1].resolve()
    assert_same(ckpt, state, ordered=True)


def test_read_of_bin_tensor_cannot_corrupt_the_cache(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(3)}, tmp_path / "w.bin")
    ckpt = open_checkpoint(tmp_path / "w.bin")
    ckpt.read("w").zero_()
    assert torch.equal(ckpt.read("w"), torch.ones(3))


def test_safetensors_preferred_over_bin(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.infos["w"].file.name == "model.safetensors"
    assert torch.equal(ckpt.read("w"), torch.ones(2))


def test_round_trip_through_several_shards(tmp_path: Path) -> None:
    state = tiny_state()
    seen: list[int] = []
    files = save_checkpoint(state, tmp_path, config={"architectures": ["Tiny"]}, max_shard_bytes=64,
                            metadata={"recipe": "abc"}, progress=seen.append)
    shards = [f for f in files if f.suffix == ".safetensors"]
    assert len(shards) > 1 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert index["metadata"]["total_size"] == total == sum(seen)
    assert list(index["weight_map"]) == list(state) and len(seen) == len(state)
    # embed.weight is 160 bytes, over the limit: it gets a shard of its own.
    assert list(load_file(shards[0])) == ["embed.weight"]
    for shard in shards:
        part = load_file(shard)
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 64 or len(part) == 1
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.config == {"architectures": ["Tiny"]}
    assert_same(ckpt, state, ordered=True)
    with safe_open(str(shards[0]), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "recipe": "abc"}


def test_save_single_shard_replaces_stale_shards(tmp_path: Path) -> None:
    state = tiny_state()
    save_checkpoint(state, tmp_path, max_shard_bytes=64)
    files = save_checkpoint(state, tmp_path)
    assert [f.name for f in files] == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert_same(open_checkpoint(tmp_path), state, ordered=True)


def test_save_tied_and_non_contiguous_tensors(tmp_path: Path) -> None:
    embed = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"embed.weight": embed, "lm_head.weight": embed, "proj.weight": embed.t(), "row": embed[1]}
    save_checkpoint(state, tmp_path)
    loaded = load_file(tmp_path / "model.safetensors")
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor)


def test_save_into_missing_directory_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not an existing directory"):
        save_checkpoint({"w": torch.ones(1)}, tmp_path / "absent")


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match="does not exist") as err:
        open_checkpoint(missing, where="models.base")
    assert str(missing.resolve()) in str(err.value)
    assert err.value.where == "models.base" and str(err.value).startswith("models.base: ")


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no .safetensors or .bin weights") as err:
        open_checkpoint(tmp_path)
    assert str(tmp_path.resolve()) in str(err.value)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    files = write_sharded(tmp_path, tiny_state(), suffix=".safetensors", index=True)
    files[1].unlink()
    with pytest.raises(CheckpointError, match="missing") as err:
        open_checkpoint(tmp_path, where="models.experts[0].path")
    assert files[1].name in str(err.value) and err.value.where == "models.experts[0].path"


@pytest.mark.parametrize("cut", [4, 20, -10])
def test_truncated_safetensors(tmp_path: Path, cut: int) -> None:
    file = tmp_path / "model.safetensors"
    save_file(tiny_state(), file)
    data = file.read_bytes()
    file.write_bytes(data[:cut])
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(file)
    assert str(file.resolve()) in str(err.value)


def test_garbage_safetensors_header(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes((12).to_bytes(8, "little") + b"not json at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        open_checkpoint(tmp_path)


def test_same_tensor_in_two_files_is_ambiguous(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2), "a": torch.ones(1)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="ambiguous") as err:
        open_checkpoint(tmp_path)
    assert "a.safetensors" in str(err.value) and "b.safetensors" in str(err.value)


class _RunsCode:
    """Unpickling this would run a shell command that leaves a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_malicious_pickle_is_refused_not_executed(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "pwned"
    file = tmp_path / "pytorch_model.bin"
    payload = {"w": torch.ones(2), "evil": _RunsCode(marker)}
    if fmt == "zip":
        torch.save(payload, file)
    else:
        file.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match="refusing to unpickle") as err:
        open_checkpoint(tmp_path)
    assert str(file.resolve()) in str(err.value)
    assert not marker.exists()


def test_pickle_of_an_arbitrary_class_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2), "cfg": Path("x")}, file)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        open_checkpoint(file)


def test_read_all_opens_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tiny_state()
    write_sharded(tmp_path, state, suffix=".safetensors", index=True)
    opened: list[str] = []
    real = checkpoints.safe_open

    def spy(file, *args, **kwargs):
        opened.append(Path(file).name)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "safe_open", spy)
    ckpt = open_checkpoint(tmp_path)
    assert opened == []  # indexing reads headers only
    got = dict(ckpt.read_all())
    assert sorted(opened) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert got.keys() == state.keys()
    opened.clear()
    # Asking for tensors of one shard, in any order and with repeats, opens only that shard.
    assert [n for n, _ in ckpt.read_all(["head.weight", "step", "head.weight"])] == ["step", "head.weight"]
    assert opened == ["model-00002-of-00002.safetensors"]


def test_unknown_tensor_name(tmp_path: Path) -> None:
    save_file({"w": torch.ones(1)}, tmp_path / "m.safetensors")
    ckpt = open_checkpoint(tmp_path / "m.safetensors", where="models.base")
    with pytest.raises(CheckpointError, match="no tensor 'v'"):
        ckpt.read("v")
    with pytest.raises(CheckpointError, match="no tensor 'v'"):
        list(ckpt.read_all(["v"]))


def test_non_weight_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a weight file"):
        open_checkpoint(tmp_path / "model.onnx")
