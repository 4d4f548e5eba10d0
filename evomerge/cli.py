"""The ``evomerge`` command line.

User mistakes exit with code 2 and one line on stderr naming the file or field at fault, never a traceback.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from evomerge.errors import UserError

if TYPE_CHECKING:  # torch and the merge engine are imported when a command needs them: --help stays instant
    import torch

    from evomerge.merging import Recipe

app = typer.Typer(name="evomerge", help="Search for the best way to merge fine-tuned models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
recipe_app = typer.Typer(help="Check and convert merge recipes (our JSON or mergekit YAML).", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
testbed_app = typer.Typer(help="Offline test beds: real models and task files built locally, no downloads.",
                          no_args_is_help=True)
app.add_typer(testbed_app, name="testbed")

# soft_wrap: long paths stay on one line when the output is a pipe or a file (rich would wrap at 80 columns).
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _progress() -> Progress:
    """Progress bars on stderr when it is a terminal; nothing otherwise (logs, CI, pipes)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=False, disable=not err.is_terminal)


def _quiet_transformers() -> None:
    """transformers' own tqdm bars ("Loading weights", "Writing model shards") and warnings are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@app.command()
def materialize(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="Recipe file: our JSON or a mergekit YAML."),
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR",
                                   help="Output folder (new or empty): HF layout, sharded safetensors."),
    device: str = typer.Option("cpu", help="Device to merge on (cpu, cuda, cuda:1…)."),
    shard_size: str = typer.Option("2GB", help="Largest shard, e.g. 500MB, 2GB."),
) -> None:
    """Write the merged model a recipe describes."""
    # Everything that needs no model is checked first, so a typo does not cost a model load.
    from evomerge.merging import materialize as write
    from evomerge.merging.materialize import check_out_dir
    from evomerge.merging.modelset import load_for

    max_bytes = _parse_size(shard_size)
    check_out_dir(out_dir)

    parsed = _load_recipe(recipe)
    dev = _device(device)
    with _progress() as progress:
        loading = progress.add_task("loading models", total=len(parsed.model_refs()) - 1 or None)
        ms = load_for(parsed, device=dev, progress=lambda _name: progress.advance(loading))
        merging = progress.add_task("merging tensors", total=len(ms.tensor_names))
        # tensors written (a layer path changes how many there are)
        writing = progress.add_task("writing tensors", total=None if parsed.path else len(ms.tensor_names))
        out = write(parsed, out_dir, model_set=ms, max_shard_bytes=max_bytes,
                    on_tensor=lambda _n: progress.advance(merging), on_bytes=lambda _n: progress.advance(writing))
    weights = [f for f in out.iterdir() if f.suffix == ".safetensors"]
    size = sum(f.stat().st_size for f in weights)
    console.print(f"wrote {escape(str(out.resolve()))}: {_format_size(size)} in {len(weights)} safetensors "
                  f"file{'s' if len(weights) != 1 else ''} ({parsed.merge_method}, {ms.num_params():,} parameters)",
                  highlight=False)


@recipe_app.command("validate")
def recipe_validate(
    file: Path = typer.Argument(..., metavar="FILE", help="Recipe file: our JSON or a mergekit YAML."),
) -> None:
    """Check a recipe: schema, method, parameters and ranges, and that every model path exists."""
    from evomerge.errors import RecipeError

    parsed = _load_recipe(file)
    for ref in parsed.model_refs():
        path = parsed.resolve(ref)
        if not path.exists():
            raise RecipeError(f"model {ref!r}: {path} does not exist", where=str(file))
    try:
        parsed.to_mergekit_yaml()
        mergekit = "yes"
    except RecipeError as e:
        mergekit = f"no ({e.detail})"
    table = Table(show_header=False, box=None)
    rows = [("method", parsed.merge_method), ("base", parsed.base_model or "-"),
            ("models", ", ".join(m.model for m in parsed.models) or "-")]
    if parsed.path:
        rows.append(("layer path", f"{len(parsed.path)} layers"))
    rows.append(("mergekit", mergekit))
    for key, value in rows:
        table.add_row(key, escape(value))  # model paths may hold [brackets], which rich would read as markup
    console.print(table)
    console.print(f"[green]{escape(str(file))} is a valid recipe")


@recipe_app.command("convert")
def recipe_convert(
    file: Path = typer.Argument(..., metavar="FILE", help="Recipe file: our JSON or a mergekit YAML."),
    to: str = typer.Option("mergekit", help="mergekit (YAML) or json."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write here instead of stdout."),
) -> None:
    """Convert a recipe between our JSON and mergekit YAML."""
    fmt = {"mergekit": "mergekit", "yaml": "mergekit", "json": "json"}.get(to.lower())
    if fmt is None:
        raise UserError(f"unknown format {to!r}; use mergekit or json", where="--to")
    parsed = _load_recipe(file)
    text = parsed.to_mergekit_yaml() if fmt == "mergekit" else parsed.to_json() + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror}", where="--output") from None
    console.print(f"wrote {escape(str(output))}", highlight=False)


@app.command()
def demo(
    out: Path = typer.Option(Path(".evomerge/demo"), help="Working folder for the demo's models and output."),
    experts: int = typer.Option(3, min=2, max=8, help="Number of experts to build."),
) -> None:
    """Build a small model family offline and materialize a TIES merge of it (the search runner comes next)."""
    import torch
    from transformers import AutoTokenizer

    from evomerge.merging import ModelEntry, Recipe, load_merged
    from evomerge.merging import materialize as write
    from evomerge.testbeds.synthetic import build_family

    _quiet_transformers()
    out = out.absolute()  # the recipe saved beside the merged model must not depend on where this ran
    with _progress() as progress:
        task = progress.add_task("building a base and experts", total=None)
        family = build_family(out / "models", "llama", n_experts=experts, seed=0)
        progress.update(task, total=1, completed=1)
    names = list(family.experts)
    recipe = Recipe(
        merge_method="ties", base_model="base",
        models=[ModelEntry(model=n, parameters={"weight": [0.3, 0.7], "density": 0.5}) for n in names],
        parameters={"normalize": True},
        sources={"base": str(family.base), **{n: str(p) for n, p in family.experts.items()}},
    )
    target = out / "merged"
    shutil.rmtree(target, ignore_errors=True)
    write(recipe, target)
    model = load_merged(target)
    tokens = AutoTokenizer.from_pretrained(target, local_files_only=True)("hello", return_tensors="pt")
    with torch.no_grad():
        logits = model(**tokens).logits
    console.print(f"merged {len(names)} experts into {escape(str(target))} "
                  f"({sum(p.numel() for p in model.parameters()):,} parameters); a forward pass gives logits of "
                  f"shape {tuple(logits.shape)}", highlight=False)
    console.print(f"mergekit recipe: {escape(str(target / 'mergekit_config.yml'))}", highlight=False)
    console.out(recipe.to_mergekit_yaml(), highlight=False, end="")


@testbed_app.command("build")
def testbed_build(
    name: str = typer.Argument(..., metavar="NAME", help="digits (the M2N2 setting) or tinylm (a tiny causal LM)."),
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="Folder to build into; a finished build is reused."),
    seed: int = typer.Option(0, help="Seed of every random choice: same seed, same bytes."),
    size: str = typer.Option("full", help="full, or ci (smaller and faster, for tests)."),
) -> None:
    """Build a test bed: a base, experts and task files, in the formats users have (HF layout, JSONL, .npz)."""
    from evomerge.testbeds import build

    _quiet_transformers()
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(), console=err,
                  transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task(f"building {name}", total=None)
        out = build(name, out_dir, seed=seed, size=size,
                    progress=lambda message: progress.update(task, description=f"{name}: {message}"))
    console.print(f"{name} test bed ready in {escape(str(Path(out).resolve()))}", highlight=False)


def _load_recipe(file: Path) -> Recipe:
    """Read a recipe by its absolute path, so that its model paths become absolute as well.

    Relative model paths resolve against the recipe's folder; with a relative file name they would stay relative
    to the working directory, and the copy saved beside a merged model would point nowhere.
    """
    from evomerge.merging import Recipe

    return Recipe.load(file.absolute())


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _parse_size(text: str) -> int:
    """``500MB``, ``2GB``, ``1.5G``, ``2GiB`` or a plain number of bytes; K/M/G are powers of 1024."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if match:
        value = int(float(match[1]) * _UNITS[match[2]])
        if value > 0:
            return value
    raise UserError(f"cannot read size {text!r}; write it like 500MB or 2GB", where="--shard-size")


def _format_size(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            break
    return f"{n:.1f} {unit}"


def _device(name: str) -> torch.device:
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N", where="--device") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"{name}: no such CUDA device here ({torch.cuda.device_count()} visible); use cpu",
                        where="--device")
    return dev


def main() -> None:
    """Entry point: run the app, turning user mistakes into one line on stderr and exit code 2.

    Click's own errors (a missing argument, an unknown option) print its usage message and exit 2 as well;
    anything else is a bug and keeps its traceback.
    """
    try:
        app()  # standalone mode: click handles --help, usage errors, Ctrl-C and exit codes
    except UserError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
