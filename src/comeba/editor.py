"""The consecutive batch editor (COMEBA-HK) and its saved state.

The state is of fixed size whatever the number of edits: per edited layer
ΔW = W_h − W_0, C_accu = λ·C0 + Σ_past K Kᵀ and the gate threshold α. It is
saved like a PEFT adapter — a small JSON config and a safetensors file —
and the base model's weights are never modified.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import __version__
from .compute import accumulate_keys, context_templates, fill_template, solve_update, write_layers
from .files import atomic_save_tensors, atomic_write_text, sha256_file, writer_lock
from .hooks import HookLayers, HookWeights, SpanGate, gate_scores, hook_addition, span_gate, span_threshold
from .hparams import HParams
from .models import Layout, detect_layout, fingerprint, mlp_out_weight, num_layers
from .requests import Request, RequestError, make_requests
from .stats import Corpus, calibration_sample, default_corpus, load_or_compute_stats, samples_corpus
from .text import encode_prompt, encode_target, model_device, pad_batch, subject_last_index
from .trace import trace
from .values import target_values

log = logging.getLogger(__name__)

CONFIG_FILE = "comeba_config.json"
FORMAT = "comeba-hook-layers"
FORMAT_VERSION = 1


class StateError(ValueError):
    """A saved editor state that cannot be used with this model."""


class EditError(ValueError):
    """A batch that cannot be written (a non-finite value or an ill-posed solve); the state is unchanged."""


def _names(batch: Sequence[Request], rows) -> str:
    return ", ".join(f"#{i} ({batch[i].subject!r} → {batch[i].target_new.strip()!r})" for i in rows)


@dataclass
class LayerState:
    """One hook layer: ΔW (float32, d_out × d_in), C_accu (float64, d_in × d_in), α.

    The span gate also keeps C0 (fixed, in the statistics' dtype) and the gate derived from C0
    and C_accu (recomputed, never saved).
    """

    delta: torch.Tensor
    c_accu: torch.Tensor
    alpha: float
    c0: torch.Tensor | None = None
    span: SpanGate | None = None

    def copy(self) -> "LayerState":
        """A shallow copy: a batch replaces ΔW and C_accu with new tensors and never writes into them, so
        the previous state stays intact for a rollback without copying C_accu (gigabytes for a 7B model)."""
        return LayerState(self.delta, self.c_accu, self.alpha, self.c0, self.span)


class Editor:
    """Writes batches of facts into hook layers, one consecutive step per `edit` call.

    Create with `Editor.create` (computes or loads the key statistics) or
    `Editor.load`; apply the edits with `attach()` / `with editor.applied():`.
    """

    def __init__(
        self,
        model,
        tokenizer,
        hparams: HParams,
        layers: Mapping[int, LayerState],
        templates: Sequence[str],
        *,
        model_fingerprint: str,
        stats_provenance: Mapping[str, Any] | None = None,
        n_batches: int = 0,
        n_edits: int = 0,
        calibration: Sequence[Sequence[int]] | None = None,
        progress: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.hparams = hparams
        self.layout: Layout = detect_layout(model)
        hparams.check_model(num_layers(model, self.layout))
        self.layers: dict[int, LayerState] = dict(layers)
        self.templates = list(templates)
        self.model_fingerprint = model_fingerprint
        self.stats_provenance = dict(stats_provenance or {})
        self.n_batches = n_batches
        self.n_edits = n_edits
        self.progress = progress
        self.calibration = [list(map(int, seq)) for seq in calibration] if calibration else []
        if hparams.gate == "span":
            if not self.calibration:
                raise ValueError("the span gate needs held-back general text to calibrate on (calibration)")
            for l, s in self.layers.items():
                if s.c0 is None:
                    raise ValueError(f"the span gate needs C0 for layer {l}")
                if s.span is None:
                    s.span = span_gate(s.c0, s.c_accu, hparams.mom2_update_weight)
        self._hooks: HookLayers | None = None

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        model,
        tokenizer,
        hparams: HParams | None = None,
        corpus: Corpus | None = None,
        progress: bool = True,
    ) -> "Editor":
        """A fresh editor: C_accu = λ·C0 from the (cached) key statistics, ΔW = 0, α = α₀."""
        hp = hparams or HParams()
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
        return cls.from_statistics(model, tokenizer, hp, c0, stats_provenance=provenance, model_fingerprint=fp,
                                   calibration=calibration, progress=progress)

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

        What `create` does after loading the statistics; lets a harness build
        many fresh editors (single-round evaluation) from one set of statistics
        and templates. The templates must come from this unedited model.
        `calibration` (token ids of held-back general text) is what the span
        gate calibrates on; without it, text sampled from the model is used.
        """
        hp = hparams
        layout = detect_layout(model)
        hp.check_model(num_layers(model, layout))
        fp = model_fingerprint or fingerprint(model)
        layers = {}
        for layer in hp.layers:
            w0 = mlp_out_weight(model, layout, layer)
            # The span gate keeps C0 in the statistics' own precision, and C_accu starts from that very
            # C0, so that C_accu − λC0 is exactly Σ K Kᵀ.
            base = c0[layer].to(device=w0.device, dtype=getattr(torch, hp.mom2_dtype)) if hp.gate == "span" else None
            layers[layer] = LayerState(
                delta=torch.zeros(w0.shape, dtype=torch.float32, device=w0.device),
                c_accu=hp.mom2_update_weight * (base if base is not None else c0[layer]).to(w0.device, torch.float64),
                alpha=float(hp.gate_alpha0 if hp.gate == "span" else hp.alpha),
                c0=base,
            )
        templates = list(templates) if templates is not None else context_templates(model, tokenizer, hp)
        if hp.gate == "span" and not calibration:
            log.info("gate calibration text: sampled from the model (no statistics corpus given)")
            calibration = calibration_sample(model, tokenizer, samples_corpus(hp.seed), hp.gate_calibration_tokens, 0)
        return cls(model, tokenizer, hp, layers, templates, model_fingerprint=fp,
                   stats_provenance=stats_provenance, calibration=calibration if hp.gate == "span" else None,
                   progress=progress)

    # ------------------------------------------------------------------ applying the edits
    def hook_weights(self, gated: bool = True) -> dict[int, HookWeights]:
        return {l: HookWeights(s.delta, s.alpha, gated, s.span) for l, s in self.layers.items()}

    def attach(self) -> "Editor":
        """Make the model answer as edited (validated hooks); the weights stay untouched."""
        self.detach()
        self._hooks = HookLayers(self.model, self.layout, self.hook_weights())
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
    def edit(self, requests: Iterable[Mapping[str, Any] | Request]) -> dict[str, Any]:
        """One consecutive step: write a batch of facts on top of everything written so far.

        All requests are validated first; the state changes only if the whole
        step succeeds (an error or an interrupt leaves it as it was).
        """
        batch = make_requests(requests)
        self._check_lengths(batch)
        start = time.perf_counter()
        hp = self.hparams
        was_attached = self.attached
        self.detach()
        new = {l: s.copy() for l, s in self.layers.items()}
        try:
            with HookLayers(self.model, self.layout, self.hook_weights(gated=True)) as hooks:
                # 1. target values with the validated hooks (the model as edited so far)
                z = target_values(self.model, self.tokenizer, self.layout, batch, hp, self.templates, progress=self.progress)
                bad = (~torch.isfinite(z).all(dim=1)).nonzero().flatten().tolist()
                if bad:
                    raise EditError(f"the target values of request(s) {_names(batch, bad)} are not finite; "
                                    "nothing was written")
                # 2. temporary hooks everywhere, then write layer by layer
                for l, s in new.items():
                    hooks.set(l, HookWeights(s.delta, s.alpha, gated=False))

                def apply(layer: int, delta: torch.Tensor, keys: torch.Tensor) -> None:
                    bad_keys = (~torch.isfinite(keys).all(dim=1)).nonzero().flatten().tolist()
                    if bad_keys:
                        raise EditError(f"layer {layer}: the keys of request(s) {_names(batch, bad_keys)} are not "
                                        "finite; nothing was written")
                    if not bool(torch.isfinite(delta).all()):
                        raise EditError(f"layer {layer}: the update for this batch is not finite; nothing was written")
                    state = new[layer]
                    state.delta = state.delta + delta.to(state.delta)
                    state.c_accu = accumulate_keys(state.c_accu, keys)
                    if state.c0 is not None:
                        state.span = span_gate(state.c0, state.c_accu, hp.mom2_update_weight)
                    # validated from here on, with the previous batch's α (as the reference)
                    hooks.set(layer, HookWeights(state.delta, state.alpha, True, state.span))

                write_layers(
                    self.model, self.tokenizer, self.layout, batch, hp.layers, self.templates, z,
                    solve=lambda l, R, K: solve_update(R, K, new[l].c_accu), apply=apply,
                )
                # 3. α: span gate — calibrated on held-back general text under the new hooks;
                if hp.gate == "span":
                    alphas = self._calibrate(hooks, batch)
                    for l, a in alphas.items():
                        new[l].alpha = a
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
        self.n_batches += 1
        self.n_edits += len(batch)
        if was_attached:
            self.attach()
        seconds = time.perf_counter() - start
        info = {"batch": self.n_batches, "n": len(batch), "seconds": seconds,
                "alpha": {l: s.alpha for l, s in self.layers.items()}}
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

    @torch.no_grad()
    def _calibrate(self, hooks: HookLayers, batch: Sequence[Request]) -> dict[int, float]:
        """The span gate's α per layer: one pass over the held-back general text and the batch's bare prompts."""
        hp = self.hparams
        prompts = [encode_prompt(self.tokenizer, r.text) for r in batch]
        subjects = [(len(self.calibration) + i, subject_last_index(self.tokenizer, r.prompt, r.subject))
                    for i, r in enumerate(batch)]
        ids, mask = pad_batch(self.calibration + prompts, self.tokenizer.pad_token_id, model_device(self.model))
        last = self.layout.mlp_out_name(max(self.layers))

        def run() -> None:
            with trace(self.model, [last], stop_after=last):
                self.model(input_ids=ids, attention_mask=mask)

        return hooks.calibrate(run, lambda z: span_threshold(z, len(self.calibration), subjects, hp.gate_false_open,
                                                             hp.gate_false_open_max))

    def edit_batches(self, requests: Sequence[Mapping[str, Any] | Request], batch_size: int | None = None) -> list[dict]:
        """Consecutive batches of `batch_size` (validated all together before the first)."""
        reqs = make_requests(requests)
        size = batch_size or self.hparams.batch_size
        if size < 1:
            raise ValueError(f"batch size must be positive, got {size}")
        infos = []
        for start in tqdm(range(0, len(reqs), size), desc="batches", disable=not self.progress or len(reqs) <= size):
            infos.append(self.edit(reqs[start : start + size]))
        return infos

    # ------------------------------------------------------------------ state on disk
    def config(self, tensor_file: str) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "comeba_version": __version__,
            "base_model": {
                "name_or_path": str(getattr(self.model, "name_or_path", "") or ""),
                "fingerprint": self.model_fingerprint,
                "architecture": self.layout.name,
                "model_type": getattr(self.model.config, "model_type", None),
            },
            "layers": list(self.hparams.layers),
            "alpha": {str(l): s.alpha for l, s in self.layers.items()},
            "n_batches": self.n_batches,
            "n_edits": self.n_edits,
            "hparams": self.hparams.to_dict(),
            "context_templates": self.templates,
            "statistics": self.stats_provenance,
            "tensors": tensor_file,
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def save(self, directory: str | Path) -> Path:
        """Write the state atomically: the old state stays valid until the new one is complete."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with writer_lock(directory):
            return self._save_locked(directory)

    def _save_locked(self, directory: Path) -> Path:
        tensor_file = f"state-{uuid.uuid4().hex[:12]}.safetensors"
        tensors = {}
        for l, s in self.layers.items():
            tensors[f"delta.{l}"] = s.delta.detach().cpu().contiguous()
            tensors[f"c_accu.{l}"] = s.c_accu.detach().cpu().contiguous()
            if s.c0 is not None:
                tensors[f"c0.{l}"] = s.c0.detach().cpu().contiguous()
        if self.calibration:
            ids, mask = pad_batch(self.calibration, 0)
            tensors["calibration.ids"] = ids
            tensors["calibration.lengths"] = mask.sum(1)
        atomic_save_tensors(directory / tensor_file, tensors)
        config = self.config(tensor_file)
        config["tensors_sha256"] = sha256_file(directory / tensor_file)
        atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2))
        for old in directory.glob("state-*.safetensors"):  # a reader that has them open keeps reading them
            if old.name != tensor_file:
                old.unlink(missing_ok=True)
        return directory

    @classmethod
    def load(cls, directory: str | Path, model, tokenizer, progress: bool = True) -> "Editor":
        """Resume a saved state onto a fresh copy of its base model (refuses any other model)."""
        directory = Path(directory)
        name = None
        for attempt in range(3):  # a writer may replace the state between reading its config and its tensors
            try:
                config = read_config(directory)
                name = config["tensors"]
                tensors = _read_tensors(directory, config)
                break
            except (StateError, FileNotFoundError) as err:
                try:
                    now = json.loads((directory / CONFIG_FILE).read_text()).get("tensors")
                except (OSError, ValueError, AttributeError):
                    now = None
                if now is None or now == name or attempt == 2:  # not a replaced state: a real error
                    if isinstance(err, FileNotFoundError):
                        raise StateError(f"{directory}: tensor file {name!r} named in {CONFIG_FILE} is missing") from None
                    raise
                name = now
        fp = fingerprint(model)
        base = config["base_model"]
        if base.get("fingerprint") != fp:
            raise StateError(
                f"the editor state in {directory} was made for base model {base.get('name_or_path')!r} "
                f"(fingerprint {base.get('fingerprint')}), but the given model "
                f"{getattr(model, 'name_or_path', '?')!r} has fingerprint {fp}: load the state onto the model it was made for, "
                "in the dtype it was made in"
            )
        # States saved before the span gate existed used the reference gate.
        hp = HParams.from_dict({"gate": "reference", **config["hparams"]})
        layout = detect_layout(model)
        layers = {}
        for l in hp.layers:
            w0 = mlp_out_weight(model, layout, l)
            try:
                delta, c_accu = tensors[f"delta.{l}"], tensors[f"c_accu.{l}"]
            except KeyError as err:
                raise StateError(f"editor state in {directory} lacks tensor {err}") from None
            if tuple(delta.shape) != tuple(w0.shape) or c_accu.shape != (w0.shape[1], w0.shape[1]):
                raise StateError(f"editor state in {directory}: layer {l} tensors do not match the model's shapes")
            c0 = tensors.get(f"c0.{l}")
            if hp.gate == "span" and (c0 is None or c0.shape != c_accu.shape):
                raise StateError(f"editor state in {directory} lacks the span gate's C0 of layer {l}")
            for what, t in (("ΔW", delta), ("C_accu", c_accu), ("C0", c0)):
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise StateError(f"editor state in {directory} is damaged: {what} of layer {l} holds NaN or "
                                     "infinite values; it was not loaded")
            layers[l] = LayerState(delta.to(w0.device, torch.float32), c_accu.to(w0.device, torch.float64),
                                   float(config["alpha"][str(l)]),
                                   c0=c0.to(w0.device) if hp.gate == "span" else None)
        calibration = None
        if hp.gate == "span":
            if "calibration.ids" not in tensors:
                raise StateError(f"editor state in {directory} lacks the span gate's calibration text")
            ids, lengths = tensors["calibration.ids"], tensors["calibration.lengths"]
            calibration = [row[: int(n)].tolist() for row, n in zip(ids, lengths)]
        return cls(model, tokenizer, hp, layers, config["context_templates"], model_fingerprint=fp,
                   stats_provenance=config.get("statistics"), n_batches=int(config["n_batches"]),
                   n_edits=int(config["n_edits"]), calibration=calibration, progress=progress)


def _read_tensors(directory: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state's tensors, verified against the digest recorded at save time (states saved before digests
    were recorded are only checked for readability)."""
    path = directory / config["tensors"]
    if not path.is_file():
        raise FileNotFoundError(path)
    expected = config.get("tensors_sha256")
    if expected is not None and sha256_file(path) != expected:
        raise StateError(f"editor state in {directory} is damaged: {path.name} does not match the checksum "
                         f"recorded when it was saved; it was not loaded")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise StateError(f"editor state in {directory}: {path.name} cannot be read (truncated or damaged: "
                         f"{_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def read_config(directory: str | Path) -> dict[str, Any]:
    """The saved config, with errors that say what is wrong with the folder."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise StateError(f"{directory} holds no comeba editor state ({CONFIG_FILE} missing)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StateError(f"{path} is not valid JSON: {err}") from None
    if config.get("format") != FORMAT:
        raise StateError(f"{path} is not a comeba editor state (format {config.get('format')!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise StateError(f"{path} has format version {config.get('format_version')}, this comeba reads {FORMAT_VERSION}")
    if not (Path(directory) / config.get("tensors", "")).is_file():
        raise StateError(f"{directory}: tensor file {config.get('tensors')!r} named in {CONFIG_FILE} is missing")
    return config


# ---------------------------------------------------------------------------- α and generation


@torch.no_grad()
def batch_gate_maxima(model, tokenizer, layout: Layout, prompts: Sequence[str],
                      deltas: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per layer, each prompt's largest gate score under ΔW, keys from the model as it runs (no hooks)."""
    device = model_device(model)
    ids, mask = pad_batch([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id, device)
    names = {l: layout.mlp_out_name(l) for l in deltas}
    last = names[max(deltas)]
    with trace(model, list(names.values()), inputs=True, stop_after=last) as rec:
        model(input_ids=ids, attention_mask=mask)
    out = {}
    for l, name in names.items():
        m = hook_addition(rec[name].input, deltas[l].to(device, torch.float32)).norm(dim=-1)
        z = gate_scores(m, mask)
        out[l] = torch.nan_to_num(z, nan=-math.inf).max(dim=1).values
    return out


def adapt_alpha(alpha: float, prompt_maxima: torch.Tensor) -> float:
    """α = min(α, min over prompts of their max gate score); never increases, ignores non-finite scores."""
    finite = prompt_maxima[torch.isfinite(prompt_maxima)]
    if finite.numel() == 0:
        return alpha
    return min(alpha, float(finite.min()))


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 20) -> list[str]:
    """Greedy continuations, one prompt at a time (no padding to perturb the gate)."""
    device = model_device(model)
    out = []
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=device)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out
