"""The search runner: ask → write ``pending`` → dispatch → write scores → tell → checkpoint, until the budget.

One loop drives every optimizer, space and executor (DESIGN.md, "Execution")::

    search_id = submit(store, spec, spec_path)              # validates everything, then writes the row
    with make_executor(spec, kind="ray") as executor:
        run_search(store, search_id, executor=executor)     # to the end, a cancel, or the wall-time budget

Guarantees:

* **Deterministic.** Batches are synchronous: the optimizer's natural batch (``ask()``, cut to the remaining
  budget) or, for steady-state optimizers that take any ``n``, ``ask(spec.resources.workers)``; the whole batch
  goes to the pool (which keeps its workers busy) and is told in candidate-index order once every result is in.
  Worker timing never changes what is asked next, so the same seed gives the same candidates inline and on Ray.
* **Exact resume.** Optimizer state is checkpointed after every tell together with the stage, the candidate
  index the stage started at and the previous stage's best recipe. :func:`run_search` on an interrupted search
  restores the last checkpoint and replays: every genome asked at an index that already has a row must be
  bit-identical to the stored one (else :class:`ResumeError`); ``done``/``failed`` rows are reused without
  dispatch, ``pending`` rows are dispatched again. The search ends with exactly the candidates of an
  uninterrupted run: none lost, none duplicated.
* **Identical recipes are scored once** per search: a candidate whose recipe hash matches an earlier ``done``
  one (in an earlier batch or the same batch) copies its results (``reused_from``); repeats count toward the
  evaluation budget (they are candidates the optimizer asked for) but cost no evaluation.
* **Holdout** scores (objectives with a ``holdout`` file) are computed for the best candidate and the front
  members that lack them, at most every :data:`HOLDOUT_EVERY_S` seconds or every 10% of the budget, and once at
  the end. They are reported beside the search scores and never reach the optimizer.
* **Cancel** (``evomerge cancel``, another process) sets the row to ``cancelling``; a watcher thread polls the
  row every :data:`POLL_S` second(s) (and heartbeats it) and dispatch stops. Pending rows stay pending, so a
  resume redoes them. A search whose runner is gone is cancelled at once (:meth:`Store.request_cancel`).
* **One runner per search.** :meth:`Store.start_search` records this runner's owner token (host, pid, uuid) and
  takes a ``running``/``cancelling`` row over only from a runner that is gone (process dead on this host, or
  heartbeat older than ``STALE_AFTER_S``); heartbeats and status writes check the token, and a runner whose
  search was taken over stops and raises :class:`~evomerge.storage.repository.LostOwnershipError`.
* **Wall time** ends a search ``done``; candidates asked but never told are deleted, so it has no pending rows.

The runner depends on the storage repository (:mod:`evomerge.storage`), the executors (:mod:`evomerge.workers`)
and the torch-free search package; it loads the model set only to measure the space.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from evomerge.errors import UserError
from evomerge.search import OPTIMIZERS, Optimizer, Problem, Space
from evomerge.service.results import Scoring, rank_front
from evomerge.spec import JobSpec, SpecError
from evomerge.storage.repository import LostOwnershipError, new_owner, runner_alive

if TYPE_CHECKING:
    from evomerge.merging import ModelSet, Recipe
    from evomerge.storage import Store

POLL_S = 1.0  # how often the watcher reads the row (cancel requests) at most
HEARTBEAT_S = 5.0  # how often the watcher heartbeats the row (the contract: at least every 10 s)
HOLDOUT_EVERY_S = 20.0  # holdout scoring at most this often (or every HOLDOUT_EVERY_FRACTION of the budget)
HOLDOUT_EVERY_FRACTION = 0.1
SHUTDOWN = "shutdown"  # a should_stop() answering this requeues the search instead of cancelling it
STEADY_STATE = frozenset({"m2n2"})  # optimizers whose ask(n) takes any n without replacing in-flight genomes
CHECKPOINT_FORMAT = 1
WRITE_EVERY_S = 0.1  # results arriving faster than this share a transaction
CHECKPOINT_CHEAP_S = 0.02  # checkpoints that take less are saved after every tell
CHECKPOINT_SHARE = 0.05  # costlier ones take at most this share of the run time (see Runner._checkpoint)


class SearchFailedError(UserError):
    """A search that cannot go on or produced nothing: a hybrid stage without one successful candidate, every
    candidate failed. The row is marked ``failed`` with this message; the CLI prints it as one line, exit 1."""

    exit_code = 1


class ResumeError(RuntimeError):
    """The optimizer asked for something other than what the interrupted run stored: resuming would not
    reproduce it (a changed library version, a changed model, an edited row)."""


# ---------------------------------------------------------------------------------------------- preparing


@dataclass
class Prepared:
    """A validated job: its spec (absolute paths), the loaded model set and the space laid out for it."""

    spec: JobSpec
    model_set: "ModelSet"
    space: Space


def _torch_dtype(name: str | None) -> Any:
    from evomerge.merging.modelset import parse_dtype

    try:
        return parse_dtype(name, "models.dtype")
    except UserError as e:
        raise SpecError(e.detail, where="models.dtype") from None


def _spec_where(where: str | None) -> str:
    """A model-loading error's location as the spec field: ``experts.low`` → ``models.experts.low``."""
    if not where:
        return "models"
    return where if where.startswith("models") else f"models.{where}"


def prepare(spec: JobSpec, *, check_data: bool = True) -> Prepared:
    """Check everything a search needs before any row is written: paths, the experts against the base, the
    space against the model's shape, every objective's data file. Raises :class:`SpecError` naming the field.
    """
    from evomerge.errors import CheckpointError, ModelMismatchError
    from evomerge.evaluation import Evaluator
    from evomerge.merging import ModelSet
    from evomerge.service.spaces import space_for

    spec.check_paths()
    try:
        model_set = ModelSet.load(spec.models.base, {e.name: e.path for e in spec.models.experts},
                                  device="cpu", dtype=_torch_dtype(spec.models.dtype))
    except (ModelMismatchError, CheckpointError) as e:
        raise SpecError(e.detail, where=_spec_where(e.where)) from None
    space = space_for(spec, model_set)
    check_stages(spec, model_set, space)
    check_optimizer(spec, space)
    if check_data:
        evaluator = Evaluator(model_set, spec.objectives, device="cpu")
        evaluator.check("data")
        evaluator.check("holdout")
    return Prepared(spec, model_set, space)


def check_optimizer(spec: JobSpec, space: Space) -> None:
    """Build the first stage's optimizer once and drop it, so options that do not fit this space or budget (a MAP
    budget below its design, initial points too few for the coefficients) are refused before any row is written,
    not by a search that starts and fails."""
    budget = space.stage_budgets(spec.budget.evaluations)[0]
    build_optimizer(spec, space.stage(1, None), budget)


def check_stages(spec: JobSpec, model_set: "ModelSet", space: Space) -> None:
    """Decode each stage's default genome (x0) and bind it to the loaded models, so a space the models cannot run
    (a layer path through an MLP, whose layers differ in shape) is refused before the search starts, instead of
    every candidate failing. Raises :class:`SpecError` at ``space.kind``."""
    from evomerge.errors import RecipeError
    from evomerge.merging.mlp import is_mlp_config
    from evomerge.service.spaces import decode

    previous = None
    for k, budget in enumerate(space.stage_budgets(spec.budget.evaluations), start=1):
        if budget <= 0:
            break
        stage = space.stage(k, previous)
        x0 = getattr(stage, "x0", None)
        x0 = (np.asarray(stage.lower) + np.asarray(stage.upper)) / 2 if x0 is None else x0
        decoded = decode(stage, np.asarray(x0, dtype=np.float64))
        if isinstance(decoded, np.ndarray):
            continue
        try:
            model_set.bind(decoded)
            config = model_set.merged_config(decoded)
        except (RecipeError, ValueError) as e:
            raise SpecError(f"a {spec.space.kind} search cannot merge these models: {e}", where="space.kind") from None
        if decoded.path and (config is None or is_mlp_config(config)):
            raise SpecError(f"a {spec.space.kind} search stacks transformer layers (a layer path), and these models "
                            "have none (an MLP, or no config.json); use kind: parameter", where="space.kind")
        previous = decoded


def submit(store: "Store", spec: JobSpec, spec_path: str | None = None, *,
           prepared: Prepared | None = None) -> int:
    """Validate ``spec`` (see :func:`prepare`) and create its search row (status ``queued``); returns its id.

    Nothing is written when the spec is wrong. ``spec`` should carry absolute paths (``JobSpec.load`` does that
    for files) so that a resume from another folder finds the same files.
    """
    if prepared is None:
        prepare(spec)
    return store.create_search(
        name=spec.name, spec=spec.model_dump(mode="json"), algorithm=spec.algorithm.name, seed=spec.seed,
        budget=spec.budget.evaluations,
        objectives=[{"name": o.name, "direction": o.direction} for o in spec.objectives],
        spec_path=None if spec_path is None else str(spec_path), status="queued")


# ------------------------------------------------------------------------------------------------ progress


@dataclass
class RunProgress:
    """What a progress display shows after each told batch."""

    search_id: int
    evaluated: int  # candidates with a result (done or failed), this run and earlier ones
    budget: int
    stage: int
    stages: int
    best_index: int | None = None
    best_values: dict[str, float] | None = None
    best_score: float | None = None
    front_size: int = 0
    per_minute: float = 0.0  # candidates per minute in this run
    eta_s: float | None = None


@dataclass
class RunResult:
    search_id: int
    status: str
    stop_reason: str | None
    evaluated: int


# ------------------------------------------------------------------------------------------------- helpers


def weights_hash(weights: np.ndarray) -> str:
    """The identity of a candidate given as flat weights: sha256 of its float32 bytes (first 16 hex digits)."""
    return hashlib.sha256(np.ascontiguousarray(weights, dtype=np.float32).tobytes()).hexdigest()[:16]


def same_genome(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical float64 genomes (what an exact resume needs; ``==`` would call -0.0 and 0.0 equal)."""
    a = np.ascontiguousarray(np.asarray(a, dtype="<f8"))
    b = np.ascontiguousarray(np.asarray(b, dtype="<f8"))
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def one_line(error: BaseException) -> str:
    """An exception as one line for the row's ``error`` column."""
    text = str(error).strip().splitlines()
    message = text[0] if text else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def build_optimizer(spec: JobSpec, stage: Space, budget: int) -> Optimizer:
    """A fresh optimizer for one stage (a new one per stage of a hybrid search). The problem carries the stage's
    space as ``problem.space``: M2N2 reads its representation (fields or weights) from it."""
    problem = Problem.for_search(stage, spec, budget=budget)
    return OPTIMIZERS[spec.algorithm.name](problem, spec.algorithm.options, spec.seed)


@dataclass
class _Entry:
    """One candidate of the current batch."""

    index: int
    genome: np.ndarray
    recipe: str | None
    weights: np.ndarray | None
    recipe_hash: str
    status: str = "pending"
    values: dict[str, float] | None = None
    per_example: dict[str, np.ndarray] | None = None
    finished_before: bool = False  # a done/failed row of an interrupted run (already counted)


@dataclass
class _Known:
    """A finished candidate the runner remembers (for dedup, the front and the best)."""

    index: int
    values: dict[str, float]
    per_example: dict[str, np.ndarray] | None


class _Watch:
    """A thread that heartbeats the row and notices cancel requests, so neither waits for a slow candidate."""

    def __init__(self, store: "Store", search_id: int, owner: str) -> None:
        self.store = store
        self.search_id = search_id
        self.owner = owner
        self.cancelled = threading.Event()
        self.lost = threading.Event()  # another runner took the search over: stop, write nothing more
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"evomerge-watch-{search_id}", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> "_Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._halt.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        from evomerge.storage.repository import LostOwnershipError

        last_beat = time.monotonic()
        while not self._halt.wait(POLL_S):
            try:
                row = self.store.get_search(self.search_id)
                if row is not None and row.owner != self.owner:
                    self.lost.set()
                elif row is None or row.status in ("cancelling", "cancelled"):
                    self.cancelled.set()
                if time.monotonic() - last_beat >= HEARTBEAT_S:
                    self.store.heartbeat(self.search_id, owner=self.owner)
                    last_beat = time.monotonic()
            except LostOwnershipError:
                self.lost.set()
            except Exception as e:  # a database hiccup must not kill the search; the next poll retries
                self.error = e


# --------------------------------------------------------------------------------------------------- runner


class Runner:
    """Drives one search to its end; see the module docstring. Build with :func:`run_search`."""

    def __init__(self, store: "Store", search_id: int, *, executor: Any,
                 progress: Callable[[RunProgress], None] | None = None,
                 should_stop: Callable[[], bool | str] | None = None, prepared: Prepared | None = None,
                 take_over: bool = False, from_status: str | None = None) -> None:
        self.store = store
        self.take_over = take_over
        self.search_id = search_id
        self.executor = executor
        self.progress = progress
        self.user_stop = should_stop
        row = store.get_search(search_id)
        if row is None:
            raise UserError(f"there is no search {search_id}", where="ID")
        self.row = row
        # the status the caller decided to start from (default: the one read now); a search whose status moved
        # since — a cancel while the controller scored its experts — is not started
        self.from_status = from_status or row.status
        self.spec = prepared.spec if prepared is not None else JobSpec.from_dict(row.spec, where=f"search {search_id}")
        self.prepared = prepared
        self.names = self.spec.objective_names
        self.directions = tuple(o.direction for o in self.spec.objectives)
        self.weights = tuple(o.weight for o in self.spec.objectives)
        self.has_holdout = any(o.task.holdout for o in self.spec.objectives)
        self.budget = self.spec.budget.evaluations
        self.wall_time = self.spec.budget.wall_time_s
        # filled by run()
        self.by_hash: dict[str, _Known] = {}
        self.front: list[_Known] = []
        self.best: _Known | None = None
        self.best_score: float | None = None
        self.scoring = Scoring.of(self.spec.model_dump(mode="json"))
        self.owner = new_owner()
        self.next_index = 0  # the first candidate index not told yet
        self.holdout_done: set[int] = set()
        self.evaluated = 0
        self.evaluated_here = 0
        self.elapsed_before = 0.0
        self.started = time.monotonic()
        self._checkpoint_at, self._checkpoint_cost = self.started, 0.0
        self.watch: _Watch | None = None
        self.stop_reason: str | None = None
        self.last_holdout = (time.monotonic(), 0)
        self.stage_spaces: dict[int, Space] = {}
        self.loaded_rows: dict[int, Any] = {}  # candidate rows present when this run started, by index

    # -- the loop -------------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        store, sid = self.store, self.search_id
        if self.prepared is None:
            self.prepared = prepare(self.spec, check_data=False)
        space = self.prepared.space
        # Compare-and-set from the status this runner was built on: a cancel that came meanwhile wins, and a
        # search a live runner holds raises SearchBusyError (two resumes of one search: one wins).
        status_now = store.start_search(sid, owner=self.owner, from_status=self.from_status,
                                        **({"stale_after": 0.0} if self.take_over else {}))
        if status_now != "running":
            return RunResult(sid, status_now, f"not started: the search is {status_now}", 0)
        store.add_event(sid, "started", {"pid": os.getpid(), "host": socket.gethostname(), "owner": self.owner,
                                         "executor": type(self.executor).__name__,
                                         "workers": int(getattr(self.executor, "workers", 1))})
        try:
            with _Watch(store, sid, self.owner) as self.watch:
                status = self._loop(space)
                if status == "done" and self.best is None and self.evaluated > 0:
                    raise SearchFailedError(self._all_failed())
        except KeyboardInterrupt:
            self._finish("cancelled", stop_reason="interrupted")
            raise
        except LostOwnershipError:
            raise
        except BaseException as e:
            self._finish("failed", error=one_line(e) if not isinstance(e, UserError) else str(e))
            raise
        if self.watch.lost.is_set():
            raise LostOwnershipError(sid, store.get_search(sid).owner)
        self._finish(status, stop_reason=self.stop_reason, evaluated=self.evaluated,
                     best=None if self.best is None else self.best.index)
        return RunResult(sid, status, self.stop_reason, self.evaluated)

    def _finish(self, status: str, **data: Any) -> None:
        """The last write of this runner: the status (only while it still holds the search) and its event."""
        self.store.set_status(self.search_id, status, owner=self.owner, error=data.get("error"),
                              stop_reason=data.get("stop_reason"))
        self.store.add_event(self.search_id, "finished", {"status": status, **data})

    def _all_failed(self) -> str:
        first = next((r for r in self.store.candidates(self.search_id, status="failed", limit=1)), None)
        why = "" if first is None or not first.error else f"; the first (candidate {first.index}): {first.error}"
        return f"every candidate of search {self.search_id} failed ({self.evaluated}){why}"

    def _loop(self, space: Space) -> str:
        self._load_known()
        budgets = space.stage_budgets(self.budget)
        checkpoint = self.store.latest_checkpoint(self.search_id)
        stage_no, stage_start, previous, opt = 1, 0, None, None
        if checkpoint is not None:
            state = checkpoint.state
            if state.get("format") != CHECKPOINT_FORMAT:
                raise ResumeError(f"the search cannot be resumed exactly: checkpoint format "
                                  f"{state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
            stage_no, stage_start = int(state["stage"]), int(state["stage_start"])
            self.next_index = int(checkpoint.told)
            previous = self._recipe(state.get("previous"))
            self.elapsed_before = float(state.get("elapsed_s", 0.0))
            stage = self._stage(space, stage_no, previous)
            opt = build_optimizer(self.spec, stage, budgets[stage_no - 1])
            opt.load_state_dict(state["optimizer"])
        self.started = time.monotonic()
        while stage_no <= len(budgets):
            stage_budget = budgets[stage_no - 1]
            if stage_budget <= 0:
                break
            stage = self._stage(space, stage_no, previous)
            if opt is None:
                opt = build_optimizer(self.spec, stage, stage_budget)
                self.store.add_event(self.search_id, "stage", {"stage": stage_no, "stages": len(budgets),
                                                               "budget": stage_budget, "dim": stage.dim,
                                                               "first_index": stage_start})
            while not opt.done:
                reason = self._stop_reason()
                if reason is not None:
                    return self._stopped_status(reason)
                remaining = stage_budget - opt.num_told
                if opt.name in STEADY_STATE:
                    genomes = opt.ask(min(self.spec.resources.workers, remaining))
                else:
                    genomes = opt.ask()[:remaining]
                if not genomes:
                    raise RuntimeError(f"the {opt.name} optimizer asked for nothing before its budget")
                first = stage_start + opt.num_told
                entries = self._enter(stage, stage_no, first, genomes)
                if not self._dispatch(entries):
                    return self._stopped_status(self._stop_reason() or "stopped")
                opt.tell([e.genome for e in entries],
                         [[None] * len(self.names) if e.status != "done" else [e.values.get(n) for n in self.names]
                          for e in entries],
                         [e.per_example if e.status == "done" else None for e in entries])
                self._absorb(entries)
                self._checkpoint(first + len(entries), stage_no, stage_start, previous, opt, len(budgets),
                                 force=opt.done)
                self.next_index = first + len(entries)
                self._maybe_holdout()
                self._report_progress(stage_no, len(budgets))
            if opt.stop_reason and stage_no == len(budgets):
                self.stop_reason = f"optimizer: {opt.stop_reason}"
            best = opt.best()
            previous = None if best is None else self._recipe_of(stage_start + best.index)
            stage_start += opt.num_told
            stage_no += 1
            opt = None
            if stage_no <= len(budgets) and previous is None:
                raise SearchFailedError(
                    f"stage {stage_no - 1} of search {self.search_id} ended without a successful candidate, and "
                    f"stage {stage_no} starts from its best recipe" + self._all_failed().partition(")")[2])
        self._holdout(force=True)
        if self.stop_reason is None:
            self.stop_reason = "budget"
        return "done"

    # -- state ----------------------------------------------------------------------------------------------

    def _checkpoint(self, told: int, stage_no: int, stage_start: int, previous: "Recipe | None", opt: Optimizer,
                    stages: int, *, force: bool = False) -> None:
        """Save the optimizer's state after a tell.

        Cheap states (every optimizer but M2N2 over full weights: kilobytes) are saved after every tell. A state
        whose last save took longer than :data:`CHECKPOINT_CHEAP_S` is saved again only once that cost is at most
        :data:`CHECKPOINT_SHARE` of the time since — an M2N2 archive of full weights is megabytes, and saving it
        after every child would dominate the run. Resume stays exact either way: it restores the last state
        saved and replays the finished candidates after it without scoring them again.
        """
        now = time.monotonic()
        if (not force and self._checkpoint_cost > CHECKPOINT_CHEAP_S
                and self._checkpoint_cost > CHECKPOINT_SHARE * (now - self._checkpoint_at)):
            return
        self.store.save_checkpoint(self.search_id, told=told, state=self._state(stage_no, stage_start, previous, opt),
                                   report=self._report(opt, stage_no, stages))
        self._checkpoint_at = time.monotonic()
        self._checkpoint_cost = self._checkpoint_at - now

    def _state(self, stage_no: int, stage_start: int, previous: "Recipe | None", opt: Optimizer) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "stage": stage_no, "stage_start": stage_start,
                "previous": None if previous is None else previous.to_json(),
                "elapsed_s": self._elapsed(), "optimizer": opt.state_dict()}

    def _report(self, opt: Optimizer, stage_no: int, stages: int) -> dict[str, Any]:
        return {"stage": stage_no, "stages": stages, "evaluated": self.evaluated, "budget": self.budget,
                "best": None if self.best is None else self.best.index,
                "best_score": None if self.best is None else self.best_score,
                "front": [k.index for k in self.front], "optimizer": opt.report()}

    def _load_known(self) -> None:
        """Rows of an earlier run of this search: dedup sources, the front, the best, holdouts."""
        rows = self.store.candidates(self.search_id, with_per_example=True, order_by="index", descending=False)
        done = []
        for row in rows:
            self.loaded_rows[row.index] = row
            if row.status in ("done", "failed"):
                self.evaluated += 1
            if row.holdout is not None:
                self.holdout_done.add(row.index)
            if row.status == "done" and row.reused_from is None:
                known = _Known(row.index, dict(row.values), row.per_example)
                if row.recipe_hash and row.recipe_hash not in self.by_hash:
                    self.by_hash[row.recipe_hash] = known
                done.append(known)
        self._update_best_front(done)
        self.last_holdout = (time.monotonic(), self.evaluated)

    def _stage(self, space: Space, k: int, previous: "Recipe | None") -> Space:
        if k not in self.stage_spaces:
            self.stage_spaces[k] = space.stage(k, previous)
        return self.stage_spaces[k]

    @staticmethod
    def _recipe(text: str | None) -> "Recipe | None":
        if text is None:
            return None
        from evomerge.merging import Recipe

        return Recipe.model_validate_json(text)

    def _recipe_of(self, index: int) -> "Recipe | None":
        row = self.store.candidate(self.search_id, index)
        return None if row is None or row.recipe is None else self._recipe(row.recipe)

    # -- a batch --------------------------------------------------------------------------------------------

    def _enter(self, stage: Space, stage_no: int, first: int, genomes: Sequence[np.ndarray]) -> list[_Entry]:
        """Decode the batch, check it against rows an interrupted run left, write the new ones ``pending``."""
        from evomerge.service.spaces import decode
        from evomerge.storage import NewCandidate

        entries: list[_Entry] = []
        new = []
        for k, genome in enumerate(genomes):
            index = first + k
            genome = np.asarray(genome, dtype=np.float64)
            decoded = decode(stage, genome)
            if isinstance(decoded, np.ndarray):
                entry = _Entry(index, genome, None, decoded, weights_hash(decoded))
            else:
                entry = _Entry(index, genome, decoded.to_json(), None, decoded.fingerprint())
            row = self.loaded_rows.get(index)  # rows an interrupted run left (only those: no read per candidate)
            if row is None:
                new.append(NewCandidate(index=index, genome=genome, recipe=entry.recipe,
                                        recipe_hash=entry.recipe_hash, stage=stage_no))
            else:
                if not same_genome(row.genome, genome):
                    raise ResumeError(f"the search cannot be resumed exactly: candidate {index} was stored with "
                                      "another genome than the restored optimizer asks for (were the code, the "
                                      "libraries or the models changed?)")
                if row.status in ("done", "failed"):
                    entry.finished_before = True
                    entry.status = row.status
                    entry.values = dict(row.values or {})
                    entry.per_example = row.per_example
            entries.append(entry)
        if new:
            self.store.add_candidates(self.search_id, new)
        return entries

    def _dispatch(self, entries: list[_Entry]) -> bool:
        """Score every pending entry (reusing identical recipes); False when a stop left some unscored."""
        from evomerge.storage import CandidateResult
        from evomerge.workers import Task

        leaders: dict[str, _Entry] = {}
        for entry in entries:  # results an interrupted run stored lead their later copies, as they did then
            if entry.status in ("done", "failed"):
                leaders.setdefault(entry.recipe_hash, entry)
        tasks = []
        followers: list[tuple[_Entry, _Entry | _Known]] = []
        reused = []
        for entry in entries:
            if entry.status != "pending":
                continue
            source = self.by_hash.get(entry.recipe_hash)
            if source is not None:
                entry.status, entry.values, entry.per_example = "done", dict(source.values), source.per_example
                reused.append(self._reuse_result(entry, source.index))
                continue
            leader = leaders.get(entry.recipe_hash)
            if leader is not None and leader.index < entry.index:
                followers.append((entry, leader))
                continue
            leaders[entry.recipe_hash] = entry
            tasks.append(Task(index=entry.index, recipe=entry.recipe, weights=entry.weights, split="data"))
        if reused:
            self.store.complete_candidates(self.search_id, reused)
        by_index = {e.index: e for e in entries}

        # Results are written as they arrive, in one transaction with their status; when candidates are faster
        # than a commit (a PostgreSQL commit is a few ms), those arriving within WRITE_EVERY_S share one.
        buffer: list[Any] = []
        last_write = time.monotonic()

        def write() -> None:
            nonlocal last_write
            if buffer:
                self.store.complete_candidates(self.search_id, list(buffer))
                buffer.clear()
            last_write = time.monotonic()

        def on_outcome(outcome: Any) -> None:
            entry = by_index[outcome.index]
            entry.status = outcome.status
            entry.values = dict(outcome.values or {}) if outcome.status == "done" else None
            # What the optimizer is told must be what a resume reads back: per-example scores as stored.
            entry.per_example = _as_stored(outcome.per_example) if outcome.status == "done" else None
            buffer.append(CandidateResult(
                index=outcome.index, status=outcome.status, values=entry.values or {},
                per_example=entry.per_example, merge_seconds=outcome.merge_seconds,
                score_seconds=outcome.score_seconds, worker=outcome.worker, error=outcome.error,
                attempts=outcome.attempts, reused_from=None))
            if time.monotonic() - last_write >= WRITE_EVERY_S:
                write()

        if tasks:
            seen: set[int] = set()

            def record(outcome: Any) -> None:
                if outcome.index not in seen:
                    seen.add(outcome.index)
                    on_outcome(outcome)

            try:
                outcomes = self.executor.run(tasks, on_outcome=record, should_stop=self._should_stop)
                for outcome in outcomes:  # executors that do not call on_outcome for every result
                    record(outcome)
            finally:
                write()
        copies = []
        for entry, leader in followers:
            if leader.status == "done":
                entry.status, entry.values, entry.per_example = "done", dict(leader.values), leader.per_example
                copies.append(self._reuse_result(entry, leader.index))
            elif leader.status == "failed":  # an identical recipe failed: the same outcome, no second try
                entry.status = "failed"
                copies.append(CandidateResult(index=entry.index, status="failed", values={}, per_example=None,
                                              merge_seconds=0.0, score_seconds=0.0, worker=None,
                                              error=f"identical to candidate {leader.index}, which failed",
                                              attempts=0, reused_from=leader.index))
        if copies:
            self.store.complete_candidates(self.search_id, copies)
        return all(e.status in ("done", "failed") for e in entries)

    @staticmethod
    def _reuse_result(entry: _Entry, source: int) -> Any:
        from evomerge.storage import CandidateResult

        return CandidateResult(index=entry.index, status="done", values=dict(entry.values or {}),
                               per_example=entry.per_example, merge_seconds=0.0, score_seconds=0.0, worker=None,
                               error=None, attempts=0, reused_from=source)

    def _absorb(self, entries: list[_Entry]) -> None:
        """Count a told batch and update the best, the front and the dedup table."""
        fresh = []
        for entry in entries:
            if not entry.finished_before:
                self.evaluated += 1
                self.evaluated_here += 1
            if entry.status == "done" and entry.recipe_hash not in self.by_hash:
                known = _Known(entry.index, dict(entry.values or {}), entry.per_example)
                self.by_hash[entry.recipe_hash] = known
                fresh.append(known)
        old_best = None if self.best is None else self.best.index
        self._update_best_front(fresh)
        if self.best is not None and self.best.index != old_best:
            self.store.add_event(self.search_id, "best", {"index": self.best.index, "values": self.best.values,
                                                          "score": self.best_score})

    def _matrix(self, known: Sequence[_Known]) -> np.ndarray:
        return np.array([[k.values.get(n, np.nan) for n in self.names] for k in known],
                        dtype=np.float64).reshape(len(known), len(self.names))

    def _update_best_front(self, fresh: Sequence[_Known]) -> None:
        """The front and the best by :func:`evomerge.service.results.rank_front`, the one definition reports use."""
        if not fresh:
            return
        pool = self.front + list(fresh)
        order, scores = rank_front(self._matrix(pool), [k.index for k in pool], self.scoring)
        self.front = [pool[i] for i in order]
        best = next((i for i in order if np.isfinite(scores[i])), None)
        self.best = None if best is None else pool[best]
        self.best_score = None if best is None else float(scores[best])

    # -- stopping -------------------------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.started)

    def _stop_reason(self) -> str | None:
        """Why the search should stop now (None: go on). No side effects: executors poll it from their loops."""
        if self.watch is not None and self.watch.lost.is_set():
            return "lost ownership"
        if self.watch is not None and self.watch.cancelled.is_set():
            return "cancelled"
        if self.user_stop is not None:
            asked = self.user_stop()
            if asked:
                return asked if isinstance(asked, str) else "stopped"
        if self.wall_time is not None and self._elapsed() >= self.wall_time:
            return "wall_time"
        return None

    def _should_stop(self) -> bool:
        return self._stop_reason() is not None

    def _stopped_status(self, reason: str) -> str:
        """The status a stop leaves: ``done`` at the wall-time budget (candidates asked but never told are
        deleted, so a finished search has no pending rows); ``queued`` at a server shutdown
        (:data:`SHUTDOWN`: the next server's queue resumes it); ``cancelled`` otherwise. Pending rows stay for
        the resume either way."""
        self.stop_reason = reason
        if reason == "wall_time":
            self.store.delete_candidates_from(self.search_id, self.next_index)
            self._holdout(force=True)
            return "done"
        if reason == SHUTDOWN:
            return "queued"
        return "cancelled"

    # -- holdout --------------------------------------------------------------------------------------------

    def _maybe_holdout(self) -> None:
        at, evaluated = self.last_holdout
        if (time.monotonic() - at >= HOLDOUT_EVERY_S
                or self.evaluated - evaluated >= max(1, int(HOLDOUT_EVERY_FRACTION * self.budget))):
            self._holdout()

    def _holdout(self, force: bool = False) -> None:
        """Score the best and the front members that lack holdout scores on the holdout split."""
        from evomerge.workers import Task

        if not self.has_holdout:
            return
        self.last_holdout = (time.monotonic(), self.evaluated)
        wanted = ([] if self.best is None else [self.best.index]) + [k.index for k in self.front]
        missing = sorted({i for i in wanted if i not in self.holdout_done})
        if not missing:
            return
        tasks = []
        for index in missing:
            row = self.store.candidate(self.search_id, index)
            if row is None:
                continue
            if row.recipe is not None:
                tasks.append(Task(index=index, recipe=row.recipe, split="holdout"))
            else:
                weights = self._decode_weights(row)
                if weights is not None:
                    tasks.append(Task(index=index, weights=weights, split="holdout"))
        stop = None if force else self._should_stop
        for outcome in self.executor.run(tasks, should_stop=stop):
            if outcome.status == "done":
                self.store.set_holdout(self.search_id, outcome.index, dict(outcome.values))
                self.holdout_done.add(outcome.index)

    def _decode_weights(self, row: Any) -> np.ndarray | None:
        from evomerge.service.spaces import decode

        stage = self.stage_spaces.get(int(row.stage or 1))
        if stage is None:
            return None
        decoded = decode(stage, row.genome)
        return decoded if isinstance(decoded, np.ndarray) else None

    # -- progress -------------------------------------------------------------------------------------------

    def _report_progress(self, stage_no: int, stages: int) -> None:
        if self.progress is None:
            return
        here = time.monotonic() - self.started
        rate = self.evaluated_here / here * 60 if here > 0 else 0.0
        left = max(0, self.budget - self.evaluated)
        self.progress(RunProgress(
            search_id=self.search_id, evaluated=self.evaluated, budget=self.budget, stage=stage_no, stages=stages,
            best_index=None if self.best is None else self.best.index,
            best_values=None if self.best is None else dict(self.best.values),
            best_score=None if self.best is None else self.best_score, front_size=len(self.front),
            per_minute=rate, eta_s=left / rate * 60 if rate > 0 else None))


def _as_stored(per_example: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
    """Per-example scores after a round trip through the database's codec (float32 for non-0/1 scores)."""
    from evomerge.storage import decode_scores, encode_scores

    return None if not per_example else decode_scores(encode_scores(per_example))


def run_search(store: "Store", search_id: int, *, executor: Any,
               progress: Callable[[RunProgress], None] | None = None,
               should_stop: Callable[[], bool | str] | None = None, prepared: Prepared | None = None,
               take_over: bool = False) -> RunResult:
    """Run (or resume) search ``search_id`` to its end with ``executor``; see the module docstring.

    Returns the final status (``done``, or ``cancelled`` after a cancel request or ``should_stop()``; a
    ``should_stop()`` that answers a string gives that stop reason, and :data:`SHUTDOWN` leaves the search
    ``queued`` for the next server to resume); an
    exception in the runner marks the row ``failed`` with a one-line error and is raised again. A search a live
    runner holds raises :class:`~evomerge.storage.repository.SearchBusyError` (``take_over=True`` takes it
    anyway: ``evomerge resume --force``); a runner whose search was taken over while it ran stops and raises
    :class:`~evomerge.storage.repository.LostOwnershipError` without writing the row again.
    """
    return Runner(store, search_id, executor=executor, progress=progress, should_stop=should_stop,
                  prepared=prepared, take_over=take_over).run()


def expert_recipe(spec: JobSpec, expert: str) -> "Recipe":
    """A recipe that is exactly one expert (``linear`` with weight 1): how the experts are scored as reference
    points beside a search's front."""
    from evomerge.merging import ModelEntry, Recipe

    return Recipe(merge_method="linear", models=[ModelEntry(model=expert, parameters={"weight": 1.0})],
                  sources=spec.models.sources(), dtype=spec.models.dtype)


def score_references(store: "Store", search_id: int, *, executor: Any, spec: JobSpec | None = None) -> list[dict]:
    """Score every expert alone on the search data (and the holdout, when objectives have one) and store each as a
    ``reference`` event ``{"name", "values", "holdout"}``; returns them. They never reach the optimizer."""
    from evomerge.service.results import REFERENCE_EVENT
    from evomerge.workers import Task

    if spec is None:
        spec = JobSpec.from_dict(store.get_search(search_id).spec)
    names = spec.models.expert_names
    tasks = [Task(index=i, recipe=expert_recipe(spec, n).to_json(), split="data") for i, n in enumerate(names)]
    if any(o.task.holdout for o in spec.objectives):
        tasks += [Task(index=i, recipe=t.recipe, split="holdout") for i, t in enumerate(tasks)]
    found: dict[int, dict[str, Any]] = {i: {"name": n, "values": None, "holdout": None} for i, n in enumerate(names)}
    for outcome in executor.run(tasks):
        if outcome.status == "done":
            found[outcome.index]["values" if outcome.split == "data" else "holdout"] = {
                k: float(v) for k, v in (outcome.values or {}).items()}
    for reference in found.values():
        store.add_event(search_id, REFERENCE_EVENT, reference)
    return list(found.values())


def live_runner(store: "Store", search_id: int) -> str | None:
    """Why search ``search_id`` has a live runner (None when it has none): a ``running``/``cancelling`` row whose
    runner process is alive on this host or whose heartbeat is fresh (:func:`evomerge.storage.repository.runner_alive`,
    the rule :meth:`Store.start_search` applies)."""
    row = store.get_search(search_id)
    if row is None or row.status not in ("running", "cancelling"):
        return None
    return runner_alive(row.owner, row.updated_at)


__all__ = ["SHUTDOWN", "Prepared", "ResumeError", "SearchFailedError", "RunProgress", "RunResult", "Runner", "build_optimizer", "expert_recipe",
           "live_runner", "prepare", "run_search", "same_genome", "score_references", "submit", "weights_hash"]
