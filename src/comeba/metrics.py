"""Evaluation metrics of model editing, computed on a (model, tokenizer) pair.

Pure functions: no global state, nothing kept between calls, everything
under ``torch.no_grad()``. Every forward pass is one self-contained call with
right padding and an explicit attention mask (the edited model may carry
forward hooks whose gate statistics are per call and must not see padding).
Tokenisation goes through `comeba.text`, so a metric scores exactly the
tokens the editor optimised: ``encode_prompt(prompt) + encode_target(target)``.

Targets are read as continuations: a target is stripped and one space is put
in front (``" " + target.strip()``), the convention of `comeba.requests`
and of EasyEdit (which scores ``prompt + " " + target``). So
``Request.target_new``, a raw ``ground_truth`` and a raw
``locality_ground_truth`` can all be passed as they are.

Metrics (docs/evaluation.md):

- reliability / generality: `token_accuracy` (EasyEdit's teacher-forced token
  accuracy) on (prompt, target_new) / (rephrase, target_new);
- locality: `argmax_tokens` on (locality_prompt, locality_ground_truth) before
  and after the edit, compared by `locality` (EasyEdit's definition);
- CounterFact scores, the MEMIT way: `target_nll`, `prefers_new` (efficacy,
  paraphrase) and `prefers_true` (neighbourhood);
- fluency: `ngram_entropy` of text from `generate_text` (ROME's definition);
- `exact_match_generation`: free greedy generation, no teacher forcing.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from typing import Iterator, Sequence

import torch

from comeba.models import cache_kwarg, input_device
from comeba.text import encode_prompt, encode_target, pad_batch

__all__ = [
    "continuation",
    "token_accuracy",
    "argmax_tokens",
    "locality",
    "target_nll",
    "prefers_new",
    "prefers_true",
    "generate_tokens",
    "generate_text",
    "exact_match_generation",
    "ngram_entropy",
    "fluency",
]

DEFAULT_BATCH_SIZE = 16


# ------------------------------------------------------------------ helpers


def continuation(target: str) -> str:
    """The target as it is scored: stripped, with one leading space (EasyEdit's ``prompt + ' ' + target``)."""
    return " " + target.strip()


def _pad_id(tok) -> int:
    """A pad id without mutating the tokenizer; its value never matters (masked, right padded)."""
    for pid in (tok.pad_token_id, tok.eos_token_id):
        if pid is not None:
            return int(pid)
    return 0


def _forward_logits(model, sequences: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Logits [B, L, V] of one right-padded batch, one self-contained call with its mask."""
    ids, mask = pad_batch(sequences, pad_id, input_device(model))
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def _prompt_ids(tok, prompt: str) -> list[int]:
    ids = encode_prompt(tok, prompt)
    if not ids:
        raise ValueError(f"prompt {prompt!r} tokenises to nothing; there is no position to predict from")
    return ids


def _check_pairs(prompts: Sequence[str], targets: Sequence[str]) -> None:
    if isinstance(prompts, str) or isinstance(targets, str):
        raise TypeError("prompts and targets must be sequences of strings, not a single string")
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")


def _teacher_forced(
    model, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int
) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """Per pair: float32 logits [T, V] predicting each target token, and the T target ids.

    The input is prompt + the full target; position ``len(prompt) - 1 + j``
    predicts target token j given the gold tokens before it.
    """
    _check_pairs(prompts, targets)
    pad_id = _pad_id(tok)
    pairs = [
        (_prompt_ids(tok, p), encode_target(tok, continuation(t))) for p, t in zip(prompts, targets)
    ]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        logits = _forward_logits(model, [p + t for p, t in chunk], pad_id)
        for row, (p, t) in enumerate(chunk):
            first = len(p) - 1
            yield logits[row, first : first + len(t)].float(), t


# ------------------------------------------------------- teacher-forced metrics


@torch.no_grad()
def argmax_tokens(
    model, tok, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = DEFAULT_BATCH_SIZE
) -> list[list[int]]:
    """Teacher-forced argmax token at each target position (EasyEdit's locality outputs).

    Store these for the unedited model; `locality` compares them with the
    edited model's.
    """
    return [logits.argmax(-1).tolist() for logits, _ in _teacher_forced(model, tok, prompts, targets, batch_size)]


@torch.no_grad()
def token_accuracy(
    model, tok, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = DEFAULT_BATCH_SIZE
) -> list[float]:
    """Fraction of target tokens that are the argmax given prompt + gold previous tokens.

    EasyEdit's reliability (prompt, target_new) and generality (rephrase,
    target_new) metric.
    """
    out = []
    for logits, target in _teacher_forced(model, tok, prompts, targets, batch_size):
        hits = logits.argmax(-1).cpu() == torch.tensor(target)
        out.append(hits.float().mean().item())
    return out


def locality(before: Sequence[Sequence[int]], after: Sequence[Sequence[int]]) -> list[float]:
    """Per record, the fraction of argmax tokens unchanged by the edit (EasyEdit's locality).

    `before` and `after` come from `argmax_tokens` on the same locality
    prompts and ground truths, before and after the edit.
    """
    if len(before) != len(after):
        raise ValueError(f"{len(before)} records before the edit but {len(after)} after")
    out = []
    for i, (b, a) in enumerate(zip(before, after)):
        if len(b) != len(a) or not b:
            raise ValueError(
                f"record {i}: {len(b)} tokens before and {len(a)} after; "
                "compute both with the same prompts and targets"
            )
        out.append(sum(x == y for x, y in zip(b, a)) / len(b))
    return out


@torch.no_grad()
def target_nll(
    model, tok, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = DEFAULT_BATCH_SIZE
) -> list[float]:
    """Mean per-token negative log-likelihood (nats) of each target after its prompt (MEMIT's probs)."""
    out = []
    for logits, target in _teacher_forced(model, tok, prompts, targets, batch_size):
        logp = torch.log_softmax(logits, dim=-1)
        idx = torch.tensor(target, device=logp.device)
        out.append(-logp.gather(1, idx[:, None]).mean().item())
    return out


def _nll_pairs(model, tok, prompts, targets_new, targets_true, batch_size):
    _check_pairs(prompts, targets_new)
    _check_pairs(prompts, targets_true)
    # One pass over both targets so both see the same batches (hooks are per call anyway).
    nll = target_nll(
        model, tok, list(prompts) + list(prompts), list(targets_new) + list(targets_true),
        batch_size=batch_size,
    )
    n = len(prompts)
    return nll[:n], nll[n:]


def prefers_new(
    model,
    tok,
    prompts: Sequence[str],
    targets_new: Sequence[str],
    targets_true: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[bool]:
    """P(new) > P(true) per prompt (mean-token NLL, as MEMIT): the efficacy and paraphrase scores."""
    new, true = _nll_pairs(model, tok, prompts, targets_new, targets_true, batch_size)
    return [a < b for a, b in zip(new, true)]


def prefers_true(
    model,
    tok,
    prompts: Sequence[str],
    targets_new: Sequence[str],
    targets_true: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[bool]:
    """P(true) > P(new) per prompt: MEMIT's neighbourhood score (ties count as failures both ways)."""
    new, true = _nll_pairs(model, tok, prompts, targets_new, targets_true, batch_size)
    return [b < a for a, b in zip(new, true)]


# ------------------------------------------------------------------ generation


@torch.no_grad()
def generate_tokens(
    model,
    tok,
    prompts: Sequence[str],
    max_new_tokens: int | Sequence[int],
    *,
    top_k: int | None = None,
    seed: int | None = 0,
    stop_at_eos: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    use_cache: bool = False,
) -> list[list[int]]:
    """New token ids per prompt: greedy (``top_k=None``) or top-k sampling (ROME uses 5).

    Default, no KV cache: every step re-reads the whole sequence in one call
    with its attention mask, so gated hook layers see the full sequence each
    time and nothing is carried between calls (quadratic in the length).
    ``use_cache=True``: left-padded batches with explicit positions and the
    model's KV cache, one new token per call — how an edited model is
    deployed (gated hooks keep per-sequence running statistics over the
    tokens seen so far, padding excluded, reset with each new call without a
    cache); linear in the length, for long samples such as fluency's.
    Sampling uses a generator per prompt, seeded from `seed` and the prompt's
    text (never the global RNG), so a prompt's sample does not depend on the
    other prompts, their order or the batch size.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not a single string")
    budgets = (
        [int(max_new_tokens)] * len(prompts)
        if isinstance(max_new_tokens, int)
        else [int(m) for m in max_new_tokens]
    )
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(budgets)} max_new_tokens")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    gens = ([torch.Generator().manual_seed(_prompt_seed(seed, p)) for p in prompts]
            if (top_k is not None and seed is not None) else None)
    pad_id = _pad_id(tok)
    eos = tok.eos_token_id
    seqs = [_prompt_ids(tok, p) for p in prompts]

    def pick(last: torch.Tensor, rows: Sequence[int]) -> list[int]:
        if top_k is None:
            return last.argmax(-1).tolist()
        probs, idx = torch.softmax(last, -1).topk(min(top_k, last.shape[-1]), dim=-1)
        probs, idx = probs.cpu(), idx.cpu()
        return [int(idx[r, torch.multinomial(probs[r], 1, generator=gens[i] if gens else None)])
                for r, i in enumerate(rows)]

    def stops(t: int) -> bool:
        return stop_at_eos and eos is not None and t == eos

    if use_cache:
        return _generate_cached(model, seqs, budgets, pick, stops, pad_id, batch_size)
    new: list[list[int]] = [[] for _ in prompts]
    done = [b <= 0 for b in budgets]
    while not all(done):
        active = [i for i, d in enumerate(done) if not d]
        for start in range(0, len(active), batch_size):
            rows = active[start : start + batch_size]
            logits = _forward_logits(model, [seqs[i] for i in rows], pad_id)
            last = torch.stack([logits[r, len(seqs[i]) - 1] for r, i in enumerate(rows)]).float()
            picks = pick(last, rows)
            for i, t in zip(rows, picks):
                seqs[i].append(t)
                new[i].append(t)
                if len(new[i]) >= budgets[i] or stops(t):
                    done[i] = True
    return new


def _prompt_seed(seed: int, prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()[:8], "little") & (2**63 - 1)


def _generate_cached(model, seqs: list[list[int]], budgets: list[int], pick, stops, pad_id: int,
                     batch_size: int) -> list[list[int]]:
    """Batches of left-padded prompts (explicit positions, so padding changes nothing), one new
    token per call after the prompt, reusing the KV cache; a row that is done is fed on but ignored."""
    device = input_device(model)
    kw = cache_kwarg(model)
    new: list[list[int]] = [[] for _ in seqs]
    todo = [i for i, b in enumerate(budgets) if b > 0]
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        width = max(len(seqs[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(seqs[i]):] = torch.tensor(seqs[i])
            mask[r, width - len(seqs[i]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        following = positions[:, -1:] + 1
        done = [False] * len(rows)
        while True:
            picks = pick(out.logits[:, -1].float(), rows)
            for r, (i, t) in enumerate(zip(rows, picks)):
                if not done[r]:
                    new[i].append(t)
                    done[r] = len(new[i]) >= budgets[i] or stops(t)
            if all(done):
                break
            cache = getattr(out, "cache", None)
            if cache is None:
                cache = getattr(out, "past_key_values", None)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = model(input_ids=torch.tensor(picks, device=device)[:, None], attention_mask=mask,
                        position_ids=following, use_cache=True, **{kw: cache})
            following = following + 1
    return new


def generate_text(
    model,
    tok,
    prompts: Sequence[str],
    max_new_tokens: int = 100,
    *,
    top_k: int | None = 5,
    seed: int | None = 0,
    include_prompt: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    use_cache: bool = False,
) -> list[str]:
    """Decoded generations; with the prompt in front by default, as ROME's ``generate_fast``."""
    new = generate_tokens(
        model, tok, prompts, max_new_tokens, top_k=top_k, seed=seed,
        stop_at_eos=True, batch_size=batch_size, use_cache=use_cache,
    )
    out = []
    for prompt, ids in zip(prompts, new):
        full = (encode_prompt(tok, prompt) + ids) if include_prompt else ids
        out.append(tok.decode(full, skip_special_tokens=True))
    return out


def exact_match_generation(
    model, tok, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = DEFAULT_BATCH_SIZE,
    use_cache: bool = False,
) -> list[bool]:
    """Greedy generation (no teacher forcing) of len(target) tokens equals the target tokens."""
    _check_pairs(prompts, targets)
    wanted = [encode_target(tok, continuation(t)) for t in targets]
    got = generate_tokens(
        model, tok, prompts, [len(w) for w in wanted], top_k=None, batch_size=batch_size,
        use_cache=use_cache,
    )
    return [g == w for g, w in zip(got, wanted)]


# --------------------------------------------------------------------- fluency

_WORD = re.compile(r"\w+|[^\w\s]")


def _words(text: str) -> list[str]:
    """Words and punctuation marks (a dependency-free stand-in for ``nltk.word_tokenize``)."""
    return _WORD.findall(text)


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME's fluency measure: mean over n of weight_n · (base-2 entropy of the n-gram distribution).

    Low values flag degenerate, repetitive text. A text too short for any
    n-gram scores 0 for that n, as in ROME.
    """
    if len(ns) != len(weights):
        raise ValueError("ns and weights must have the same length")
    words = _words(text)
    terms = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        terms.append(w * h)
    return sum(terms) / len(terms)


def fluency(
    model,
    tok,
    prompts: Sequence[str],
    max_new_tokens: int = 100,
    *,
    top_k: int = 5,
    seed: int | None = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    use_cache: bool = False,
) -> list[float]:
    """n-gram entropy of top-k sampled text (prompt included) per prompt; average for ROME's score."""
    texts = generate_text(
        model, tok, prompts, max_new_tokens, top_k=top_k, seed=seed, batch_size=batch_size,
        use_cache=use_cache,
    )
    return [ngram_entropy(t) for t in texts]
