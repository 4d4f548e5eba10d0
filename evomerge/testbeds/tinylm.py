"""The ``tinylm`` test bed: a tiny Llama that reads characters, a base and experts on string tasks.

Everything is made here, from nothing downloaded: a character-level tokenizer (every printable ASCII character,
newline, and ``<pad> <s> </s> <unk>``), a ``LlamaForCausalLM`` of a few hundred thousand parameters, a base
pre-trained on Python's own documentation text (``pydoc_data.topics``, which ships with CPython) mixed with
synthetic task lines, and experts fine-tuned from it on one string task each:

========  =========================  =============================================
task      prompt                     answer
========  =========================  =============================================
upper     ``upper hello=``           ``HELLO``
rot13     ``rot13 hello=``           ``uryyb`` (each letter moved 13 places)
atbash    ``atbash hello=``          ``svool`` (the alphabet mirrored, a <-> z)
========  =========================  =============================================

Each training sequence is ``<s>`` + prompt + answer + ``"\\n"``: the form the scorers read (the prompt with the
BOS token, then the answer without special tokens, stopped at the newline). Words are 3-7 random lowercase
letters; the search and test words are never trained on. Layout under ``out_dir``::

    base/  expert_<task>/              LlamaForCausalLM + tokenizer, save_pretrained (safetensors)
    <task>_search.jsonl  _test.jsonl   exact_match / nll rows: {"prompt", "answer"}
    <task>_mc_search.jsonl  _mc_test   multiple_choice rows: {"prompt", "choices" (4), "answer" (index)}
    testbed.json                       build arguments, file hashes, measured exact match; written last

The choices of a multiple-choice row are the right answer and what other tasks (copy, reverse, the other
ciphers) answer for the same word.

What makes the bed useful for merging (measured numbers in ``testbed.json`` and docs/testbeds.md):

- The base mix is 70% documentation text and 30% task lines: ``copy`` on all letters, and ``upper``, ``rot13``
  and ``atbash`` on the letters a-m only. The base knows the prompt format and half of each map, yet scores
  ~0.05 exact match on each task (test words nearly always hold a letter from n-z). Measured: when the base had
  never seen the experts' keywords, every merge of three experts scored ~0 — they shared too little.
- Experts replay the base mix in half of every batch (without replay they forget the text and every merge
  scores ~0, FINDINGS), and reach ~1.0 exact match on their task.
- Task arithmetic at λ = 1 loses much of every task; the best single λ keeps part of each; one coefficient per
  expert and per layer keeps most of all three: a search has something to find.
- ``reverse`` is defined (a distractor, and a possible expert through :class:`Plan`) but not a default expert:
  at this size its expert reached anywhere from 0.07 to 0.995 exact match depending on the seed.

Exact match is measured in one teacher-forced forward pass (the argmax is right at every answer position and
at the final newline), which equals greedy generation's exact match here at a fraction of the cost.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.testbeds import manifest as _bed
from evomerge.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["PLANS", "TASKS", "Plan", "StringTask", "build", "exact_match", "prompt", "tokenizer"]

NAME = "tinylm"
# Bump when the data, the training or the layout change, so beds built by older code are rebuilt.
FORMAT = 1

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3
PAD, BOS, EOS, UNK = range(4)
# Newline, then printable ASCII (space to tilde): 96 characters, 100 ids with the specials.
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB = {token: i for i, token in enumerate((*SPECIALS, *CHARACTERS))}

LOWER = "abcdefghijklmnopqrstuvwxyz"
# The base sees the ciphers and upper-casing on these letters only; the experts learn the rest.
BASE_LETTERS = LOWER[:13]


def _rot13(word: str) -> str:
    return "".join(LOWER[(LOWER.index(c) + 13) % 26] if c in LOWER else c for c in word)


def _atbash(word: str) -> str:
    return "".join(LOWER[25 - LOWER.index(c)] if c in LOWER else c for c in word)


@dataclass(frozen=True)
class StringTask:
    """A string-to-string map on lowercase words; the prompt is ``"<name> <word>="``."""

    name: str
    description: str
    apply: Callable[[str], str]


TASKS: dict[str, StringTask] = {
    "copy": StringTask("copy", "the word itself", lambda w: w),
    "reverse": StringTask("reverse", "the word backwards", lambda w: w[::-1]),
    "upper": StringTask("upper", "the word in capitals", str.upper),
    "rot13": StringTask("rot13", "each letter moved 13 places in the alphabet", _rot13),
    "atbash": StringTask("atbash", "the alphabet mirrored: a<->z, b<->y, ...", _atbash),
}
# Tasks the base sees on BASE_LETTERS only, and the share of each in the base mix's task lines (copy: all letters).
_BASE_TASKS = {"copy": 0.55, "upper": 0.15, "rot13": 0.15, "atbash": 0.15}


def prompt(task: str, word: str) -> str:
    return f"{task} {word}="


@dataclass(frozen=True)
class Plan:
    """Everything a build depends on besides the seed: model size, training and data sizes."""

    experts: tuple[str, ...]
    hidden: int
    layers: int
    intermediate: int
    heads: int
    base_steps: int
    expert_steps: int
    rows: int  # rows per task in each of the search and test files
    batch: int = 32
    seq_len: int = 40
    base_lr: float = 3e-3
    expert_lr: float = 1e-3
    task_fraction: float = 0.3  # share of task lines in the base mix; the rest is documentation text
    base_tasks: Mapping[str, float] = field(default_factory=lambda: dict(_BASE_TASKS))
    word_lengths: tuple[int, int] = (3, 7)
    lambdas: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 16))
    coefficient_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)


PLANS: dict[str, Plan] = {
    "full": Plan(experts=("upper", "rot13", "atbash"), hidden=96, layers=3, intermediate=256, heads=4,
                 base_steps=1200, expert_steps=600, rows=200),
    # Smaller and shorter; at lr 1e-3 this model learned rot13 too slowly (0.5 after 300 steps), hence 5e-3.
    "ci": Plan(experts=("upper", "rot13"), hidden=64, layers=2, intermediate=128, heads=4,
               base_steps=800, expert_steps=500, expert_lr=5e-3, rows=100),
}


def build(out_dir: str | Path, *, seed: int = 0, size: str = "full",
          progress: Callable[[str], None] | None = None, plan: Plan | None = None) -> Path:
    """Build (or reuse) the tinylm bed in ``out_dir`` and return it.

    ``size`` picks a plan from :data:`PLANS` (``"full"``: three experts, ~3.5 minutes on 2 cores; ``"ci"``:
    two experts on a smaller model, under a minute, for tests); ``plan`` replaces it entirely (experiments,
    tests of the mechanics). The build uses one thread, so its bytes do not depend on the machine's core count.
    """
    out = _bed.check_arguments(NAME, out_dir, seed, size)
    plan = plan or PLANS[size]
    _check_plan(plan)
    say = progress or (lambda _msg: None)
    corpus = _corpus()
    arguments = {"format": FORMAT, "seed": seed, "size": size, "plan": _plan_record(plan),
                 "corpus_sha256": _sha256_text(corpus)}
    if _bed.cached(out, arguments) is not None:
        say(f"tinylm test bed in {out} is up to date")
        return out

    started = time.perf_counter()
    owned = ["base", *(f"expert_{t}" for t in TASKS), *_data_files(TASKS)]
    _bed.start(out, owned)
    with _bed.deterministic(seed), _quiet_transformers():
        held_out = _write_data(out, seed, plan)
        tok = tokenizer(plan.seq_len)
        model = _train_base(corpus, held_out, seed, plan, say)
        _save(model, tok, out / "base")
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        for task in plan.experts:
            model.load_state_dict(base_state)
            _train_expert(model, task, corpus, held_out, seed, plan, say)
            _save(model, tok, out / f"expert_{task}")
        say("measuring exact match and merges")
        quality = measure(out, plan.experts, lambdas=plan.lambdas, grid=plan.coefficient_grid)
    import torch
    import transformers

    written = _bed.files_under(out, ["base", *(f"expert_{t}" for t in plan.experts), *_data_files(plan.experts)])
    _bed.finish(out, NAME, arguments, written, quality, started,
                extra={"experts": list(plan.experts),
                       "versions": {"torch": torch.__version__, "transformers": transformers.__version__}})
    say(f"tinylm test bed ready in {out}")
    return out


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-file progress bars from save/load: the build reports its own progress."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _check_plan(plan: Plan) -> None:
    unknown = [t for t in plan.experts if t not in TASKS or t == "copy"]
    if unknown or not plan.experts:
        raise UserError(f"experts must be among {', '.join(t for t in TASKS if t != 'copy')}, got {plan.experts}",
                        where="plan.experts")
    unknown = [t for t in plan.base_tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown tasks {unknown} in the base mix; known: {', '.join(TASKS)}", where="plan.base_tasks")
    # <s>, the prompt with its word, the answer (as long as the word) and the newline.
    longest = 1 + max(len(prompt(t, "")) for t in TASKS) + 2 * plan.word_lengths[1] + 1
    if plan.seq_len < longest:
        raise UserError(f"seq_len {plan.seq_len} is shorter than the longest task line ({longest})",
                        where="plan.seq_len")


def _plan_record(plan: Plan) -> dict[str, Any]:
    record = asdict(plan)
    return json.loads(json.dumps(record))  # tuples -> lists, as the manifest stores them


def _data_files(tasks: Iterable[str]) -> list[str]:
    return [f"{t}{kind}_{split}.jsonl" for t in tasks if t != "copy"
            for kind in ("", "_mc") for split in ("search", "test")]


# ---------------------------------------------------------------------------------------------------- tokenizer


def tokenizer(max_length: int = 64) -> Any:
    """The character-level tokenizer (a ``PreTrainedTokenizerFast``): one id per character, BOS added.

    Characters outside printable ASCII and newline map to ``<unk>``; decoding joins characters back.
    """
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    pad, bos, eos, unk = SPECIALS
    tok = Tokenizer(WordLevel(dict(VOCAB), unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, bos_token=bos, eos_token=eos,
                                   unk_token=unk, model_max_length=max_length)


def encode(text: str) -> list[int]:
    """Ids of ``text`` without special tokens: what the tokenizer gives, without its overhead."""
    return [VOCAB.get(c, UNK) for c in text]


# --------------------------------------------------------------------------------------------------------- data


_ASCII = str.maketrans({"\t": "    ", "\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"',
                        "\u2014": "-", "\u2013": "-", "\u2026": "..."})


def _corpus() -> str:
    """Python's own documentation topics (shipped with CPython), in the tokenizer's alphabet."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics)).translate(_ASCII)
    return "".join(c for c in text if c in VOCAB)


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _word(rng: random.Random, lengths: tuple[int, int], letters: str = LOWER) -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(*lengths)))


MC_CHOICES = 4


def _distinct(word: str) -> bool:
    """Every task gives ``word`` a different answer (no palindromes, no letters where two ciphers agree)."""
    return len({task.apply(word) for task in TASKS.values()}) == len(TASKS)


def _choices(task: str, word: str, rng: random.Random) -> list[str]:
    """The right answer and distractors: what other tasks answer for the same word, in a seeded order."""
    others = [t.apply(word) for name, t in TASKS.items() if name != task]
    choices = [TASKS[task].apply(word), *rng.sample(others, MC_CHOICES - 1)]
    rng.shuffle(choices)
    return choices


def _eval_words(seed: int, plan: Plan) -> dict[str, dict[str, list[str]]]:
    """Disjoint search and test words per task; each word's answers under all tasks are distinct."""
    rng = random.Random(_bed.derive_seed(seed, "tinylm-eval-words"))
    seen: set[str] = set()
    words: dict[str, dict[str, list[str]]] = {}
    for task in plan.experts:
        words[task] = {}
        for split in ("search", "test"):
            chosen: list[str] = []
            while len(chosen) < plan.rows:
                w = _word(rng, plan.word_lengths)
                if w in seen or not _distinct(w):
                    continue
                seen.add(w)
                chosen.append(w)
            words[task][split] = chosen
    return words


def _write_data(out: Path, seed: int, plan: Plan) -> set[str]:
    """Write the task files; return every evaluation word (kept out of training)."""
    words = _eval_words(seed, plan)
    rng = random.Random(_bed.derive_seed(seed, "tinylm-choice-order"))
    held: set[str] = set()
    for task, splits in words.items():
        fn = TASKS[task].apply
        for split, ws in splits.items():
            held.update(ws)
            _write_jsonl(out / f"{task}_{split}.jsonl", ({"prompt": prompt(task, w), "answer": fn(w)} for w in ws))
            mc = []
            for w in ws:
                choices = _choices(task, w, rng)
                mc.append({"prompt": prompt(task, w), "choices": choices, "answer": choices.index(fn(w))})
            _write_jsonl(out / f"{task}_mc_{split}.jsonl", mc)
    return held


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=True) + "\n" for row in rows), encoding="utf-8")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


class _Batches:
    """Training batches: documentation text windows and task lines, as id tensors with a loss mask.

    The mask marks the positions whose token the model is trained to predict: every character of a text
    window, and the answer plus the closing newline of a task line (the prompt is given, not learned).
    """

    def __init__(self, corpus: str, held_out: set[str], plan: Plan, rng: random.Random) -> None:
        import torch

        self.ids = torch.tensor(encode(corpus), dtype=torch.long)
        self.held_out = held_out
        self.plan = plan
        self.rng = rng

    def _empty(self, n: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        return (torch.full((n, self.plan.seq_len), PAD, dtype=torch.long),
                torch.zeros((n, self.plan.seq_len), dtype=torch.bool))

    def text(self, n: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        ids, mask = self._empty(n)
        width = self.plan.seq_len - 1
        ids[:, 0] = BOS
        for i in range(n):
            start = self.rng.randrange(len(self.ids) - width)
            ids[i, 1:] = self.ids[start:start + width]
        mask[:, 1:] = True
        return ids, mask

    def task(self, name: str, n: int, letters: str = LOWER) -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        ids, mask = self._empty(n)
        for i in range(n):
            word = _word(self.rng, self.plan.word_lengths, letters)
            while word in self.held_out:
                word = _word(self.rng, self.plan.word_lengths, letters)
            head = [BOS, *encode(prompt(name, word))]
            line = head + encode(TASKS[name].apply(word) + "\n")
            ids[i, :len(line)] = torch.tensor(line)
            mask[i, len(head):len(line)] = True
        return ids, mask

    def base_mix(self, n: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        """The pre-training mix: text, and task lines (upper and rot13 on the base's letters only)."""
        import torch

        lines = sum(self.rng.random() < self.plan.task_fraction for _ in range(n))
        parts = [self.text(n - lines)]
        names, weights = zip(*self.plan.base_tasks.items())
        for _ in range(lines):
            name = self.rng.choices(names, weights)[0]
            parts.append(self.task(name, 1, LOWER if name == "copy" else BASE_LETTERS))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def expert(self, name: str, n: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Half the batch the expert's task on all letters, half replayed from the base mix."""
        import torch

        own, replay = self.task(name, n // 2), self.base_mix(n - n // 2)
        return torch.cat([own[0], replay[0]]), torch.cat([own[1], replay[1]])


# ------------------------------------------------------------------------------------------------------- models


def _new_model(plan: Plan) -> "nn.Module":
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=plan.hidden, intermediate_size=plan.intermediate,
                         num_hidden_layers=plan.layers, num_attention_heads=plan.heads,
                         num_key_value_heads=plan.heads, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    return LlamaForCausalLM(config)


def _loss(model: "nn.Module", ids: "torch.Tensor", mask: "torch.Tensor") -> "torch.Tensor":
    import torch

    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _train(model: "nn.Module", steps: int, lr: float, batch: Callable[[], tuple], label: str,
           say: Callable[[str], None]) -> None:
    """AdamW with a 50-step warm-up and linear decay to 10%, gradients clipped at norm 1."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = min(50, max(1, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1.0 - s / steps))
    model.train()
    report = max(1, steps // 6)
    for step in range(1, steps + 1):
        loss = _loss(model, *batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % report == 0 or step == steps:
            say(f"training {label}: step {step}/{steps} (loss {loss.item():.2f})")
    model.eval()


def _train_base(corpus: str, held_out: set[str], seed: int, plan: Plan, say: Callable[[str], None]) -> "nn.Module":
    import torch

    torch.manual_seed(_bed.derive_seed(seed, "tinylm-init"))
    model = _new_model(plan)
    batches = _Batches(corpus, held_out, plan, random.Random(_bed.derive_seed(seed, "tinylm-base-data")))
    _train(model, plan.base_steps, plan.base_lr, lambda: batches.base_mix(plan.batch), "base", say)
    return model


def _train_expert(model: "nn.Module", task: str, corpus: str, held_out: set[str], seed: int, plan: Plan,
                  say: Callable[[str], None]) -> None:
    batches = _Batches(corpus, held_out, plan, random.Random(_bed.derive_seed(seed, "tinylm-expert-data", task)))
    _train(model, plan.expert_steps, plan.expert_lr, lambda: batches.expert(task, plan.batch),
           f"expert {task}", say)


def _save(model: "nn.Module", tok: Any, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------------- measuring


def encode_rows(rows: Sequence[Mapping[str, str]], tok: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Right-padded ids of prompt + answer + newline, and a mask of the positions that must be predicted.

    Tokenized exactly as the exact-match scorer does: ``tok(prompt)`` (BOS added), then the continuation with
    ``add_special_tokens=False``.
    """
    import torch

    lines, spans = [], []
    for row in rows:
        head = tok(row["prompt"])["input_ids"]
        tail = tok(row["answer"] + "\n", add_special_tokens=False)["input_ids"]
        lines.append(head + tail)
        spans.append((len(head), len(head) + len(tail)))
    width = max(len(line) for line in lines)
    ids = torch.full((len(lines), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(lines), width), dtype=torch.bool)
    for i, (line, (lo, hi)) in enumerate(zip(lines, spans)):
        ids[i, :len(line)] = torch.tensor(line)
        mask[i, lo:hi] = True
    return ids, mask


def exact_match(model: "nn.Module", ids: "torch.Tensor", mask: "torch.Tensor") -> float:
    """Share of rows whose answer and closing newline are all the argmax (teacher-forced greedy decoding)."""
    import torch

    with torch.no_grad():
        predicted = model(input_ids=ids, use_cache=False).logits[:, :-1].argmax(-1)
    right = (predicted == ids[:, 1:]) | ~mask[:, 1:]
    return float(right.all(dim=1).float().mean())


def measure(out: str | Path, experts: Sequence[str], *, lambdas: Sequence[float] = PLANS["full"].lambdas,
            grid: Sequence[float] = PLANS["full"].coefficient_grid) -> dict[str, Any]:
    """Exact match of the base, each expert and task-arithmetic merges on every task's test file.

    Task arithmetic (Ilharco et al., arXiv 2212.04089) at λ = 1 and at the best λ of ``lambdas`` for all
    experts; merge settings are chosen on the search files and reported on the test files. ``per_layer`` is found by
    one sweep of coordinate ascent over a coefficient per expert and per layer (embeddings, norm and head as
    one more group), starting from the best single λ. Merges go through :class:`evomerge.merging.ModelSet`.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    from evomerge.merging import ModelSet

    out = Path(out)
    tok = AutoTokenizer.from_pretrained(out / "base")
    model = LlamaForCausalLM.from_pretrained(out / "base").eval()
    data = {split: {t: encode_rows(read_rows(out / f"{t}_{split}.jsonl"), tok) for t in experts}
            for split in ("search", "test")}

    def scores(split: str) -> dict[str, float]:
        values = {t: round(exact_match(model, *data[split][t]), 4) for t in experts}
        return {**values, "mean": round(sum(values.values()) / len(values), 4)}

    quality: dict[str, Any] = {"metric": "exact match on the test files", "exact_match": {}}
    for name in ["base", *(f"expert_{t}" for t in experts)]:
        model.load_state_dict(LlamaForCausalLM.from_pretrained(out / name).state_dict())
        quality["exact_match"][name] = scores("test")

    names = [f"expert_{t}" for t in experts]
    models = ModelSet.load(out / "base", {n: out / n for n in names})
    groups = [f"model.layers.{i}." for i in range(model.config.num_hidden_layers)] + ["*"]

    def merged(weights: Mapping[str, Sequence[float]], split: str) -> dict[str, float]:
        _merge(models, model, weights, groups)
        return scores(split)

    def flat(value: float) -> dict[str, list[float]]:
        return {n: [value] * len(groups) for n in names}

    at_one = merged(flat(1.0), "test")
    best_lam = max(lambdas, key=lambda lam: merged(flat(lam), "search")["mean"])
    weights = flat(best_lam)
    best_search = merged(weights, "search")["mean"]
    for n in names:
        for g in range(len(groups)):
            for value in grid:
                trial = {**weights, n: [*weights[n][:g], value, *weights[n][g + 1:]]}
                score = merged(trial, "search")["mean"]
                if score > best_search:
                    weights, best_search = trial, score
    quality["task_arithmetic"] = {"lambda_1": at_one, "best_lambda": best_lam,
                                  "best_single_lambda": merged(flat(best_lam), "test")}
    quality["per_layer"] = {"groups": groups, "weights": weights, "test": merged(weights, "test")}
    return quality


def per_layer_recipe(weights: Mapping[str, Sequence[float]], groups: Sequence[str]) -> dict[str, Any]:
    """A task-arithmetic recipe with one coefficient per expert and per layer group (mergekit filters)."""
    def setting(values: Sequence[float]) -> list[dict[str, Any]]:
        return [{"filter": g, "value": float(v)} if g != "*" else {"value": float(v)} for g, v in zip(groups, values)]

    return {"merge_method": "task_arithmetic",
            "models": [{"model": n, "parameters": {"weight": setting(v)}} for n, v in weights.items()]}


def _merge(models: Any, module: "nn.Module", weights: Mapping[str, Sequence[float]], groups: Sequence[str]) -> None:
    from evomerge.merging import Recipe

    recipe = Recipe.model_validate({"base_model": models.base_name, **per_layer_recipe(weights, groups)})
    models.merge_into(module, recipe)
