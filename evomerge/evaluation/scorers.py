"""Scorers: the objectives of a job spec, turned into functions of a live model that return per-example scores.

A scorer is built once per objective (:func:`build_scorer`) and called for every candidate. It reads and
tokenizes its data on first use of each split (``"data"`` drives the search, ``"holdout"`` is scored only when
asked) and keeps the padded tensors on the model's device, so a candidate costs forward passes only. Scoring runs
under :func:`torch.inference_mode`, in fixed batches and a fixed order: the same weights give the same bytes.

Kinds (``task.kind``) and the metrics they report (``objective.metric`` picks the one that is the objective;
every metric is the mean of its per-example scores):

====================  ===========================================================================================
classification        ``accuracy``: argmax of ``model(x)`` (``.npz`` arrays) or of a ``*ForSequenceClassification``
                      model's ``.logits`` on tokenized ``text`` (JSONL/CSV) equals the label; 1.0 or 0.0.
multiple_choice       ``acc``: the choice of highest log-likelihood given the prompt is the answer; ``acc_norm``:
                      the same with each log-likelihood divided by the choice's length in characters;
                      ``acc_bytes``: in UTF-8 bytes (lm-eval-harness 0.4 ``ConfigurableTask.process_results``).
exact_match           ``exact_match``: greedy generation after the prompt, cut at the first stop string, equals
                      the answer after ``task.normalize``.
nll                   ``nll``: mean negative log-likelihood per token of the answer given the prompt (or of the
                      whole ``text`` when rows have no prompt); lower is better.
python                ``score`` (or any name): the mean of what ``module:function`` returns per example.
num_layers            the transformer layers of the live model (one "example"); lower is better.
num_params            the parameters of the live model (one "example"); lower is better.
lm_eval               a per-sample metric of an lm-eval-harness task (:mod:`evomerge.evaluation.lm_eval_task`).
====================  ===========================================================================================
"""

from __future__ import annotations

import importlib
import json
import string
import sys
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import torch

from evomerge.errors import UserError, first_error
from evomerge.evaluation.data import DataError, Rows, check_file, integer_labels, is_array_file, read_arrays, read_rows
from evomerge.evaluation.lm import (
    ContinuationBatches,
    NotALanguageModel,
    StopRule,
    TextCodec,
    context_window,
    generate_with_shortcut,
    model_device,
    model_eos_ids,
    rolling_pairs,
    teacher_batches,
)
from evomerge.spec import ObjectiveSpec

SPLITS = ("data", "holdout")


@dataclass
class Scores:
    """One objective on one candidate: its value, its per-example scores (float64), every metric it computed."""

    value: float
    per_example: np.ndarray
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


class Scorer(ABC):
    """An objective bound to its data: ``score(model, split)`` -> :class:`Scores`.

    Subclasses declare ``METRICS`` (the first is the default) and implement :meth:`_prepare` (read and tokenize
    one split, once) and :meth:`_score` (per-example scores of every metric for a live model).
    """

    kind: ClassVar[str]
    METRICS: ClassVar[tuple[str, ...]]
    NEEDS_DATA: ClassVar[bool] = True
    NEEDS_TOKENIZER: ClassVar[bool] = False

    def __init__(self, objective: ObjectiveSpec, *, tokenizer: Any = None, where: str | None = None) -> None:
        self.objective = objective
        self.task = objective.task
        self.name = objective.name
        self.where = where or f"objectives.{objective.name}"
        self.metric = objective.metric or self.METRICS[0]
        self.tokenizer = tokenizer
        self._prepared: dict[tuple[str, str], Any] = {}
        self._check_metric()
        if self.NEEDS_TOKENIZER and tokenizer is None:
            raise UserError(f"a {self.kind} objective reads text, and the base model has no tokenizer; save one "
                            "beside the base (tokenizer.save_pretrained(base_dir))", where=f"{self.where}.task.kind")

    def _check_metric(self) -> None:
        if self.metric not in self.METRICS:
            raise UserError(f"a {self.kind} objective reports {', '.join(self.METRICS)}, not {self.metric!r}",
                            where=f"{self.where}.metric")

    # -- splits ---------------------------------------------------------------------------------------------

    def path_of(self, split: str) -> str | None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        return getattr(self.task, split)

    def has_split(self, split: str) -> bool:
        """Whether this objective is scored on ``split`` (cost objectives are, on both)."""
        return not self.NEEDS_DATA or self.path_of(split) is not None

    def field(self, split: str) -> str:
        return f"{self.where}.task.{split}"

    def check(self, split: str = "data") -> None:
        """Read and tokenize ``split`` now, so data errors surface before any model is merged."""
        self._get(split, torch.device("cpu"))

    def _get(self, split: str, device: torch.device) -> Any:
        key = (split, str(device))
        if key not in self._prepared:
            self._prepared[key] = self._prepare(split, device)
        return self._prepared[key]

    # -- scoring --------------------------------------------------------------------------------------------

    def score(self, model: torch.nn.Module, split: str = "data") -> Scores:
        if not self.has_split(split):
            raise UserError(f"objective {self.name!r} has no {split} set", where=self.field(split))
        prepared = self._get(split, model_device(model))
        with torch.inference_mode():
            per_metric, details = self._score(model, prepared)
        per_metric = {k: np.asarray(v, dtype=np.float64) for k, v in per_metric.items()}
        metrics = self._aggregate(per_metric, details)
        return Scores(metrics[self.metric], per_metric[self.metric], metrics, details)

    def _aggregate(self, per_metric: dict[str, np.ndarray], details: dict[str, Any]) -> dict[str, float]:
        """Each metric's value: the mean of its per-example scores."""
        return {k: float(v.mean()) for k, v in per_metric.items()}

    @abstractmethod
    def _prepare(self, split: str, device: torch.device) -> Any:
        """Read and tokenize one split, put its tensors on ``device`` (called once per split and device)."""

    @abstractmethod
    def _score(self, model: torch.nn.Module, prepared: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Per-example scores of every metric, and details worth reporting (counts, timings)."""

    # -- shared helpers -------------------------------------------------------------------------------------

    def _rows(self, split: str) -> Rows:
        return read_rows(self.path_of(split), where=self.field(split), limit=self.task.limit)

    def _column_field(self, attr: str) -> str:
        return f"{self.where}.task.{attr}"


def _logits(output: Any) -> torch.Tensor:
    logits = output.logits if hasattr(output, "logits") else output
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits


# -------------------------------------------------------------------------------------------- classification


@dataclass
class _ArrayData:
    x: torch.Tensor
    y: np.ndarray
    path: Path


@dataclass
class _TextData:
    encoded: list[list[int]]  # token ids per row, truncated
    y: np.ndarray
    path: Path
    rows: Rows
    device: torch.device
    batch_size: int
    fill: int  # the tokenizer's pad id: pads batches for models without a config
    unused: int  # the smallest id no row holds
    # pad id (None: one row per batch) -> [(input ids, attention mask, row indices)], built on first use
    batches: dict[int | None, list[tuple[torch.Tensor, torch.Tensor, np.ndarray]]] = field(default_factory=dict)

    def batches_for(self, pad: int | None) -> list[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        """Length-sorted batches right-padded with ``pad``; with None, one row per batch (no padding)."""
        if pad not in self.batches:
            size = self.batch_size if pad is not None else 1
            order = sorted(range(len(self.encoded)), key=lambda i: (-len(self.encoded[i]), i))
            batches = []
            for start in range(0, len(order), size):
                index = np.array(order[start:start + size], dtype=np.int64)
                width = len(self.encoded[index[0]])
                ids = torch.full((len(index), width), 0 if pad is None else pad, dtype=torch.long)
                mask = torch.zeros((len(index), width), dtype=torch.long)
                for b, i in enumerate(index):
                    ids[b, :len(self.encoded[i])] = torch.tensor(self.encoded[i], dtype=torch.long)
                    mask[b, :len(self.encoded[i])] = 1
                batches.append((ids.to(self.device), mask.to(self.device), index))
            self.batches[pad] = batches
        return self.batches[pad]


class ClassificationScorer(Scorer):
    """Accuracy of a classifier: ``.npz`` arrays into ``model(x)``, or tokenized text into a
    ``*ForSequenceClassification`` model."""

    kind = "classification"
    METRICS = ("accuracy",)

    def _prepare(self, split: str, device: torch.device) -> _ArrayData | _TextData:
        path = self.path_of(split)
        if is_array_file(path):
            x_key, y_key = self.task.input or "x", self.task.target or "y"
            arrays = read_arrays(path, [(x_key, self._column_field("input")), (y_key, self._column_field("target"))],
                                 where=self.field(split), limit=self.task.limit)
            y = arrays[y_key]
            if not np.issubdtype(y.dtype, np.integer) and not (
                    np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)):
                raise DataError(f"{Path(path).name}: array {y_key!r} holds {y.dtype} values, not class indices",
                                where=self._column_field("target"))
            y = y.astype(np.int64)
            if (y < 0).any():
                raise DataError(f"{Path(path).name}: array {y_key!r} row {int(np.argmax(y < 0))} is "
                                f"{int(y[y < 0][0])}, not a class index", where=self._column_field("target"))
            x = arrays[x_key]
            if not np.issubdtype(x.dtype, np.number):
                raise DataError(f"{Path(path).name}: array {x_key!r} is not numeric ({x.dtype})",
                                where=self._column_field("input"))
            return _ArrayData(torch.as_tensor(x).to(device), y, Path(path))
        if self.tokenizer is None:
            raise UserError("text classification needs a tokenizer, and the base model has none; save one beside "
                            "the base, or give .npz arrays", where=self.field(split))
        rows = self._rows(split)
        texts = rows.column(self.task.input or "text", field=self._column_field("input"), what="text")
        labels = rows.column(self.task.target or "label", field=self._column_field("target"), what="label")
        y = integer_labels(labels, rows, field=self._column_field("target"), source=rows.path.name)
        # Truncate to task.max_length, else to the tokenizer's own limit when it states a real one.
        limit = self.task.max_length or context_window(None, self.tokenizer)
        encoded = [list(self.tokenizer(str(t), truncation=limit is not None, max_length=limit)["input_ids"])
                   for t in texts]
        for i, tokens in enumerate(encoded):
            if not tokens:
                raise DataError(f"{rows.path.name} line {rows.lines[i]}: the text is empty and the tokenizer adds "
                                "no special tokens; there is nothing to classify", where=self._column_field("input"))
        used = {token for tokens in encoded for token in tokens}
        unused = next(i for i in range(len(used) + 1) if i not in used)
        return _TextData(encoded, y, rows.path, rows, device, self.task.batch_size, _pad_id(self.tokenizer), unused)

    def _score(self, model: torch.nn.Module, data: _ArrayData | _TextData) -> tuple[dict, dict]:
        pred = np.empty(len(data.y), dtype=np.int64)
        classes = None
        if isinstance(data, _ArrayData):
            x = data.x.to(_float_dtype(model)) if data.x.is_floating_point() else data.x
            size = self.task.batch_size
            for start in range(0, len(x), size):
                logits = self._class_logits(model(x[start:start + size]), model)
                classes = logits.shape[-1]
                pred[start:start + size] = logits.argmax(-1).cpu().numpy()
        else:
            with _classification_padding(model, data.fill, data.unused) as pad:
                for ids, mask, index in data.batches_for(pad):
                    logits = self._class_logits(model(input_ids=ids, attention_mask=mask), model)
                    classes = logits.shape[-1]
                    pred[index] = logits.argmax(-1).cpu().numpy()
        self._check_labels(data, classes)
        return {"accuracy": (pred == data.y).astype(np.float64)}, {}

    def _class_logits(self, output: Any, model: torch.nn.Module) -> torch.Tensor:
        logits = _logits(output)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise UserError(f"classification needs a model that returns one row of class logits per example; "
                            f"{type(model).__name__} returns {shape}. Score language models with multiple_choice, "
                            "exact_match or nll", where=f"{self.where}.task.kind")
        return logits

    def _check_labels(self, data: _ArrayData | _TextData, classes: int | None) -> None:
        if classes is None or int(data.y.max()) < classes:
            return
        i = int(np.argmax(data.y >= classes))
        at = f"line {data.rows.lines[i]}" if isinstance(data, _TextData) else f"row {i}"
        raise DataError(f"{data.path.name} {at}: label {int(data.y[i])} is out of range; the model has {classes} "
                        f"classes (0-{classes - 1}); fix the labels or score a model with more classes",
                        where=self._column_field("target"))


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextmanager
def _classification_padding(model: torch.nn.Module, fill: int, unused: int) -> Iterator[int | None]:
    """The id to right-pad text batches with so that each row is classified as it would be alone (None: score
    one row at a time).

    Decoder classifiers (transformers' ``…ForSequenceClassification`` of Llama, Mistral, Qwen, GPT-2…) pool the
    logits of the last token that is not ``config.pad_token_id``, whatever the attention mask says, so padding
    must be that id. A config without a usable one (None, or no id of the vocabulary) makes them pool the last
    position and refuse batches; for the call, the config's pad id is set to an id no row holds (``unused``),
    which then pools each row's last token, as alone. Encoders pool by the mask and ignore the id; models
    without a config get the tokenizer's pad (``fill``)."""
    config = getattr(model, "config", None)
    if config is None:
        yield fill
        return
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(config, "vocab_size", None)
    pad = getattr(config, "pad_token_id", None)
    if isinstance(pad, int) and pad >= 0 and (vocab is None or pad < vocab):
        yield pad
        return
    if vocab is not None and unused >= vocab:  # every id occurs in some row: nothing can stand for padding
        yield None
        return
    config.pad_token_id = unused
    try:
        yield unused
    finally:
        config.pad_token_id = pad


def _pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


# ---------------------------------------------------------------------------------------- language models


class _LMScorer(Scorer):
    NEEDS_TOKENIZER = True

    def __init__(self, objective: ObjectiveSpec, *, tokenizer: Any = None, where: str | None = None) -> None:
        super().__init__(objective, tokenizer=tokenizer, where=where)
        self.codec = TextCodec(tokenizer)

    def _prompt_field(self) -> str:
        return self._column_field("input")

    def score(self, model: torch.nn.Module, split: str = "data") -> Scores:
        try:
            return super().score(model, split)
        except NotALanguageModel as e:
            raise UserError(f"a {self.kind} objective needs a causal language model (…ForCausalLM); {e}",
                            where=f"{self.where}.task.kind") from None


@dataclass
class _Choices:
    batches: ContinuationBatches | None
    owner: np.ndarray  # request -> row
    n_choices: list[int]
    chars: np.ndarray  # per request: characters of the choice
    bytes: np.ndarray  # per request: UTF-8 bytes of the choice
    answer: np.ndarray
    pairs: list[tuple[list[int], list[int]]]
    device: torch.device


class MultipleChoiceScorer(_LMScorer):
    """Log-likelihood of each choice given the prompt; the best choice is the prediction (lm-eval's ``acc``,
    ``acc_norm``, ``acc_bytes``)."""

    kind = "multiple_choice"
    METRICS = ("acc_norm", "acc", "acc_bytes")

    def _prepare(self, split: str, device: torch.device) -> _Choices:
        rows = self._rows(split)
        prompts = rows.column(self.task.input or "prompt", field=self._prompt_field(), what="prompt")
        choice_lists = rows.column(self.task.choices, field=self._column_field("choices"), what="choices")
        answers = rows.column(self.task.target or "answer", field=self._column_field("target"), what="answer")
        pairs, owner, chars, nbytes, counts, gold = [], [], [], [], [], []
        for i, (prompt, choices, answer) in enumerate(zip(prompts, choice_lists, answers)):
            choices = self._choice_list(choices, rows, i)
            label = _answer_index(answer, choices)
            if label is None:
                raise DataError(f"{rows.path.name} line {rows.lines[i]}: answer {answer!r} is neither an index into "
                                f"the {len(choices)} choices nor one of them", where=self._column_field("target"))
            gold.append(label)
            counts.append(len(choices))
            for choice in choices:
                pairs.append(self.codec.pair(str(prompt), choice))
                owner.append(i)
                chars.append(len(choice))
                nbytes.append(len(choice.encode("utf-8")))
        return _Choices(None, np.array(owner), counts, np.array(chars, dtype=np.float64),
                        np.array(nbytes, dtype=np.float64), np.array(gold), pairs, device)

    def _choice_list(self, value: Any, rows: Rows, i: int) -> list[str]:
        if isinstance(value, str):  # CSV cells: a JSON list
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, (str, int, float)) for c in value):
            raise DataError(f"{rows.path.name} line {rows.lines[i]}: {self.task.choices!r} must list at least two "
                            'choices (["yes", "no"])', where=self._column_field("choices"))
        choices = [str(c) for c in value]
        if any(not c for c in choices):
            raise DataError(f"{rows.path.name} line {rows.lines[i]}: a choice is empty; its length-normalised "
                            "log-likelihood is undefined", where=self._column_field("choices"))
        return choices

    def _score(self, model: torch.nn.Module, data: _Choices) -> tuple[dict, dict]:
        if data.batches is None:
            data.batches = ContinuationBatches(data.pairs, batch_size=self.task.batch_size,
                                               max_length=context_window(model, self.tokenizer, self.task.max_length),
                                               pad_id=self.codec.pad_id, device=data.device)
        ll = data.batches.run(model).logprob
        out = {"acc": [], "acc_norm": [], "acc_bytes": []}
        start = 0
        for row, n in enumerate(data.n_choices):
            lls = ll[start:start + n]
            gold = data.answer[row]
            out["acc"].append(float(np.argmax(lls) == gold))
            out["acc_norm"].append(float(np.argmax(lls / data.chars[start:start + n]) == gold))
            out["acc_bytes"].append(float(np.argmax(lls / data.bytes[start:start + n]) == gold))
            start += n
        return out, {}


def _answer_index(answer: Any, choices: list[str]) -> int | None:
    """The gold choice: a string that is one of the choices is that choice (CSV cells are always strings, so
    ``"4"`` among ``["2", "4", "6", "8"]`` is the second), any other digit string an index; numbers are indices."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, str):
        if answer in choices:
            return choices.index(answer)
        if not answer.strip().isdigit():
            return None
        index = int(answer)
    elif isinstance(answer, (int, np.integer)) or (isinstance(answer, float) and answer.is_integer()):
        index = int(answer)
    else:
        return None
    return index if 0 <= index < len(choices) else None


@dataclass
class _Pairs:
    batches: ContinuationBatches | None
    pairs: list[tuple[list[int], list[int]]]
    owner: np.ndarray  # request -> example
    size: int
    whole: list[list[int]] | None  # text-only rows: the full token lists, split into windows at first scoring
    device: torch.device


class NLLScorer(_LMScorer):
    """Mean negative log-likelihood per token of the answer given the prompt (or of the whole text)."""

    kind = "nll"
    METRICS = ("nll",)

    def _prepare(self, split: str, device: torch.device) -> _Pairs:
        rows = self._rows(split)
        prompt_key = self.task.input or "prompt"
        if self.task.input is None and not rows.has(prompt_key) and rows.has("text"):
            texts = rows.column("text", field=self._prompt_field(), what="text")
            whole = [self.codec.document(str(t)) for t in texts]
            for i, tokens in enumerate(whole):
                if len(tokens) < 2:
                    raise DataError(f"{rows.path.name} line {rows.lines[i]}: the text is empty; nothing to score",
                                    where=self._prompt_field())
            return _Pairs(None, [], np.empty(0, dtype=np.int64), len(whole), whole, device)
        prompts = rows.column(prompt_key, field=self._prompt_field(), what="prompt")
        answers = rows.column(self.task.target or "answer", field=self._column_field("target"), what="answer")
        pairs = []
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            pair = self.codec.pair(str(prompt), str(answer))
            if not pair[1]:
                raise DataError(f"{rows.path.name} line {rows.lines[i]}: the answer is empty; nothing to score",
                                where=self._column_field("target"))
            pairs.append(pair)
        return _Pairs(None, pairs, np.arange(len(pairs)), len(pairs), None, device)

    def _score(self, model: torch.nn.Module, data: _Pairs) -> tuple[dict, dict]:
        if data.batches is None:
            window = context_window(model, self.tokenizer, self.task.max_length)
            if data.whole is not None:
                owner = []
                for i, tokens in enumerate(data.whole):
                    windows = rolling_pairs(tokens, window)
                    data.pairs.extend(windows)
                    owner.extend([i] * len(windows))
                data.owner = np.array(owner, dtype=np.int64)
            data.batches = ContinuationBatches(data.pairs, batch_size=self.task.batch_size, max_length=window,
                                               pad_id=self.codec.pad_id, device=data.device)
        result = data.batches.run(model)
        total = np.zeros(data.size)
        count = np.zeros(data.size)
        np.add.at(total, data.owner, result.logprob)
        np.add.at(count, data.owner, result.num_tokens)
        return {"nll": -total / count}, {}


@dataclass
class _Generation:
    prompts: list[list[int]]
    forced: list[list[int]]  # answer then the first stop string: what a right generation produces
    alternatives: list[list[int] | None]  # the same after a space, for answers that do not start with one
    answers: list[str]  # normalised
    device: torch.device
    teacher: ContinuationBatches | None = None
    ready: bool = False


class ExactMatchScorer(_LMScorer):
    """Greedy generation after the prompt, cut at the first stop string, compared with the answer after
    normalisation. A teacher-forced pass over ``prompt + answer + stop`` decides every example whose generation
    would end while it still follows that text (see :func:`~evomerge.evaluation.lm.generate_with_shortcut`), and a
    second pass over ``prompt + " " + answer + stop`` those whose generation starts with that space (a prompt
    ``"A:"`` that the model continues with ``" 72"``); the others are generated. ``teacher_forcing=False``
    generates every example (the reference the shortcut is tested against)."""

    kind = "exact_match"
    METRICS = ("exact_match",)

    def __init__(self, objective: ObjectiveSpec, *, tokenizer: Any = None, where: str | None = None,
                 teacher_forcing: bool = True) -> None:
        super().__init__(objective, tokenizer=tokenizer, where=where)
        self.teacher_forcing = teacher_forcing
        self.normalize = make_normalizer(self.task.normalize)

    def _prepare(self, split: str, device: torch.device) -> _Generation:
        rows = self._rows(split)
        prompts = rows.column(self.task.input or "prompt", field=self._prompt_field(), what="prompt")
        answers = [str(a) for a in rows.column(self.task.target or "answer", field=self._column_field("target"),
                                               what="answer")]
        stop_ids = self.codec.continuation(self.task.stop[0]) if self.task.stop else []
        new = self.task.max_new_tokens
        # Any token would do where the answer and stop are empty: the pass only needs one position to read.
        forced = [(self.codec.continuation(a) + stop_ids)[:new] or [self.codec.prefix_id] for a in answers]
        alternatives = []
        for answer, tokens in zip(answers, forced):
            spaced = (self.codec.continuation(" " + answer) + stop_ids)[:new] if answer[:1].strip() else None
            alternatives.append(spaced if spaced and spaced[0] != tokens[0] else None)
        return _Generation([self.codec.prompt(str(p)) for p in prompts], forced, alternatives,
                           [self.normalize(a) for a in answers], device)

    def _setup(self, model: torch.nn.Module, data: _Generation) -> None:
        """On first scoring, when the model's window is known: truncate prompts, pad the teacher-forced pass."""
        new = self.task.max_new_tokens
        window = context_window(model, self.tokenizer, self.task.max_length)
        if window is not None:
            if window <= new:
                raise UserError(f"max_new_tokens ({new}) leaves no room for the prompt in the model's window of "
                                f"{window} tokens; lower max_new_tokens", where=f"{self.where}.task.max_new_tokens")
            data.prompts = [p[-(window - new):] for p in data.prompts]
        if self.teacher_forcing:
            data.teacher = teacher_batches(data.prompts, data.forced, batch_size=self.task.batch_size,
                                           pad_id=self.codec.pad_id, device=data.device)
        data.ready = True

    def _score(self, model: torch.nn.Module, data: _Generation) -> tuple[dict, dict]:
        if not data.ready:
            self._setup(model, data)
        rule = StopRule(self.codec, self.task.stop, self.codec.eos_ids | model_eos_ids(model))
        tokens, generated = generate_with_shortcut(model, data.prompts, data.forced, rule,
                                                   max_new_tokens=self.task.max_new_tokens,
                                                   batch_size=self.task.batch_size, pad_id=self.codec.pad_id,
                                                   teacher=data.teacher, alternatives=data.alternatives)
        texts = [rule.text(t) for t in tokens]
        hits = [float(self.normalize(text) == answer) for text, answer in zip(texts, data.answers)]
        return {"exact_match": hits}, {"generated": generated, "predictions": texts}


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def make_normalizer(steps: Sequence[str]) -> Callable[[str], str]:
    """``task.normalize`` as a function, applied in a fixed order whatever the list's order: ``lower``
    (case-fold), ``punctuation`` (drop ASCII punctuation), ``whitespace`` (collapse runs to one space, trim),
    ``strip`` (trim both ends)."""
    wanted = set(steps)

    def normalize(text: str) -> str:
        if "lower" in wanted:
            text = text.lower()
        if "punctuation" in wanted:
            text = text.translate(_PUNCTUATION)
        if "whitespace" in wanted:
            text = " ".join(text.split())
        if "strip" in wanted:
            text = text.strip()
        return text

    return normalize


# ----------------------------------------------------------------------------------------------------- python


class PythonScorer(Scorer):
    """A user's function ``module:function`` called as ``function(model, tokenizer, data, **options)``.

    ``model`` is the live merged model (in eval mode, on its device, under ``torch.inference_mode``);
    ``tokenizer`` the base's tokenizer or None; ``data`` the split's examples: a list of dicts for JSONL/CSV, a
    dict of numpy arrays for ``.npz`` (first ``task.limit`` rows of each), None when the objective has no data
    file; ``options`` are ``task.options``. It returns one float per example (a sequence or 1-D array; higher
    or lower is better as ``direction`` says); the objective's value is their mean. Refused unless the evaluator
    allows Python objectives (the server does not).
    """

    kind = "python"
    METRICS = ()
    NEEDS_DATA = False

    def __init__(self, objective: ObjectiveSpec, *, tokenizer: Any = None, where: str | None = None) -> None:
        super().__init__(objective, tokenizer=tokenizer, where=where)
        self.function = load_function(self.task.function or "", where=f"{self.where}.task.function")

    def _check_metric(self) -> None:  # the function defines what it measures; any name labels it
        pass

    def has_split(self, split: str) -> bool:
        return split == "data" or self.path_of(split) is not None

    def _prepare(self, split: str, device: torch.device) -> Any:
        path = self.path_of(split)
        if path is None:
            return None
        if is_array_file(path):
            file = check_file(path, self.field(split))
            with np.load(file, allow_pickle=False) as archive:
                keys = [(k, self.field(split)) for k in archive.files]
            return read_arrays(file, keys, where=self.field(split), limit=self.task.limit)
        return self._rows(split).records

    def _score(self, model: torch.nn.Module, data: Any) -> tuple[dict, dict]:
        where = f"{self.where}.task.function"
        result = self.function(model, self.tokenizer, data, **self.task.options)
        try:
            scores = np.asarray(result, dtype=np.float64)
        except (TypeError, ValueError):
            raise UserError(f"{self.task.function} returned {type(result).__name__}; return one float per example",
                            where=where) from None
        if scores.ndim != 1 or scores.size == 0:
            raise UserError(f"{self.task.function} returned an array of shape {scores.shape}; return a non-empty "
                            "1-D sequence, one float per example", where=where)
        if not np.isfinite(scores).all():
            raise UserError(f"{self.task.function} returned NaN or infinite scores; return finite floats",
                            where=where)
        return {self.metric: scores}, {}


def load_function(spec: str, *, where: str) -> Callable[..., Any]:
    """Import ``module:function`` (``module`` may be dotted; the working directory is searched too)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"{spec!r} is not `module:function`", where=where)
    added = False
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
        added = True
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"cannot import {module_name!r} ({e}); put it on PYTHONPATH or in the working directory",
                        where=where) from None
    finally:
        if added:
            sys.path.remove(str(Path.cwd()))
    function = module
    for part in attr.split("."):
        function = getattr(function, part, None)
        if function is None:
            raise UserError(f"module {module_name!r} has no {attr!r}", where=where)
    if not callable(function):
        raise UserError(f"{spec} is not callable", where=where)
    return function


# ------------------------------------------------------------------------------------------------------ costs

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def count_layers(model: torch.nn.Module) -> int:
    """Transformer blocks of a model (its config's layer count), or the Linear layers of a plain MLP."""
    config = getattr(model, "config", None)
    for key in _LAYER_KEYS:
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, int):
            return value
    return sum(isinstance(m, torch.nn.Linear) for m in model.modules())


class NumLayersScorer(Scorer):
    kind = "num_layers"
    METRICS = ("num_layers",)
    NEEDS_DATA = False

    def _prepare(self, split: str, device: torch.device) -> None:
        return None

    def _score(self, model: torch.nn.Module, prepared: None) -> tuple[dict, dict]:
        return {"num_layers": [float(count_layers(model))]}, {}


class NumParamsScorer(Scorer):
    kind = "num_params"
    METRICS = ("num_params",)
    NEEDS_DATA = False

    def _prepare(self, split: str, device: torch.device) -> None:
        return None

    def _score(self, model: torch.nn.Module, prepared: None) -> tuple[dict, dict]:
        # parameters() lists tied tensors once: the count of distinct weights the merged model holds.
        return {"num_params": [float(sum(p.numel() for p in model.parameters()))]}, {}


# ---------------------------------------------------------------------------------------------------- factory

SCORERS: dict[str, type[Scorer]] = {
    cls.kind: cls for cls in (ClassificationScorer, MultipleChoiceScorer, ExactMatchScorer, NLLScorer, PythonScorer,
                              NumLayersScorer, NumParamsScorer)
}


def build_scorer(objective: ObjectiveSpec | Mapping[str, Any], *, tokenizer: Any = None, allow_python: bool = True,
                 where: str | None = None) -> Scorer:
    """The scorer of one objective (an :class:`~evomerge.spec.ObjectiveSpec` or its dict).

    ``tokenizer`` is needed by text tasks; ``allow_python=False`` refuses ``python`` objectives (the server's
    setting). Nothing is read yet: data is loaded on the first :meth:`Scorer.score` or :meth:`Scorer.check`.
    """
    if not isinstance(objective, ObjectiveSpec):
        objective = parse_objective(objective)
    where = where or f"objectives.{objective.name}"
    kind = objective.task.kind
    if kind == "python" and not allow_python:
        raise UserError("python objectives run your code and are disabled here (the server refuses them); use "
                        "the CLI, or a built-in task kind", where=f"{where}.task.kind")
    if kind == "lm_eval":
        from evomerge.evaluation.lm_eval_task import LmEvalScorer

        return LmEvalScorer(objective, tokenizer=tokenizer, where=where)
    return SCORERS[kind](objective, tokenizer=tokenizer, where=where)


def parse_objective(data: Mapping[str, Any]) -> ObjectiveSpec:
    from pydantic import ValidationError

    try:
        return ObjectiveSpec.model_validate(dict(data))
    except ValidationError as e:
        # The job spec's reading of pydantic's report, so a bad objective names the same field either way.
        loc, message = first_error(e, ObjectiveSpec)
        name = data.get("name", "?") if isinstance(data, Mapping) else "?"
        raise UserError(message, where=f"objectives.{name}" + (f".{loc}" if loc else "")) from None
