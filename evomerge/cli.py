"""The ``evomerge`` command line.

User mistakes exit with code 2 and one line on stderr naming the file or field at fault, never a traceback.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from evomerge.errors import UserError

if TYPE_CHECKING:  # torch and the merge engine are imported when a command needs them: --help stays instant
    import torch

    from evomerge.merging import Recipe

app = typer.Typer(name="evomerge", help="Search for the best way to merge fine-tuned models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


class _RecipeGroup(TyperGroup):
    """``evomerge recipe 7 --candidate best`` means ``evomerge recipe export 7 --candidate best``: a first argument
    that is not a subcommand name (``validate``, ``convert``, ``export``) goes to ``export``."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None,
                                                                          list[str]]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "export", self.commands["export"], args
        return super().resolve_command(ctx, args)


recipe_app = typer.Typer(cls=_RecipeGroup, no_args_is_help=True,
                         help="Export a search's recipes (`evomerge recipe ID`), check and convert recipe files.")
app.add_typer(recipe_app, name="recipe")
db_app = typer.Typer(help="The search database.", no_args_is_help=True)
app.add_typer(db_app, name="db")
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
    import math

    from evomerge.merging import materialize as write
    from evomerge.merging.checkpoints import open_checkpoint
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
    written = sum(math.prod(info.shape) for info in open_checkpoint(out).infos.values())  # a layer path adds some
    console.print(f"wrote {escape(str(out.resolve()))}: {_format_size(size)} in {len(weights)} safetensors "
                  f"file{'s' if len(weights) != 1 else ''} ({parsed.merge_method}, {written:,} parameters)",
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
    fmt = _recipe_format(to, "--to")
    _emit_recipe(_load_recipe(file), fmt, output, what="", where="--to")


def _recipe_format(name: str, option: str) -> str:
    """``mergekit`` (also ``yaml``) or ``json``; anything else is a one-line error naming ``option``."""
    fmt = {"mergekit": "mergekit", "yaml": "mergekit", "json": "json"}.get(name.lower())
    if fmt is None:
        raise UserError(f"unknown format {name!r}; use mergekit or json", where=option)
    return fmt


def _emit_recipe(parsed: Recipe, fmt: str, output: Path | None, *, what: str, where: str) -> None:
    """A recipe as mergekit YAML or our JSON, on stdout or into ``output``; ``what`` names it in the message."""
    from evomerge.errors import RecipeError

    try:
        text = parsed.to_mergekit_yaml() if fmt == "mergekit" else parsed.to_json() + "\n"
    except RecipeError as e:
        raise UserError(f"{what or 'this recipe'} cannot be written as mergekit YAML ({e.detail}); use json",
                        where=where) from None
    if output is None:
        sys.stdout.write(text)
        return
    _write(output, text)
    console.print(f"wrote {what + ' to ' if what else ''}{escape(str(output))}", highlight=False)


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


# ------------------------------------------------------------------------------------------------- searches

_DB = typer.Option(None, "--db", metavar="URL", envvar="EVOMERGE_DATABASE_URL", show_envvar=False,
                   help="Database URL (default: EVOMERGE_DATABASE_URL, else SQLite in the data folder).")
_EXECUTOR = typer.Option("ray", "--executor", help="ray (a local Ray, or --ray-address) or inline (this process).")
_RAY = typer.Option(None, "--ray-address", metavar="A", envvar="EVOMERGE_RAY_ADDRESS", show_envvar=False,
                    help="Join this Ray cluster (default: EVOMERGE_RAY_ADDRESS, else start a local one).")
_JSON = typer.Option(False, "--json", help="Print one JSON document on stdout instead of tables.")
_SERVER = typer.Option(None, "--server", metavar="URL", envvar="EVOMERGE_SERVER", show_envvar=False,
                       help="Ask this evomerge server (default: EVOMERGE_SERVER, else the local database).")
_TOKEN = typer.Option(None, "--token", metavar="T", envvar="EVOMERGE_TOKEN", show_envvar=False,
                      help="The server's API token (default: EVOMERGE_TOKEN).")
_BEDS = ("digits", "tinylm")


def _check_id(value: int | None) -> int | None:
    """Search ids are SQL integers: a number outside 0..2^63-1 is no id (one line, exit 2; not an overflow)."""
    from evomerge.service.results import MAX_ID

    if value is not None and not 0 <= value <= MAX_ID:
        raise UserError(f"{value} is not a search id (ids run from 1 to {MAX_ID}; see `evomerge list`)", where="ID")
    return value


def _id_argument(help: str | None = None) -> Any:
    return typer.Argument(..., metavar="ID", help=help, callback=_check_id)


def _store(db: str | None) -> Any:
    """The database of ``--db`` (migrated on open); use it as ``with _store(db) as store:``."""
    from evomerge.storage import Store

    return Store(db)


def _client(server: str | None, token: str | None) -> Any:
    from evomerge.service.client import Client

    return Client(server, token)


def _remote_summary(server: str, token: str | None, search_id: int, as_json: bool) -> tuple[Any, Any]:
    """(summary, the server's JSON document when ``as_json``) of a search on a server."""
    from evomerge.service.results import Summary

    with _client(server, token) as client:
        document = client.search(search_id)
    return Summary.from_dict(document), document if as_json else None


def _say_status(answer: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(answer, indent=2) + "\n")
    else:
        console.print(f"search {answer['id']}: {answer['status']} ({escape(answer.get('detail') or '')})",
                      highlight=False)


def _executor_kind(kind: str) -> str:
    kind = kind.lower()
    if kind not in ("ray", "inline"):
        raise UserError(f"unknown executor {kind!r}; use ray or inline", where="--executor")
    return kind


def _make_executor(spec: Any, kind: str, ray_address: str | None) -> Any:
    from evomerge.storage import data_dir
    from evomerge.workers import make_executor

    return make_executor(spec, kind=_executor_kind(kind), ray_address=ray_address,
                         log_dir=data_dir() / "ray" if ray_address is None else None)


def _check_beds(spec: Any) -> None:
    """A spec pointing into a test bed that was not built yet: one line saying how to build it."""
    base = Path(spec.models.base)
    if base.exists():
        return
    for parent in base.parents:
        if parent.parent.name == "testbeds" and parent.name in _BEDS and not parent.exists():
            raise UserError(f"{base} does not exist: build the {parent.name} test bed first with `evomerge testbed "
                            f"build {parent.name} {parent}`", where="models.base")


class _RunDisplay:
    """The progress bar of a running search (stderr, terminals only): evaluations, best so far, front size,
    candidates per minute, ETA."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err, transient=False,
                            disable=not err.is_terminal)
        self.task: Any = None

    def __enter__(self) -> "_RunDisplay":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, p: Any) -> None:
        if self.task is None:
            self.task = self.bar.add_task(f"search {p.search_id}", total=p.budget, info="")
        parts = []
        if p.best_values is not None and p.best_score is not None:
            parts.append(f"best {p.best_score:.4g}")
            if err.width >= 120:  # per-objective values only where they fit on one line
                parts[-1] += " (" + ", ".join(f"{n} {_g(p.best_values.get(n))}" for n in self.names) + ")"
        parts.append(f"front {p.front_size}")
        parts.append(f"{p.per_minute:.0f}/min")
        if p.eta_s is not None:
            parts.append(f"ETA {_duration(p.eta_s)}")
        if p.stages > 1:
            parts.append(f"stage {p.stage}/{p.stages}")
        self.bar.update(self.task, completed=p.evaluated, info=escape(" · ".join(parts)))


def _g(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _drive(store: Any, search_id: int, spec: Any, executor: Any, *, prepared: Any = None,
           references: bool = False, as_json: bool = False, take_over: bool = False) -> Any:
    """Run or resume a search in this process with a progress bar; returns the runner's result.

    A search that could not run to its end says so in one line on stderr (with ``--json`` the summary document
    still goes to stdout): exit 1 when it failed (a resume that cannot be exact, every candidate failed), was
    not started (it is done, or cancelled meanwhile) or was taken over by another runner; exit 130 after Ctrl-C,
    which leaves it ``cancelled (interrupted)`` for a resume."""
    from evomerge.service.runner import ResumeError, SearchFailedError, run_search, score_references
    from evomerge.storage.repository import LostOwnershipError

    def stop(message: str, code: int) -> typer.Exit:
        err.print(f"[red]error:[/red] search {search_id}: {escape(message)}", highlight=False)
        if as_json:
            _report(store, search_id, True)
        return typer.Exit(code)

    if references:
        score_references(store, search_id, executor=executor, spec=spec)
    try:
        with _RunDisplay(spec.objective_names) as display:
            result = run_search(store, search_id, executor=executor, progress=display, prepared=prepared,
                                take_over=take_over)
    except (ResumeError, LostOwnershipError) as e:
        raise stop(str(e), 1) from None
    except SearchFailedError as e:
        raise stop(e.detail, 1) from None
    except KeyboardInterrupt:
        raise stop(f"cancelled (interrupted); `evomerge resume {search_id}` continues it", 130) from None
    if result.stop_reason and result.stop_reason.startswith("not started"):
        raise stop(result.stop_reason, 1)
    return result
def _report(store: Any, search_id: int, as_json: bool, *, front_rows: int = 10) -> None:
    """The end of `run`, `resume` and `status`: one JSON document, or a summary and the front as tables."""
    from evomerge.service.results import summarize

    summary = summarize(store, search_id)
    _show(summary, summary.to_dict() if as_json else None, front_rows=front_rows)


def _show(summary: Any, document: dict[str, Any] | None, *, front_rows: int = 10) -> None:
    """A search's report: ``document`` as JSON on stdout when given (``--json``), else tables."""
    if document is not None:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return
    row = summary.row
    counts = row.counts or {}
    table = Table(show_header=False, box=None)
    table.add_row("search", f"{row.id} ({escape(row.name)})")
    table.add_row("status", row.status + (f" ({escape(row.stop_reason)})" if row.stop_reason else ""))
    if row.error:
        table.add_row("error", escape(row.error))
    table.add_row("algorithm", f"{row.algorithm}, seed {row.seed}")
    table.add_row("candidates", f"{counts.get('done', 0)} done, {counts.get('failed', 0)} failed, "
                  f"{counts.get('pending', 0)} pending of a budget of {row.budget}")
    if summary.best is not None:
        table.add_row("best", f"candidate {summary.best.index}: " + _values_text(summary.best.values))
    console.print(table)
    if summary.front:
        console.print(_front_table(summary, limit=front_rows))


def _values_text(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())


def _front_table(summary: Any, *, limit: int | None = None) -> Table:
    names = summary.names
    holdout = any(p.holdout for p in summary.front)
    title = f"Pareto front ({len(summary.front)} candidate{'s' if len(summary.front) != 1 else ''})"
    table = Table(title=title, title_justify="left")
    table.add_column("candidate")
    for name in names:
        table.add_column(name, justify="right")
        if holdout:
            table.add_column(f"{name} (holdout)", justify="right")
    table.add_column(f"{summary.scoring.scalarize} score", justify="right")
    shown = summary.front if limit is None else summary.front[:limit]
    for p in shown:
        cells = [str(p.index) + (" (best)" if summary.best and p.index == summary.best.index else "")]
        for name in names:
            cells.append(f"{p.values[name]:.4f}")
            if holdout:
                h = (p.holdout or {}).get(name)
                cells.append("-" if h is None else f"{h:.4f}")
        cells.append(f"{p.score:.4f}")
        table.add_row(*cells)
    for ref in summary.references:
        values = ref.get("values") or {}
        if not values:
            continue
        score = ref.get("score")
        cells = [f"expert {escape(ref['name'])}"]
        for name in names:
            cells.append(f"{values.get(name, float('nan')):.4f}")
            if holdout:
                h = (ref.get("holdout") or {}).get(name)
                cells.append("-" if h is None else f"{h:.4f}")
        cells.append("-" if score is None else f"{score:.4f}")
        table.add_row(*cells, style="dim")
    if limit is not None and len(summary.front) > limit:
        table.caption = f"{len(summary.front) - limit} more: evomerge front {summary.search_id}"
    return table


@app.command()
def run(
    spec_file: Optional[Path] = typer.Argument(None, metavar="SPEC", help="Job spec (YAML or JSON)."),
    db: Optional[str] = _DB,
    executor: str = _EXECUTOR,
    ray_address: Optional[str] = _RAY,
    resume_id: Optional[int] = typer.Option(None, "--resume", metavar="ID", callback=_check_id,
                                            help="Resume search ID instead of starting one (SPEC not needed)."),
    as_json: bool = _JSON,
) -> None:
    """Run a search to the end in this process, with a progress bar."""
    from evomerge.service.runner import prepare, submit
    from evomerge.spec import JobSpec

    if resume_id is not None:
        _resume(resume_id, db, executor, ray_address, as_json)
        return
    if spec_file is None:
        raise UserError("give a job spec file (evomerge run SPEC), or --resume ID", where="SPEC")
    _executor_kind(executor)
    spec = JobSpec.load(spec_file)
    _check_beds(spec)
    _quiet_transformers()
    prepared = prepare(spec)
    with _store(db) as store:
        with _make_executor(spec, executor, ray_address) as pool:  # started before the row exists
            search_id = submit(store, spec, str(spec_file.absolute()), prepared=prepared)
            if not as_json:
                err.print(f"search {search_id} ({escape(spec.name)}): {spec.algorithm.name}, "
                          f"{spec.budget.evaluations} evaluations", highlight=False)
            _drive(store, search_id, spec, pool, prepared=prepared, as_json=as_json)
        _report(store, search_id, as_json)


def _resume(search_id: int, db: str | None, executor: str, ray_address: str | None, as_json: bool,
            force: bool = False) -> None:
    from evomerge.service.results import search_row, spec_of
    from evomerge.service.runner import live_runner

    from evomerge.storage.repository import SearchBusyError

    _executor_kind(executor)
    with _store(db) as store:
        row = search_row(store, search_id)
        if row.status == "done":
            raise UserError(f"search {search_id} is done; there is nothing to resume", where="ID")
        alive = None if force else live_runner(store, search_id)
        if alive:
            raise SearchBusyError(f"search {search_id} is {row.status}: {alive}; cancel it first (evomerge "
                                  f"cancel {search_id}) or pass --force", where="ID")
        spec = spec_of(row)
        _quiet_transformers()
        if not as_json:
            err.print(f"resuming search {search_id} ({escape(row.name)})", highlight=False)
        with _make_executor(spec, executor, ray_address) as pool:
            _drive(store, search_id, spec, pool, as_json=as_json, take_over=force)
        _report(store, search_id, as_json)


@app.command()
def resume(
    search_id: int = _id_argument("The search to resume."),
    db: Optional[str] = _DB,
    executor: str = _EXECUTOR,
    ray_address: Optional[str] = _RAY,
    force: bool = typer.Option(False, "--force", help="Resume even when the search looks alive elsewhere."),
    server: Optional[str] = _SERVER,
    token: Optional[str] = _TOKEN,
    as_json: bool = _JSON,
) -> None:
    """Resume an interrupted or cancelled search from its last checkpoint; ends with exactly the candidates an
    uninterrupted run has. With --server, the server's queue resumes it."""
    if server:
        with _client(server, token) as client:
            answer = client.resume(search_id)
        _say_status(answer, as_json)
        return
    _resume(search_id, db, executor, ray_address, as_json, force=force)


@app.command("list")
def list_searches(
    db: Optional[str] = _DB,
    status: Optional[str] = typer.Option(None, help="Only searches with this status."),
    limit: int = typer.Option(50, min=1, help="At most this many (newest first)."),
    server: Optional[str] = _SERVER,
    token: Optional[str] = _TOKEN,
    as_json: bool = _JSON,
) -> None:
    """List the searches in the database (or on a server)."""
    if server:
        with _client(server, token) as client:
            items = client.searches(status=status, limit=limit)
    else:
        with _store(db) as store:
            items = [{"id": r.id, "name": r.name, "status": r.status, "algorithm": r.algorithm, "budget": r.budget,
                      "counts": dict(r.counts or {}),
                      "created_at": r.created_at.isoformat() if r.created_at else None}
                     for r in store.list_searches(status=status, limit=limit)]
    if as_json:
        keys = ("id", "name", "status", "algorithm", "budget", "counts", "created_at")
        sys.stdout.write(json.dumps([{k: item.get(k) for k in keys} for item in items], indent=2) + "\n")
        return
    if not items:
        console.print("no searches yet: evomerge demo, or evomerge run SPEC")
        return
    table = Table()
    for column in ("id", "name", "status", "algorithm", "done", "failed", "pending", "budget", "created"):
        table.add_column(column, justify="right" if column in ("id", "done", "failed", "pending", "budget")
                         else "left")
    for item in items:
        c = item.get("counts") or {}
        created = item.get("created_at")
        table.add_row(str(item["id"]), escape(item["name"]), item["status"], item["algorithm"],
                      str(c.get("done", 0)), str(c.get("failed", 0)), str(c.get("pending", 0)), str(item["budget"]),
                      created[:16].replace("T", " ") if created else "-")
    console.print(table)


@app.command()
def status(
    search_id: int = _id_argument(),
    db: Optional[str] = _DB,
    server: Optional[str] = _SERVER,
    token: Optional[str] = _TOKEN,
    as_json: bool = _JSON,
) -> None:
    """A search's status, counts, best candidate and front."""
    if server:
        _show(*_remote_summary(server, token, search_id, as_json))
        return
    with _store(db) as store:
        _report(store, search_id, as_json)


@app.command()
def cancel(
    search_id: int = _id_argument(),
    db: Optional[str] = _DB,
    server: Optional[str] = _SERVER,
    token: Optional[str] = _TOKEN,
) -> None:
    """Ask a running search to stop: its runner stops dispatching within seconds (resume continues it). A search
    whose runner is gone is cancelled at once."""
    from evomerge.service.results import search_row

    if server:
        with _client(server, token) as client:
            now = client.search(search_id)["status"]
            if now in ("done", "failed", "cancelled"):
                console.print(f"search {search_id} is already {now}")
                return
            _say_status(client.cancel(search_id), False)
        return
    with _store(db) as store:
        row = search_row(store, search_id)
        if row.status in ("done", "failed", "cancelled"):
            console.print(f"search {search_id} is already {row.status}")
            return
        console.print(f"search {search_id}: {store.request_cancel(search_id)}")


@recipe_app.command("export")
def recipe_export(
    search_id: int = _id_argument("The search."),
    candidate: str = typer.Option("best", "--candidate", metavar="CID|best", help="A candidate id, or best."),
    fmt: str = typer.Option("mergekit", "--format", help="mergekit (YAML) or json."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write here instead of stdout."),
    db: Optional[str] = _DB,
    server: Optional[str] = _SERVER,
    token: Optional[str] = _TOKEN,
) -> None:
    """Export a candidate's recipe (default: the best) as mergekit YAML or our JSON."""
    from evomerge.service.results import candidate_recipe

    kind = _recipe_format(fmt, "--format")
    if server:
        with _client(server, token) as client:
            index, text = client.recipe(search_id, candidate, kind)
        what = f"candidate {index}'s recipe" if index is not None else "the recipe"
        if output is None:
            sys.stdout.write(text)
        else:
            _write(output, text)
            console.print(f"wrote {what} to {escape(str(output))}", highlight=False)
        return
    with _store(db) as store:
        index, parsed = candidate_recipe(store, search_id, candidate)
    _emit_recipe(parsed, kind, output, what=f"candidate {index}'s recipe", where="--format")


@app.command()
def front(
    search_id: int = _id_argument(),
    output: Optional[Path] = typer.Option(None, "-o", "--output", metavar="FILE.png|FILE.csv",
                                          help="Write the front as a CSV table or a PNG plot."),
    db: Optional[str] = _DB,
    server: Optional[str] = _SERVER,
    token: Optional[str] = _TOKEN,
    as_json: bool = _JSON,
) -> None:
    """The Pareto front of a search: a table, a CSV file or a picture."""
    from evomerge.service.results import summarize

    png = output is not None and output.suffix.lower() == ".png"
    points = None
    if server:
        summary, document = _remote_summary(server, token, search_id, True)
        if png:
            with _client(server, token) as client:
                points = list(client.scored(search_id))
    else:
        with _store(db) as store:
            summary = summarize(store, search_id)
            document = summary.to_dict()
            if png:
                points = [(index, values) for index, values, _ in summary.scored]
    if as_json:  # the same document as `status --json`
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return
    if output is None:
        console.print(_front_table(summary))
        return
    suffix = output.suffix.lower()
    if suffix == ".csv":
        _write(output, _front_csv(summary))
    elif suffix == ".png":
        from evomerge.service.plots import front_png

        try:
            front_png(summary, points or [], output)
        except OSError as e:
            raise UserError(f"cannot write {output}: {e.strerror}", where="--output") from None
    else:
        raise UserError(f"{output.name}: write the front to a .csv or .png file", where="--output")
    console.print(f"wrote {escape(str(output))} ({len(summary.front)} candidates on the front)", highlight=False)


@app.command()
def serve(
    host: Optional[str] = typer.Option(None, help="Address to listen on (default 127.0.0.1; another address needs "
                                       "EVOMERGE_API_TOKENS)."),
    port: Optional[int] = typer.Option(None, help="Port (default 8000)."),
    db: Optional[str] = _DB,
    executor: Optional[str] = typer.Option(None, "--executor", help="ray (default) or inline."),
    ray_address: Optional[str] = _RAY,
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", min=1,
                                                 help="Searches that run at once (default 2; the rest wait)."),
    model_root: Optional[list[Path]] = typer.Option(None, "--model-root", help="A folder spec paths may point "
                                                    "into (repeatable; default EVOMERGE_MODEL_ROOTS, else here)."),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="Log every request."),
) -> None:
    """Serve the REST API and the dashboard; run submitted searches on Ray workers (or in process)."""
    import logging

    from evomerge.service.settings import Settings

    roots = tuple(p.expanduser().resolve() for p in model_root) if model_root else None
    settings = Settings.from_env().with_overrides(host=host, port=port, database_url=db, executor=executor,
                                                  ray_address=ray_address, max_concurrent=max_concurrent,
                                                  model_roots=roots)
    with _store(settings.database_url) as store:  # a wrong URL is one line here, not a failed start-up
        where = _safe_url(store)
    _quiet_transformers()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    service_log = logging.getLogger("evomerge.service")
    service_log.addHandler(handler)
    service_log.setLevel(logging.INFO)
    service_log.propagate = False
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    err.print(f"evomerge {_version()} on http://{shown}:{settings.port} · dashboard / · API /docs · "
              f"database {escape(where)}", highlight=False)
    for line in settings.describe():
        err.print(f"  {escape(line)}", highlight=False)
    from evomerge.service.server import run_server

    run_server(settings, access_log=access_log)


def _version() -> str:
    from evomerge import __version__

    return __version__


@app.command()
def submit(
    spec_file: Path = typer.Argument(..., metavar="SPEC", help="Job spec (YAML or JSON)."),
    server: Optional[str] = _SERVER,
    token: Optional[str] = _TOKEN,
    wait: bool = typer.Option(False, "--wait", help="Follow the search with a progress bar until it ends."),
    paths: str = typer.Option("auto", "--paths", help="spec: resolve relative paths against the spec's folder "
                              "(files on this machine); server: send them as written, for the server's model "
                              "roots; auto: spec when the server is on this machine."),
    as_json: bool = _JSON,
) -> None:
    """Submit a search to an evomerge server."""
    from evomerge.service.client import Client
    from evomerge.spec import JobSpec

    mode = paths.lower()
    if mode not in ("auto", "spec", "server"):
        raise UserError(f"unknown value {paths!r}; use auto, spec or server", where="--paths")
    with Client(server, token) as client:
        if mode == "auto":
            from urllib.parse import urlsplit

            host = urlsplit(client.server).hostname or ""
            mode = "spec" if host in ("127.0.0.1", "localhost", "::1") else "server"
        spec = JobSpec.load(spec_file)  # checked here first: a typo costs no round trip
        if mode == "server":
            spec = JobSpec.parse(spec_file.read_text(encoding="utf-8"), where=str(spec_file))
        else:
            _check_beds(spec)
        answer = client.submit(spec.model_dump(mode="json"))
        search_id = answer["id"]
        if not wait:
            if as_json:
                sys.stdout.write(json.dumps(answer, indent=2) + "\n")
            else:
                console.print(f"submitted search {search_id} ({escape(spec.name)}): {client.server}"
                              f"{answer.get('dashboard', '')}", highlight=False)
            return
        err.print(f"search {search_id} ({escape(spec.name)}) submitted to {client.server}; following it "
                  "(Ctrl-C stops following, not the search)", highlight=False)
        document = _follow(client, search_id, spec.objective_names)
    from evomerge.service.results import Summary

    _show(Summary.from_dict(document), document if as_json else None)
    if document["status"] != "done":
        err.print(f"[red]error:[/red] search {search_id} ended {document['status']}"
                  + (f": {escape(document['error'])}" if document.get("error") else ""), highlight=False)
        raise typer.Exit(1)


def _follow(client: Any, search_id: int, names: list[str], poll: float = 1.0) -> dict[str, Any]:
    """Poll a search on a server with the progress bar until it ends; returns its last document."""
    import time

    from evomerge.service.runner import RunProgress

    started, first = time.monotonic(), None
    try:
        with _RunDisplay(names) as display:
            while True:
                document = client.search(search_id)
                evaluated = int(document.get("evaluated", 0))
                first = evaluated if first is None else first
                elapsed = time.monotonic() - started
                rate = (evaluated - first) / elapsed * 60 if elapsed > 0 else 0.0
                best = document.get("best")
                left = max(0, document["budget"] - evaluated)
                display(RunProgress(search_id=search_id, evaluated=evaluated, budget=document["budget"], stage=1,
                                    stages=1, best_index=None if best is None else best["id"],
                                    best_values=None if best is None else best["values"],
                                    best_score=None if best is None else best["score"],
                                    front_size=len(document.get("front") or []), per_minute=rate,
                                    eta_s=left / rate * 60 if rate > 0 else None))
                if document["status"] in ("done", "failed", "cancelled"):
                    return document
                time.sleep(poll)
    except KeyboardInterrupt:
        err.print(f"stopped following; search {search_id} goes on on the server (evomerge status {search_id} "
                  f"--server {client.server})", highlight=False)
        raise typer.Exit(130) from None


def _front_csv(summary: Any) -> str:
    import csv
    import io

    names = summary.names
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["candidate", "kind", *names, *(f"{n}_holdout" for n in names), "score"])
    for p in summary.front:
        writer.writerow([p.index, "best" if summary.best and p.index == summary.best.index else "front",
                         *(p.values[n] for n in names), *((p.holdout or {}).get(n, "") for n in names), p.score])
    for ref in summary.references:
        values, holdout = ref.get("values") or {}, ref.get("holdout") or {}
        writer.writerow([f"expert:{ref['name']}", "reference", *(values.get(n, "") for n in names),
                         *(holdout.get(n, "") for n in names), ""])
    return buffer.getvalue()


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}", where="--output") from None


@db_app.command("upgrade")
def db_upgrade(db: Optional[str] = _DB) -> None:
    """Create or migrate the database schema to the latest version."""
    with _store(db) as store:  # opening migrates
        console.print(f"database ready: {escape(_safe_url(store))}", highlight=False)


def _safe_url(store: Any) -> str:
    url = getattr(store, "url", None)
    if url is None:
        engine = getattr(store, "engine", None)
        url = getattr(engine, "url", "") if engine is not None else ""
    try:
        return url.render_as_string(hide_password=True)  # type: ignore[union-attr]
    except AttributeError:
        return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", str(url))


# --------------------------------------------------------------------------------------------------- demo

DEMO_BUDGET = 160


def demo_spec(bed: Path, *, algorithm: str, budget: int, workers: int) -> dict[str, Any]:
    """The demo's job: a TIES merge of the digits experts for 0-4 and 5-9, per expert and layer, with one
    objective per task (a front of trade-offs), holdout on the test digits."""
    options = {"nsga2": {"pop_size": 16}, "cmaes": {"popsize": 8}}.get(algorithm, {})
    return {
        "name": "demo-digits", "seed": 0,
        "models": {"base": str(bed / "base"), "experts": [{"name": "low", "path": str(bed / "expert_0_4")},
                                                          {"name": "high", "path": str(bed / "expert_5_9")}]},
        "space": {"kind": "parameter", "method": "ties", "layer_groups": 2,
                  "search": {"weight": [0.0, 1.5], "density": [0.1, 1.0]}, "fixed": {"normalize": False}},
        "objectives": [
            {"name": f"acc_{t}", "task": {"kind": "classification", "data": str(bed / f"search_{t}.npz"),
                                          "holdout": str(bed / f"test_{t}.npz")}, "direction": "maximize"}
            for t in ("0_4", "5_9")],
        "algorithm": {"name": algorithm, "options": options},
        "budget": {"evaluations": budget, "wall_time_s": 600},
        "resources": {"workers": workers, "cpus_per_worker": 1},
    }


@app.command()
def demo(
    algorithm: str = typer.Option("nsga2", help="The optimizer (nsga2, cmaes, optuna, random, m2n2, map)."),
    budget: int = typer.Option(DEMO_BUDGET, min=1, help="Candidates to evaluate."),
    executor: str = _EXECUTOR,
    ray_address: Optional[str] = _RAY,
    out: Optional[Path] = typer.Option(None, help="Output folder (default: <data dir>/demo)."),
    db: Optional[str] = _DB,
) -> None:
    """Build the digits test bed if missing, search a merge of its two experts, print the front and write the
    best recipe."""
    import yaml

    from evomerge.service.results import candidate_recipe, summarize
    from evomerge.service.runner import prepare, submit
    from evomerge.spec import JobSpec
    from evomerge.storage import data_dir
    from evomerge.testbeds import build

    _executor_kind(executor)
    _quiet_transformers()
    bed_dir = data_dir() / "testbeds" / "digits"
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(), console=err,
                  transient=True, disable=not err.is_terminal) as progress:
        progress.add_task("digits test bed (built once)", total=None)
        bed = Path(build("digits", bed_dir)).absolute()
    out = (out or data_dir() / "demo").absolute()
    out.mkdir(parents=True, exist_ok=True)
    data = demo_spec(bed, algorithm=algorithm, budget=budget, workers=1 if executor == "inline" else 2)
    spec_path = out / "demo-spec.yaml"
    spec_path.write_text(yaml.safe_dump(data, sort_keys=False))
    spec = JobSpec.from_dict(data, where=str(spec_path))
    prepared = prepare(spec)
    with _store(db) as store:
        with _make_executor(spec, executor, ray_address) as pool:
            search_id = submit(store, spec, str(spec_path), prepared=prepared)
            err.print(f"search {search_id}: {algorithm} over a TIES merge of two digits experts (0-4 and 5-9), "
                      f"{budget} evaluations", highlight=False)
            result = _drive(store, search_id, spec, pool, prepared=prepared, references=True)
        summary = summarize(store, search_id)
        console.print(_front_table(summary, limit=12))
        if summary.best is None:
            raise UserError(f"search {search_id} ended ({result.status}) without a successful candidate")
        index, best = candidate_recipe(store, search_id, "best")
    yaml_path, json_path = out / "best-recipe.yml", out / "best-recipe.json"
    yaml_path.write_text(best.to_mergekit_yaml())
    json_path.write_text(best.to_json() + "\n")
    means = {ref["name"]: sum(ref["values"].values()) / len(ref["values"])
             for ref in summary.references if ref.get("values")}
    best_mean = sum(summary.best.values.values()) / len(summary.best.values)
    console.print(f"best merge: candidate {index}, mean accuracy {best_mean:.4f} (experts alone: "
                  + ", ".join(f"{n} {m:.4f}" for n, m in means.items()) + ")", highlight=False)
    console.print(f"best recipe: {escape(str(yaml_path))} (mergekit) and {escape(str(json_path))}", highlight=False)
    console.print(f"see it later: evomerge status {search_id} · evomerge front {search_id} -o front.png · "
                  f"evomerge recipe {search_id} --candidate best", highlight=False)




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
