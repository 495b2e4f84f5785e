"""Evaluation harness: every method, both protocols, metrics before and after editing.

    summary = evaluate(model, tokenizer, requests, method="comeba", protocol="consecutive",
                       hparams=hp, corpus=corpus, batch_size=10, checkpoint_every=1, out="runs/x")

Methods (one harness, the same statistics, context templates and update math
from compute.py for all of them):

- ``comeba``: COMEBA-HK, hook layers, W_0 never changes (editor.Editor);
- ``no-hook``: the ablation, the same batches written into W_0 in place;
- ``memit`` and ``seq-memit``: C = λ·C0 every batch — MEMIT when each batch
  starts from the original model (single protocol), sequential MEMIT when the
  batches pile up (consecutive protocol); the two names are the same editor
  and the protocol decides;
- ``alphaedit``: AlphaEdit (comeba.alphaedit).

Protocols:

- ``single`` (single-round): each batch is edited from the original model,
  its records are evaluated right after, and the edit is removed (a fresh
  Editor for comeba, ``restore()`` for the weight editors). Checkpoints are
  the running means over the records evaluated so far.
- ``consecutive``: the batches are written one after another on one editor;
  every ``checkpoint_every`` batches and after the last one, *all edits so
  far* are evaluated. The records' post-edit values are the final ones.

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

Output folder: ``records.jsonl`` (per record, pre and post), ``summary.json``,
``checkpoints.csv``, ``metrics.png``; while running also ``run.json`` (the
configuration), ``pre.json`` and ``progress.json`` (and the editor state of a
consecutive run at its last checkpoint), so an interrupted run resumes where
it stopped when started again with the same configuration.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import resource
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ContextManager, Iterator, Mapping, Sequence

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import metrics as M
from .baselines import AlphaEditEditor, WeightEditor, make_baseline
from .compute import context_templates
from .editor import Editor
from .diagnostics import TextSample, gate_report, general_text_sample, text_pass
from .files import atomic_save_tensors, atomic_write_text
from .hooks import HookLayers
from .hparams import HParams
from .models import detect_layout, fingerprint
from .requests import Request, make_requests
from .stats import Corpus, calibration_sample, load_or_compute_stats

log = logging.getLogger(__name__)

METHODS = ("comeba", "no-hook", "memit", "seq-memit", "alphaedit")
PROTOCOLS = ("consecutive", "single")
CORE = ("reliability", "generality", "locality")
CF_SCORES = ("efficacy_score", "paraphrase_score", "neighborhood_score")
GENERATION = ("reliability_generation", "generality_generation")
FLUENCY = "fluency"
TEACHER_FORCED = CORE + CF_SCORES
DIAGNOSTICS = ("perplexity", "false_open_", "edit_open_", "rephrase_open_")

METHOD_NOTES = {
    "comeba": "COMEBA-HK: hook layers (W_0 untouched), C_accu = λ·C0 + Σ_past K Kᵀ, gate α adapted per batch",
    "no-hook": "ablation without hooks: written into W_0 with C_accu = λ·C0 + Σ_past K Kᵀ "
               "(not the reference's wohk, which solves with λ·(C0 + Σ_past K Kᵀ) + K Kᵀ)",
    "memit": "MEMIT: C = λ·C0 every batch, written into W_0 (under the consecutive protocol this is sequential MEMIT)",
    "seq-memit": "sequential MEMIT: C = λ·C0 every batch, re-applied on the edited W_0 "
                 "(under the single protocol this is MEMIT)",
    "alphaedit": "AlphaEdit (Fang et al., ICLR 2025): Δ = R Kᵀ P (Kp Kpᵀ P + K Kᵀ P + L2·I)⁻¹, "
                 "P the null-space projector of C0, Kp the earlier batches' keys; written into W_0",
}

RUN_FILE, PRE_FILE, PROGRESS_FILE = "run.json", "pre.json", "progress.json"
RECORDS_FILE, SUMMARY_FILE, CSV_FILE, PLOT_FILE = "records.jsonl", "summary.json", "checkpoints.csv", "metrics.png"
STATE_DIR, STATE_TENSORS = "state", "state.safetensors"


class EvalError(ValueError):
    """A run that cannot start (bad settings, an output folder holding another run)."""


@dataclass(frozen=True)
class Settings:
    """What to measure besides reliability, generality and locality."""

    counterfact: bool = False  # efficacy / paraphrase / neighbourhood scores and fluency
    generation: bool = True  # exact match of greedy generation (reliability and generality)
    fluency_tokens: int = 100  # sampled tokens per fluency text (CounterFact only; 0 = no fluency)
    metric_batch_size: int = M.DEFAULT_BATCH_SIZE
    diagnostics_text: str | None = None  # general text for the gate diagnostics (comeba.diagnostics); None: none


# ============================================================================ metrics per record


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


# ============================================================================ methods behind one interface


class _Method:
    """One editing method: edit a batch, evaluate under `applied()`, `reset()` to the original model."""

    def __init__(self, name: str, model, tokenizer, hparams: HParams, c0, templates, provenance, model_fp,
                 calibration=None):
        self.name, self.model, self.tokenizer, self.hparams = name, model, tokenizer, hparams
        self.c0, self.templates, self.provenance, self.model_fp = c0, list(templates), provenance, model_fp
        self.calibration = calibration

    def edit(self, batch: Sequence[Request]) -> dict[str, Any]:
        raise NotImplementedError

    def applied(self) -> ContextManager:
        return nullcontext()

    def hook_layers(self) -> HookLayers | None:
        """The attached hooks (inside `applied()`), for the gate diagnostics; None for weight editors."""
        return None

    def reset(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Leave the caller's model as it was given."""
        self.reset()

    def info(self) -> dict[str, Any]:
        return {}

    def save(self, directory: Path) -> None:
        raise NotImplementedError

    def load(self, directory: Path, n_edits: int) -> None:
        raise NotImplementedError


class _HookMethod(_Method):
    """COMEBA-HK: a fresh Editor from the shared statistics and templates; the weights never change."""

    def __init__(self, *args):
        super().__init__(*args)
        self.editor = self._fresh()

    def _fresh(self) -> Editor:
        return Editor.from_statistics(self.model, self.tokenizer, self.hparams, self.c0, templates=self.templates,
                                      stats_provenance=self.provenance, model_fingerprint=self.model_fp,
                                      calibration=self.calibration, progress=False)

    def edit(self, batch):
        info = self.editor.edit(batch)
        return {"seconds": info["seconds"], "alpha": {str(l): a for l, a in info["alpha"].items()}}

    def applied(self):
        return self.editor.applied()

    def hook_layers(self):
        return self.editor.hooks

    def reset(self):
        self.editor.detach()
        self.editor = self._fresh()

    def close(self):
        self.editor.detach()

    def info(self):
        return {"gate": self.hparams.gate, "alpha": {str(l): s.alpha for l, s in self.editor.layers.items()}}

    def save(self, directory):
        self.editor.save(directory / STATE_DIR)

    def load(self, directory, n_edits):
        self.editor = Editor.load(directory / STATE_DIR, self.model, self.tokenizer, progress=False)
        if self.editor.n_edits != n_edits:
            raise EvalError(f"saved editor state holds {self.editor.n_edits} edits, progress says {n_edits}")


class _WeightMethod(_Method):
    """MEMIT, sequential MEMIT, the no-hook ablation and AlphaEdit: written into W_0, `restore()` resets."""

    def __init__(self, *args):
        super().__init__(*args)
        self.editor: WeightEditor = make_baseline(self.name if self.name != "seq-memit" else "memit", self.model,
                                                  self.tokenizer, self.hparams, self.c0, templates=self.templates,
                                                  progress=False)

    def edit(self, batch):
        return {"seconds": self.editor.edit(batch)["seconds"]}

    def reset(self):
        self.editor.restore()

    def info(self):
        if isinstance(self.editor, AlphaEditEditor):
            return {"null_space": {str(l): ns.describe() for l, ns in self.editor.null_spaces.items()},
                    "L2": self.hparams.L2}
        return {}

    def save(self, directory):
        atomic_save_tensors(directory / STATE_TENSORS, self.editor.state_tensors())

    def load(self, directory, n_edits):
        self.editor.load_state_tensors(load_file(str(directory / STATE_TENSORS)), n_edits)


def make_method(name: str, model, tokenizer, hparams: HParams, c0, templates, provenance=None,
                model_fp: str | None = None, calibration=None) -> _Method:
    if name not in METHODS:
        raise EvalError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    cls = _HookMethod if name == "comeba" else _WeightMethod
    return cls(name, model, tokenizer, hparams, c0, templates, provenance, model_fp or fingerprint(model),
               calibration)


# ============================================================================ the run


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def requests_digest(requests: Sequence[Request]) -> str:
    text = json.dumps([r.to_dict() for r in requests], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False, default=str)


class _Progress:
    """The mutable part of a run, saved after every unit of work so that a restart resumes."""

    def __init__(self, data: Mapping[str, Any] | None = None):
        d = dict(data or {})
        self.batches_done: int = d.get("batches_done", 0)
        self.checkpoints: list[dict] = d.get("checkpoints", [])
        self.post: list[dict | None] = d.get("post", [])
        self.batch_infos: list[dict] = d.get("batch_infos", [])
        self.seconds: float = d.get("seconds", 0.0)
        self.edit_seconds: float = d.get("edit_seconds", 0.0)
        self.eval_seconds: float = d.get("eval_seconds", 0.0)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def evaluate(
    model,
    tokenizer,
    requests: Sequence[Mapping[str, Any] | Request],
    *,
    method: str = "comeba",
    protocol: str = "consecutive",
    hparams: HParams | None = None,
    corpus: Corpus | None = None,
    c0: Mapping[int, torch.Tensor] | None = None,
    batch_size: int | None = None,
    checkpoint_every: int | None = None,
    settings: Settings = Settings(),
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
    pre_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Run one method under one protocol on `requests`; return the summary (and write `out` when given).

    The key statistics come from `c0` (per layer) or are loaded/computed from
    `corpus` as the editor would. `checkpoint_every` defaults to about ten
    checkpoints over the run. The model is left as it was given (weights
    restored, hooks removed), also after an error. `pre_cache` is a file
    holding the unedited model's evaluation of these records, shared by runs
    of other methods and protocols (it does not depend on them): used when its
    key (records, settings, model) matches, else computed and written there.
    """
    started = time.perf_counter()
    hp = hparams or HParams()
    reqs = make_requests(requests)
    if method not in METHODS:
        raise EvalError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if protocol not in PROTOCOLS:
        raise EvalError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    size = batch_size or hp.batch_size
    if size < 1:
        raise EvalError(f"batch size must be positive, got {size}")
    batches = _batches(len(reqs), size)
    every = checkpoint_every or max(1, len(batches) // 10)
    if every < 1:
        raise EvalError(f"checkpoint_every must be positive, got {every}")
    if settings.fluency_tokens < 0:
        raise EvalError(f"fluency tokens must be >= 0, got {settings.fluency_tokens}")

    layout = detect_layout(model)
    model_fp = fingerprint(model)
    provenance: dict[str, Any] = {}
    if c0 is None:
        if corpus is None:
            raise EvalError("give the key statistics (c0) or a corpus to compute them from")
        c0, provenance = load_or_compute_stats(model, tokenizer, layout, hp.layers, corpus, hp.mom2_n_tokens,
                                               hp.mom2_dtype, model_fp=model_fp, progress=progress)
    config = {
        "method": method, "protocol": protocol, "batch_size": size, "checkpoint_every": every,
        "n_edits": len(reqs), "requests_digest": requests_digest(reqs), "hparams": hp.to_dict(),
        "model_fingerprint": model_fp, "statistics": provenance.get("corpus_id"), "settings": asdict(settings),
    }
    folder = Path(out) if out is not None else None
    state = _prepare_folder(folder, config, overwrite) if folder else None
    if state == "complete":
        log.info("%s already holds this completed run", folder)
        return {**json.loads((folder / SUMMARY_FILE).read_text()), "already_complete": True}

    templates = context_templates(model, tokenizer, hp)
    sample: TextSample | None = None
    if settings.diagnostics_text:
        sample = general_text_sample(tokenizer, settings.diagnostics_text)
        reference_ppl = float(text_pass(model, tokenizer, sample)["perplexity"])
    setup_seconds = time.perf_counter() - started

    # Before editing: the unedited model, once (and the locality reference).
    # The diagnostics text does not change the records' pre-edit values: runs with and without it share them.
    pre_settings = {k: v for k, v in config["settings"].items() if k != "diagnostics_text"}
    pre_key = {"requests_digest": config["requests_digest"], "settings": pre_settings,
               "model_fingerprint": model_fp}
    pre_path = folder / PRE_FILE if folder else None
    shared_path = Path(pre_cache) if pre_cache is not None else None
    here, shared = _read_pre(pre_path, pre_key), _read_pre(shared_path, pre_key)
    saved = here or shared
    if saved is not None:
        reference, pre, pre_seconds = saved["reference"], saved["pre"], saved["seconds"]
    else:
        t = time.perf_counter()
        if progress:
            tqdm.write(f"evaluating the {len(reqs)} records on the unedited model...", file=sys.stderr)
        reference = locality_reference(model, tokenizer, reqs, settings.metric_batch_size)
        pre = evaluate_requests(model, tokenizer, reqs, reference, settings, full=True)
        pre_seconds = time.perf_counter() - t
        saved = {"key": pre_key, "reference": reference, "pre": pre, "seconds": pre_seconds}
    for path, had in ((pre_path, here), (shared_path, shared)):
        if path is not None and had is None:  # missing, stale or another run's: (re)written
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(saved))

    progress_path = folder / PROGRESS_FILE if folder else None
    prog = _Progress(json.loads(progress_path.read_text()) if progress_path and progress_path.is_file() else None)
    if prog.batches_done == 0:
        prog.post = [None] * len(reqs)
    # Wall time counts from this call's start, plus what earlier sessions of a resumed run spent.
    clock0 = started - prog.seconds

    calibration = None
    if method == "comeba" and hp.gate == "span" and corpus is not None:
        calibration = calibration_sample(model, tokenizer, corpus, hp.gate_calibration_tokens, hp.mom2_n_tokens)
    runner = make_method(method, model, tokenizer, hp, c0, templates, provenance, model_fp, calibration)
    done_edits = batches[prog.batches_done - 1][1] if prog.batches_done else 0
    bar = tqdm(total=len(reqs), initial=done_edits, unit="edit", desc=f"{method} ({protocol})",
               disable=not progress, dynamic_ncols=True)
    try:
        if prog.batches_done and protocol == "consecutive":
            runner.load(folder, done_edits)
        for b in range(prog.batches_done, len(batches)):
            lo, hi = batches[b]
            last = b == len(batches) - 1
            at_checkpoint = last or (b + 1) % every == 0
            t = time.perf_counter()
            info = runner.edit(reqs[lo:hi])
            prog.edit_seconds += time.perf_counter() - t
            prog.batch_infos.append({"batch": b + 1, "n": hi - lo, **info})

            t = time.perf_counter()
            point = None
            if protocol == "single":
                # This batch's records, right after its edit; then back to the original model.
                with runner.applied():
                    prog.post[lo:hi] = evaluate_requests(model, tokenizer, reqs[lo:hi], reference[lo:hi], settings)
                    diagnostics = (gate_report(model, tokenizer, sample, runner.hook_layers(), reqs[lo:hi],
                                               reference_ppl) if sample is not None and at_checkpoint else {})
                runner.reset()
                if at_checkpoint:
                    point = {**aggregate(prog.post[:hi]), **diagnostics}
            elif at_checkpoint:
                # All edits so far; generation and fluency only for the final values.
                with runner.applied():
                    post = evaluate_requests(model, tokenizer, reqs[:hi], reference[:hi], settings, full=last)
                    diagnostics = (gate_report(model, tokenizer, sample, runner.hook_layers(), reqs[:hi], reference_ppl)
                                   if sample is not None else {})
                if last:
                    prog.post = post
                point = {**aggregate(post), **diagnostics}
            prog.eval_seconds += time.perf_counter() - t
            bar.update(hi - lo)
            if point is not None:
                prog.checkpoints.append(_checkpoint(point, hi, b + 1, time.perf_counter() - clock0))
                bar.set_postfix_str(", ".join(f"{k[:3]} {point[k]:.0f}" for k in CORE if point.get(k) is not None))
            if protocol == "single" or at_checkpoint:
                prog.batches_done = b + 1
                prog.seconds = time.perf_counter() - clock0
                if progress_path is not None and not last:
                    if protocol == "consecutive":
                        runner.save(folder)
                    atomic_write_text(progress_path, _json(prog.to_dict()))
        method_info = runner.info() if protocol == "consecutive" or method != "comeba" else {"gate": hp.gate}
    finally:
        bar.close()
        runner.close()

    seconds = time.perf_counter() - clock0
    records = [_record(i, r, size, pre[i], prog.post[i]) for i, r in enumerate(reqs)]
    summary = {
        "method": method,
        "protocol": protocol,
        "n_edits": len(reqs),
        "batch_size": size,
        "n_batches": len(batches),
        "checkpoint_every": every,
        "pre": _rounded(aggregate(pre)),
        "post": _rounded(aggregate(prog.post)),
        "checkpoints": prog.checkpoints,
        "seconds": round(seconds, 2),
        "edit_seconds": round(prog.edit_seconds, 2),
        "eval_seconds": round(prog.eval_seconds, 2),
        "pre_seconds": round(pre_seconds, 2),
        "setup_seconds": round(setup_seconds, 2),
        "seconds_per_edit": round(prog.edit_seconds / len(reqs), 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "method_note": METHOD_NOTES[method],
        "method_info": method_info,
        "metric_notes": {
            "units": "percent, except fluency (ROME's weighted 2/3-gram entropy, bits)",
            "locality": "teacher-forced argmax tokens unchanged from the unedited model",
            "checkpoints": ("running means over the records evaluated so far" if protocol == "single"
                            else "all edits so far, teacher-forced metrics"),
            "generation": "exact match of greedy generation (KV cache, as deployed)",
        },
        "hparams": hp.to_dict(),
        "statistics": provenance,
        "model_fingerprint": model_fp,
        "device": str(next(model.parameters()).device),
        "batches": prog.batch_infos,
        **dict(meta or {}),
    }
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        summary["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if folder:
        _write_outputs(folder, summary, records)
    return summary


def _checkpoint(point: Mapping[str, float | None], n_edits: int, batches: int, seconds: float) -> dict[str, Any]:
    entry: dict[str, Any] = {"n_edits": n_edits, "batches": batches}
    for k in TEACHER_FORCED:
        if k in point:
            entry[k] = None if point[k] is None else round(point[k], 3)
    for k, v in point.items():  # gate diagnostics (already rounded)
        if k.startswith(DIAGNOSTICS):
            entry[k] = v
    entry["seconds"] = round(seconds, 2)
    return entry


def _rounded(d: Mapping[str, float | None]) -> dict[str, float | None]:
    return {k: (None if v is None else round(v, 3)) for k, v in d.items()}


def _record(i: int, r: Request, size: int, pre, post) -> dict[str, Any]:
    return {
        "index": i,
        "case_id": r.case_id,
        "batch": i // size + 1,
        "subject": r.subject,
        "prompt": r.text,
        "target_new": r.target_new.strip(),
        "ground_truth": r.ground_truth,
        "pre": _rounded(pre),
        "post": _rounded(post or {}),
    }


# ============================================================================ the output folder


def _read_pre(path: Path | None, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """A saved unedited-model evaluation, if `path` holds one for exactly these records and settings."""
    if path is None or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and saved.get("key") == json.loads(_json(key)) else None


def _prepare_folder(folder: Path, config: Mapping[str, Any], overwrite: bool) -> str:
    """"new", "resume" or "complete"; refuses a folder that holds another run."""
    if folder.exists() and not folder.is_dir():
        raise EvalError(f"output {str(folder)!r} is a file, not a folder")
    run_file = folder / RUN_FILE
    if folder.is_dir() and overwrite:
        for name in (RUN_FILE, PRE_FILE, PROGRESS_FILE, RECORDS_FILE, SUMMARY_FILE, CSV_FILE, PLOT_FILE, STATE_TENSORS):
            (folder / name).unlink(missing_ok=True)
        shutil.rmtree(folder / STATE_DIR, ignore_errors=True)
    if folder.is_dir() and run_file.is_file():
        saved = json.loads(run_file.read_text())
        if saved != json.loads(_json(config)):
            differ = sorted(k for k in set(saved) | set(config) if saved.get(k) != json.loads(_json(config)).get(k))
            raise EvalError(
                f"{folder} holds another run (it differs in: {', '.join(differ)}); "
                "give a new --out folder, or --overwrite to replace it"
            )
        return "complete" if (folder / SUMMARY_FILE).is_file() else "resume"
    if folder.is_dir() and any(folder.iterdir()):
        raise EvalError(f"{folder} is a non-empty folder without a comeba evaluation ({RUN_FILE} missing); "
                        "give a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_file, _json(config))
    return "new"


def _write_outputs(folder: Path, summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> None:
    atomic_write_text(folder / RECORDS_FILE, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n"
                                                     for r in records))
    atomic_write_text(folder / CSV_FILE, checkpoints_csv(summary["checkpoints"]))
    try:
        plot_checkpoints(summary, folder / PLOT_FILE)
    except ImportError as err:  # matplotlib is optional for the library, not for the CLI
        log.warning("no plot written: %s", err)
    atomic_write_text(folder / SUMMARY_FILE, _json(summary))
    # The run is complete: the resume files are no longer needed (run.json stays: it names the run).
    (folder / PROGRESS_FILE).unlink(missing_ok=True)
    (folder / STATE_TENSORS).unlink(missing_ok=True)
    shutil.rmtree(folder / STATE_DIR, ignore_errors=True)


def checkpoints_csv(checkpoints: Sequence[Mapping[str, Any]]) -> str:
    columns: list[str] = []
    for c in checkpoints:
        columns += [k for k in c if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for c in checkpoints:
        writer.writerow({k: ("" if c.get(k) is None else c.get(k)) for k in columns})
    return buf.getvalue()


PLOT_STYLE = {
    "reliability": ("tab:blue", "-"), "generality": ("tab:orange", "-"), "locality": ("tab:green", "-"),
    "efficacy_score": ("tab:blue", "--"), "paraphrase_score": ("tab:orange", "--"),
    "neighborhood_score": ("tab:green", "--"),
}


def plot_checkpoints(summary: Mapping[str, Any], path: Path) -> None:
    """The teacher-forced metrics against the number of edits; pre-edit values as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cps = summary["checkpoints"]
    gate_keys = sorted({k for c in cps for k in c if k.startswith("false_open_") and k != "false_open_max"},
                       key=lambda k: int(k.rsplit("_", 1)[1]))
    has_ppl = any(c.get("perplexity_ratio") is not None for c in cps)
    if gate_keys or has_ppl:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=120, gridspec_kw={"width_ratios": [3, 2]})
    else:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    xs = [c["n_edits"] for c in cps]
    for key, (color, style) in PLOT_STYLE.items():
        ys = [c.get(key) for c in cps]
        if not any(y is not None for y in ys):
            continue
        ax.plot(xs, [math.nan if y is None else y for y in ys], style, color=color, marker="o", ms=3,
                label=key.replace("_", " "))
        pre = (summary.get("pre") or {}).get(key)
        if pre is not None and key != "locality":
            ax.axhline(pre, color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("number of edits" + (" (evaluated so far)" if summary["protocol"] == "single" else ""))
    ax.set_ylabel("percent")
    ax.set_ylim(-2, 102)
    ax.set_title(f"{summary['method']} · {summary['protocol']} · batch {summary['batch_size']}"
                 f" · {summary['n_edits']} edits (dotted: before editing)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    if gate_keys or has_ppl:
        for i, key in enumerate(gate_keys):
            ax2.plot(xs, [c.get(key, math.nan) for c in cps], marker="o", ms=3, color=f"C{i}",
                     label=f"false-open, layer {key.rsplit('_', 1)[1]}")
        ax2.set_xlabel("number of edits")
        ax2.set_ylabel("gate opens on general text (% of tokens)")
        ax2.set_ylim(bottom=0)
        ax2.grid(alpha=0.3)
        if has_ppl:
            ax3 = ax2.twinx()
            ax3.plot(xs, [c.get("perplexity_ratio", math.nan) for c in cps], "k--", marker="s", ms=3,
                     label="perplexity ratio (right)")
            ax3.set_ylabel("perplexity with hooks / unedited")
            ax3.ticklabel_format(axis="y", useOffset=False)
            lines = ax2.get_legend_handles_labels()
            more = ax3.get_legend_handles_labels()
            ax2.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left")
        else:
            ax2.legend(fontsize=7, loc="upper left")
        ax2.set_title("gate diagnostics (general text not used for the statistics)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(".tmp-" + path.name)
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
