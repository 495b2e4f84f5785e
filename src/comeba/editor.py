"""The consecutive batch editor (COMEBA-HK).

The state is of fixed size whatever the number of edits: per edited layer
ΔW = W_h − W_0, C_accu = λ·C0 + Σ_past K Kᵀ and the gate threshold α. It is
saved like a PEFT adapter (comeba.adapter) and the base model's weights are
never modified. See docs/method.md.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from . import __version__
from .adapter import StateError, check_base_model, read_state, write_state
from .compute import (accumulate_keys, context_templates, fill_template, solve_update, subject_keys,
                      weighted_covariance, write_layers)
from .gate import (Remembered, adapt_alpha, batch_gate_maxima, calibrate_span, calibration_stream, remember,
                   span_gate, span_gate_added, whitened_energy)
from .hooks import HookLayers, LayerState
from .hparams import HParams
from .models import (Layout, detect_layout, fingerprint, input_device, mlp_out_device, mlp_out_weight,
                     num_layers)
from .requests import Request, RequestError, consecutive_batches, make_requests
from .stats import load_or_compute_stats
from .corpus import Corpus, calibration_sample, default_corpus, samples_corpus
from .text import encode_prompt, encode_target, subject_last_index
from .values import target_values

log = logging.getLogger(__name__)
# A subject key whose energy whitened against general text, kᵀ(λC0)⁻¹k, is under this share of general text's
# mean (d_in / λ) carries almost no context: at 1,000 edits of the embedded model those keys (0.04–0.56,
# against 0.77) were exactly the 13 edit prompts the gate shut (README, The gate).
LOW_CONTEXT_SHARE = 0.5

class EditError(ValueError):
    """A batch that cannot be written (a non-finite value or an ill-posed solve); the state is unchanged."""


def _names(batch: Sequence[Request], rows) -> str:
    return ", ".join(f"#{i} ({batch[i].subject!r} → {batch[i].target_new.strip()!r})" for i in rows)


class Editor:
    """Writes batches of facts into hook layers, one consecutive step per `edit` call.

    `Editor(model, tokenizer, config, corpus=...)` starts from the (cached) key
    statistics of `corpus`; `Editor.from_pretrained(model, tokenizer, dir)` goes
    on editing a saved state. The edits act while the hooks are attached
    (`attach()`, `with editor.applied():`); `save_pretrained(dir)` writes them,
    and `comeba.load_edits(model, dir)` applies them for inference.
    """

    def __init__(self, model, tokenizer, config: HParams | None = None, corpus: Corpus | None = None,
                 progress: bool = True):
        hp = config or HParams()
        layout = detect_layout(model)
        hp.check_model(num_layers(model, layout))
        fp = fingerprint(model)
        corpus = corpus or default_corpus()
        log.info("key statistics corpus: %s", corpus.describe)
        c0, provenance = load_or_compute_stats(
            model, tokenizer, layout, hp.layers, corpus, hp.mom2_n_tokens, hp.mom2_dtype, model_fp=fp, progress=progress
        )
        calibration = (calibration_sample(model, tokenizer, corpus, hp.gate_calibration_tokens, hp.mom2_n_tokens)
                       if hp.gate == "span" else None)
        self._setup(model, tokenizer, hp, layout, _fresh_layers(model, layout, hp, c0),
                    context_templates(model, tokenizer, hp), model_fingerprint=fp, stats_provenance=provenance,
                    calibration=calibration, progress=progress)

    def _setup(self, model, tokenizer, hparams: HParams, layout: Layout, layers: Mapping[int, LayerState],
               templates: Sequence[str], *, model_fingerprint: str, stats_provenance: Mapping[str, Any] | None = None,
               n_batches: int = 0, n_edits: int = 0, calibration: Sequence[Sequence[int]] | None = None,
               memory: Sequence[Remembered] = (), progress: bool = True) -> None:
        """An editor from its parts (what creation and loading share); the caller checked the model's layers."""
        self.model = model
        self.tokenizer = tokenizer
        self.hparams = hparams.resolved()  # `auto` spelled out: what a saved state holds
        self.layout: Layout = layout
        self.layers: dict[int, LayerState] = dict(layers)
        self.templates = list(templates)
        self.model_fingerprint = model_fingerprint
        self.stats_provenance = dict(stats_provenance or {})
        self.n_batches = n_batches
        self.n_edits = n_edits
        self.progress = progress
        self.calibration = [list(map(int, seq)) for seq in calibration] if calibration else []
        self.memory: list[Remembered] = list(memory)  # the span gate's kept earlier edits (`gate.remember`)
        if hparams.gate == "span":
            if not self.calibration:
                raise ValueError("the span gate needs held-back general text to calibrate on (calibration)")
            for l, st in self.layers.items():
                if st.c0 is None:
                    raise ValueError(f"the span gate needs C0 for layer {l}")
                if st.span is None:
                    st.span = span_gate(st.c0, st.c_accu, hparams.mom2_update_weight, hparams.gate_span_beta,
                                        unedited=n_edits == 0)
        self._hooks = None
        # the calibration text's input to the first edited layer (`calibration_stream`), made at the first batch
        self._calibration_stream: tuple[torch.device, torch.Tensor | None] | None = None

    @classmethod
    def from_statistics(
        cls,
        model,
        tokenizer,
        hparams: HParams,
        c0: Mapping[int, torch.Tensor],
        *,
        templates: Sequence[str] | None = None,
        stats_provenance: Mapping[str, Any] | None = None,
        model_fingerprint: str | None = None,
        calibration: Sequence[Sequence[int]] | None = None,
        progress: bool = True,
    ) -> "Editor":
        """A fresh editor from precomputed C0 per layer (and, optionally, context templates).

        Lets a harness build many fresh editors (single-round evaluation) from
        one set of statistics and templates. The templates must come from this
        unedited model. `calibration` (token ids of held-back general text) is
        what the span gate calibrates on; without it, text sampled from the
        model is used.
        """
        hp = hparams
        layout = detect_layout(model)
        hp.check_model(num_layers(model, layout))
        templates = list(templates) if templates is not None else context_templates(model, tokenizer, hp)
        if hp.gate == "span" and not calibration:
            log.info("gate calibration text: sampled from the model (no statistics corpus given)")
            calibration = calibration_sample(model, tokenizer, samples_corpus(hp.seed), hp.gate_calibration_tokens, 0)
        self = cls.__new__(cls)
        self._setup(model, tokenizer, hp, layout, _fresh_layers(model, layout, hp, c0), templates,
                    model_fingerprint=model_fingerprint or fingerprint(model), stats_provenance=stats_provenance,
                    calibration=calibration if hp.gate == "span" else None, progress=progress)
        return self

    # ------------------------------------------------------------------ applying the edits
    def attach(self) -> "Editor":
        """Make the model answer as edited (validated hooks); the weights stay untouched."""
        self.detach()
        self._hooks = HookLayers(self.model, self.layout, self.layers, layer_mean=self.hparams.gate_layer_mean)
        return self

    def detach(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    @property
    def hooks(self) -> HookLayers | None:
        """The attached hook layers (None when detached)."""
        return self._hooks

    @property
    def attached(self) -> bool:
        return self._hooks is not None

    @contextmanager
    def applied(self) -> Iterator["Editor"]:
        """Temporarily attach the hooks (restores the previous attachment state)."""
        was = self.attached
        self.attach()
        try:
            yield self
        finally:
            if not was:
                self.detach()

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 20) -> list[str]:
        """Greedy continuations with the edits applied."""
        with self.applied():
            return greedy_generate(self.model, self.tokenizer, prompts, max_new_tokens)

    # ------------------------------------------------------------------ editing
    def edit_warnings(self, requests: Iterable[Mapping[str, Any] | Request]) -> list[str]:
        """What may keep a valid request from taking, said before editing (`edit` logs and returns them too).

        A subject that is the first token of its prompt, with no start token before it (the embedded
        model's tokenizer adds none): the key at position 0 depends on that token alone, unlike the
        subject's key in any other context, so the hook neither fits it nor opens on it. Likewise a
        subject whose key at the first edited layer, whitened against general text, carries almost no
        energy (`LOW_CONTEXT_SHARE`; such keys sit where the first tokens of most texts do): the update
        can write little there and the gate cannot tell it from general text.
        """
        return [w for _, w in self.request_warnings(make_requests(requests))]

    def request_warnings(self, batch: Sequence[Request]) -> list[tuple[int, str]]:
        """`edit_warnings` with the index of the request each is about (the calibration may leave those out,
        and an evaluation reports those records apart)."""
        out: list[tuple[int, str]] = []
        rest = []
        for i, r in enumerate(batch):
            if subject_last_index(self.tokenizer, r.prompt, r.subject) == 0:
                out.append((i, f"request {i}: the subject {r.subject!r} is the first token of {r.text!r} and this "
                           "tokenizer puts no start token before it, so the edit will probably not take on that "
                           f"exact prompt; put a word before the subject (e.g. \"The {r.subject} ...\")"))
            else:
                rest.append(i)
        layer = self.hparams.layers[0]
        span = self.layers[layer].span
        if rest and span is not None:  # the whitening L⁻¹ of λC0 (span gate); no hook acts below this key
            size = self.hparams.batch_size  # the CLI asks about every request at once: one batch at a time
            with torch.no_grad():
                energy = torch.cat([whitened_energy(subject_keys(self.model, self.tokenizer, self.layout, layer,
                                                                 [batch[i] for i in rest[j : j + size]], ["{}"]), span)
                                    for j in range(0, len(rest), size)]).tolist()
            mean = span.whiten.shape[0] / self.hparams.mom2_update_weight
            for i, e in zip(rest, energy):
                if e < LOW_CONTEXT_SHARE * mean:
                    r = batch[i]
                    out.append((i, f"request {i}: the subject {r.subject!r} of {r.text!r} has a key at layer {layer} "
                               f"that carries almost no context (kᵀ(λC0)⁻¹k = {e:.2g}, against {mean:.2g} for "
                               "general text on average), so the edit will probably not take on that exact prompt; "
                               "put words before the subject"))
        return sorted(out)

    def edit(self, requests: Iterable[Mapping[str, Any] | Request]) -> dict[str, Any]:
        """One consecutive step: write a batch of facts on top of everything written so far.

        All requests are validated first; the state changes only if the whole
        step succeeds (an error or an interrupt leaves it as it was).
        """
        batch = make_requests(requests)
        self._check_lengths(batch)
        warned = self.request_warnings(batch)
        warnings = [w for _, w in warned]
        for w in warnings:
            log.warning(w)
        start = time.perf_counter()
        hp = self.hparams
        was_attached = self.attached
        self.detach()
        new = {l: s.copy() for l, s in self.layers.items()}
        try:
            with HookLayers(self.model, self.layout, self.layers, check_cache=False,
                            layer_mean=hp.gate_layer_mean) as hooks:
                # 1. target values with the validated hooks (the model as edited so far)
                z = target_values(self.model, self.tokenizer, self.layout, batch, hp, self.templates, progress=self.progress)
                bad = (~torch.isfinite(z).all(dim=1)).nonzero().flatten().tolist()
                if bad:
                    raise EditError(f"the target values of request(s) {_names(batch, bad)} are not finite; "
                                    "nothing was written")
                # 2. temporary hooks everywhere (`write_gate: open`, as the reference), or hooks gated as at
                # inference but open at the subject (`subject`); then write layer by layer
                at_subject = hp.write_gate == "subject"
                for l, s in new.items():
                    hooks.set(l, s, gated=at_subject, open_last=at_subject)

                def apply(layer: int, delta: torch.Tensor, keys: torch.Tensor, accumulate: bool = True) -> None:
                    per = keys.shape[0] // len(batch)  # rows per request (`accumulated_keys: contexts`: one a template)
                    bad_keys = sorted({i // per for i in (~torch.isfinite(keys).all(dim=1)).nonzero().flatten().tolist()})
                    if bad_keys:
                        raise EditError(f"layer {layer}: the keys of request(s) {_names(batch, bad_keys)} are not "
                                        "finite; nothing was written")
                    if not bool(torch.isfinite(delta).all()):
                        raise EditError(f"layer {layer}: the update for this batch is not finite; nothing was written")
                    state = new[layer]
                    state.delta = state.delta + delta.to(state.delta)
                    if accumulate:  # a later round writes the same edits again: their keys are in already
                        state.c_accu = accumulate_keys(state.c_accu, keys)
                        if state.c0 is not None:  # the span gate of the new C_accu: a rank-n update of the old one
                            state.span = (span_gate_added(state.span, keys, hp.gate_span_beta)
                                          if state.span is not None else
                                          span_gate(state.c0, state.c_accu, hp.mom2_update_weight, hp.gate_span_beta))
                    # validated from here on, with the previous batch's α (as the reference)
                    hooks.set(layer, state.copy(), open_last=at_subject)

                # every round solves against the covariance before this batch (`self.layers`), which the
                # first round's solve at a layer sees before its keys join `new`
                for round_ in range(hp.write_rounds):
                    write_layers(
                        self.model, self.tokenizer, self.layout, batch, hp.layers, self.templates, z,
                        solve=lambda l, R, K: solve_update(R, K, weighted_covariance(
                            self.layers[l].c_accu, self.layers[l].c0, hp.mom2_update_weight, hp.key_weight(l))),
                        apply=apply if round_ == 0 else partial(apply, accumulate=False),
                        accumulated=hp.accumulated_keys, fit=hp.fit_keys,
                    )
                # 3. α: span gate — calibrated on held-back general text under the new hooks;
                if hp.gate == "span":
                    device = input_device(self.model)
                    if self._calibration_stream is None or self._calibration_stream[0] != device:
                        self._calibration_stream = (device, calibration_stream(
                            self.model, self.tokenizer, self.layout, self.calibration, hp.layers[0]))
                    alphas = calibrate_span(hooks, self.model, self.tokenizer, self.layout, self.calibration, batch,
                                            hp.gate_false_open, hp.gate_false_open_max, hp.gate_subject_share,
                                            stream=self._calibration_stream[1], memory=self.memory,
                                            skip=() if hp.gate_open_no_context else {i for i, _ in warned})
                    for l, a in alphas.items():
                        new[l].alpha = a
                    memory = remember(self.memory, batch, self.tokenizer, self.n_edits, hp.gate_memory, hp.seed)
            if hp.gate == "reference":
                # reference — adapted on the unedited model's keys of the batch's bare prompts
                scores = batch_gate_maxima(self.model, self.tokenizer, self.layout, [r.text for r in batch],
                                           {l: s.delta for l, s in new.items()})
                for l, s in new.items():
                    s.alpha = adapt_alpha(s.alpha, scores[l])
        except BaseException:
            if was_attached:
                self.attach()
            raise
        self.layers = new
        if hp.gate == "span":
            self.memory = memory
        self.n_batches += 1
        self.n_edits += len(batch)
        if was_attached:
            self.attach()
        seconds = time.perf_counter() - start
        info = {"batch": self.n_batches, "n": len(batch), "seconds": seconds,
                "alpha": {l: s.alpha for l, s in self.layers.items()}, "warnings": warnings,
                "warned": sorted({i for i, _ in warned})}
        log.info("batch %d: %d edits in %.1f s, alpha %s", self.n_batches, len(batch), seconds, info["alpha"])
        return info

    def _check_lengths(self, batch: Sequence[Request]) -> None:
        """Refuse a request whose longest rewriting prompt (context + prompt + target) exceeds the model's positions."""
        limit = next((v for v in (getattr(self.model.config, k, None) for k in
                      ("max_position_embeddings", "n_positions", "n_ctx")) if isinstance(v, int) and v > 0), None)
        if limit is None:
            return
        for i, r in enumerate(batch):
            target = len(encode_target(self.tokenizer, r.target_new))
            longest = max(len(encode_prompt(self.tokenizer, fill_template(t, r).format(r.subject)))
                          for t in self.templates) + target - 1
            if longest > limit:
                raise RequestError(f"request {i}: prompt and target take {longest} tokens with a context template, "
                                   f"more than the model's {limit} positions; shorten the prompt")

    def edit_batches(self, requests: Sequence[Mapping[str, Any] | Request], batch_size: int | None = None) -> list[dict]:
        """Consecutive batches of up to `batch_size` (validated all together before the first); a request that
        gives a prompt of its batch another target starts the next batch and replaces that edit."""
        reqs = make_requests(requests, one_batch=False)
        batches = consecutive_batches(reqs, batch_size or self.hparams.batch_size)
        return [self.edit(reqs[lo:hi]) for lo, hi in tqdm(batches, desc="batches",
                                                         disable=not self.progress or len(batches) < 2)]

    # ------------------------------------------------------------------ state on disk
    def config(self) -> dict[str, Any]:
        """What adapter_config.json says besides the tensors (deterministic: no timestamps)."""
        return {
            "comeba_version": __version__,
            "base_model": {
                "name_or_path": str(getattr(self.model, "name_or_path", "") or ""),
                "fingerprint": self.model_fingerprint,
                "architecture": self.layout.name,
                "model_type": getattr(self.model.config, "model_type", None),
            },
            "gate": self.hparams.gate,
            "n_batches": self.n_batches,
            "n_edits": self.n_edits,
            "hparams": self.hparams.resolved().to_dict(),
        }

    def save_pretrained(self, directory: str | Path, final: bool = False) -> Path:
        """Write the state in one step (the old state stays valid until the new one is complete).

        `final=True` writes only what inference needs (ΔW, α, the gate), not
        the covariances that further editing needs.
        """
        editing = None if final else {"context_templates": self.templates, "statistics": self.stats_provenance}
        modules = {l: self.layout.mlp_out_name(l) for l in self.layers}
        return write_state(directory, self.config(), self.layers, modules, editing, self.calibration, self.memory)

    @classmethod
    def from_pretrained(cls, model, tokenizer, directory: str | Path, progress: bool = True) -> "Editor":
        """Go on editing a saved state, on the model it was made for (any other model is refused)."""
        saved = read_state(directory, editing=True)
        fp = check_base_model(saved, model, directory)
        hp = HParams.from_dict(saved.config["hparams"])
        layout = detect_layout(model)
        hp.check_model(num_layers(model, layout))
        layers = {}
        for l, st in saved.layers.items():
            device = mlp_out_device(model, layout, l)
            if hp.gate == "span" and (st.c0 is None or st.c0.shape != st.c_accu.shape):
                raise StateError(f"editor state in {directory} lacks the span gate's C0 of layer {l}")
            layers[l] = LayerState(st.delta.to(device, torch.float32), st.alpha,
                                   st.span.to(device) if st.span is not None else None,
                                   st.c_accu.to(device, torch.float64), st.c0.to(device) if st.c0 is not None else None)
        if hp.gate == "span" and not saved.calibration:
            raise StateError(f"editor state in {directory} lacks the span gate's calibration text")
        self = cls.__new__(cls)
        self._setup(model, tokenizer, hp, layout, layers, saved.editing["context_templates"], model_fingerprint=fp,
                    stats_provenance=saved.editing.get("statistics"), n_batches=int(saved.config["n_batches"]),
                    n_edits=int(saved.config["n_edits"]), calibration=saved.calibration, memory=saved.memory or (),
                    progress=progress)
        return self


def _fresh_layers(model, layout: Layout, hp: HParams, c0: Mapping[int, torch.Tensor]) -> dict[int, LayerState]:
    """The hook layers before any edit: ΔW = 0, C_accu = λ·C0, each where its projection computes (its layer's
    device in a dispatched model; never the meta device of an offloaded weight)."""
    layers = {}
    for layer in hp.layers:
        w0 = mlp_out_weight(model, layout, layer)
        device = mlp_out_device(model, layout, layer)
        # The span gate keeps C0 in the statistics' own precision, and C_accu starts from that very
        # C0, so that C_accu − λC0 is exactly Σ K Kᵀ.
        base = c0[layer].to(device=device, dtype=getattr(torch, hp.mom2_dtype)) if hp.gate == "span" else None
        layers[layer] = LayerState(
            delta=torch.zeros(w0.shape, dtype=torch.float32, device=device),
            alpha=float(hp.gate_alpha0 if hp.gate == "span" else hp.alpha),
            c_accu=hp.mom2_update_weight * (base if base is not None else c0[layer]).to(device, torch.float64),
            c0=base,
        )
    return layers


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 20) -> list[str]:
    """Greedy continuations, one prompt at a time (no padding to perturb the gate)."""
    device = input_device(model)
    out = []
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=device)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out
