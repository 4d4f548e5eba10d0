"""lm-eval-harness tasks from local YAML and JSON files, scored offline through our batched code."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from eval_helpers import BigramLM, objective, write_jsonl

from evomerge.errors import UserError
from evomerge.evaluation import Evaluator, build_scorer, lm_eval_task
from evomerge.merging import ModelSet, Recipe
from evomerge.testbeds.synthetic import Family

# CI installs the `lmeval` extra, so there a missing lm-eval is a failure, not a skip.
lm_eval = importlib.import_module("lm_eval") if os.environ.get("CI") else pytest.importorskip("lm_eval")

MC_ROWS = [{"prompt": "pick one:", "choices": ["a", "bb", "ccc"], "answer": i % 3} for i in range(4)] + [
    {"prompt": "2+2=", "choices": ["4", "22", "five"], "answer": 0}, {"prompt": "sky:", "choices": ["blue", "red"],
                                                                       "answer": 0}]
QA_ROWS = [{"prompt": f"say {w}:", "answer": w} for w in ("cat", "dog", "emu", "owl")]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    write_jsonl(folder / "mc.jsonl", MC_ROWS)
    write_jsonl(folder / "qa.jsonl", QA_ROWS)
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{prompt}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'qa.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "tiny_ll.yaml").write_text(
        f"task: tiny_ll\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'qa.jsonl'}\n"
        "output_type: loglikelihood\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


@pytest.fixture(scope="module")
def model(llama: Family) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(llama.base)).eval()


def lm_objective(task: str, folder: Path, metric: str | None = None, **extra: Any) -> dict:
    spec = objective(task, kind="lm_eval", task=task, include_path=str(folder), **extra)
    if metric:
        spec["metric"] = metric
    return spec


def test_multiple_choice_per_sample_equals_our_scorer(tasks: Path, model: torch.nn.Module, tokenizer: Any) -> None:
    for metric in ("acc", "acc_norm"):
        ours = build_scorer({"name": "mc", "metric": metric, "task": {"kind": "multiple_choice",
                                                                      "data": str(tasks / "mc.jsonl")}},
                            tokenizer=tokenizer).score(model)
        theirs = build_scorer(lm_objective("tiny_mc", tasks, metric), tokenizer=tokenizer).score(model)
        np.testing.assert_array_equal(theirs.per_example, ours.per_example)
        assert theirs.value == pytest.approx(ours.value)


def test_generate_until_equals_our_exact_match(tasks: Path, model: torch.nn.Module, tokenizer: Any) -> None:
    answers = build_scorer(objective("em", kind="exact_match", data=str(tasks / "qa.jsonl"), max_new_tokens=6,
                                     normalize=[]), tokenizer=tokenizer).score(model)
    theirs = build_scorer(lm_objective("tiny_gen", tasks, "exact_match"), tokenizer=tokenizer).score(model)
    np.testing.assert_array_equal(theirs.per_example, answers.per_example)


def test_our_loop_gives_what_lm_evals_own_evaluate_gives(tasks: Path, model: torch.nn.Module,
                                                         tokenizer: Any) -> None:
    from lm_eval.evaluator import evaluate

    scorer = build_scorer(lm_objective("tiny_ll", tasks, "acc"), tokenizer=tokenizer)
    ours = scorer.score(model)
    perplexity = build_scorer(lm_objective("tiny_ll", tasks, "perplexity"), tokenizer=tokenizer).score(model)
    lm = lm_eval_task.live_lm_class()(scorer.codec, batch_size=4, max_length=None)
    lm.model = model
    names = ["tiny_ll", "tiny_mc", "tiny_gen"]
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    results = lm_eval_task._quiet(lambda: evaluate(lm, manager.load(names), bootstrap_iters=0, log_samples=True))
    samples = results["samples"]
    assert [s["acc"] for s in samples["tiny_ll"]] == ours.per_example.tolist()
    assert results["results"]["tiny_ll"]["perplexity,none"] == pytest.approx(perplexity.value)
    for name, metric in (("tiny_mc", "acc_norm"), ("tiny_gen", "exact_match")):
        mine = build_scorer(lm_objective(name, tasks, metric), tokenizer=tokenizer).score(model)
        assert [float(s[metric]) for s in samples[name]] == mine.per_example.tolist()


def test_rolling_loglikelihood_scores_every_token_once(tokenizer: Any) -> None:
    from lm_eval.api.instance import Instance

    table = torch.randn((64, 64), generator=torch.Generator().manual_seed(1))
    codec = lm_eval_task.TextCodec(tokenizer)
    lm = lm_eval_task.live_lm_class()(codec, batch_size=2, max_length=4)
    lm.model = BigramLM(table)
    texts = ["hello world, again", "hi"]
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    with torch.inference_mode():
        got = lm.loglikelihood_rolling(requests)
    for text, value in zip(texts, got):
        tokens = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        expected = sum(float(table[a].double().log_softmax(-1)[b]) for a, b in zip(tokens, tokens[1:]))
        assert value == pytest.approx(expected, rel=1e-6)


def test_mistakes_name_the_field(tasks: Path, model: torch.nn.Module, tokenizer: Any) -> None:
    with pytest.raises(UserError, match="knows no task or group 'nope'.*defines: tiny_gen, tiny_ll, tiny_mc") as info:
        build_scorer(lm_objective("nope", tasks), tokenizer=tokenizer).score(model)
    assert info.value.where == "objectives.nope.task.task"
    with pytest.raises(UserError, match="reports acc, acc_norm, not 'f1'") as info:
        build_scorer(lm_objective("tiny_mc", tasks, "f1"), tokenizer=tokenizer).score(model)
    assert info.value.where == "objectives.tiny_mc.metric"
    with pytest.raises(UserError, match="not a folder"):
        build_scorer(objective("t", kind="lm_eval", task="x", include_path=str(tasks / "missing")),
                     tokenizer=tokenizer).score(model)


def test_without_lm_eval_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tokenizer: Any) -> None:
    monkeypatch.setattr(lm_eval_task, "_lm_eval", lambda: None)
    with pytest.raises(UserError, match=r"pip install 'evomerge\[lmeval\]'") as info:
        build_scorer(objective("t", kind="lm_eval", task="x"), tokenizer=tokenizer)
    assert info.value.where == "objectives.t.task.kind"


def test_an_evaluator_scores_lm_eval_tasks_per_candidate_from_requests_built_once(
        llama: Family, tasks: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval.api.task import ConfigurableTask

    built = []
    real = ConfigurableTask.build_all_requests
    monkeypatch.setattr(ConfigurableTask, "build_all_requests",
                        lambda self, *a, **k: (built.append(self.config.task), real(self, *a, **k))[1])
    ms = ModelSet.load(llama.base, llama.experts)
    evaluator = Evaluator(ms, [lm_objective("tiny_mc", tasks, "acc_norm"),
                               lm_objective("tiny_gen", tasks, "exact_match")])
    recipes = [Recipe.model_validate({"merge_method": "linear", "models": [
        {"model": "base", "parameters": {"weight": 1 - w}}, {"model": "e0", "parameters": {"weight": w}}]})
        for w in (0.0, 1.0)]
    first, second = (evaluator.evaluate(r) for r in recipes)
    assert built == ["tiny_mc", "tiny_gen"]
    assert first.per_example["tiny_mc"].shape == (len(MC_ROWS),)
    assert first.values.keys() == {"tiny_mc", "tiny_gen"}
    again = evaluator.evaluate(recipes[0])
    assert np.array_equal(again.per_example["tiny_mc"], first.per_example["tiny_mc"])
    assert second.values.keys() == first.values.keys()
