"""Optuna samplers through Optuna's ask/tell API on an in-memory study (Akiba et al. 2019, "Optuna: A
Next-generation Hyperparameter Optimization Framework").

``sampler``: ``tpe`` — the tree-structured Parzen estimator (Bergstra et al. 2011; multi-objective: MOTPE,
Ozaki et al. 2020), Optuna's defaults (10 random start-up trials); ``gp`` — Gaussian-process Bayesian
optimisation (Optuna's ``GPSampler``, log-EI; it runs on torch, imported by Optuna when the sampler is built);
``nsgaii`` — Optuna's NSGA-II sampler (Deb et al. 2002; population 50, Optuna's default).

Each genome coordinate is a float parameter ``x0000``, ``x0001``, … with the problem's bounds. By default the
study has every objective in its own direction (``scalarize: false``); ``scalarize: true`` gives it one
maximised score, the problem's scalarization. A failed candidate (NaN) is told the worst value seen so far for
each objective it failed on (so the sampler learns to avoid it), or recorded as a failed trial while nothing has
been seen yet. Trials are independent: a crashed batch leaves its trials running (samplers ignore those unless
``constant_liar``) and costs only its evaluations; a told genome that was never asked is added as a completed
trial (a warm start).

State: the study's trials (parameters, values, state, system attributes, in trial order) and the study's system
attributes, replayed into a fresh in-memory storage, and the sampler pickled (base64). Replaying the trials alone
into a sampler built with the same seed is not enough: the sampler's random stream has advanced with every ask
and replaying does not advance it, so the next asks differ (checked with TPE, GP and NSGA-II); the pickled sampler
carries that stream. Pickles are specific to the Optuna version that wrote them.
"""

from __future__ import annotations

import datetime
import warnings
from typing import Any, Literal, Mapping

import numpy as np
from pydantic import Field

from evomerge.search.optimizers.base import MAX_POPULATION, Optimizer, OptimizerOptions, genome_key, register
from evomerge.search.problem import Problem
from evomerge.search.state import decode_array, decode_pickle, encode_array, encode_pickle


class OptunaOptions(OptimizerOptions):
    sampler: Literal["tpe", "gp", "nsgaii"] = Field(default="tpe", description="Which Optuna sampler.")
    n_startup_trials: int | None = Field(default=None, ge=0, description="tpe/gp: random trials before the model "
                                         "is used; None = Optuna's default (10).")
    multivariate: bool = Field(default=False, description="tpe: model the coordinates jointly (Falkner et al. "
                               "2018) instead of independently.")
    constant_liar: bool = Field(default=False, description="tpe: treat running trials as bad so that parallel "
                                "asks spread out.")
    population_size: int = Field(default=50, ge=2, le=MAX_POPULATION, description="nsgaii: population size.")
    scalarize: bool = Field(default=False, description="Tell one score (the problem's scalarization) instead of "
                            "every objective.")
    batch: int = Field(default=1, ge=1, le=MAX_POPULATION,
                       description="Genomes returned by ask() when no number is given.")


@register("optuna")
class OptunaSampler(Optimizer):
    """An Optuna study driven by ask/tell (see the module docstring)."""

    Options = OptunaOptions
    options: OptunaOptions
    multi_objective = True

    def __init__(self, problem: Problem, options: OptunaOptions | Mapping[str, Any] | None = None,
                 seed: int = 0) -> None:
        super().__init__(problem, options, seed)
        import optuna
        from optuna.distributions import FloatDistribution

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # a log line per trial would drown the runner's
        self.joint = not self.options.scalarize  # every objective in the study, or one score
        self.param_names = [f"x{i:04d}" for i in range(problem.dim)]
        self.distributions = {name: FloatDistribution(float(lo), float(hi))
                              for name, lo, hi in zip(self.param_names, problem.lower, problem.upper)}
        self.directions = list(problem.directions) if self.joint else ["maximize"]
        self.study = self._new_study(self._make_sampler())
        self.pending: dict[bytes, list[int]] = {}
        self.worst: np.ndarray | None = None  # per study objective, in the study's directions

    def _make_sampler(self) -> Any:
        import optuna

        opts = self.options
        startup = {} if opts.n_startup_trials is None else {"n_startup_trials": opts.n_startup_trials}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning for some sampler arguments
            if opts.sampler == "tpe":
                return optuna.samplers.TPESampler(seed=self.seed, multivariate=opts.multivariate,
                                                  constant_liar=opts.constant_liar, **startup)
            if opts.sampler == "gp":
                return optuna.samplers.GPSampler(seed=self.seed, **startup)
            return optuna.samplers.NSGAIISampler(seed=self.seed, population_size=opts.population_size)

    def _new_study(self, sampler: Any) -> Any:
        import optuna

        return optuna.create_study(sampler=sampler, directions=self.directions)

    # -- ask/tell -----------------------------------------------------------------------------------------

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(self._batch_size(n, self.options.batch)):
                trial = self.study.ask(self.distributions)
                x = np.array([trial.params[name] for name in self.param_names], dtype=np.float64)
                self.pending.setdefault(genome_key(x), []).append(trial.number)
                out.append(x)
        return out

    def _tell(self, X: list[np.ndarray], F: np.ndarray, per_example: Any) -> None:
        from optuna.trial import TrialState, create_trial

        for x, f in zip(X, F):
            values = f if self.joint else self.problem.scores(f[None, :])
            values, failed = self._fill_failures(np.asarray(values, dtype=np.float64))
            numbers = self.pending.get(genome_key(x))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if numbers:
                    number = numbers.pop(0)
                    if not numbers:
                        del self.pending[genome_key(x)]
                    if failed:
                        self.study.tell(number, state=TrialState.FAIL)
                    else:
                        self.study.tell(number, values.tolist())
                else:
                    params = {name: float(v) for name, v in zip(self.param_names, x)}
                    self.study.add_trial(create_trial(
                        params=params, distributions=self.distributions, state=TrialState.FAIL if failed else
                        TrialState.COMPLETE, values=None if failed else values.tolist()))

    def _fill_failures(self, values: np.ndarray) -> tuple[np.ndarray, bool]:
        """NaN entries → the worst value seen so far for that objective; failed when none has been seen."""
        sign = np.array([1.0 if d == "maximize" else -1.0 for d in self.directions])
        bad = ~np.isfinite(values)
        if not bad.any():
            self.worst = values.copy() if self.worst is None else np.where(
                values * sign < self.worst * sign, values, self.worst)
            return values, False
        if self.worst is None or not np.all(np.isfinite(self.worst[bad])):
            return values, True
        return np.where(bad, self.worst, values), False

    # -- state --------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        trials = []
        for t in self.study.get_trials(deepcopy=False):
            x = np.array([t.params.get(name, np.nan) for name in self.param_names], dtype=np.float64)
            trials.append({"state": t.state.name, "params": encode_array(x),
                           "values": None if t.values is None else encode_array(np.asarray(t.values)),
                           "system_attrs": t.system_attrs, "user_attrs": t.user_attrs})
        storage, study_id = self.study._storage, self.study._study_id  # noqa: SLF001 (no public accessor)
        return {"sampler": encode_pickle(self.study.sampler), "trials": trials,
                "study_system_attrs": storage.get_study_system_attrs(study_id),
                "worst": None if self.worst is None else encode_array(self.worst)}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        from optuna.trial import FrozenTrial, TrialState

        self.study = self._new_study(decode_pickle(state["sampler"]))
        storage, study_id = self.study._storage, self.study._study_id  # noqa: SLF001 (no public accessor)
        for key, value in state["study_system_attrs"].items():
            storage.set_study_system_attr(study_id, key, value)
        self.pending = {}
        now = datetime.datetime.now()
        for number, record in enumerate(state["trials"]):
            trial_state = TrialState[record["state"]]
            x = decode_array(record["params"])
            params = {name: float(v) for name, v in zip(self.param_names, x) if not np.isnan(v)}
            values = None if record["values"] is None else decode_array(record["values"]).tolist()
            # Created through the storage (not Study.add_trial) so running trials come back running.
            storage.create_new_trial(study_id, template_trial=FrozenTrial(
                number=number, state=trial_state, value=None, values=values, datetime_start=now,
                datetime_complete=None if trial_state == TrialState.RUNNING else now, params=params,
                distributions={name: self.distributions[name] for name in params},
                user_attrs=dict(record["user_attrs"]), system_attrs=dict(record["system_attrs"]),
                intermediate_values={}, trial_id=number))
            if trial_state == TrialState.RUNNING:
                self.pending.setdefault(genome_key(x), []).append(number)
        self.worst = None if state["worst"] is None else decode_array(state["worst"])
