"""Model weights on disk: find them, index them without reading them, stream them, write them back.

A :class:`Checkpoint` accepts what users actually have: a Hugging Face model directory (single or sharded
safetensors, with or without an index, or the older ``pytorch_model*.bin`` pickles), a single weight file, or a
plain folder of ``.safetensors`` files. Safetensors headers are parsed directly, so opening a 70 GB model reads
a few kilobytes; tensors are read later, one at a time, from memory-mapped files.

PyTorch pickles are only ever unpickled with ``weights_only=True``: a pickle that holds anything but tensors is
refused, never executed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from evomerge.errors import CheckpointError, UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_INDEX = "pytorch_model.bin.index.json"

# The names Hugging Face gives its own weight files. When a directory has them, stray weight files beside them
# (adapters, optimizer states, training_args.bin) are not part of the model.
_HF_SAFETENSORS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
_HF_PYTORCH = re.compile(r"pytorch_model(-\d{5}-of-\d{5})?\.bin")

# Copied from the base (or tokenizer_source) beside a merged model; generation_config.json too, as mergekit does.
_TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "merges.txt",
                    "tokenizer.model", "added_tokens.json", "generation_config.json")
_TOKENIZER_GLOBS = ("vocab.*", "chat_template.*")

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in [
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"),
        ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("U8", "uint8"), ("BOOL", "bool"),
    ]
    if hasattr(torch, attr)
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

# A real header is a few MB at most; a larger length field means the file is not safetensors at all.
_MAX_HEADER_BYTES = 100 * 1024**2


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of one tensor, and the file that holds it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


class Checkpoint:
    """One model's weights on disk, indexed but not read.

    Build it with :func:`open_checkpoint`. ``infos`` lists every tensor in on-disk order: the order of the
    index's ``weight_map`` when there is an index, otherwise file by file (files sorted by name) and, inside a
    safetensors file, by position in the file.
    """

    def __init__(self, path: Path, config: dict | None, infos: dict[str, TensorInfo], *,
                 pickles: dict[Path, dict[str, torch.Tensor]] | None = None, where: str | None = None) -> None:
        self.path = path
        self.config = config
        self.infos = infos
        # .bin files had to be unpickled to be indexed; keeping them means nothing is read twice.
        self._pickles = pickles or {}
        self._where = where

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, tensors={len(self.infos)})"

    @property
    def is_hf_dir(self) -> bool:
        """True when the checkpoint is a directory with a ``config.json``."""
        return self.path.is_dir() and (self.path / "config.json").is_file()

    def names(self) -> list[str]:
        """Tensor names in on-disk order."""
        return list(self.infos)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into memory the caller owns."""
        info = self._info(name)
        if info.file in self._pickles:
            return self._pickles[info.file][name].clone()
        with safe_open(str(info.file), framework="pt", device="cpu") as f:
            return f.get_tensor(name)

    def read_all(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` for ``names`` (default: all), file by file.

        Each file is opened once and each tensor read once, so streaming a sharded model touches every shard a
        single time. Inside a file, tensors come in on-disk order.
        """
        wanted = self.infos if names is None else {name: self._info(name) for name in names}
        by_file: dict[Path, list[str]] = {}
        for name, info in self.infos.items():
            if name in wanted:
                by_file.setdefault(info.file, []).append(name)
        for file, file_names in by_file.items():
            if file in self._pickles:
                for name in file_names:
                    yield name, self._pickles[file][name].clone()
                continue
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in file_names:
                    yield name, f.get_tensor(name)

    def tokenizer_files(self) -> list[Path]:
        """Tokenizer files (and ``generation_config.json``) that sit in an HF directory, to copy beside a merged
        model; ``[]`` otherwise."""
        if not self.is_hf_dir:
            return []
        found = {self.path / n for n in _TOKENIZER_NAMES if (self.path / n).is_file()}
        for pattern in _TOKENIZER_GLOBS:
            found.update(p for p in self.path.glob(pattern) if p.is_file())
        return sorted(found)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path} has no tensor {name!r}; check that all models share one "
                                  "architecture", where=self._where) from None


def open_checkpoint(path: str | os.PathLike, *, where: str | None = None) -> Checkpoint:
    """Index the weights at ``path``: an HF model directory, a single weight file, or a folder of safetensors.

    Only headers are read for safetensors; ``.bin`` pickles are loaded (memory-mapped when their format allows)
    because a pickle has no header. Every problem the user can fix raises :class:`CheckpointError` carrying
    ``where``.
    """
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise CheckpointError(f"{root} does not exist; check the model path", where=where)
    pickles: dict[Path, dict[str, torch.Tensor]] = {}
    if root.is_file():
        if root.suffix not in WEIGHT_SUFFIXES:
            raise CheckpointError(f"{root} is not a weight file; give a {', '.join(WEIGHT_SUFFIXES)} file or a "
                                  "model directory", where=where)
        return Checkpoint(root, None, _index_files([root], pickles, where), pickles=pickles, where=where)

    config = _read_json(root / "config.json", where) if (root / "config.json").is_file() else None
    safetensors_files = _weight_files(root, (".safetensors",), _HF_SAFETENSORS)
    pickle_files = _weight_files(root, (".bin", ".pt", ".pth"), _HF_PYTORCH)
    if (root / SAFETENSORS_INDEX).is_file():
        infos = _index_from_weight_map(root / SAFETENSORS_INDEX, pickles, where)
    elif safetensors_files:
        infos = _index_files(safetensors_files, pickles, where)
    elif (root / PYTORCH_INDEX).is_file():
        infos = _index_from_weight_map(root / PYTORCH_INDEX, pickles, where)
    elif pickle_files:
        infos = _index_files(pickle_files, pickles, where)
    else:
        raise CheckpointError(f"no .safetensors or .bin weights in {root}; point to the folder that holds the "
                              "model's weight files", where=where)
    return Checkpoint(root, config, infos, pickles=pickles, where=where)


def save_checkpoint(state: Mapping[str, torch.Tensor], out_dir: Path, *, config: dict | None = None,
                    max_shard_bytes: int = 2 * 1024**3, metadata: dict[str, str] | None = None,
                    progress: Callable[[int], None] | None = None) -> list[Path]:
    """Write ``state`` into ``out_dir`` in Hugging Face layout and return the files written.

    Tensors keep their order and are split into shards of at most ``max_shard_bytes`` (a larger tensor gets a
    shard of its own). One shard is ``model.safetensors``; several are ``model-0000i-of-0000N.safetensors``
    with a ``model.safetensors.index.json``. Weight files left by an earlier save are removed, as
    ``save_pretrained`` does, so the directory never mixes two models. ``progress(n_bytes)`` is called after
    each tensor is written.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} is not an existing directory; create it first")
    if max_shard_bytes <= 0:
        raise UserError(f"max_shard_bytes must be positive, got {max_shard_bytes}", where="max_shard_bytes")
    for name, tensor in state.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store; "
                                  "cast it to a float or integer dtype", where=str(out_dir))

    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size

    n = len(shards)
    file_names = (["model.safetensors"] if n == 1
                  else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)])
    _remove_stale_weights(out_dir, keep=set(file_names))
    header_metadata = {"format": "pt", **(metadata or {})}
    written: list[Path] = []
    weight_map: dict[str, str] = {}
    for file_name, names in zip(file_names, shards):
        file = out_dir / file_name
        _write_safetensors(file, [(name, state[name]) for name in names], header_metadata, progress)
        written.append(file)
        weight_map.update(dict.fromkeys(names, file_name))
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = out_dir / SAFETENSORS_INDEX
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        written.append(index)
    if config is not None:
        config_file = out_dir / "config.json"
        config_file.write_text(json.dumps(config, indent=2))
        written.append(config_file)
    return written


def _weight_files(root: Path, suffixes: tuple[str, ...], hf_names: re.Pattern[str]) -> list[Path]:
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in suffixes)
    hf_files = [p for p in files if hf_names.fullmatch(p.name)]
    return hf_files or files


def _index_from_weight_map(index: Path, pickles: dict[Path, dict[str, torch.Tensor]],
                           where: str | None) -> dict[str, TensorInfo]:
    weight_map = _read_json(index, where).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map; re-download the index or delete it so the shards are "
                              "scanned", where=where)
    files: dict[str, Path] = {}
    for shard in dict.fromkeys(weight_map.values()):
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            # shards lie beside their index: a path elsewhere would read files outside the model's folder
            raise CheckpointError(f"{index} names shard {shard!r}, which is not a file name in {index.parent}; "
                                  "re-download the index or delete it so the shards are scanned", where=where)
        file = index.parent / shard
        if not file.is_file():
            raise CheckpointError(f"{index} names shard {shard}, which is missing from {index.parent}; "
                                  "re-download it", where=where)
        files[shard] = file
    in_files = _index_files(list(files.values()), pickles, where)
    infos: dict[str, TensorInfo] = {}
    for name, shard in weight_map.items():
        info = in_files.get(name)
        if info is None or info.file != files[shard]:
            raise CheckpointError(f"{index} puts tensor {name!r} in {shard}, which does not hold it; "
                                  "re-download the model", where=where)
        infos[name] = info
    return infos


def _index_files(files: list[Path], pickles: dict[Path, dict[str, torch.Tensor]],
                 where: str | None) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for file in files:
        if file.suffix == ".safetensors":
            file_infos = _read_safetensors_header(file, where)
        else:
            pickles[file] = _load_pickle(file, where)
            file_infos = [TensorInfo(name, tuple(t.shape), t.dtype, file) for name, t in pickles[file].items()]
        for info in file_infos:
            if info.name in infos:
                raise CheckpointError(f"tensor {info.name!r} is in both {infos[info.name].file} and {file}, so "
                                      "it is ambiguous; remove the file that does not belong", where=where)
            infos[info.name] = info
    return infos


def _read_safetensors_header(file: Path, where: str | None) -> list[TensorInfo]:
    """Tensors of a safetensors file in on-disk order, from its header alone.

    Layout: an 8-byte little-endian header length, a JSON header, then the tensor bytes.
    """
    unreadable = CheckpointError(f"{file} is not a readable safetensors file (corrupt or truncated header); "
                                 "re-download or re-save it", where=where)
    size = file.stat().st_size
    with file.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise unreadable
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise unreadable
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise unreadable from None
    if not isinstance(header, dict):
        raise unreadable
    data_bytes = size - 8 - header_len
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, (start, end) = entry["dtype"], (int(o) for o in entry["data_offsets"])
            shape = tuple(int(d) for d in entry["shape"])
        except (TypeError, KeyError, ValueError):
            raise unreadable from None
        if dtype_name not in _DTYPES:
            raise CheckpointError(f"{file} stores tensor {name!r} as {dtype_name}, which this torch cannot "
                                  "read; convert the checkpoint to F32, F16 or BF16", where=where)
        if end > data_bytes:
            raise CheckpointError(f"{file} is truncated: tensor {name!r} ends at byte {end} of data but the file "
                                  f"holds {data_bytes}; re-download it", where=where)
        entries.append((start, TensorInfo(name, shape, _DTYPES[dtype_name], file)))
    entries.sort(key=lambda e: e[0])
    return [info for _, info in entries]


def _load_pickle(file: Path, where: str | None) -> dict[str, torch.Tensor]:
    # mmap needs torch's zip format; legacy pickles (pre-1.6 torch.save) are read into memory.
    mmap = zipfile.is_zipfile(file)
    try:
        with warnings.catch_warnings():
            # Legacy pickles warn about their protocol; the load below is safe either way.
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(file), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{file} holds Python objects other than tensors (or is corrupt); refusing to "
                              "unpickle it because that could run code; convert it to .safetensors where you "
                              "trust its source", where=where) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{file} is not a readable PyTorch weight file ({str(exc).splitlines()[0]}); "
                              "re-download or re-save it", where=where) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file} holds a {type(obj).__name__}, not a state dict of tensors; save "
                              "model.state_dict() instead", where=where)
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{file} holds {name!r} of type {type(value).__name__}, not a tensor; save "
                                  "model.state_dict() instead", where=where)
    return obj


def _read_json(file: Path, where: str | None) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc}); fix or re-download it", where=where) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object; fix or re-download it", where=where)
    return data


def _write_safetensors(file: Path, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str],
                       progress: Callable[[int], None] | None) -> None:
    """Write one safetensors file, tensor by tensor.

    Written by hand rather than with ``safetensors.torch.save_file`` so that a shard never sits in memory as
    one byte string, tied tensors (shared storage) need no special case, and progress can be reported per
    tensor. The file is written beside its final name and renamed, so a crash never leaves a half shard.
    """
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Padding the header to 8 bytes keeps the data block aligned, as the reference writer does.
    header_bytes += b" " * (-len(header_bytes) % 8)
    partial = file.with_name(file.name + ".partial")
    with partial.open("wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for _, tensor in tensors:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            f.write(flat.view(torch.uint8).numpy())
            if progress is not None:
                progress(flat.numel() * flat.element_size())
    os.replace(partial, file)


def _remove_stale_weights(out_dir: Path, *, keep: set[str]) -> None:
    for file in out_dir.iterdir():
        if file.name in keep:
            continue
        if _HF_SAFETENSORS.fullmatch(file.name) or file.name == SAFETENSORS_INDEX:
            file.unlink()
