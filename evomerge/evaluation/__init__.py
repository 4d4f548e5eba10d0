"""Scoring merged models: the job spec's objectives as scorers of a live model, with per-example scores.

>>> from evomerge.evaluation import Evaluator, score
>>> evaluator = Evaluator(model_set, spec.objectives, allow_python=False)     # doctest: +SKIP
>>> result = evaluator.evaluate(recipe)                                       # doctest: +SKIP
>>> result.values, result.per_example, result.merge_seconds, result.score_seconds  # doctest: +SKIP

- :mod:`~evomerge.evaluation.evaluator` — :class:`Evaluator` (merge in place, score every objective),
  :class:`CandidateScore`, :func:`score` (one call, evaluator cached per model set and objectives).
- :mod:`~evomerge.evaluation.scorers` — one scorer per task kind, :func:`build_scorer`.
- :mod:`~evomerge.evaluation.lm` — causal-LM requests, batched log-likelihoods, greedy generation.
- :mod:`~evomerge.evaluation.lm_eval_task` — lm-eval-harness tasks (optional extra ``evomerge[lmeval]``).
- :mod:`~evomerge.evaluation.data` — reading JSONL/CSV rows and ``.npz`` arrays, with errors that name the field.

Imports torch and :mod:`evomerge.merging`; never Ray, FastAPI, SQLAlchemy or the search.
"""

from __future__ import annotations

from evomerge.evaluation.data import DataError
from evomerge.evaluation.evaluator import CandidateScore, Evaluator, load_tokenizer, score
from evomerge.evaluation.scorers import SCORERS, Scorer, Scores, build_scorer, make_normalizer

__all__ = ["CandidateScore", "DataError", "Evaluator", "SCORERS", "Scorer", "Scores", "build_scorer",
           "load_tokenizer", "make_normalizer", "score"]
