"""Causal language models: tokenizing requests, scoring continuations, greedy generation — batched and exact.

Shared by the multiple-choice, exact-match and NLL scorers and by the lm-eval adapter. Requests are tokenized,
truncated, sorted by length and padded into device tensors once (:class:`ContinuationBatches`); each candidate
model then costs forward passes only.

Conventions (lm-eval-harness 0.4, ``lm_eval/api/model.py: TemplateLM._encode_pair``):

- A prompt is tokenized as ``tokenizer(prompt)`` (special tokens added, so a BOS where the tokenizer adds one;
  a trailing special token such as BERT's ``[SEP]`` is dropped, it would end the text), a continuation with
  ``add_special_tokens=False``, and the two are concatenated. lm-eval tokenizes ``context + continuation``
  jointly and splits at the context's length; separate tokenization gives the same ids for character-level
  tokenizers and never lets a merge straddle the boundary for BPE ones.
- For log-likelihoods, trailing whitespace of the context moves to the start of the continuation, as lm-eval
  does, so ``"Q: ... A: "`` + ``"yes"`` scores ``" yes"``.
- Sequences longer than the model's window keep their last ``max_length + 1`` tokens (lm-eval's left
  truncation); prompts for generation keep their last ``max_length - max_new_tokens``.

Inputs for scoring are right-padded: in a causal model a real token never attends to the padding after it, so
no attention mask is needed and results equal unpadded ones. Generation left-pads with an attention mask and
position ids and reuses a KV cache (Hugging Face models); plain modules are called as ``model(input_ids)`` on
the whole right-padded sequence at every step.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Sequence

import numpy as np
import torch

# --------------------------------------------------------------------------------------------------- encoding


class TextCodec:
    """A tokenizer seen the way the scorers use it: prompts, continuations, pairs, decoding, stop strings."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
        full = list(tokenizer("a")["input_ids"])
        # Where the plain ids sit inside the full ones tells which special tokens the tokenizer adds around text.
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
        self._suffix = 0 if at is None else len(full) - at - len(plain)
        added = full[:at] if at else []
        self.prefix_id = _first_int(tokenizer.bos_token_id, added[-1] if added else None, tokenizer.eos_token_id,
                                    tokenizer.pad_token_id, 0)
        self.pad_id = _first_int(tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
        self.eos_ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
        self._pieces: dict[int, str] = {}

    def prompt(self, text: str) -> list[int]:
        """``tokenizer(text)``: special tokens added before the text, none after; never empty."""
        ids = list(self.tokenizer(text)["input_ids"])
        if self._suffix:
            ids = ids[:-self._suffix]
        return ids or [self.prefix_id]

    def continuation(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def document(self, text: str) -> list[int]:
        """A whole text to score token by token: the prefix token (BOS, else EOS), then the text without special
        tokens, as lm-eval's ``loglikelihood_rolling`` does."""
        return [self.prefix_id, *self.continuation(text)]

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """A log-likelihood request as lm-eval splits it: the context's trailing whitespace opens the
        continuation."""
        stripped = context.rstrip()
        if stripped != context:
            continuation = context[len(stripped):] + continuation
            context = stripped
        return self.prompt(context), self.continuation(continuation)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def piece(self, token: int) -> str:
        """The text of one token on its own (cached): enough to notice a stop string as it is generated."""
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.tokenizer.decode([token], skip_special_tokens=True)
        return text


def _first_int(*values: Any) -> int:
    for value in values:
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    raise AssertionError("unreachable: the last default is an int")


def model_eos_ids(model: torch.nn.Module) -> set[int]:
    """End-of-sequence ids a Hugging Face model declares (config and generation config)."""
    ids: set[int] = set()
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(config, "eos_token_id", None) if config is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def context_window(model: torch.nn.Module | None, tokenizer: Any = None, override: int | None = None) -> int | None:
    """The longest input the model takes: ``override`` (``task.max_length``), else the config's position limit,
    else the tokenizer's ``model_max_length`` when it is a real limit; None when nothing says."""
    if override:
        return int(override)
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**7:
        return value
    return None


def rolling_pairs(tokens: Sequence[int], max_length: int | None) -> list[tuple[list[int], list[int]]]:
    """Windows that score every token after the first exactly once, each with as much preceding context as fits
    (lm-eval's ``get_rolling_token_windows`` with ``context_len=1``, made disjoint)."""
    tokens = list(tokens)
    if max_length is None or len(tokens) <= max_length + 1:
        return [(tokens[:1], tokens[1:])] if len(tokens) > 1 else []
    pairs = []
    start = 1
    while start < len(tokens):
        end = min(start + max_length, len(tokens))
        first = max(0, end - max_length - 1)
        pairs.append((tokens[first:start], tokens[start:end]))
        start = end
    return pairs


# ------------------------------------------------------------------------------------------------ calling


class NotALanguageModel(TypeError):
    """The model's output is not per-token logits (a classifier given to a language-model task)."""


@lru_cache(maxsize=64)
def _forward_params(cls: type) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def is_hf_causal(model: torch.nn.Module) -> bool:
    """A transformers model that takes attention masks, position ids and a KV cache."""
    params = _forward_params(type(model))
    return hasattr(model, "config") and {"attention_mask", "position_ids"} <= params and (
        "cache" in params or "past_key_values" in params)


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor, keep: int | None = None) -> torch.Tensor:
    """Logits ``[B, T or keep, V]`` of a forward pass without cache; ``keep`` asks for the last positions only
    (transformers' ``logits_to_keep`` spares the output projection on the rest)."""
    params = _forward_params(type(model))
    if "logits_to_keep" in params:
        out = model(input_ids=input_ids, use_cache=False, logits_to_keep=keep or 0)
    elif "use_cache" in params:
        out = model(input_ids=input_ids, use_cache=False)
    else:
        out = model(input_ids)
    logits = out.logits if hasattr(out, "logits") else out
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise NotALanguageModel(f"{type(model).__name__} returns {shape}, not logits [batch, tokens, vocab]")
    return logits[:, -keep:] if keep and logits.shape[1] > keep else logits


def model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------ scoring


@dataclass(frozen=True)
class _Batch:
    input_ids: torch.Tensor  # [B, T], right-padded
    keep: int  # logits are needed for the last `keep` positions
    rows: torch.Tensor  # [K] batch row of each scored token
    cols: torch.Tensor  # [K] its position within the kept window
    targets: torch.Tensor  # [K] the token it must predict
    index: np.ndarray  # [B] request index of each batch row
    counts: np.ndarray  # [B] scored tokens per row


@dataclass
class ContinuationScores:
    """Per request: summed log-probability of the continuation (float64), its token count, whether greedy
    decoding would produce it, and (when asked) the argmax token at every continuation position."""

    logprob: np.ndarray
    num_tokens: np.ndarray
    greedy: np.ndarray
    argmax: list[np.ndarray] | None = None


class ContinuationBatches:
    """Log-likelihood requests ``(context ids, continuation ids)``, truncated to ``max_length`` and padded into
    length-sorted batches on ``device`` once; :meth:`run` scores them with any live causal model."""

    def __init__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int,
                 max_length: int | None, pad_id: int, device: torch.device | str) -> None:
        self.size = len(pairs)
        wholes: list[list[int]] = []
        n_cont: list[int] = []
        for context, continuation in pairs:
            if not continuation:
                raise ValueError("an empty continuation has no log-likelihood")
            whole = [*context, *continuation]
            if max_length is not None:
                whole = whole[-(max_length + 1):]
            wholes.append(whole)
            n_cont.append(min(len(continuation), len(whole) - 1))
        # The input is the sequence without its last token; longest first, ties in request order, so batches
        # hold similar lengths and the order never varies.
        order = sorted(range(len(wholes)), key=lambda i: (-len(wholes[i]), i))
        self.batches: list[_Batch] = []
        for start in range(0, len(order), batch_size):
            index = np.array(order[start:start + batch_size], dtype=np.int64)
            width = len(wholes[index[0]]) - 1
            ids = torch.full((len(index), width), pad_id, dtype=torch.long)
            # The first input position whose logits any row needs: logits before it are never computed.
            first = min(len(wholes[i]) - 1 - n_cont[i] for i in index)
            rows, cols, targets = [], [], []
            for b, i in enumerate(index):
                whole, n = wholes[i], n_cont[i]
                ids[b, :len(whole) - 1] = torch.tensor(whole[:-1], dtype=torch.long)
                for p in range(len(whole) - 1 - n, len(whole) - 1):  # input position p predicts whole[p + 1]
                    rows.append(b)
                    cols.append(p - first)
                    targets.append(whole[p + 1])
            counts = np.array([n_cont[i] for i in index], dtype=np.int64)
            self.batches.append(_Batch(ids.to(device), width - first, torch.tensor(rows, device=device),
                                       torch.tensor(cols, device=device), torch.tensor(targets, device=device),
                                       index, counts))

    @torch.inference_mode()
    def run(self, model: torch.nn.Module, *, argmax: bool = False) -> ContinuationScores:
        logprob = np.zeros(self.size, dtype=np.float64)
        num_tokens = np.zeros(self.size, dtype=np.int64)
        greedy = np.zeros(self.size, dtype=bool)
        tops: list[np.ndarray] | None = [np.empty(0, dtype=np.int64)] * self.size if argmax else None
        for batch in self.batches:
            logits = logits_of(model, batch.input_ids, batch.keep)
            chosen = logits[batch.rows, batch.cols].float()  # [K, V]: only the scored positions
            token_lp = chosen.log_softmax(-1).gather(1, batch.targets[:, None]).squeeze(1).double()
            best = chosen.argmax(-1)
            n = len(batch.index)
            sums = torch.zeros(n, dtype=torch.float64, device=token_lp.device).index_add_(0, batch.rows, token_lp)
            misses = torch.zeros(n, dtype=torch.long, device=best.device).index_add_(
                0, batch.rows, (best != batch.targets).long())
            logprob[batch.index] = sums.cpu().numpy()
            num_tokens[batch.index] = batch.counts
            greedy[batch.index] = misses.cpu().numpy() == 0
            if tops is not None:
                for b, piece in enumerate(torch.split(best.cpu(), batch.counts.tolist())):
                    tops[batch.index[b]] = piece.numpy()
        return ContinuationScores(logprob, num_tokens, greedy, tops)


# ---------------------------------------------------------------------------------------------- generation


class StopRule:
    """When greedy generation ends: an end-of-sequence token (not kept), a stop string appearing in the decoded
    text, or the token budget. The same rule drives real generation and its teacher-forced shortcut."""

    def __init__(self, codec: TextCodec, stops: Sequence[str], eos_ids: Iterable[int]) -> None:
        self.codec = codec
        self.stops = [s for s in stops if s]
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self._tail = max((len(s) for s in self.stops), default=1) - 1

    def stream(self, budget: int) -> "TokenStream":
        return TokenStream(self, budget)

    def text(self, tokens: Sequence[int]) -> str:
        """The generated text: decoded, cut before the first stop string."""
        text = self.codec.decode(tokens)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        return text[:cut] if cut >= 0 else text


class TokenStream:
    """One sequence being generated; :meth:`push` returns True once it has ended."""

    __slots__ = ("rule", "budget", "tokens", "tail", "done")

    def __init__(self, rule: StopRule, budget: int) -> None:
        self.rule = rule
        self.budget = budget
        self.tokens: list[int] = []
        self.tail = ""
        self.done = budget <= 0

    def push(self, token: int) -> bool:
        rule = self.rule
        if token in rule.eos_ids:
            self.done = True
            return True
        self.tokens.append(token)
        if rule.stops:
            piece = rule.codec.piece(token)
            window = self.tail + piece
            self.tail = window[-rule._tail:] if rule._tail else ""
            # Pieces flag a possible stop cheaply; the decoded text decides (BPE pieces may differ from it).
            if any(s in window for s in rule.stops) and any(s in rule.codec.decode(self.tokens) for s in rule.stops):
                self.done = True
                return True
        if len(self.tokens) >= self.budget:
            self.done = True
        return self.done


@torch.inference_mode()
def greedy_generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], rule: StopRule, *,
                    max_new_tokens: int, batch_size: int, pad_id: int,
                    prefixes: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (ids, already truncated), ending by ``rule``.

    ``prefixes`` are tokens already known to be greedy's first choices (from a teacher-forced pass): they count
    against ``max_new_tokens`` and generation resumes after them. Returns the generated ids (EOS excluded).
    """
    prefixes = prefixes or [[] for _ in prompts]
    streams = []
    for prefix in prefixes:
        stream = rule.stream(max_new_tokens)
        for token in prefix:
            stream.push(token)
        streams.append(stream)
    todo = [i for i, s in enumerate(streams) if not s.done]
    # Longest prompt first, ties in order: batches share lengths, little padding, a fixed order.
    todo.sort(key=lambda i: (-(len(prompts[i]) + len(prefixes[i])), i))
    device = model_device(model)
    hf = is_hf_causal(model)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        inputs = [[*prompts[i], *prefixes[i]] for i in chunk]
        batch = [streams[i] for i in chunk]
        if hf:
            _generate_cached(model, inputs, batch, pad_id, device)
        else:
            _generate_plain(model, inputs, batch, pad_id, device)
    return [s.tokens for s in streams]


def _new_cache(model: torch.nn.Module) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers 4.x
        return DynamicCache()


def _generate_cached(model: torch.nn.Module, inputs: list[list[int]], streams: list[TokenStream], pad_id: int,
                     device: torch.device) -> None:
    width = max(len(s) for s in inputs)
    ids = torch.full((len(inputs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(inputs), width), dtype=torch.long)
    for b, seq in enumerate(inputs):  # left padding: every row's next token is at the same column
        ids[b, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[b, width - len(seq):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    params = _forward_params(type(model))
    cache_kw = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    cache = _new_cache(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_kw: cache},
                **extra)
    active = list(streams)
    while True:
        tokens = out.logits[:, -1].argmax(-1)
        for stream, token in zip(active, tokens.tolist()):
            stream.push(token)
        keep = [b for b, stream in enumerate(active) if not stream.done]
        if not keep:
            return
        if len(keep) < len(active):  # drop finished rows: later steps only pay for the rows still generating
            rows = torch.tensor(keep, device=device)
            cache.batch_select_indices(rows)
            tokens, mask, positions = tokens[rows], mask[rows], positions[rows]
            active = [active[b] for b in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                    **{cache_kw: cache}, **extra)


def _generate_plain(model: torch.nn.Module, inputs: list[list[int]], streams: list[TokenStream], pad_id: int,
                    device: torch.device) -> None:
    budget = max(s.budget - len(s.tokens) for s in streams)
    lengths = torch.tensor([len(s) for s in inputs], device=device)
    ids = torch.full((len(inputs), int(lengths.max()) + budget), pad_id, dtype=torch.long)
    for b, seq in enumerate(inputs):  # right padding: the causal model never sees what comes after a row's end
        ids[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    ids = ids.to(device)
    rows = torch.arange(len(inputs), device=device)
    while True:
        width = int(lengths.max())
        logits = logits_of(model, ids[:, :width])
        tokens = logits[rows, lengths - 1].argmax(-1)
        for stream, token in zip(streams, tokens.tolist()):
            if not stream.done:
                stream.push(token)
        if all(s.done for s in streams):
            return
        ids[rows, lengths] = tokens
        lengths = lengths + 1


def generate_with_shortcut(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                           forced: Sequence[Sequence[int]], rule: StopRule, *, max_new_tokens: int, batch_size: int,
                           pad_id: int, teacher: ContinuationBatches | None,
                           alternatives: Sequence[Sequence[int] | None] | None = None) -> tuple[list[list[int]], int]:
    """Greedy continuations, decided where possible by one teacher-forced pass over ``prompt + forced``.

    ``forced`` holds the tokens greedy should produce for a correct answer (answer then stop string). The
    argmax at each forced position is greedy's choice *as long as greedy has produced the forced tokens so
    far*, so replaying the stop rule over those argmaxes until the first disagreement gives greedy's output
    exactly whenever generation ends within that stretch (right answers, and wrong ones that stop early).

    ``alternatives`` (per example, or None) are second guesses, the answer after a space: where greedy's first
    token is not ``forced``'s but is the alternative's (a prompt ``"A:"`` answered ``" 72"``, not ``"72"``), a
    second teacher-forced pass over ``prompt + alternative`` is replayed the same way; the argument above holds
    for any forced sequence, so the result is still greedy's. The rest are generated, resuming after the tokens
    a pass already fixed. Returns the continuations and how many needed real generation.
    """
    known: list[list[int]] = [[] for _ in prompts]
    pending: list[int] = list(range(len(prompts)))
    if teacher is not None:
        tops = teacher.run(model, argmax=True).argmax
        pending, retry = [], []
        for i, (target, top) in enumerate(zip(forced, tops)):
            known[i], done = _replay(rule, max_new_tokens, target, top)
            if done:
                continue
            alternative = alternatives[i] if alternatives is not None else None
            # Not done means the pass disagreed somewhere; known[i] ends with greedy's token there.
            if alternative and len(known[i]) == 1 and known[i][0] == alternative[0] != target[0]:
                retry.append(i)
            else:
                pending.append(i)
        if retry:
            second = teacher_batches([prompts[i] for i in retry], [alternatives[i] for i in retry],
                                     batch_size=batch_size, pad_id=pad_id, device=model_device(model))
            for i, top in zip(retry, second.run(model, argmax=True).argmax):
                known[i], done = _replay(rule, max_new_tokens, alternatives[i], top)
                if not done:
                    pending.append(i)
            pending.sort()
    if pending:
        generated = greedy_generate(model, [prompts[i] for i in pending], rule, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, pad_id=pad_id, prefixes=[known[i] for i in pending])
        for i, tokens in zip(pending, generated):
            known[i] = tokens
    return known, len(pending)


def _replay(rule: StopRule, max_new_tokens: int, target: Sequence[int], top: np.ndarray) -> tuple[list[int], bool]:
    """Greedy's tokens read off a teacher-forced pass: its argmaxes up to and including the first one that leaves
    ``target``, cut by the stop rule; and whether generation has ended there."""
    stream = rule.stream(max_new_tokens)
    for j, choice in enumerate(top.tolist()):
        if stream.push(choice) or choice != target[j]:
            break
    return stream.tokens, stream.done


def teacher_batches(prompts: Sequence[Sequence[int]], forced: Sequence[Sequence[int]], *, batch_size: int,
                    pad_id: int, device: torch.device | str) -> ContinuationBatches:
    """The teacher-forced pass of :func:`generate_with_shortcut` (prompts must already fit the window)."""
    return ContinuationBatches(list(zip(prompts, forced)), batch_size=batch_size, max_length=None, pad_id=pad_id,
                               device=device)
