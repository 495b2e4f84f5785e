"""Evaluation harness: every method, both protocols, metrics before and after editing.

    summary = evaluate(model, tokenizer, requests, method="comeba", protocol="consecutive",
                       hparams=hp, corpus=corpus, batch_size=10, checkpoint_every=1, out="runs/x")

Methods (registered in comeba.methods; one harness, the same statistics,
context templates and update math from compute.py for all of them):

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

What is measured and how: comeba.scoring. The output folder (records.jsonl,
summary.json, checkpoints.csv, metrics.png, and the files that let an
interrupted run resume): comeba.runfolder.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Mapping, Sequence

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .baselines import AlphaEditEditor, WeightEditor, make_baseline
from .compute import context_templates
from .editor import Editor
from .diagnostics import TextSample, gate_report, general_text_sample, text_pass
from .distributed import dist_context, from_lead, gather_split, is_lead
from .files import atomic_save_tensors
from .hooks import HookLayers
from .hparams import HParams
from .methods import METHODS, PROTOCOLS, REGISTRY
from .models import detect_layout, fingerprint, model_check
from .requests import Request, consecutive_batches, make_requests
from .runfolder import (STATE_DIR, STATE_TENSORS, EvalError, FingerprintCheck, Progress, checkpoint_entry,
                        completed_summary, find_pre, load_progress, pre_key, prepare_folder, record_entry, run_config,
                        run_summary, save_progress, write_outputs, write_pre)
from .scoring import CORE, Settings, aggregate, evaluate_requests, locality_reference
from .stats import load_or_compute_stats
from .corpus import Corpus, calibration_sample

log = logging.getLogger(__name__)


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
        out = {"seconds": info["seconds"], "alpha": {str(l): a for l, a in info["alpha"].items()}}
        return {**out, "warned": info["warned"]} if info["warned"] else out  # indices in the batch

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
        self.editor.save_pretrained(directory / STATE_DIR)

    def load(self, directory, n_edits):
        self.editor = Editor.from_pretrained(self.model, self.tokenizer, directory / STATE_DIR, progress=False)
        if self.editor.n_edits != n_edits:
            raise EvalError(f"saved editor state holds {self.editor.n_edits} edits, progress says {n_edits}")


class _WeightMethod(_Method):
    """MEMIT, sequential MEMIT, the no-hook ablation and AlphaEdit: written into W_0, `restore()` resets."""

    def __init__(self, *args):
        super().__init__(*args)
        self.editor: WeightEditor = make_baseline(REGISTRY[self.name].baseline, self.model, self.tokenizer,
                                                  self.hparams, self.c0, templates=self.templates, progress=False)

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

_ADAPTERS: dict[str, type[_Method]] = {"hook": _HookMethod, "weight": _WeightMethod}  # comeba.methods' adapters


def make_method(name: str, model, tokenizer, hparams: HParams, c0, templates, provenance=None,
                model_fp: str | None = None, calibration=None) -> _Method:
    """The adapter that runs method `name` (comeba.methods.REGISTRY) on `model`."""
    if name not in REGISTRY:
        raise EvalError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    cls = _ADAPTERS[REGISTRY[name].adapter]
    return cls(name, model, tokenizer, hparams, c0, templates, provenance, model_fp or fingerprint(model),
               calibration)


# ============================================================================ the run


def _schedule(method: str, protocol: str, hp: HParams, batch_size: int | None, checkpoint_every: int | None,
              settings: Settings, reqs: Sequence[Request]) -> tuple[int, list[tuple[int, int]], int]:
    """(batch size, batches as (lo, hi), checkpoint every) of a run; bad settings are EvalErrors."""
    if method not in METHODS:
        raise EvalError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if protocol not in PROTOCOLS:
        raise EvalError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    size = batch_size or hp.batch_size
    if size < 1:
        raise EvalError(f"batch size must be positive, got {size}")
    batches = consecutive_batches(reqs, size)
    every = checkpoint_every or max(1, len(batches) // 10)
    if every < 1:
        raise EvalError(f"checkpoint_every must be positive, got {every}")
    if settings.fluency_tokens < 0:
        raise EvalError(f"fluency tokens must be >= 0, got {settings.fluency_tokens}")
    return size, batches, every


@dataclass
class _Run:
    """One run as the batch loop sees it: the model, the records, the schedule, the unedited reference."""

    method: str
    protocol: str
    model: Any
    tokenizer: Any
    reqs: list[Request]
    settings: Settings
    batches: list[tuple[int, int]]
    every: int
    folder: Path | None
    reference: list  # per record, per locality prompt: the unedited model's argmax tokens
    clock0: float  # wall time counts from here (earlier sessions of a resumed run included)
    sample: TextSample | None = None  # general text for the gate diagnostics
    reference_ppl: float | None = None  # the unedited model's perplexity on it

    def last(self, b: int) -> bool:
        return b == len(self.batches) - 1

    def at_checkpoint(self, b: int) -> bool:
        return self.last(b) or (b + 1) % self.every == 0


def _evaluate_records(model, tokenizer, reqs: Sequence[Request], reference: Sequence, settings: Settings,
                      full: bool = True) -> list[dict[str, Any]]:
    """`evaluate_requests`, the records dealt to the processes of a group (each holding the same edits)."""
    return gather_split(len(reqs), lambda idx: evaluate_requests(
        model, tokenizer, [reqs[i] for i in idx], [reference[i] for i in idx], settings, full=full))


def _unedited(model, tokenizer, reqs: Sequence[Request], settings: Settings, key: Mapping[str, Any],
              folder: Path | None, pre_cache: str | Path | None, progress: bool,
              known: FingerprintCheck | None = None) -> tuple[list, list, float]:
    """(locality reference, pre-edit values, seconds) of the unedited model: saved ones when they match
    `key`, else computed once and saved (in the run folder and the shared `pre_cache`)."""
    saved, stale = find_pre(folder, pre_cache, key, known) if is_lead() else (None, [])
    saved = from_lead(saved)
    if saved is None:
        t = time.perf_counter()
        if progress:
            tqdm.write(f"evaluating the {len(reqs)} records on the unedited model...", file=sys.stderr)
        reference = gather_split(len(reqs), lambda idx: locality_reference(
            model, tokenizer, [reqs[i] for i in idx], settings.metric_batch_size))
        pre = _evaluate_records(model, tokenizer, reqs, reference, settings, full=True)
        saved = {"key": key, "reference": reference, "pre": pre, "seconds": time.perf_counter() - t}
    write_pre(stale, saved)
    return saved["reference"], saved["pre"], saved["seconds"]


def _diagnostics(run: _Run, runner: _Method, reqs: Sequence[Request]) -> dict[str, Any]:
    if run.sample is None:
        return {}
    return gate_report(run.model, run.tokenizer, run.sample, runner.hook_layers(), reqs, run.reference_ppl)


def _evaluate_batch(run: _Run, runner: _Method, prog: Progress, b: int) -> dict[str, Any] | None:
    """Evaluate after batch `b` as the protocol says; the checkpoint's means (None between checkpoints)."""
    lo, hi = run.batches[b]
    if run.protocol == "single":
        # This batch's records, right after its edit; then back to the original model.
        with runner.applied():
            prog.post[lo:hi] = _evaluate_records(run.model, run.tokenizer, run.reqs[lo:hi], run.reference[lo:hi],
                                                 run.settings)
            diagnostics = _diagnostics(run, runner, run.reqs[lo:hi]) if run.at_checkpoint(b) else {}
        runner.reset()
        return {**aggregate(prog.post[:hi]), **diagnostics} if run.at_checkpoint(b) else None
    if not run.at_checkpoint(b):
        return None
    # All edits so far; generation and fluency only for the final values.
    with runner.applied():
        post = _evaluate_records(run.model, run.tokenizer, run.reqs[:hi], run.reference[:hi], run.settings,
                                 full=run.last(b))
        diagnostics = _diagnostics(run, runner, run.reqs[:hi])
    if run.last(b):
        prog.post = post
    return {**aggregate(post), **diagnostics}


def _checkpointed(run: _Run, runner: _Method, prog: Progress, b: int) -> None:
    """After batch `b`: count it as done where a restart may resume, and save the progress there."""
    if run.protocol == "single" or run.at_checkpoint(b):
        prog.batches_done = b + 1
        prog.seconds = time.perf_counter() - run.clock0
        if run.folder is not None and not run.last(b) and is_lead():
            if run.protocol == "consecutive":
                runner.save(run.folder)
            save_progress(run.folder, prog)


def _run_batches(run: _Run, runner: _Method, prog: Progress, progress: bool) -> None:
    """Edit the batches not done yet (after the saved state of a resumed run), evaluating at the checkpoints."""
    done_edits = run.batches[prog.batches_done - 1][1] if prog.batches_done else 0
    bar = tqdm(total=len(run.reqs), initial=done_edits, unit="edit", desc=f"{run.method} ({run.protocol})",
               disable=not progress, dynamic_ncols=True)
    try:
        if prog.batches_done and run.protocol == "consecutive":
            runner.load(run.folder, done_edits)
        for b in range(prog.batches_done, len(run.batches)):
            lo, hi = run.batches[b]
            t = time.perf_counter()
            info = runner.edit(run.reqs[lo:hi])
            prog.edit_seconds += time.perf_counter() - t
            if "warned" in info:  # the requests `comeba edit` warns will probably not take, as record indices
                info["warned"] = [lo + i for i in info["warned"]]
            prog.batch_infos.append({"batch": b + 1, "n": hi - lo, **info})

            t = time.perf_counter()
            point = _evaluate_batch(run, runner, prog, b)
            prog.eval_seconds += time.perf_counter() - t
            bar.update(hi - lo)
            if point is not None:
                prog.checkpoints.append(checkpoint_entry(point, hi, b + 1, time.perf_counter() - run.clock0))
                bar.set_postfix_str(", ".join(f"{k[:3]} {point[k]:.0f}" for k in CORE if point.get(k) is not None))
            _checkpointed(run, runner, prog, b)
    finally:
        bar.close()


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
    restored, hooks removed), also after an error. Inside a process group
    (torchrun) every process makes the same edits and evaluates its share of
    the records; rank 0 alone reads and writes the files. `pre_cache` is a file
    holding the unedited model's evaluation of these records, shared by runs
    of other methods and protocols (it does not depend on them): used when its
    key (records, settings, model) matches, else computed and written there.
    """
    started = time.perf_counter()
    progress = progress and is_lead()
    hp = hparams or HParams()
    reqs = make_requests(requests, one_batch=False)
    size, batches, every = _schedule(method, protocol, hp, batch_size, checkpoint_every, settings, reqs)
    layout = detect_layout(model)
    model_fp = fingerprint(model)
    provenance: dict[str, Any] = {}
    if c0 is None:
        if corpus is None:
            raise EvalError("give the key statistics (c0) or a corpus to compute them from")
        c0, provenance = load_or_compute_stats(model, tokenizer, layout, hp.layers, corpus, hp.mom2_n_tokens,
                                               hp.mom2_dtype, model_fp=model_fp, progress=progress)
    config = run_config(method, protocol, size, every, reqs, hp, model_fp, provenance, settings)
    folder = Path(out) if out is not None else None
    known = model_check(model, model_fp)
    if folder and from_lead(prepare_folder(folder, config, overwrite, known) if is_lead() else None) == "complete":
        log.info("%s already holds this completed run", folder)
        return completed_summary(folder)

    templates = context_templates(model, tokenizer, hp)
    sample, reference_ppl = None, None
    if settings.diagnostics_text:
        sample = general_text_sample(tokenizer, settings.diagnostics_text)
        reference_ppl = float(text_pass(model, tokenizer, sample)["perplexity"])
    setup_seconds = time.perf_counter() - started
    # Before editing: the unedited model, once (and the locality reference).
    reference, pre, pre_seconds = _unedited(model, tokenizer, reqs, settings, pre_key(config, model_fp), folder,
                                            pre_cache, progress, known)
    prog = load_progress(folder, len(reqs))
    run = _Run(method, protocol, model, tokenizer, reqs, settings, batches, every, folder, reference,
               clock0=started - prog.seconds, sample=sample, reference_ppl=reference_ppl)

    calibration = None
    if method == "comeba" and hp.gate == "span" and corpus is not None:
        calibration = calibration_sample(model, tokenizer, corpus, hp.gate_calibration_tokens, hp.mom2_n_tokens)
    runner = make_method(method, model, tokenizer, hp, c0, templates, provenance, model_fp, calibration)
    try:
        _run_batches(run, runner, prog, progress)
        method_info = runner.info() if protocol == "consecutive" or method != "comeba" else {"gate": hp.gate}
    finally:
        runner.close()

    times = {"seconds": time.perf_counter() - run.clock0, "pre_seconds": pre_seconds, "setup_seconds": setup_seconds}
    batch_of = [b + 1 for b, (lo, hi) in enumerate(batches) for _ in range(lo, hi)]
    warned = {i for b in prog.batch_infos for i in b.get("warned", ())}
    records = [record_entry(i, r, batch_of[i], pre[i], prog.post[i], i in warned) for i, r in enumerate(reqs)]
    summary = run_summary(config, len(batches), pre, prog, times, method_info, provenance,
                          str(next(model.parameters()).device), meta, warned)
    summary["processes"] = (dist_context() or (0, 1))[1]
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        summary["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if folder and is_lead():
        write_outputs(folder, summary, records)
    return summary
