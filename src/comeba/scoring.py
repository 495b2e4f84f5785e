"""Per-record metrics of a set of edit requests: what the evaluation measures (comeba.evaluate runs it).

    reference = locality_reference(model, tokenizer, requests)      # on the unedited model
    per_record = evaluate_requests(model, tokenizer, requests, reference, Settings(counterfact=True))
    means = aggregate(per_record)

Metrics (DESIGN.md §3; comeba.metrics holds the definitions), per record, in
percent: reliability, generality (mean over the record's rephrasings) and
locality (mean over its locality prompts), all teacher-forced; CounterFact
also efficacy/paraphrase/neighbourhood scores (P(new) > P(true) the MEMIT
way) and fluency (ROME's n-gram entropy of 100 sampled tokens — a number of
bits, not a percentage); with ``generation`` the exact match of greedy
generation of the new target after the prompt / rephrasings. Checkpoints
compute the teacher-forced metrics; generation and fluency are computed
before editing and for the final post-edit values. Every metric call runs the
model afresh with an attention mask; a gated hook keeps no state between
calls, so a record's result does not depend on its batch-mates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch

from . import metrics as M
from .requests import Request

CORE = ("reliability", "generality", "locality")
CF_SCORES = ("efficacy_score", "paraphrase_score", "neighborhood_score")
GENERATION = ("reliability_generation", "generality_generation")
FLUENCY = "fluency"
TEACHER_FORCED = CORE + CF_SCORES
DIAGNOSTICS = ("perplexity", "false_open_", "edit_open_", "rephrase_open_")  # gate diagnostics' key prefixes


@dataclass(frozen=True)
class Settings:
    """What to measure besides reliability, generality and locality."""

    counterfact: bool = False  # efficacy / paraphrase / neighbourhood scores and fluency
    generation: bool = True  # exact match of greedy generation (reliability and generality)
    fluency_tokens: int = 100  # sampled tokens per fluency text (CounterFact only; 0 = no fluency)
    metric_batch_size: int = M.DEFAULT_BATCH_SIZE
    diagnostics_text: str | None = None  # general text for the gate diagnostics (comeba.diagnostics); None: none


def _percent(x: float | bool | None) -> float | None:
    return None if x is None else 100.0 * float(x)


def _grouped(owners: Sequence[int], values: Sequence[float | bool], n: int) -> list[float | None]:
    """Mean per owner in percent (None for owners without values)."""
    sums, counts = [0.0] * n, [0] * n
    for o, v in zip(owners, values):
        sums[o] += float(v)
        counts[o] += 1
    return [100.0 * s / c if c else None for s, c in zip(sums, counts)]


def _rephrases(requests: Sequence[Request]) -> tuple[list[int], list[str], list[Request]]:
    owners, prompts, reqs = [], [], []
    for i, r in enumerate(requests):
        for p in r.rephrase_prompts:
            owners.append(i)
            prompts.append(p)
            reqs.append(r)
    return owners, prompts, reqs


def locality_prompts(requests: Sequence[Request]) -> tuple[list[int], list[str], list[str]]:
    """(owning record, prompt, answer) over every record's locality prompts, flattened in order.

    Public so that analyses of a run (benchmarks/locality_margins.py) line up with its records.
    """
    owners, prompts, truths = [], [], []
    for i, r in enumerate(requests):
        for p, t in zip(r.locality_prompts, r.locality_ground_truths):
            owners.append(i)
            prompts.append(p)
            truths.append(t)
    return owners, prompts, truths


@torch.no_grad()
def locality_reference(model, tokenizer, requests: Sequence[Request], batch_size: int = M.DEFAULT_BATCH_SIZE
                       ) -> list[list[list[int]]]:
    """Per request, per locality prompt: the argmax tokens over its ground truth (store for the unedited model)."""
    owners, prompts, truths = locality_prompts(requests)
    tokens = M.argmax_tokens(model, tokenizer, prompts, truths, batch_size=batch_size) if prompts else []
    out: list[list[list[int]]] = [[] for _ in requests]
    for o, t in zip(owners, tokens):
        out[o].append(t)
    return out


def _fluency_prompts(request: Request) -> list[str]:
    prompts = request.extra.get("generation_prompts") if request.extra else None
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
        return list(prompts)
    return [request.text]


@torch.no_grad()
def evaluate_requests(
    model,
    tokenizer,
    requests: Sequence[Request],
    reference: Sequence[Sequence[Sequence[int]]],
    settings: Settings = Settings(),
    *,
    full: bool = True,
) -> list[dict[str, float | None]]:
    """Per request, the metrics in percent (fluency in bits); None where a record lacks the prompts.

    `reference` comes from `locality_reference` on the unedited model.
    `full=False` computes only the teacher-forced metrics (checkpoints).
    """
    if len(reference) != len(requests):
        raise ValueError(f"{len(requests)} requests but {len(reference)} locality references")
    n, bs = len(requests), settings.metric_batch_size
    prompts = [r.text for r in requests]
    targets = [r.target_new for r in requests]
    out: dict[str, list[float | None]] = {}

    out["reliability"] = [_percent(x) for x in M.token_accuracy(model, tokenizer, prompts, targets, batch_size=bs)]
    g_own, g_prompts, g_reqs = _rephrases(requests)
    g_targets = [r.target_new for r in g_reqs]
    out["generality"] = (_grouped(g_own, M.token_accuracy(model, tokenizer, g_prompts, g_targets, batch_size=bs), n)
                         if g_prompts else [None] * n)
    l_own, l_prompts, l_truths = locality_prompts(requests)
    if l_prompts:
        after = M.argmax_tokens(model, tokenizer, l_prompts, l_truths, batch_size=bs)
        before = [list(reference[o][j]) for o, j in _positions(l_own)]
        out["locality"] = _grouped(l_own, M.locality(before, after), n)
    else:
        out["locality"] = [None] * n

    if settings.counterfact:
        has_true = [bool(r.ground_truth and r.ground_truth.strip()) for r in requests]
        idx = [i for i in range(n) if has_true[i]]
        eff = M.prefers_new(model, tokenizer, [prompts[i] for i in idx], [targets[i] for i in idx],
                            [requests[i].ground_truth for i in idx], batch_size=bs) if idx else []
        out["efficacy_score"] = _grouped(idx, eff, n)
        sel = [k for k, o in enumerate(g_own) if has_true[o]]
        para = M.prefers_new(model, tokenizer, [g_prompts[k] for k in sel], [g_targets[k] for k in sel],
                             [g_reqs[k].ground_truth for k in sel], batch_size=bs) if sel else []
        out["paraphrase_score"] = _grouped([g_own[k] for k in sel], para, n)
        sel = [k for k, o in enumerate(l_own) if has_true[o]]
        neigh = M.prefers_true(model, tokenizer, [l_prompts[k] for k in sel],
                               [requests[l_own[k]].target_new for k in sel],
                               [requests[l_own[k]].ground_truth for k in sel], batch_size=bs) if sel else []
        out["neighborhood_score"] = _grouped([l_own[k] for k in sel], neigh, n)

    if full and settings.generation:
        em = M.exact_match_generation(model, tokenizer, prompts, targets, batch_size=bs, use_cache=True)
        out["reliability_generation"] = [_percent(x) for x in em]
        em = (M.exact_match_generation(model, tokenizer, g_prompts, g_targets, batch_size=bs, use_cache=True)
              if g_prompts else [])
        out["generality_generation"] = _grouped(g_own, em, n)
    if full and settings.counterfact and settings.fluency_tokens > 0:
        f_own, f_prompts = [], []
        for i, r in enumerate(requests):
            for p in _fluency_prompts(r):
                f_own.append(i)
                f_prompts.append(p)
        ent = M.fluency(model, tokenizer, f_prompts, settings.fluency_tokens, batch_size=bs, use_cache=True)
        out[FLUENCY] = [v / 100.0 if v is not None else None for v in _grouped(f_own, ent, n)]

    return [{k: v[i] for k, v in out.items()} for i in range(n)]


def _positions(owners: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(owner, index within the owner) for a flat list of owners."""
    seen: dict[int, int] = {}
    for o in owners:
        j = seen.get(o, 0)
        seen[o] = j + 1
        yield o, j


def aggregate(per_record: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    """Mean of each metric over the records that have it (None when none has it)."""
    keys: list[str] = []
    for rec in per_record:
        keys += [k for k in rec if k not in keys]
    out = {}
    for k in keys:
        vals = [rec[k] for rec in per_record if rec.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    return out
