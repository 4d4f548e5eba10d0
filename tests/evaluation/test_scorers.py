"""Scorers against values worked out by hand: models whose logits we choose, manual log-softmax sums."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from eval_helpers import BigramLM, chain_table, objective, write_jsonl, write_npz
from torch import nn

from evomerge.errors import UserError
from evomerge.evaluation import build_scorer
from evomerge.evaluation.data import DataError
from evomerge.evaluation.lm import TextCodec
from evomerge.evaluation.scorers import ExactMatchScorer, make_normalizer
from evomerge.testbeds.synthetic import Family


class FirstLogits(nn.Module):
    """Logits are the first ``n`` input features: the prediction is their argmax."""

    def __init__(self, n: int = 10) -> None:
        super().__init__()
        self.n = n
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :self.n] + self.dummy


def ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------- classification


def test_classification_of_arrays_is_per_example_argmax_accuracy(tmp_path: Path) -> None:
    picks = np.array([3, 7, 0, 9, 2])
    x = np.zeros((5, 64), np.float32)
    x[np.arange(5), picks] = 1.0
    y = np.array([3, 7, 1, 9, 5])
    data = write_npz(tmp_path / "d.npz", x=x, y=y)
    scorer = build_scorer(objective("acc", kind="classification", data=str(data), batch_size=2))
    result = scorer.score(FirstLogits())
    assert result.per_example.dtype == np.float64
    assert result.per_example.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert result.value == pytest.approx(0.6)
    limited = build_scorer(objective("acc", kind="classification", data=str(data), limit=2))
    assert limited.score(FirstLogits()).per_example.tolist() == [1.0, 1.0]


def test_classification_arrays_under_other_names(tmp_path: Path) -> None:
    x = np.eye(10, 64, dtype=np.float32)
    data = write_npz(tmp_path / "d.npz", feats=x, labels=np.arange(10))
    scorer = build_scorer(objective("acc", kind="classification", data=str(data), input="feats", target="labels"))
    assert scorer.score(FirstLogits()).value == 1.0


def test_a_label_beyond_the_models_classes_fails_at_first_scoring(tmp_path: Path) -> None:
    data = write_npz(tmp_path / "d.npz", x=np.eye(4, 64, dtype=np.float32), y=np.array([0, 1, 10, 2]))
    scorer = build_scorer(objective("acc_0_4", kind="classification", data=str(data)))
    scorer.check()  # reading is fine: the number of classes is the model's
    with pytest.raises(DataError, match="row 2: label 10 is out of range; the model has 10 classes") as info:
        scorer.score(FirstLogits(10))
    assert info.value.where == "objectives.acc_0_4.task.target"


def test_text_classification_matches_one_example_at_a_time(bert: Family, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bert.base), local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(bert.base)).eval()
    texts = ["a cat sat", "dogs!", "the quick brown fox jumps", "x", "hello there, general", "zz top"]
    labels = [0, 1, 1, 0, 1, 0]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": lab} for t, lab in zip(texts, labels)])
    scorer = build_scorer(objective("sent", kind="classification", data=str(data), batch_size=4), tokenizer=tokenizer)
    with torch.no_grad():
        expected = [float(int(model(**tokenizer(t, return_tensors="pt")).logits.argmax()) == lab)
                    for t, lab in zip(texts, labels)]
    assert scorer.score(model).per_example.tolist() == expected


@pytest.mark.parametrize("pad", ["tokenizer", "eos", "s", None])
def test_batched_text_classification_with_a_decoder_classifier_equals_one_example_at_a_time(
        tokenizer: Any, tmp_path: Path, pad: str | None) -> None:
    """Llama/Mistral/Qwen/GPT-2 classifiers pool the last token that is not ``config.pad_token_id``: padding with
    any other id pools a padding position; without a pad id they refuse batches of more than one row."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    pad_id = {"tokenizer": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id, None: None,
              "s": tokenizer.convert_tokens_to_ids("s")}[pad]  # "s": a real character, ending some texts
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, num_labels=5,
                         pad_token_id=pad_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    texts = ["a cat sat", "dogs", "the quick brown fox jumps", "x", "hello there general", "zz top", "cats",
             "ab", "yes", "no", "emus", "a cat ran"]
    with torch.no_grad():
        alone = [int(model(**tokenizer(t, return_tensors="pt")).logits.argmax(-1)) for t in texts]
    assert len(set(alone)) > 1  # pooling the wrong position would change some predictions
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": lab} for t, lab in zip(texts, alone)])
    scorer = build_scorer(objective("sent", kind="classification", data=str(data), batch_size=4), tokenizer=tokenizer)
    assert scorer.score(model).per_example.tolist() == [1.0] * len(texts)
    assert model.config.pad_token_id == pad_id  # a pad id set for the call is taken back


def test_a_decoder_classifier_without_a_pad_id_whose_every_id_occurs_is_scored_one_row_at_a_time(
        tokenizer: Any, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(config).eval()
    texts = ["<pad>ab", "</s>cd", "\u00e9", "abcd", "dcba", "ba", "c", "aab"]  # ids 0-7: "\u00e9" is <unk>
    assert {i for t in texts for i in tokenizer(t)["input_ids"]} == set(range(8))
    with torch.no_grad():
        alone = [int(model(**tokenizer(t, return_tensors="pt")).logits.argmax(-1)) for t in texts]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": lab} for t, lab in zip(texts, alone)])
    scorer = build_scorer(objective("sent", kind="classification", data=str(data), batch_size=4), tokenizer=tokenizer)
    assert scorer.score(model).per_example.tolist() == [1.0] * len(texts)


def test_text_classification_without_a_tokenizer_is_a_user_error(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}])
    scorer = build_scorer(objective("sent", kind="classification", data=str(data)))
    with pytest.raises(UserError, match="needs a tokenizer") as info:
        scorer.score(FirstLogits())
    assert info.value.where == "objectives.sent.task.data"


@pytest.mark.parametrize("kind", ["multiple_choice", "exact_match", "nll"])
def test_language_tasks_without_a_tokenizer_are_refused_when_built(kind: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no tokenizer") as info:
        build_scorer(objective("t", kind=kind, data=str(tmp_path / "d.jsonl")))
    assert info.value.where == "objectives.t.task.kind"


def test_an_unknown_metric_names_the_ones_the_kind_reports(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="reports acc_norm, acc, acc_bytes, not 'f1'") as info:
        build_scorer({"name": "mc", "metric": "f1", "task": {"kind": "multiple_choice", "data": "x.jsonl"}},
                     tokenizer=object())
    assert info.value.where == "objectives.mc.metric"


# --------------------------------------------------------------------------------------------- multiple choice


def _logsoftmax(table: torch.Tensor, tokenizer: Any, prev: str, nxt: str) -> float:
    row = table[tokenizer.convert_tokens_to_ids(prev)].double().log_softmax(-1)
    return float(row[tokenizer.convert_tokens_to_ids(nxt)])


def test_acc_norm_divides_by_the_choices_length_in_characters_and_can_disagree_with_acc(tokenizer: Any,
                                                                                         tmp_path: Path) -> None:
    table = torch.zeros(64, 64)
    q, x, y, z = (tokenizer.convert_tokens_to_ids(c) for c in "qxyz")
    table[q, x], table[q, y], table[y, z] = 2.0, 2.5, 2.5
    ll_x = _logsoftmax(table, tokenizer, "q", "x")
    ll_yz = _logsoftmax(table, tokenizer, "q", "y") + _logsoftmax(table, tokenizer, "y", "z")
    assert ll_yz < ll_x and ll_yz / 2 > ll_x / 1  # acc picks "x", acc_norm picks "yz"
    rows = [{"prompt": "q", "choices": ["x", "yz"], "answer": 1},
            {"prompt": "q", "choices": ["x", "yz"], "answer": 0},
            {"prompt": "q", "choices": ["yz", "zzzz"], "answer": "yz"}]
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    model = BigramLM(table)
    scorer = build_scorer(objective("mc", kind="multiple_choice", data=str(data), batch_size=3), tokenizer=tokenizer)
    result = scorer.score(model)
    assert scorer.metric == "acc_norm"
    assert result.per_example.tolist() == [1.0, 0.0, 1.0]
    assert result.metrics == {"acc": pytest.approx(2 / 3), "acc_norm": pytest.approx(2 / 3),
                              "acc_bytes": pytest.approx(2 / 3)}
    acc = build_scorer({"name": "mc", "metric": "acc", "task": {"kind": "multiple_choice", "data": str(data)}},
                       tokenizer=tokenizer)
    assert acc.score(model).per_example.tolist() == [0.0, 1.0, 1.0]


def test_multiple_choice_answer_out_of_range_names_the_line(tokenizer: Any, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "q", "choices": ["a", "b"], "answer": 0},
                                               {"prompt": "q", "choices": ["a", "b"], "answer": 2}])
    scorer = build_scorer(objective("mc", kind="multiple_choice", data=str(data)), tokenizer=tokenizer)
    with pytest.raises(DataError, match="line 2: answer 2 is neither an index") as info:
        scorer.check()
    assert info.value.where == "objectives.mc.task.target"


def test_a_multiple_choice_answer_that_is_a_choices_text_is_that_choice(tokenizer: Any, tmp_path: Path) -> None:
    """CSV cells are strings: ``"6"`` among ``["2", "4", "6", "8"]`` is the third choice, not index 6; a digit
    string that is no choice is an index; numbers (JSON) are always indices."""
    table = torch.zeros(64, 64)
    table[tokenizer.convert_tokens_to_ids("q"), tokenizer.convert_tokens_to_ids("6")] = 4.0  # the model picks "6"
    path = tmp_path / "mc.csv"
    path.write_text('prompt,choices,answer\n'
                    'q,"[""2"", ""4"", ""6"", ""8""]",6\n'  # the choice "6": right (was index 6: out of range)
                    'q,"[""2"", ""4"", ""6"", ""8""]",2\n'  # the choice "2": wrong (was index 2, "6": right)
                    'q,"[""2"", ""4"", ""6"", ""8""]",1\n'  # no choice is "1": index 1, "4": wrong
                    'q,"[""a"", ""b"", ""6""]",2\n')  # no choice is "2": index 2, "6": right
    spec = {"name": "mc", "metric": "acc", "task": {"kind": "multiple_choice", "data": str(path)}}
    assert build_scorer(spec, tokenizer=tokenizer).score(BigramLM(table)).per_example.tolist() == [1, 0, 0, 1]
    data = write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "q", "choices": ["2", "4", "6", "8"], "answer": 2},
                                               {"prompt": "q", "choices": ["2", "4", "6", "8"], "answer": 0}])
    spec["task"]["data"] = str(data)
    assert build_scorer(spec, tokenizer=tokenizer).score(BigramLM(table)).per_example.tolist() == [1, 0]


def test_trailing_whitespace_of_the_context_moves_into_the_continuation(tokenizer: Any) -> None:
    codec = TextCodec(tokenizer)
    context, continuation = codec.pair("q: ", "x")
    assert context == [tokenizer.bos_token_id, *ids(tokenizer, "q:")]
    assert continuation == ids(tokenizer, " x")
    assert codec.prompt("ab") == [tokenizer.bos_token_id, *ids(tokenizer, "ab")]


# ------------------------------------------------------------------------------------------------------- nll


def test_nll_is_the_mean_token_negative_log_likelihood_of_the_answer(llama: Family, tokenizer: Any,
                                                                     tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llama.base)).eval()
    rows = [{"prompt": "reverse: abc\n", "answer": "cba"}, {"prompt": "hi", "answer": " there, you"},
            {"prompt": "1+1=", "answer": "2"}, {"prompt": "a much longer prompt than the others", "answer": "ok"}]
    data = write_jsonl(tmp_path / "nll.jsonl", rows)
    scorer = build_scorer(objective("loss", kind="nll", data=str(data), batch_size=3), tokenizer=tokenizer)
    expected = []
    with torch.no_grad():
        for row in rows:
            prompt, answer = row["prompt"], row["answer"]
            stripped = prompt.rstrip()  # lm-eval moves the prompt's trailing whitespace into the answer
            answer, prompt = prompt[len(stripped):] + answer, stripped
            p = tokenizer(prompt)["input_ids"]
            a = ids(tokenizer, answer)
            logp = model(torch.tensor([p + a])).logits[0].double().log_softmax(-1)
            expected.append(-sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(a)) / len(a))
    result = scorer.score(model)
    np.testing.assert_allclose(result.per_example, expected, rtol=1e-5)
    assert result.value == pytest.approx(np.mean(expected), rel=1e-5)


def test_nll_of_whole_texts_in_windows_scores_every_token_once(tokenizer: Any, tmp_path: Path) -> None:
    table = torch.randn((64, 64), generator=torch.Generator().manual_seed(3))
    texts = ["the quick brown fox jumps over", "ab"]
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    # A bigram model ignores context, so windows of 5 tokens give exactly the whole text's per-token loss.
    scorer = build_scorer(objective("ppl", kind="nll", data=str(data), max_length=5), tokenizer=tokenizer)
    expected = []
    for text in texts:
        tokens = [tokenizer.bos_token_id, *ids(tokenizer, text)]
        lps = [float(table[a].double().log_softmax(-1)[b]) for a, b in zip(tokens, tokens[1:])]
        expected.append(-sum(lps) / len(lps))
    np.testing.assert_allclose(scorer.score(BigramLM(table)).per_example, expected, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ exact match

CHAIN = {"q": "a", "a": "b", "b": "c", "c": "\n", "d": "d", "x": "</s>"}


@pytest.mark.parametrize("teacher_forcing", [True, False])
def test_exact_match_generates_greedily_until_a_stop_and_normalizes(tokenizer: Any, tmp_path: Path,
                                                                    teacher_forcing: bool) -> None:
    model = BigramLM(chain_table(tokenizer, CHAIN))
    rows = [
        {"prompt": "q", "answer": "abc"},  # q -> a b c \n: "abc"
        {"prompt": "zq", "answer": " ABC "},  # the same after strip + lower
        {"prompt": "b", "answer": "cc"},  # b -> c \n: "c", wrong
        {"prompt": "d", "answer": "dddddd"},  # d repeats until the 6-token budget
        {"prompt": "x", "answer": ""},  # end of sequence at once: ""
        {"prompt": "q", "answer": "ax"},  # wrong after one token: needs real generation ("abc")
    ]
    data = write_jsonl(tmp_path / "em.jsonl", rows)
    spec = objective("em", kind="exact_match", data=str(data), max_new_tokens=6, normalize=["strip", "lower"],
                     batch_size=4)
    scorer = ExactMatchScorer(build_scorer(spec, tokenizer=tokenizer).objective, tokenizer=tokenizer,
                              teacher_forcing=teacher_forcing)
    result = scorer.score(model)
    assert result.details["predictions"] == ["abc", "abc", "c", "dddddd", "", "abc"]
    assert result.per_example.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    # With the teacher-forced pass first, only the examples whose greedy output leaves the answer's text and has
    # not ended yet are generated: " ABC " (greedy starts with "a", not " ") and "ax".
    assert result.details["generated"] == (2 if teacher_forcing else len(rows))


def test_exact_match_stops_at_the_first_of_several_stop_strings(tokenizer: Any, tmp_path: Path) -> None:
    model = BigramLM(chain_table(tokenizer, CHAIN))
    data = write_jsonl(tmp_path / "em.jsonl", [{"prompt": "q", "answer": "ab"}, {"prompt": "q", "answer": "abc"}])
    scorer = build_scorer(objective("em", kind="exact_match", data=str(data), stop=["c", "\n"]), tokenizer=tokenizer)
    result = scorer.score(model)
    assert result.details["predictions"] == ["ab", "ab"]
    assert result.per_example.tolist() == [1.0, 0.0]


def test_exact_match_decides_answers_greedy_writes_after_a_space_without_generating(tokenizer: Any,
                                                                                  tmp_path: Path) -> None:
    """Prompt "a:", answer "72", greedy " 72": the answer's own tokens disagree at once, the spaced ones do not."""
    model = BigramLM(chain_table(tokenizer, {":": " ", " ": "7", "7": "2", "2": "\n", "9": "9"}))
    rows = [{"prompt": "a:", "answer": "72"},  # " 72" then "\n": right, decided by the second pass
            {"prompt": "b:", "answer": "73"},  # " 72": leaves " 73" at "2", then generated
            {"prompt": "7", "answer": "2"},  # "2" at once: decided by the first pass
            {"prompt": "c:", "answer": "99"},  # " " is not "9" and "99" after a space is not " 72": generated
            {"prompt": "d:", "answer": " 72"}]  # already spaced: the first pass decides it
    data = write_jsonl(tmp_path / "em.jsonl", rows)
    spec = build_scorer(objective("em", kind="exact_match", data=str(data), max_new_tokens=6, normalize=["strip"],
                                  batch_size=2), tokenizer=tokenizer).objective
    fast = ExactMatchScorer(spec, tokenizer=tokenizer).score(model)
    slow = ExactMatchScorer(spec, tokenizer=tokenizer, teacher_forcing=False).score(model)
    assert fast.details["predictions"] == slow.details["predictions"] == [" 72", " 72", "2", " 72", " 72"]
    assert fast.per_example.tolist() == slow.per_example.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert fast.details["generated"] == 2


def test_normalizations() -> None:
    text = "  The  Cat,\tsat!  "
    assert make_normalizer(["strip"])(text) == "The  Cat,\tsat!"
    assert make_normalizer(["lower"])(text) == "  the  cat,\tsat!  "
    assert make_normalizer(["whitespace"])(text) == "The Cat, sat!"
    assert make_normalizer(["punctuation", "whitespace", "lower"])(text) == "the cat sat"


def test_teacher_forced_exact_match_equals_generation_on_a_real_model(llama: Family, tokenizer: Any,
                                                                     tmp_path: Path) -> None:
    """Half the answers are the model's own greedy output (from transformers' generate), so both the shortcut's
    right and wrong branches are exercised, against generation and against an independent reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llama.base)).eval()
    gen = np.random.default_rng(0)
    alphabet = list("abcdefghij \n")
    prompts = ["".join(gen.choice(alphabet[:-1], size=int(gen.integers(1, 12)))) for _ in range(24)]
    new = 8

    def reference(prompt: str) -> str:
        p = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=new, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        if tokenizer.eos_token_id in out:
            out = out[:out.index(tokenizer.eos_token_id)]
        return tokenizer.decode(out, skip_special_tokens=True).split("\n")[0]

    truth = [reference(p) for p in prompts]
    answers = [t if i % 2 == 0 else t[:2] + "q" for i, t in enumerate(truth)]
    data = write_jsonl(tmp_path / "em.jsonl", [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)])
    spec = build_scorer(objective("em", kind="exact_match", data=str(data), max_new_tokens=new, batch_size=5),
                        tokenizer=tokenizer).objective
    fast = ExactMatchScorer(spec, tokenizer=tokenizer).score(model)
    slow = ExactMatchScorer(spec, tokenizer=tokenizer, teacher_forcing=False).score(model)
    assert fast.details["predictions"] == slow.details["predictions"] == truth
    assert fast.per_example.tolist() == slow.per_example.tolist() == [float(i % 2 == 0 or t[:2] + "q" == t)
                                                                       for i, t in enumerate(truth)]
    assert fast.details["generated"] < len(prompts) == slow.details["generated"]


def test_spaced_second_pass_equals_generation_on_a_real_model(llama: Family, tokenizer: Any, tmp_path: Path) -> None:
    """The model is made to answer ":" with a space; answers are written without it, right or wrong."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llama.base)).eval()
    space, colon = tokenizer.convert_tokens_to_ids(" "), tokenizer.convert_tokens_to_ids(":")
    with torch.no_grad():
        model.model.embed_tokens.weight[colon] = model.lm_head.weight[space] * 40
    gen = np.random.default_rng(1)
    prompts = ["".join(gen.choice(list("abcdefghij"), size=int(gen.integers(1, 10)))) + ":" for _ in range(24)]
    rows = [{"prompt": p, "answer": "x"} for p in prompts]
    spec = objective("em", kind="exact_match", data=str(write_jsonl(tmp_path / "em.jsonl", rows)), max_new_tokens=6,
                     normalize=["strip"], batch_size=5)
    reference = ExactMatchScorer(build_scorer(spec, tokenizer=tokenizer).objective, tokenizer=tokenizer,
                                 teacher_forcing=False)
    truth = reference.score(model).details["predictions"]
    assert all(t.startswith(" ") and t.strip() for t in truth)
    answers = [t.strip() if i % 2 == 0 else t.strip()[:1] + "q" for i, t in enumerate(truth)]
    write_jsonl(tmp_path / "em.jsonl", [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)])
    objective_spec = build_scorer(spec, tokenizer=tokenizer).objective
    fast = ExactMatchScorer(objective_spec, tokenizer=tokenizer).score(model)
    slow = ExactMatchScorer(objective_spec, tokenizer=tokenizer, teacher_forcing=False).score(model)
    assert fast.details["predictions"] == slow.details["predictions"] == truth
    assert fast.per_example.tolist() == slow.per_example.tolist()
    assert fast.details["generated"] < len(prompts) == slow.details["generated"]


# ---------------------------------------------------------------------------------------------------- python


@pytest.fixture()
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_scoring.py").write_text(textwrap.dedent("""
        import numpy as np

        def score(model, tokenizer, data, scale=1.0):
            return [scale * len(row["prompt"]) for row in data]

        def arrays(model, tokenizer, data):
            return data["y"] * 2.0

        def no_data(model, tokenizer, data):
            assert data is None
            return [sum(p.numel() for p in model.parameters())]

        def bad(model, tokenizer, data):
            return [[1.0, 2.0]]

        def nan(model, tokenizer, data):
            return [float("nan")]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_scoring"
    sys.modules.pop("my_scoring", None)


def test_python_objectives_call_module_function_with_model_tokenizer_data_and_options(user_module: str,
                                                                                    tmp_path: Path) -> None:
    rows = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab"}, {"prompt": "abcd"}])
    scorer = build_scorer(objective("py", kind="python", function=f"{user_module}:score", data=str(rows),
                                    options={"scale": 0.5}))
    result = scorer.score(FirstLogits())
    assert result.per_example.tolist() == [1.0, 2.0] and result.value == 1.5
    arrays = write_npz(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.array([1, 2, 3]))
    scorer = build_scorer(objective("py", kind="python", function=f"{user_module}:arrays", data=str(arrays), limit=2))
    assert scorer.score(FirstLogits()).per_example.tolist() == [2.0, 4.0]
    scorer = build_scorer(objective("py", kind="python", function=f"{user_module}:no_data"))
    assert scorer.score(FirstLogits()).value == 1.0


def test_python_objectives_are_refused_unless_allowed(user_module: str) -> None:
    with pytest.raises(UserError, match="disabled") as info:
        build_scorer(objective("py", kind="python", function=f"{user_module}:score"), allow_python=False)
    assert info.value.where == "objectives.py.task.kind"


@pytest.mark.parametrize("function, message", [("bad", "shape \\(1, 2\\)"), ("nan", "NaN"),
                                               ("missing", "has no 'missing'")])
def test_python_objective_mistakes_are_user_errors(user_module: str, function: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        build_scorer(objective("py", kind="python", function=f"{user_module}:{function}")).score(FirstLogits())
    assert info.value.where == "objectives.py.task.function"


def test_python_objective_in_an_unknown_module() -> None:
    with pytest.raises(UserError, match="cannot import 'no_such_module_xyz'"):
        build_scorer(objective("py", kind="python", function="no_such_module_xyz:f"))


# ------------------------------------------------------------------------------------------------------ costs


def test_cost_objectives_count_layers_and_parameters(llama: Family) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llama.base))
    layers = build_scorer(objective("depth", kind="num_layers")).score(model)
    params = build_scorer(objective("size", kind="num_params")).score(model)
    assert layers.value == 4 and layers.per_example.tolist() == [4.0]
    assert params.value == sum(p.numel() for p in model.parameters())
    mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    assert build_scorer(objective("depth", kind="num_layers")).score(mlp).value == 2
    assert build_scorer(objective("size", kind="num_params")).score(mlp).value == 64 * 256 + 256 + 256 * 10 + 10
    assert not math.isnan(params.value)


def test_a_model_of_the_wrong_kind_is_a_user_error(bert: Family, llama: Family, tokenizer: Any,
                                                   tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_pretrained(str(bert.base)).eval()
    causal = AutoModelForCausalLM.from_pretrained(str(llama.base)).eval()
    rows = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "b", "text": "a", "label": 0}])
    with pytest.raises(UserError, match="needs a causal language model") as info:
        build_scorer(objective("loss", kind="nll", data=str(rows)), tokenizer=tokenizer).score(classifier)
    assert info.value.where == "objectives.loss.task.kind"
    with pytest.raises(UserError, match="one row of class logits per example") as info:
        build_scorer(objective("acc", kind="classification", data=str(rows)), tokenizer=tokenizer).score(causal)
    assert info.value.where == "objectives.acc.task.kind"


def test_multiple_choice_from_csv_with_choices_as_json_lists_and_a_limit(tokenizer: Any, tmp_path: Path) -> None:
    table = torch.zeros(64, 64)
    q, x = tokenizer.convert_tokens_to_ids("q"), tokenizer.convert_tokens_to_ids("x")
    table[q, x] = 3.0
    path = tmp_path / "mc.csv"
    path.write_text('question,options,gold\nq,"[""y"", ""x""]",1\nq,"[""x"", ""y""]",1\nq,"[""x"", ""y""]",0\n')
    spec = {"name": "mc", "task": {"kind": "multiple_choice", "data": str(path), "input": "question",
                                   "choices": "options", "target": "gold", "limit": 2}}
    result = build_scorer(spec, tokenizer=tokenizer).score(BigramLM(table))
    assert result.per_example.tolist() == [1.0, 0.0]
