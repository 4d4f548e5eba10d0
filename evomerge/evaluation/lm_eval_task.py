"""lm-eval-harness tasks as objectives (the optional extra ``evomerge[lmeval]``).

The live merged model is wrapped as an lm-eval :class:`~lm_eval.api.model.LM` (:class:`LiveLM`) whose
``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until`` run our own batched code
(:mod:`evomerge.evaluation.lm`): no Hugging Face hub, no re-loading, the weights the evaluator just wrote in
place. The task's requests are built once per scorer; for each candidate the scorer runs the model on them and
lets the task itself turn responses into per-sample metrics (``Task.apply_filters`` and
``Task.process_results``, the loop of ``lm_eval.evaluator.evaluate``), so per-example scores are exactly
lm-eval's. Tasks can come from ``task.include_path`` (a folder of YAML files, e.g. over local JSON data) or from
lm-eval's own catalogue (whose data sets must then be in the local Hugging Face cache: nothing is downloaded at
run time when ``HF_DATASETS_OFFLINE=1``).

``objective.metric`` names a per-sample metric of the task (``acc``, ``acc_norm``, ``exact_match``), optionally
with its filter (``exact_match,strict-match``; default: the ``none`` filter, else the task's first). A group task
scores all its sub-tasks; the per-example scores are concatenated in sub-task name order and the value is their
size-weighted mean. Generation is greedy whatever the task's ``generation_kwargs`` ask (``until`` and
``max_gen_toks`` are honoured), so a search is deterministic. ``task.options.num_fewshot`` overrides the task's
number of few-shot examples (drawn by lm-eval's seeded sampler); ``task.limit`` scores the first N documents.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evomerge.errors import UserError
from evomerge.evaluation.lm import (
    ContinuationBatches,
    StopRule,
    TextCodec,
    context_window,
    greedy_generate,
    model_device,
    model_eos_ids,
    rolling_pairs,
)
from evomerge.evaluation.scorers import Scorer
from evomerge.spec import ObjectiveSpec

INSTALL_HINT = "pip install 'evomerge[lmeval]'"
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default


def _lm_eval() -> Any:
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError:
        return None
    return lm_eval


def live_lm_class() -> type:
    """The :class:`LiveLM` class (defined on first use: lm-eval is an optional dependency)."""
    global _LIVE_LM
    if _LIVE_LM is None:
        from lm_eval.api.model import LM

        class LiveLM(LM):
            """A live ``nn.Module`` as an lm-eval model, scored with evomerge's batched code.

            Set :attr:`model` before each run. Tokenization follows :class:`~evomerge.evaluation.lm.TextCodec`
            (the prompt with the tokenizer's special tokens, the continuation without, lm-eval's whitespace
            move); prepared batches are kept per request list, so a task scored for many candidates is
            tokenized once.
            """

            def __init__(self, codec: TextCodec, *, batch_size: int, max_length: int | None) -> None:
                super().__init__()
                self.codec = codec
                self.batch_size = batch_size
                self.max_length = max_length
                self.model: torch.nn.Module | None = None
                # request arguments -> (padded batches, request index of each scored window)
                self._prepared: dict[Any, tuple[ContinuationBatches, np.ndarray]] = {}

            def _window(self) -> int | None:
                return context_window(self.model, self.codec.tokenizer, self.max_length)

            def _run(self, key: Any, make: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
                """Summed log-likelihood and greedy flag per request. ``make()`` gives the scored windows and the
                request each belongs to; it runs (and the batches are padded) on the first call only."""
                if key not in self._prepared:
                    pairs, owner = make()
                    batches = ContinuationBatches(pairs, batch_size=self.batch_size, max_length=self._window(),
                                                  pad_id=self.codec.pad_id, device=model_device(self.model))
                    self._prepared[key] = (batches, np.asarray(owner, dtype=np.int64))
                batches, owner = self._prepared[key]
                result = batches.run(self.model)
                total = np.zeros(size)
                greedy = np.ones(size, dtype=bool)
                np.add.at(total, owner, result.logprob)
                np.logical_and.at(greedy, owner, result.greedy)
                return total, greedy

            def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
                if not context:  # lm-eval scores an empty context after its prefix token
                    return [self.codec.prefix_id], self.codec.continuation(continuation)
                return self.codec.pair(context, continuation)

            def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
                args = tuple(r.args for r in requests)
                total, greedy = self._run(("loglikelihood", args),
                                          lambda: ([self._pair(c, x) for c, x in args], range(len(args))), len(args))
                return [(float(t), bool(g)) for t, g in zip(total, greedy)]

            def loglikelihood_rolling(self, requests: list) -> list[float]:
                texts = tuple(r.args[0] for r in requests)

                def make() -> tuple[list, list[int]]:
                    pairs, owner = [], []
                    for i, text in enumerate(texts):
                        windows = rolling_pairs(self.codec.document(text), self._window())
                        pairs.extend(windows)
                        owner.extend([i] * len(windows))
                    return pairs, owner

                total, _ = self._run(("loglikelihood_rolling", texts), make, len(texts))
                return [float(t) for t in total]

            def generate_until(self, requests: list) -> list[str]:
                out: list[str | None] = [None] * len(requests)
                groups: dict[tuple, list[int]] = defaultdict(list)
                for i, request in enumerate(requests):
                    context, kwargs = request.args
                    until = kwargs.get("until") or []
                    until = [until] if isinstance(until, str) else list(until)
                    groups[(tuple(until), int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)))].append(i)
                window = self._window()
                eos = self.codec.eos_ids | model_eos_ids(self.model)
                for (until, max_new), members in groups.items():
                    rule = StopRule(self.codec, until, eos)
                    prompts = [self.codec.prompt(requests[i].args[0]) for i in members]
                    if window is not None:
                        prompts = [p[-max(1, window - max_new):] for p in prompts]
                    tokens = greedy_generate(self.model, prompts, rule, max_new_tokens=max_new,
                                             batch_size=self.batch_size, pad_id=self.codec.pad_id)
                    for i, t in zip(members, tokens):
                        out[i] = rule.text(t)
                return out  # type: ignore[return-value]

        _LIVE_LM = LiveLM
    return _LIVE_LM


_LIVE_LM: type | None = None


@dataclass
class _Tasks:
    tasks: list[tuple[str, Any]]  # (name, lm-eval Task) in name order
    metric: str
    filter_key: str
    limit: int | None
    lm: Any


class LmEvalScorer(Scorer):
    """An lm-eval-harness task (``task.task``, optionally from ``task.include_path``)."""

    kind = "lm_eval"
    METRICS = ()
    NEEDS_DATA = False
    NEEDS_TOKENIZER = True

    def __init__(self, objective: ObjectiveSpec, *, tokenizer: Any = None, where: str | None = None) -> None:
        if _lm_eval() is None:
            raise UserError(f"lm_eval objectives need lm-eval-harness; {INSTALL_HINT}",
                            where=f"{where or f'objectives.{objective.name}'}.task.kind")
        super().__init__(objective, tokenizer=tokenizer, where=where)
        self.codec = TextCodec(tokenizer)

    def _check_metric(self) -> None:  # the task declares its metrics: checked when it is loaded
        pass

    def has_split(self, split: str) -> bool:
        # An lm-eval task carries its own evaluation split; there is no separate holdout file.
        return split == "data"

    def _prepare(self, split: str, device: torch.device) -> _Tasks:
        where = f"{self.where}.task.task"
        tasks = load_tasks(self.task.task or "", self.task.include_path, where=where,
                           include_where=f"{self.where}.task.include_path")
        metric, _, filter_key = (self.metric or "acc").partition(",")
        for name, task in tasks:
            known = list(task.aggregation())
            if metric not in known:
                raise UserError(f"lm-eval task {name!r} reports {', '.join(known) or 'no metric'}, not {metric!r}; "
                                "set `metric` to one of them", where=f"{self.where}.metric")
            filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
            chosen = filter_key or ("none" if "none" in filters else filters[0])
            if chosen not in filters:
                raise UserError(f"lm-eval task {name!r} has filters {', '.join(filters)}, not {chosen!r}",
                                where=f"{self.where}.metric")
            filter_key = filter_key or chosen
            num_fewshot = self.task.options.get("num_fewshot")
            if num_fewshot is not None:
                task.set_config(key="num_fewshot", value=int(num_fewshot))
            _quiet(lambda task=task: task.build_all_requests(limit=self.task.limit, rank=0, world_size=1))
            if not task.instances:
                raise UserError(f"lm-eval task {name!r} produced no requests; check its data files",
                                where=where)
        lm = live_lm_class()(self.codec, batch_size=self.task.batch_size, max_length=self.task.max_length)
        return _Tasks(tasks, metric, filter_key or "none", self.task.limit, lm)

    def _score(self, model: torch.nn.Module, data: _Tasks) -> tuple[dict, dict]:
        data.lm.model = model
        by_type: dict[str, list] = defaultdict(list)
        for _, task in data.tasks:
            for instance in task.instances:
                instance.resps = []
                instance.filtered_resps = {}
                by_type[instance.request_type].extend([instance] * (instance.repeats or 1))
        for request_type, instances in by_type.items():
            responses = getattr(data.lm, request_type)(instances)
            for instance, response in zip(instances, responses, strict=True):
                instance.resps.append(response)
        values: list[float] = []
        per_task: dict[str, float] = {}
        for name, task in data.tasks:
            task.apply_filters()
            by_doc: dict[int, list] = defaultdict(list)
            for instance in task.instances:
                by_doc[instance.doc_id].append(instance)
            mine: list[float] = []
            for doc_id, doc in task.doc_iterator(rank=0, limit=data.limit, world_size=1):
                requests = sorted(by_doc[doc_id], key=lambda r: r.idx)
                metrics = task.process_results(doc, [r.filtered_resps[data.filter_key] for r in requests])
                value = metrics.get(data.metric)
                if isinstance(value, (bool, int, float, np.integer, np.floating)):
                    mine.append(float(value))
                else:
                    raise UserError(f"metric {data.metric!r} of lm-eval task {name!r} is not a number per sample "
                                    f"({type(value).__name__}); pick a per-sample metric such as acc or exact_match",
                                    where=f"{self.where}.metric")
            per_task[name] = float(task.aggregation()[data.metric](mine))
            values.extend(mine)
        return {self.metric: np.asarray(values)}, {"tasks": per_task}

    def _aggregate(self, per_metric: dict[str, np.ndarray], details: dict[str, Any]) -> dict[str, float]:
        # One task: lm-eval's own aggregation (a mean for per-sample accuracies); a group: the size-weighted mean.
        tasks = details["tasks"]
        if len(tasks) == 1:
            return {self.metric: next(iter(tasks.values()))}
        return super()._aggregate(per_metric, details)


def load_tasks(name: str, include_path: str | None, *, where: str, include_where: str) -> list[tuple[str, Any]]:
    """The leaf tasks of an lm-eval task or group, by name: tasks in ``include_path`` first (without indexing
    lm-eval's whole catalogue, which takes seconds), else the catalogue."""
    from pathlib import Path

    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"{include_path} is not a folder of lm-eval task YAML files", where=include_where)
    managers = []
    if include_path is not None:
        managers.append(lambda: TaskManager(include_path=include_path, include_defaults=False))
    managers.append(lambda: TaskManager(include_path=include_path))
    manager = None
    for make in managers:
        manager = _quiet(make)
        if name in manager.all_tasks:
            break
    else:
        local = ""
        if include_path is not None:
            names = sorted(_quiet(managers[0]).all_tasks)
            local = f"; {include_path} defines: {', '.join(names[:20]) or 'nothing'}"
        raise UserError(f"lm-eval knows no task or group {name!r}{local}", where=where)
    try:
        if hasattr(manager, "load"):
            found = _quiet(lambda: manager.load([name]))["tasks"]
        else:  # lm-eval < 0.4.10
            from lm_eval.tasks import get_task_dict

            found = _flatten(_quiet(lambda: get_task_dict([name], manager)))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - lm-eval raises anything for a bad YAML or unreadable data
        raise UserError(f"lm-eval could not load task {name!r}: {type(e).__name__}: {e}", where=where) from None
    return sorted(found.items())


def _flatten(tree: dict) -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value))
        elif isinstance(value, tuple):  # (group config, task) in old versions
            out[str(key)] = value[-1]
        else:
            out[str(key)] = value
    return out


def _quiet(fn: Any) -> Any:
    """Run ``fn`` with lm-eval's and datasets' INFO logging and progress bars silenced."""
    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval", "datasets")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import datasets

        bars = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):
        bars = None
    try:
        from unittest import mock

        import lm_eval.api.task as task_module

        # build_all_requests draws a progress bar per task; the bar is noise in a search's log.
        if hasattr(task_module, "tqdm"):
            with mock.patch.object(task_module, "tqdm", lambda it, *a, **k: it):
                return fn()
        return fn()
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars:
            import datasets

            datasets.utils.logging.enable_progress_bar()
