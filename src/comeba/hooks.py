"""Hook layers: the edited copies of MLP output projections, attached to a model as forward hooks.

A hook layer at layer l holds ΔW = W_h − W_0 (float32, never the model's
weight). Attached to the model it adds ΔW·k to the projection's output: a
*temporary* hook everywhere, a *validated* hook only at tokens the layer's
gate opens (comeba.gate: the span gate, or the authors' z-score gate). See
docs/method.md.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from .gate import RunningStats, SpanGate, hook_addition, span_scores
from .models import Layout, get_module, module_device


@dataclass
class LayerState:
    """One hook layer: ΔW (float32, d_out × d_in), its threshold α and its span gate (None: the reference
    z-score gate). An editor also keeps C_accu = λC0 + Σ K Kᵀ (float64) and C0, which inference does not need.

    With the span gate, `alpha=None` calibrates α on the call itself (`HookLayers.calibrate`).
    """

    delta: torch.Tensor
    alpha: float | None
    span: SpanGate | None = None
    c_accu: torch.Tensor | None = None
    c0: torch.Tensor | None = None

    def copy(self) -> "LayerState":
        """A shallow copy: a batch replaces ΔW and C_accu with new tensors and never writes into them, so
        the previous state stays intact for a rollback without copying C_accu (gigabytes for a 7B model)."""
        return dataclasses.replace(self)

    def for_inference(self) -> "LayerState":
        """What the hooks need: ΔW, α and the gate (no covariances)."""
        return LayerState(self.delta, self.alpha, self.span)


@dataclass
class _CallState:
    """What one thread's current forward call needs across layers: its mask, and for the reference gate the
    running statistics of the sequences and how many positions they cover (to check a KV cache against)."""

    mask: torch.Tensor | None = None
    running: dict[int, RunningStats] = field(default_factory=dict)
    seen: int = 0
    span_sum: torch.Tensor | None = None  # the span scores of this call's tokens at the layers run so far
    span_count: int = 0


@dataclass
class GateRecord:
    """What a validated hook decided in the last call: the gate (B, T) and the scores behind it."""

    gate: torch.Tensor
    scores: torch.Tensor
    alpha: float


class HookLayers:
    """Forward hooks that make a model behave as edited, without touching its weights.

    Use as a context manager or call `remove()`. `set(layer, state, gated)`
    switches a layer between temporary (ungated) and validated (gated) or changes ΔW;
    `open_last=True` gates it as validated but always open at each sequence's
    last position (the editor's write: the subject's last token, which the
    batch's own calibration will open).
    `check_cache=False` lets the reference gate continue a KV cache it did not
    fill, with the statistics it has (the editor's value optimisation runs
    suffixes on a cropped prefix cache). `layer_mean=True` gates each span
    layer on the mean of the token's span scores at the gated span layers run
    so far in the call (`gate_layer_mean`).
    """

    def __init__(self, model: torch.nn.Module, layout: Layout, layers: dict[int, LayerState] | None = None,
                 gated: bool = True, check_cache: bool = True, layer_mean: bool = False):
        self.model = model
        self.check_cache = check_cache
        self.layer_mean = layer_mean
        self.layout = layout
        self.weights: dict[int, LayerState] = {}
        self.gated: dict[int, bool] = {}
        self.open_last: dict[int, bool] = {}
        self._cast: dict[int, torch.Tensor] = {}
        self._span: dict[int, SpanGate] = {}
        self._rule: Callable[[torch.Tensor], float] | None = None
        self.records: dict[int, GateRecord] | None = None
        self._handles: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._local = threading.local()  # concurrent calls from several threads each get their own call state
        # The module that runs the decoder layers sees every call, also model.forward() or
        # a wrapper's direct call of the base model, so per-call state resets there.
        base = get_module(model, layout.layers.rsplit(".", 1)[0])
        self._top = base.register_forward_pre_hook(self._on_call, with_kwargs=True)
        self._top_out = base.register_forward_hook(self._on_return)
        for layer, state in (layers or {}).items():
            self.set(layer, state, gated)

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
        self._top_out.remove()

    def set(self, layer: int, weights: LayerState, gated: bool = True, open_last: bool = False) -> None:
        name = self.layout.mlp_out_name(layer)
        module = get_module(self.model, name)
        # Where the projection computes: its weight's device, or with a model dispatched by accelerate the
        # hook's execution device (an offloaded weight waits on the meta device between calls).
        device = module_device(self.model, name)
        self.weights[layer] = weights
        self.gated[layer] = gated
        self.open_last[layer] = open_last and gated
        # A working copy on the projection's device; the stored ΔW is never cast in place.
        self._cast[layer] = weights.delta.detach().to(device=device, dtype=torch.float32)
        if weights.span is not None:
            self._span[layer] = weights.span.to(device)
        else:
            self._span.pop(layer, None)
        if weights.alpha is None and (weights.span is None or not gated):
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
        layers = [l for l, w in self.weights.items() if self.gated[l] and w.span is not None]
        for l in layers:
            self.weights[l] = dataclasses.replace(self.weights[l], alpha=None)
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
            self.weights[l] = dataclasses.replace(self.weights[l], alpha=out[l])
        return out

    # -- hooks
    @property
    def _state(self) -> _CallState:
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = _CallState()
        return state

    def _on_call(self, module, args, kwargs):
        """Pre-hook on the base model: remember the attention mask; new sequences reset the gate statistics.

        The reference gate's z-scores need every earlier token of the sequence: a KV cache that these hooks
        did not fill (pre-filled by the caller, or cropped) is refused, and when beam search reorders the
        cache's rows the statistics are reordered with them. The span gate needs neither: a token's gate
        depends on its key alone.
        """
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
        state = self._state
        state.mask = mask[:, -length:] if mask is not None and mask.dim() == 2 and length is not None else None
        state.span_sum, state.span_count = None, 0
        if past == 0 or any(r.n.shape[0] != batch for r in state.running.values()):
            state.running, state.seen = {}, 0
        if self.check_cache and past != state.seen and any(self.gated[l] and l not in self._span for l in self.weights):
            seen, state.running, state.seen = state.seen, {}, 0
            raise RuntimeError(
                f"the reference gate has seen {seen} of the {past} cached positions of this call: its "
                "z-scores need the whole text run through the edited model (a KV cache filled without the hooks, "
                "or cropped, cannot be continued); run the full text, or use the span gate (gate: span)")
        state.seen = past + (length or 0)
        self._follow_reorders(cache)
        return None

    def _on_return(self, module, args, out) -> None:
        """Post-hook on the base model: a cache it created is followed too (it may be reordered before the next
        call)."""
        for name in ("past_key_values", "cache"):
            self._follow_reorders(getattr(out, name, None))

    def _follow_reorders(self, cache) -> None:
        """Make `cache.reorder_cache(beam_idx)` (beam search) reorder the calling thread's gate statistics too."""
        if cache is None or not hasattr(cache, "reorder_cache") or getattr(cache, "_comeba_hooks", None) is self:
            return
        cache._comeba_hooks = self
        cache.reorder_cache = _ReorderFollowingHooks(cache)

    def _mean_over_layers(self, z: torch.Tensor) -> torch.Tensor:
        """The mean of this token's span scores at the gated span layers run so far in this call, this one
        included: an edited subject scores high at every layer, general text rarely at all of them."""
        state = self._state
        if state.span_sum is not None and tuple(state.span_sum.shape) == tuple(z.shape):
            total = state.span_sum.to(z.device) + z
        else:
            total, state.span_count = z, 0
        state.span_sum, state.span_count = total, state.span_count + 1
        return total / state.span_count

    def __deepcopy__(self, memo) -> "HookLayers":
        """Hooks belong to one model: a copy of something that refers to them (a cache) refers to the same."""
        return self

    def _on_output(self, layer: int, args, out: torch.Tensor) -> torch.Tensor:
        """The hook's output in float32 even under an autocast region: the gate's scores and ΔW·k must not
        depend on the precision the caller runs the model in."""
        device_type = args[0].device.type
        if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self._hooked_output(layer, args, out)
        return self._hooked_output(layer, args, out)

    def _hooked_output(self, layer: int, args, out: torch.Tensor) -> torch.Tensor:
        k = args[0]
        delta = self._cast[layer]
        weights = self.weights[layer]
        if not self.gated[layer]:
            return out + hook_addition(k, delta).to(out.dtype)
        flat = k.dim() == 2
        mask = self._state.mask
        shape = k.shape[:-1] if not flat else (1, k.shape[0])
        if mask is None or tuple(mask.shape) != tuple(shape):
            mask = torch.ones(shape, dtype=torch.bool, device=k.device)
        mask = mask.to(device=k.device, dtype=torch.bool)  # the layer may be on another device than the input
        if layer in self._span:
            z = span_scores(k, self._span[layer], mask if not flat else mask[0])
            if flat:
                z = z[None]
            if self.layer_mean:
                z = self._mean_over_layers(z)
            alpha = weights.alpha
            if alpha is None:  # calibration pass: α from this call's own scores
                if self._rule is None:
                    raise RuntimeError(f"layer {layer}: a threshold to calibrate (alpha=None) outside calibrate()")
                alpha = self._rule(z)
        else:
            add = hook_addition(k, delta)
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
        if self.open_last[layer]:
            gate[:, -1] = True  # `gate` is this call's own tensor
        if self.records is not None:
            self.records[layer] = GateRecord(gate.detach(), z.detach(), float(alpha))
        if flat:
            gate = gate[0]
        if layer in self._span:  # ΔW·k only where the gate opens (general text: almost nowhere)
            out = out.clone()
            out[gate] = out[gate] + hook_addition(k[gate], delta).to(out.dtype)
            return out
        return torch.where(gate[..., None], out + add.to(out.dtype), out)


class _ReorderFollowingHooks:
    """A cache's `reorder_cache` that also reorders the gate statistics of the hooks that saw the cache.

    It holds the cache weakly (no reference cycle: a cache is freed as soon as it is dropped), and a deep
    copy of the cache (the value optimisation copies its prefix cache) gets one bound to the copy.
    """

    def __init__(self, cache) -> None:
        self._cache = weakref.ref(cache)

    def __call__(self, beam_idx, *args, **kwargs):
        cache = self._cache()
        out = type(cache).reorder_cache(cache, beam_idx, *args, **kwargs)
        state = cache._comeba_hooks._state
        state.running = {l: r.select(beam_idx) for l, r in state.running.items()}
        return out

    def __deepcopy__(self, memo) -> "_ReorderFollowingHooks":
        copied = memo.get(id(self._cache()))
        return _ReorderFollowingHooks(copied) if copied is not None else self


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuple-of-tuples cache
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0
