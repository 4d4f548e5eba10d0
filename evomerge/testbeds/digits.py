"""The ``digits`` test bed: scikit-learn's 8x8 digits and the 64-256-10 MLP of the M2N2 paper.

The setting of "Competition and Attraction Improve Model Fusion" (M2N2; arXiv 2508.16204, GECCO 2025), as its
reference code (github.com/SakanaAI/natural_niches) sets it up: ``load_digits`` with the raw pixel
values 0..16 as inputs (no scaling), the first 80% of the rows for training (1,437 images) and the last 20% for
testing (360); an MLP ``Linear(64, 256) -> ReLU -> Linear(256, 10)`` with a mean cross-entropy loss.

Two model families are built under ``out_dir``::

    seeds/seed_0_4  seeds/seed_5_9     the paper's two pre-trained seeds (M2N2 starts from them)
    base/                              a shared initialisation, briefly trained on all digits
    expert_0_4/  expert_5_9/           fine-tuned from base on digits 0-4 / 5-9 only (one 10-way head)
    expert_rot/  expert_flip/          fine-tuned from base on rotated / mirrored digits (plus the originals)
    search_T.npz  test_T.npz           T in 0_4, 5_9, all, rot, flip: x float32 [N, 64], y int64 [N]
    testbed.json                       build arguments, file hashes, measured accuracies; written last

*Seeds* follow the reference: each starts from its own N(0, 0.01²) draw of every parameter (the two do not
share an initialisation) and takes 10 full-batch Adam steps at lr 3e-3 on its half of the training digits. They
have no common base, so they suit methods that merge two models directly (M2N2's SLERP crossover), not task
arithmetic.

*Base and experts* are for task-vector methods. The base takes only a few full-batch steps from PyTorch's
default initialisation, so merging has something to add; each expert then trains 50 full-batch steps from it.
``expert_0_4`` and ``expert_5_9`` keep the single 10-way head, the natural setting: each forgets the other half
(about 0.47 on all digits), while task arithmetic over the two recovers about 0.8 — well above either expert and
the base (measured numbers are in ``testbed.json``). ``expert_rot`` (images rotated by 90°) and ``expert_flip``
(mirrored left to right) replay the original digits in their batch so they stay usable on them, as the tinylm
experts replay the base mix. Merging all four shows strong interference: task arithmetic at λ = 1 scores about
0.44 on the mean of all/rot/flip, per-expert coefficients about 0.75, but no merge found beats ``expert_rot``
alone (0.76) on that mean: four-expert runs are for fronts of trade-offs between tasks, not for one winner.
(Inverted digits, 16 − x, were tried and dropped: the first layer must negate its weights,
``W(16 − x) = −Wx + 16W·1``, so that task vector opposes every other one and its merges collapsed.)

Each model is a folder with ``model.safetensors`` (``0.weight`` [256, 64], ``0.bias``, ``2.weight`` [10, 256],
``2.bias``; float32) and ``config.json`` (``model_type: evomerge_mlp``). Builds are deterministic: the same seed
gives the same bytes on the same machine and library versions.
"""

from __future__ import annotations

import json
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evomerge.testbeds import manifest as _bed

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["CONFIG", "EXPERTS", "SEEDS", "TASKS", "build", "load_split", "mlp", "task_arrays"]

NAME = "digits"
# Bump when the data, the training or the layout change, so beds built by older code are rebuilt.
FORMAT = 1

LAYER_SIZES = (64, 256, 10)
CONFIG: dict[str, Any] = {"model_type": "evomerge_mlp", "architectures": ["EvomergeMLP"],
                          "layer_sizes": list(LAYER_SIZES), "activation": "relu"}
TRAIN_FRACTION = 0.8  # first 80% train, last 20% test, as in the reference

# Task name -> what its rows are. The npz files are search_<task>.npz (train split) and test_<task>.npz.
TASKS: dict[str, str] = {
    "0_4": "digits 0-4",
    "5_9": "digits 5-9",
    "all": "all digits",
    "rot": "all digits, images rotated by 90 degrees",
    "flip": "all digits, images mirrored left to right",
}
# Model folder -> the task it is trained on.
SEEDS: dict[str, str] = {"seeds/seed_0_4": "0_4", "seeds/seed_5_9": "5_9"}
EXPERTS: dict[str, str] = {"expert_0_4": "0_4", "expert_5_9": "5_9", "expert_rot": "rot", "expert_flip": "flip"}
# Experts on transformed images also see the original digits, so they keep a shared competence.
_REPLAY = {"rot", "flip"}

# M2N2 reference: init N(0, 0.01^2) for every parameter, Adam lr 3e-3, 10 full-batch steps.
SEED_INIT_STD = 0.01
SEED_LR = 3e-3
SEED_STEPS = 10
# Measured (docs/testbeds.md): 3 steps leave the base at 0.45-0.62 on all digits (seeds 0-3), 50 expert steps
# reach 0.89-0.96 on each expert's own task; with a longer-trained base (0.85) no merge beat the base any more.
BASE_LR = 3e-3
BASE_STEPS = 3
EXPERT_LR = 3e-3
EXPERT_STEPS = 50

_LAMBDAS = tuple(round(0.1 * i, 1) for i in range(1, 16))  # the single-λ grid the build measures
_TIES_DENSITIES = (0.2, 0.5, 0.8)
_RANDOM_COEFFICIENTS = 200  # per-expert coefficient vectors sampled for the four-expert measurement


def build(out_dir: str | Path, *, seed: int = 0, size: str = "full",
          progress: Callable[[str], None] | None = None) -> Path:
    """Build (or reuse) the digits bed in ``out_dir`` and return it.

    Both sizes build the same bed (it takes a few seconds); ``size`` is accepted so every bed has one signature.
    """
    out = _bed.check_arguments(NAME, out_dir, seed, size)
    say = progress or (lambda _msg: None)
    arguments = {"format": FORMAT, "seed": seed, "size": size}
    if _bed.cached(out, arguments) is not None:
        say(f"digits test bed in {out} is up to date")
        return out

    started = time.perf_counter()
    owned = ["seeds", "base", *EXPERTS, *(f"{split}_{t}.npz" for split in ("search", "test") for t in TASKS)]
    _bed.start(out, owned)
    with _bed.deterministic(seed):
        _write_data(out)
        _train_models(out, seed, say)
        say("measuring accuracies and merges")
        quality = measure(out)
    import sklearn
    import torch

    _bed.finish(out, NAME, arguments, _bed.files_under(out, owned), quality, started,
                extra={"versions": {"torch": torch.__version__, "scikit-learn": sklearn.__version__}})
    say(f"digits test bed ready in {out}")
    return out


# --------------------------------------------------------------------------------------------------------- data


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: raw pixels 0..16 as float32, labels int64; first 80% train."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    cut = int(len(images) * TRAIN_FRACTION)
    x, y = images.astype(np.float32), labels.astype(np.int64)
    return x[:cut], y[:cut], x[cut:], y[cut:]


def task_arrays(task: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``task`` (see :data:`TASKS`) drawn from ``(x, y)``."""
    if task == "0_4":
        keep = y < 5
        return x[keep], y[keep]
    if task == "5_9":
        keep = y >= 5
        return x[keep], y[keep]
    if task == "all":
        return x, y
    if task == "rot":
        # Counter-clockwise by 90 degrees, on the 8x8 image.
        return np.ascontiguousarray(np.rot90(x.reshape(-1, 8, 8), 1, axes=(1, 2)).reshape(-1, 64)), y
    if task == "flip":
        return np.ascontiguousarray(x.reshape(-1, 8, 8)[:, :, ::-1].reshape(-1, 64)), y
    raise KeyError(task)


def _write_data(out: Path) -> None:
    x_train, y_train, x_test, y_test = load_split()
    for task in TASKS:
        for split, (x, y) in (("search", (x_train, y_train)), ("test", (x_test, y_test))):
            xs, ys = task_arrays(task, x, y)
            save_npz(out / f"{split}_{task}.npz", x=xs, y=ys)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` with fixed zip timestamps, so equal arrays give equal bytes (np.savez stamps the clock)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def _load_npz(path: Path) -> tuple["torch.Tensor", "torch.Tensor"]:
    import torch

    with np.load(path) as data:
        return torch.from_numpy(data["x"]), torch.from_numpy(data["y"])


# ------------------------------------------------------------------------------------------------------- models


def mlp() -> "nn.Sequential":
    """The M2N2 MLP, as the merge engine builds it from ``CONFIG``; its state dict is what each model folder's
    ``model.safetensors`` holds."""
    from evomerge.merging.mlp import build_mlp

    return build_mlp(CONFIG)


def _train(model: "nn.Module", x: "torch.Tensor", y: "torch.Tensor", lr: float, steps: int) -> None:
    """Full-batch Adam on the mean cross-entropy, as the reference trains its seeds."""
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def _save_model(model: "nn.Module", folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n", encoding="utf-8")


def _train_models(out: Path, seed: int, say: Callable[[str], None]) -> None:
    import torch

    train = {task: _load_npz(out / f"search_{task}.npz") for task in TASKS}

    for index, (folder, task) in enumerate(SEEDS.items()):
        say(f"training {folder}: {SEED_STEPS} full-batch steps on {TASKS[task]}")
        model = mlp()
        gen = torch.Generator().manual_seed(_bed.derive_seed(seed, "digits-seed", index))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * SEED_INIT_STD)
        _train(model, *train[task], lr=SEED_LR, steps=SEED_STEPS)
        _save_model(model, out / folder)

    say(f"training base: {BASE_STEPS} full-batch steps on all digits")
    torch.manual_seed(_bed.derive_seed(seed, "digits-base"))
    model = mlp()  # PyTorch's default (Kaiming-uniform) initialisation, from the seeded global stream
    _train(model, *train["all"], lr=BASE_LR, steps=BASE_STEPS)
    _save_model(model, out / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    for folder, task in EXPERTS.items():
        say(f"training {folder}: {EXPERT_STEPS} full-batch steps on {TASKS[task]}")
        x, y = train[task]
        if task in _REPLAY:
            x, y = torch.cat([x, train["all"][0]]), torch.cat([y, train["all"][1]])
        model.load_state_dict(base_state)
        _train(model, x, y, lr=EXPERT_LR, steps=EXPERT_STEPS)
        _save_model(model, out / folder)


# ---------------------------------------------------------------------------------------------------- measuring


def accuracy(model: "nn.Module", x: "torch.Tensor", y: "torch.Tensor") -> float:
    import torch

    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def measure(out: str | Path) -> dict[str, Any]:
    """Accuracies of every model on every test set, and of merges of the experts.

    Task arithmetic (Ilharco et al., arXiv 2212.04089) over a grid of one λ for all experts, TIES (Yadav et al.,
    arXiv 2306.01708) over a small grid of λ and density, and, for all four experts, the best of 200 random
    per-expert coefficient vectors. Settings are chosen on the search split and reported on the test split, as a
    search would be. Merges go through :class:`evomerge.merging.ModelSet`, the engine searches use.
    """
    import torch

    from evomerge.merging import ModelSet

    out = Path(out)
    test = {t: _load_npz(out / f"test_{t}.npz") for t in TASKS}
    search = {t: _load_npz(out / f"search_{t}.npz") for t in TASKS}
    model = mlp()
    quality: dict[str, Any] = {"accuracy": {}}
    for folder in ["base", *SEEDS, *EXPERTS]:
        model.load_state_dict(_read_state(out / folder))
        quality["accuracy"][folder] = {t: round(accuracy(model, *test[t]), 4) for t in TASKS}

    pair = ModelSet.load(out / "base", {e: out / e for e in ("expert_0_4", "expert_5_9")})

    def pair_score(recipe: dict[str, Any], data: Mapping[str, tuple]) -> float:
        _merge(pair, model, recipe)
        return accuracy(model, *data["all"])

    def ta(weights: Mapping[str, float]) -> dict[str, Any]:
        return {"merge_method": "task_arithmetic",
                "models": [{"model": e, "parameters": {"weight": w}} for e, w in weights.items()]}

    experts2 = ("expert_0_4", "expert_5_9")
    at_one = pair_score(ta({e: 1.0 for e in experts2}), test)
    best_lam = max(_LAMBDAS, key=lambda lam: pair_score(ta({e: lam for e in experts2}), search))
    ties_grid = [(lam, d) for lam in (0.5, 1.0, 1.5) for d in _TIES_DENSITIES]

    def ties(lam: float, density: float) -> dict[str, Any]:
        return {"merge_method": "ties", "parameters": {"normalize": False},
                "models": [{"model": e, "parameters": {"weight": lam, "density": density}} for e in experts2]}

    best_ties = max(ties_grid, key=lambda p: pair_score(ties(*p), search))
    quality["merge_0_4_5_9"] = {
        "metric": "accuracy on test_all",
        "task_arithmetic_lambda_1": round(at_one, 4),
        "task_arithmetic_best_lambda": best_lam,
        "task_arithmetic_best": round(pair_score(ta({e: best_lam for e in experts2}), test), 4),
        "ties_best_lambda_density": list(best_ties),
        "ties_best": round(pair_score(ties(*best_ties), test), 4),
    }

    four = ModelSet.load(out / "base", {e: out / e for e in EXPERTS})
    union = ("all", "rot", "flip")

    def union_score(weights: Mapping[str, float], data: Mapping[str, tuple]) -> float:
        _merge(four, model, ta(weights))
        return float(np.mean([accuracy(model, *data[t]) for t in union]))

    four_at_one = union_score({e: 1.0 for e in EXPERTS}, test)
    best4 = max(_LAMBDAS, key=lambda lam: union_score({e: lam for e in EXPERTS}, search))
    gen = torch.Generator().manual_seed(0)
    samples = torch.rand((_RANDOM_COEFFICIENTS, len(EXPERTS)), generator=gen, dtype=torch.float64) * 1.5
    vectors = [dict(zip(EXPERTS, (round(float(v), 3) for v in row))) for row in samples]
    best_vector = max(vectors, key=lambda w: union_score(w, search))
    quality["merge_four_experts"] = {
        "metric": "mean test accuracy over all, rot, flip",
        "task_arithmetic_lambda_1": round(four_at_one, 4),
        "task_arithmetic_best_lambda": best4,
        "task_arithmetic_best": round(union_score({e: best4 for e in EXPERTS}, test), 4),
        "per_expert_random_samples": _RANDOM_COEFFICIENTS,
        "per_expert_best_weights": best_vector,
        "per_expert_best": round(union_score(best_vector, test), 4),
    }
    return quality


def _merge(models: Any, module: "nn.Module", recipe: Mapping[str, Any]) -> None:
    from evomerge.merging import Recipe

    models.merge_into(module, Recipe.model_validate({"base_model": models.base_name, **recipe}))


def _read_state(folder: Path) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))
