"""ModelSet: a base and its experts, loaded once, with task vectors resident on the chosen device.

The hot path of every search: for each candidate recipe, :meth:`ModelSet.merge_into` writes the merged weights
straight into the parameters of a live ``nn.Module`` (no model-sized allocation), and whatever depends only on
the task vectors (magnitude order, angles) is computed on first use and kept for every later candidate.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from evomerge.errors import ModelMismatchError, RecipeError
from evomerge.merging.checkpoints import Checkpoint, open_checkpoint
from evomerge.merging.dataflow import apply_scales, assemble, check_path, model_class, path_config
from evomerge.merging.layers import Layout, layout
from evomerge.merging.mlp import build_mlp, is_mlp_config
from evomerge.merging.methods import METHODS, Precomputed, ResolvedRecipe, TensorJob
from evomerge.merging.recipe import MERGED, Recipe

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str | None, where: str = "dtype") -> torch.dtype | None:
    if name is None:
        return None
    try:
        return _DTYPES[name]
    except KeyError:
        raise RecipeError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16, float64", where=where) from None


class ModelSet:
    """A base model and its experts, checked for compatibility and held as base + task vectors.

    Build it with :meth:`load`. Tensors are kept in a compute dtype (float32, or float64 for float64 models):
    ``base[name]`` and ``deltas[name]``, the task vectors of all experts stacked along dim 0 in expert order.
    """

    def __init__(self, base_name: str, paths: dict[str, Path], base: dict[str, torch.Tensor],
                 deltas: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype], config: dict | None,
                 checkpoints: dict[str, Checkpoint], device: torch.device,
                 input_dtype: torch.dtype | None = None) -> None:
        self.base_name = base_name
        self.paths = paths
        self.expert_names = [n for n in paths if n != base_name]
        self.base = base
        self.deltas = deltas
        self.dtypes = dtypes
        self.config = config
        self.checkpoints = checkpoints
        self.checkpoint = checkpoints[base_name]
        self.input_dtype = input_dtype
        self.device = device
        self.layout: Layout = layout(base.keys(), config)
        self.precomputed = Precomputed()
        # The canonical flat order (evomerge.merging.flat): floating tensors sorted by name, row-major.
        self.flat_offsets: dict[str, int] = {}
        offset = 0
        for name in sorted(deltas):
            self.flat_offsets[name] = offset
            offset += base[name].numel()
        self.flat_size = offset

    # -- loading --------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, base: str | os.PathLike, experts: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
             *, device: str | torch.device = "cpu", base_name: str = "base", dtype: torch.dtype | None = None,
             progress: Callable[[str], None] | None = None) -> "ModelSet":
        """Read the base and every expert once, check they match, and keep base + task vectors on ``device``.

        ``dtype`` rounds every input to that dtype before task vectors are taken, as mergekit's ``dtype`` does
        (a float32 model merged with ``dtype: float16`` trims the same elements as mergekit); the arithmetic
        itself always runs in float32 (float64 for float64 inputs).

        Raises :class:`~evomerge.errors.ModelMismatchError` naming the first tensor whose name, shape or dtype
        differs from the base's, or that holds NaN/Inf, and :class:`~evomerge.errors.CheckpointError` for paths
        that are not checkpoints.
        """
        if not isinstance(experts, Mapping):
            experts = {f"expert_{i}": p for i, p in enumerate(experts)}
        if base_name in experts:
            raise ModelMismatchError(f"an expert is named {base_name!r}, the base's name; rename it", where="experts")
        device = torch.device(device)
        base_ckpt = open_checkpoint(base, where="base")
        expert_ckpts = {name: open_checkpoint(p, where=f"experts.{name}") for name, p in experts.items()}
        for name, ckpt in expert_ckpts.items():
            _check_compatible(base_ckpt, ckpt, name)

        names = base_ckpt.names()
        base_tensors: dict[str, torch.Tensor] = {}
        dtypes: dict[str, torch.dtype] = {}
        for name, tensor in base_ckpt.read_all():
            dtypes[name] = tensor.dtype
            base_tensors[name] = _finite(_compute(tensor, device, dtype), base_ckpt, name, "base")
        deltas = {n: torch.empty((len(expert_ckpts), *base_tensors[n].shape), dtype=base_tensors[n].dtype,
                                 device=device) for n in names if base_tensors[n].is_floating_point()}
        for row, (expert, ckpt) in enumerate(expert_ckpts.items()):
            if progress:
                progress(expert)
            for name, tensor in ckpt.read_all():
                if name not in deltas:
                    continue
                target = deltas[name][row]
                target.copy_(_finite(_compute(tensor, device, dtype), ckpt, name, expert))
                target.sub_(base_tensors[name])
        paths = {base_name: base_ckpt.path, **{n: c.path for n, c in expert_ckpts.items()}}
        return cls(base_name, paths, base_tensors, deltas, dtypes, base_ckpt.config,
                   {base_name: base_ckpt, **expert_ckpts}, device, dtype)

    @property
    def names(self) -> list[str]:
        """Model names, base first."""
        return [self.base_name, *self.expert_names]

    @property
    def tensor_names(self) -> list[str]:
        return list(self.base)

    def num_params(self) -> int:
        return sum(t.numel() for t in self.base.values())

    # -- binding recipes ------------------------------------------------------------------------------------

    def _name_of(self, ref: str, recipe: Recipe, where: str) -> str:
        if ref in self.paths:
            return ref
        target = Path(recipe.sources.get(ref, ref)).expanduser()
        for name, path in self.paths.items():
            try:
                if target.exists() and target.resolve() == path.resolve():
                    return name
            except OSError:
                pass
        raise RecipeError(f"model {ref!r} is not in this model set ({', '.join(self.names)})", where=where)

    def bind(self, recipe: Recipe) -> ResolvedRecipe:
        """Match the recipe's models to this set's base and experts."""
        method = METHODS[recipe.merge_method]
        if recipe.base_model is not None and self._name_of(recipe.base_model, recipe, "base_model") != self.base_name:
            raise RecipeError(f"base_model {recipe.base_model!r} is not this model set's base ({self.base_name}); "
                              "task vectors are taken against the base the set was loaded with", where="base_model")
        rows, entries, base_entry = [], [], None
        for i, entry in enumerate(recipe.models):
            name = self._name_of(entry.model, recipe, f"models.{i}.model")
            if name == self.base_name:
                base_entry = entry
            else:
                rows.append(self.expert_names.index(name))
                entries.append(entry)
        return ResolvedRecipe(method, recipe, rows, entries, base_entry)

    # -- merging --------------------------------------------------------------------------------------------

    def merge(self, recipe: Recipe, *, dtype: torch.dtype | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
        """The merged state dict (new tensors), laid out along the recipe's layer path when it has one.

        ``dtype`` defaults to the recipe's ``out_dtype``/``dtype``, else each tensor's dtype on disk.
        """
        want = dtype or parse_dtype(recipe.out_dtype, "out_dtype") or parse_dtype(recipe.dtype)
        if recipe.path is not None and recipe.merge_method == "passthrough":
            merged: Mapping[str, torch.Tensor] = {}
        else:
            outputs = {n: torch.empty_like(t) for n, t in self.base.items()}
            self._merge_tensors(recipe, outputs, progress)
            merged = outputs
        if recipe.path is not None:
            return self._along_path(recipe, merged, want)
        return {n: t.to(want or self.dtypes.get(n, t.dtype)) for n, t in merged.items()}

    def merge_into(self, target: torch.nn.Module | Mapping[str, torch.Tensor], recipe: Recipe) -> None:
        """Write the merged weights in place into a live module (or a dict of tensors) of the base's layout.

        Parameters are overwritten through their existing storage: nothing model-sized is allocated, and
        references to the parameters (optimizers, hooks, tied weights) stay valid. Tensors of the module that
        the checkpoint does not hold (tied heads, buffers) are left as they are.
        """
        if recipe.path is not None:
            raise RecipeError("a recipe with a layer path changes the model's structure; "
                              "use ModelSet.build_model(recipe) or merge(recipe)", where="path")
        if isinstance(target, torch.nn.Module):
            live = dict(target.named_parameters(remove_duplicate=False))
            live.update(dict(target.named_buffers(remove_duplicate=False)))
        else:
            live = dict(target)
        missing = [n for n in self.base if n not in live]
        if missing:
            raise ModelMismatchError(f"the live model has no tensor {missing[0]!r} (and {len(missing) - 1} more); "
                                     "merge into a model built from the base's config", where="model")
        outputs = {}
        for name in self.base:
            tensor = live[name]
            if tuple(tensor.shape) != tuple(self.base[name].shape):
                raise ModelMismatchError(f"tensor {name!r} has shape {tuple(tensor.shape)} in the live model, "
                                         f"{tuple(self.base[name].shape)} in the base", where="model")
            outputs[name] = tensor.detach()
        with torch.no_grad():
            self._merge_tensors(recipe, outputs, None)

    def _merge_tensors(self, recipe: Recipe, outputs: Mapping[str, torch.Tensor],
                       progress: Callable[[str], None] | None) -> None:
        bound = self.bind(recipe)
        num_layers = self.layout.num_layers
        with torch.no_grad():
            for name, base in self.base.items():
                out = outputs[name]
                if name not in self.deltas:  # integer buffers: the base's
                    out.copy_(base)
                    continue
                place = self.layout.places[name]
                try:
                    params, model_params, base_params = bound.job_params(name, place, num_layers)
                except ValueError as e:
                    raise RecipeError(str(e), where="parameters") from None
                direct = out.dtype == base.dtype and out.is_contiguous() and out.device == base.device
                job = TensorJob(name, place, num_layers, base, self.deltas[name], bound.rows, model_params,
                                base_params, params, recipe.seed, self.precomputed,
                                out if direct else torch.empty_like(base), self.flat_offsets[name], self.flat_size)
                try:
                    bound.method.kernel(job)
                except ValueError as e:  # a parameter combination the operator cannot use (weights summing to 0)
                    raise RecipeError(f"{e} (tensor {name})", where="parameters") from None
                if not direct:
                    out.copy_(job.out)
                if progress:
                    progress(name)

    def _along_path(self, recipe: Recipe, merged: Mapping[str, torch.Tensor],
                    dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        known = [*self.names, *([MERGED] if merged else [])]
        steps = [s.model_copy(update={"model": s.model if s.model == MERGED else
                                      self._name_of(s.model, recipe, f"path.{i}.model")})
                 for i, s in enumerate(recipe.path or [])]
        check_path(steps, self.layout, known)

        def tensor(model: str, name: str) -> torch.Tensor:
            if model == MERGED:
                value = merged[name]
            elif model == self.base_name or name not in self.deltas:
                value = self.base[name].clone()
            else:
                # Read the expert's own bytes: base + (expert - base) is not bit-exact in floating point.
                value = _compute(self.checkpoints[model].read(name), self.device, self.input_dtype)
            # Cast by the *source* tensor's name: a path longer than the model has renumbered names
            # (model.layers.5.*) that the source never had, whose on-disk dtype is that of their source.
            return value.to(dtype or self.dtypes.get(name, value.dtype))

        return assemble(steps, self.layout, tensor)

    # -- models ---------------------------------------------------------------------------------------------

    def merged_config(self, recipe: Recipe) -> dict | None:
        """The base's config, adjusted to the recipe's layer path and output dtype."""
        config = path_config(self.config, recipe.path, self.layout.num_layers) if recipe.path else (
            dict(self.config) if self.config is not None else None)
        if config is not None and (recipe.out_dtype or recipe.dtype):
            config["torch_dtype"] = config["dtype"] = str(parse_dtype(recipe.out_dtype or recipe.dtype)).removeprefix("torch.")
        return config

    def build_model(self, recipe: Recipe) -> torch.nn.Module:
        """A live model holding the merged weights, with layer-path input scales hooked in.

        A transformers model for an HF base, an ``nn.Sequential`` for an ``evomerge_mlp`` one
        (:mod:`evomerge.merging.mlp`); needs the base's config.json. The model is on this set's device, in the
        dtype its class builds (float32 unless the class says otherwise), whatever the merged tensors' dtype.

        Building costs the merge and one copy of its weights: parameters are created on the meta device (no
        allocation, no random init) and the merged tensors are assigned to them; buffers the checkpoint does not
        hold (rotary frequencies, position ids) are built as usual, so they hold what the class computes.
        """
        import contextlib

        import transformers

        config_dict = self.merged_config(recipe)
        if config_dict is None:
            raise RecipeError("build_model needs a base with config.json (a Hugging Face model directory)",
                              where="base")
        if is_mlp_config(config_dict) and recipe.path:
            raise RecipeError("layer paths need a transformer; an MLP's layers differ in shape", where="path")

        # accelerate's init_empty_weights(include_buffers=False): parameters go to the meta device as they are
        # registered (their init then costs nothing), buffers stay real. torch.device("meta") alone would put the
        # buffers there too, and nothing generic recomputes them. Only this thread's modules are affected.
        register = _REGISTER_PARAMETER
        builder = threading.get_ident()

        def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
            register(module, name, param)
            if param is not None and threading.get_ident() == builder and not param.is_meta:
                meta = type(param)(param.to("meta"), requires_grad=param.requires_grad)
                meta.__dict__.update(param.__dict__)
                module._parameters[name] = meta

        @contextlib.contextmanager
        def parameters_on_meta():
            # One build at a time patches the class: overlapping patches would restore each other's hook.
            with _BUILD_LOCK:
                torch.nn.Module.register_parameter = register_on_meta
                try:
                    yield
                finally:
                    torch.nn.Module.register_parameter = register

        with parameters_on_meta():
            if is_mlp_config(config_dict):
                model = build_mlp(config_dict)
            else:
                config_dict = {k: v for k, v in config_dict.items() if k not in ("transformers_version",)}
                config = transformers.AutoConfig.for_model(**config_dict)
                model = model_class(config)(config)
        # In the compute dtype, unrounded, exactly as merge_into writes every later candidate: the first candidate
        # of a search must not score on weights rounded to the checkpoint's bf16 when the rest are not.
        compute = torch.float64 if any(t.dtype == torch.float64 for t in self.base.values()) else torch.float32
        state = self.merge(recipe, dtype=compute)
        live = model.state_dict(keep_vars=True)  # what load_state_dict matches: tied names too, no transient buffers
        unexpected = [n for n in state if n not in live]
        if unexpected:
            raise ModelMismatchError(f"merged tensor {unexpected[0]!r} has no place in the model", where="recipe")
        # Copies in the dtype the class built: tensors of the merge may share storage (a layer repeated along a
        # path) or map a checkpoint file, and the evaluator later writes into these parameters in place.
        owned = {name: state.pop(name).to(device=self.device, dtype=live[name].dtype, copy=True)
                 for name in list(state)}
        model.load_state_dict(owned, strict=False, assign=True)
        if hasattr(model, "tie_weights"):  # a tied head is still the meta tensor built above until it is re-tied
            model.tie_weights()
        empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if empty:
            more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
            raise ModelMismatchError(f"the merged weights have no tensor {empty[0]!r}{more} that the model needs; "
                                     "is the base checkpoint complete?", where="recipe")
        model.to(self.device)  # the buffers built above; parameters are there already
        if recipe.path:
            apply_scales(model, recipe, self.layout)
        return model.eval()


_BUILD_LOCK = threading.Lock()
_REGISTER_PARAMETER = torch.nn.Module.register_parameter


def _compute(tensor: torch.Tensor, device: torch.device, rounding: torch.dtype | None = None) -> torch.Tensor:
    """A floating tensor in the compute dtype, after rounding it to ``rounding`` when given."""
    if not tensor.is_floating_point():
        return tensor.to(device)
    if rounding is not None:
        tensor = tensor.to(rounding)
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return tensor.to(device=device, dtype=dtype).contiguous()


def _finite(tensor: torch.Tensor, ckpt: Checkpoint, name: str, model: str) -> torch.Tensor:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
        raise ModelMismatchError(f"tensor {name!r} of {ckpt.path} holds {bad} values; fix or re-export the "
                                 "checkpoint", where=model)
    return tensor


def _check_compatible(base: Checkpoint, expert: Checkpoint, expert_name: str) -> None:
    for name, info in base.infos.items():
        other = expert.infos.get(name)
        if other is None:
            raise ModelMismatchError(f"{expert.path} has no tensor {name!r} that the base {base.path} has; "
                                     "experts must be fine-tunes of the base", where=f"experts.{expert_name}")
        if other.shape != info.shape:
            raise ModelMismatchError(f"tensor {name!r} has shape {list(other.shape)} in {expert.path} but "
                                     f"{list(info.shape)} in the base {base.path}; experts must share the base's "
                                     "architecture", where=f"experts.{expert_name}")
        if other.dtype != info.dtype:
            raise ModelMismatchError(f"tensor {name!r} is {other.dtype} in {expert.path} but {info.dtype} in the "
                                     "base; convert the expert to the base's dtype", where=f"experts.{expert_name}")
    extra = [n for n in expert.infos if n not in base.infos]
    if extra:
        raise ModelMismatchError(f"{expert.path} has tensor {extra[0]!r} that the base {base.path} lacks; "
                                 "experts must be fine-tunes of the base", where=f"experts.{expert_name}")


def models_of(recipe: Recipe) -> tuple[str, dict[str, str]]:
    """The base reference and the expert references (name -> path) a recipe needs, for loading a ModelSet."""
    refs = recipe.model_refs()
    if not refs:
        raise RecipeError("the recipe names no models", where="models")
    base = recipe.base_model or refs[0]
    return base, {r: str(recipe.resolve(r)) for r in refs if r != base}


def load_for(recipe: Recipe, *, device: str | torch.device = "cpu",
             progress: Callable[[str], None] | None = None) -> ModelSet:
    """The ModelSet a recipe reads: its base (or its first model) and every other model it names."""
    base, experts = models_of(recipe)
    return ModelSet.load(recipe.resolve(base), experts, device=device, base_name=base,
                         dtype=parse_dtype(recipe.dtype), progress=progress)

