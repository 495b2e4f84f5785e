"""Hook layers: the edited copies of MLP output projections, and their gate.

A hook layer at layer l holds ΔW = W_h − W_0 (float32, never the model's
weight). Attached to the model it adds ΔW·k to the projection's output: a
*temporary* hook everywhere, a *validated* hook only at tokens whose gate
score reaches the layer's threshold α. Two gates:

- ``span`` (the default): a per-token score of how much of the key k lies in
  the span of the edited keys, both whitened against general text (C0):
  h(k) = kᵀ G k / kᵀ (λC0)⁻¹ k with G = (λC0)⁻¹ − C_accu⁻¹, in [0, 1). It needs
  no per-sequence statistics and does not depend on the key's norm, so it
  has the same meaning in a 3-token prompt and a long document. α is
  calibrated after every batch as the (1 − ε) quantile of h over held-back
  general text run through the hooks as at inference, so it rises as well
  as falls. A token's gate depends on its key alone, with or without a KV
  cache.
- ``reference`` (the authors' rule, kept reproducible): the z-score
  z_j = (m_j − mean(m)) / std(m), m_j = ‖ΔW·k_j‖, over the non-padding tokens
  of each sequence seen so far in the current call (so generation with a KV
  cache gates each new token with the statistics of the whole text up to
  it); α is a running minimum of the edited prompts' largest z-scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .models import Layout, get_module


def hook_addition(k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """ΔW·k in float32: what a hook adds to the projection's output (its norm is the gate magnitude m)."""
    return k.to(torch.float32) @ delta.T


@dataclass
class SpanGate:
    """The span gate of one layer: whitening P = L⁻¹ (λC0 = L Lᵀ) and H = (I + S_w)⁻¹ S_w, both float32.

    With w = P k the key whitened against general text and S_w = P (Σ K Kᵀ) Pᵀ
    the accumulated edit keys in the same coordinates, the score
    h(k) = wᵀ H w / wᵀ w = kᵀ G k / kᵀ (λC0)⁻¹ k, G = (λC0)⁻¹ − C_accu⁻¹, is the
    share of the key's whitened energy that lies in the span of the edited
    keys: in [0, 1), independent of the key's norm and of the sequence.
    """

    whiten: torch.Tensor
    span: torch.Tensor

    def to(self, device) -> "SpanGate":
        return SpanGate(self.whiten.to(device=device, dtype=torch.float32),
                        self.span.to(device=device, dtype=torch.float32))


def span_gate(c0: torch.Tensor, c_accu: torch.Tensor, lam: float) -> SpanGate:
    """The span gate of C_accu = λC0 + Σ K Kᵀ, computed in float64 (H is well conditioned: eigenvalues in [0, 1))."""
    c0 = c0.to(torch.float64)
    c_accu = c_accu.to(torch.float64)
    a0 = lam * c0
    eye = torch.eye(a0.shape[0], dtype=torch.float64, device=a0.device)
    chol = _cholesky_with_jitter(a0, eye)
    whiten = torch.linalg.solve_triangular(chol, eye, upper=False)  # L⁻¹
    s_w = whiten @ (c_accu - a0) @ whiten.T
    s_w = 0.5 * (s_w + s_w.T)
    h = torch.cholesky_solve(s_w, torch.linalg.cholesky(eye + s_w))
    h = 0.5 * (h + h.T)
    return SpanGate(whiten.to(torch.float32), h.to(torch.float32))


def _cholesky_with_jitter(a: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of a symmetric PSD matrix; a C0 from little text can be singular, so add the
    smallest ridge (relative to its mean diagonal) that makes it positive definite."""
    chol, info = torch.linalg.cholesky_ex(a)
    scale = float(a.diagonal().mean().clamp(min=1e-30))
    for rel in (1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
        if int(info) == 0:
            return chol
        chol, info = torch.linalg.cholesky_ex(a + rel * scale * eye)
    if int(info) != 0:
        raise ValueError("the key statistics C0 are not positive semi-definite (non-finite values?)")
    return chol


def span_scores(k: torch.Tensor, gate: SpanGate) -> torch.Tensor:
    """h(k) = wᵀ H w / wᵀ w per token (float32, NaN for a zero key): the span gate's score."""
    w = k.to(torch.float32) @ gate.whiten.T
    return ((w @ gate.span) * w).sum(-1) / (w * w).sum(-1)


def calibrated_threshold(scores: torch.Tensor, false_open: float) -> float:
    """The (1 − ε) quantile of general-text scores: the gate then opens on a share ε of such tokens."""
    flat = scores.reshape(-1).to(torch.float64)
    flat = flat[torch.isfinite(flat)]
    if flat.numel() == 0:
        raise ValueError("no finite gate scores to calibrate on")
    return float(torch.quantile(flat, 1.0 - false_open))


def span_threshold(scores: torch.Tensor, general_rows: int, subjects: Sequence[tuple[int, int]],
                   false_open: float, false_open_max: float) -> float:
    """The span gate's α from one calibration pass: rows [0, general_rows) are held-back general text,
    `subjects` the (row, position) of this batch's edited subjects in the rows after them.

    α is the (1 − ε) quantile of the general text, lowered just enough that
    every subject of the batch opens the gate, but never below the
    (1 − ε_max) quantile: a batch's own edits act, and general text still
    opens the gate on at most a share ε_max of its tokens.
    """
    general = scores[:general_rows]
    alpha = calibrated_threshold(general, false_open)
    if subjects:
        rows = torch.tensor([r for r, _ in subjects], device=scores.device)
        cols = torch.tensor([c for _, c in subjects], device=scores.device)
        need = scores[rows, cols].to(torch.float64)
        need = need[torch.isfinite(need)]
        if need.numel():
            alpha = max(calibrated_threshold(general, false_open_max), min(alpha, float(need.min())))
    return alpha


def gate_scores(m: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """z-scores of per-token magnitudes `m` (B, T) within each sequence, padding excluded.

    Non-valid positions and sequences with fewer than two tokens get NaN.
    """
    stats = RunningStats.zeros(m.shape[0], m.device)
    return stats.update(m, mask)


@dataclass
class RunningStats:
    """Per-sequence count, sum and sum of squares of gate magnitudes (float64)."""

    n: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor

    @classmethod
    def zeros(cls, batch: int, device: torch.device) -> "RunningStats":
        z = torch.zeros(batch, dtype=torch.float64, device=device)
        return cls(z.clone(), z.clone(), z.clone())

    def update(self, m: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Add this chunk's valid tokens, then return their z-scores (NaN elsewhere)."""
        valid = mask.to(torch.bool)
        m64 = m.to(torch.float64)
        w = valid.to(torch.float64)
        self.n = self.n + w.sum(1)
        self.s1 = self.s1 + (m64 * w).sum(1)
        self.s2 = self.s2 + (m64 * m64 * w).sum(1)
        mean = self.s1 / self.n.clamp(min=1)
        var = (self.s2 - self.n * mean * mean) / (self.n - 1)
        std = var.clamp(min=0).sqrt()
        std = torch.where(self.n > 1, std, torch.full_like(std, math.nan))
        z = (m64 - mean[:, None]) / std[:, None]
        return torch.where(valid, z, torch.full_like(z, math.nan))


@dataclass
class HookWeights:
    """What one hook layer adds: ΔW (float32, d_out × d_in), its threshold α, and whether it is gated.

    `span` is the layer's span gate; None selects the reference z-score gate. With the span gate, `alpha=None` calibrates α on the call
    itself (`HookLayers.calibrate`).
    """

    delta: torch.Tensor
    alpha: float | None
    gated: bool = True
    span: SpanGate | None = None


@dataclass
class _CallState:
    mask: torch.Tensor | None = None
    running: dict[int, RunningStats] = field(default_factory=dict)


@dataclass
class GateRecord:
    """What a validated hook decided in the last call: the gate (B, T) and the scores behind it."""

    gate: torch.Tensor
    scores: torch.Tensor
    alpha: float


class HookLayers:
    """Forward hooks that make a model behave as edited, without touching its weights.

    Use as a context manager or call `remove()`. `set(layer, weights)` switches
    a layer between temporary (ungated) and validated (gated) or changes ΔW.
    """

    def __init__(self, model: torch.nn.Module, layout: Layout, layers: dict[int, HookWeights] | None = None):
        self.model = model
        self.layout = layout
        self.weights: dict[int, HookWeights] = {}
        self._cast: dict[int, torch.Tensor] = {}
        self._span: dict[int, SpanGate] = {}
        self._rule: Callable[[torch.Tensor], float] | None = None
        self.records: dict[int, GateRecord] | None = None
        self._handles: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._state = _CallState()
        # The module that runs the decoder layers sees every call, also model.forward() or
        # a wrapper's direct call of the base model, so per-call state resets there.
        base = get_module(model, layout.layers.rsplit(".", 1)[0])
        self._top = base.register_forward_pre_hook(self._on_call, with_kwargs=True)
        for layer, w in (layers or {}).items():
            self.set(layer, w)

    # -- lifecycle
    def __enter__(self) -> "HookLayers":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self._top.remove()

    def set(self, layer: int, weights: HookWeights) -> None:
        module = get_module(self.model, self.layout.mlp_out_name(layer))
        self.weights[layer] = weights
        # A working copy on the model's device; the stored ΔW is never cast in place.
        self._cast[layer] = weights.delta.detach().to(device=module.weight.device, dtype=torch.float32)
        if weights.span is not None:
            self._span[layer] = weights.span.to(module.weight.device)
        else:
            self._span.pop(layer, None)
        if weights.alpha is None and (weights.span is None or not weights.gated):
            raise ValueError("only a gated span hook can calibrate its threshold (alpha=None)")
        if layer not in self._handles:
            self._handles[layer] = module.register_forward_hook(
                lambda mod, args, out, layer=layer: self._on_output(layer, args, out)
            )

    def record(self, on: bool = True) -> None:
        """Keep each validated hook's gate and scores of the last call in `records` (diagnostics)."""
        self.records = {} if on else None

    @torch.no_grad()
    def calibrate(self, run: Callable[[], object], rule: Callable[[torch.Tensor], float]) -> dict[int, float]:
        """Set each span-gated layer's α to `rule(scores)` of its scores (B, T; NaN at padding) in `run()`.

        `run` makes one forward pass (one batch, so that every layer's α is
        known before the next layer runs): layer by layer the α is taken from
        that layer's scores and then applied, so deeper layers are calibrated
        on keys as inference will see them (`span_threshold` is the rule).
        """
        layers = [l for l, w in self.weights.items() if w.gated and w.span is not None]
        for l in layers:
            self.weights[l] = HookWeights(self.weights[l].delta, None, True, self.weights[l].span)
        self._rule = rule
        self.records = {}
        try:
            run()
        finally:
            records, self.records, self._rule = self.records, None, None
        out = {}
        for l in layers:
            if l not in records:
                raise RuntimeError(f"calibration pass did not reach layer {l}")
            out[l] = records[l].alpha
            self.weights[l] = HookWeights(self.weights[l].delta, out[l], True, self.weights[l].span)
        return out

    # -- hooks
    def _on_call(self, module, args, kwargs):
        """Pre-hook on the base model: remember the attention mask; new sequences reset the gate statistics."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        past = _cache_length(cache)
        if ids is not None:
            batch, length = ids.shape[0], ids.shape[1]
        else:
            batch, length = None, None
        if mask is not None and mask.dim() == 2 and length is not None:
            self._state.mask = mask[:, -length:]
        else:
            self._state.mask = None
        if past == 0 or any(r.n.shape[0] != batch for r in self._state.running.values()):
            self._state.running = {}
        return None

    def _on_output(self, layer: int, args, out: torch.Tensor) -> torch.Tensor:
        k = args[0]
        delta = self._cast[layer]
        add = hook_addition(k, delta)
        weights = self.weights[layer]
        if not weights.gated:
            return out + add.to(out.dtype)
        flat = k.dim() == 2
        mask = self._state.mask
        shape = k.shape[:-1] if not flat else (1, k.shape[0])
        if mask is None or tuple(mask.shape) != tuple(shape):
            mask = torch.ones(shape, dtype=torch.bool, device=k.device)
        mask = mask.to(torch.bool)
        if layer in self._span:
            z = span_scores(k, self._span[layer])
            if flat:
                z = z[None]
            z = torch.where(mask, z, torch.full_like(z, math.nan))
            alpha = weights.alpha
            if alpha is None:  # calibration pass: α from this call's own scores
                if self._rule is None:
                    raise RuntimeError(f"layer {layer}: a threshold to calibrate (alpha=None) outside calibrate()")
                alpha = self._rule(z)
        else:
            m = add.norm(dim=-1)
            if flat:
                m = m[None]
            running = self._state.running.get(layer)
            if running is None:
                running = RunningStats.zeros(m.shape[0], m.device)
                self._state.running[layer] = running
            z = running.update(m, mask)
            alpha = weights.alpha
        gate = torch.nan_to_num(z.to(torch.float64), nan=-math.inf) >= alpha
        if self.records is not None:
            self.records[layer] = GateRecord(gate.detach(), z.detach(), float(alpha))
        if flat:
            gate = gate[0]
        return torch.where(gate[..., None], out + add.to(out.dtype), out)


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuple-of-tuples cache
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0
