"""Hook layers: the edited copies of MLP output projections, and their gate.

A hook layer at layer l holds ΔW = W_h − W_0 (float32, never the model's
weight). Attached to the model it adds ΔW·k to the projection's output: a
*temporary* hook everywhere, a *validated* hook only at tokens whose gate
score z_j = (m_j − mean(m)) / std(m), m_j = ‖ΔW·k_j‖, reaches α. The mean and
std run over the non-padding tokens of each sequence seen so far in the
current call, so generation with a KV cache gates each new token with the
statistics of the whole text up to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .models import Layout, get_module


def hook_addition(k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """ΔW·k in float32: what a hook adds to the projection's output (its norm is the gate magnitude m)."""
    return k.to(torch.float32) @ delta.T


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
    """What one hook layer adds: ΔW (float32, d_out × d_in), its threshold α, and whether it is gated."""

    delta: torch.Tensor
    alpha: float
    gated: bool = True


@dataclass
class _CallState:
    mask: torch.Tensor | None = None
    running: dict[int, RunningStats] = field(default_factory=dict)


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
        if layer not in self._handles:
            self._handles[layer] = module.register_forward_hook(
                lambda mod, args, out, layer=layer: self._on_output(layer, args, out)
            )

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
        m = add.norm(dim=-1)
        flat = m.dim() == 1
        if flat:
            m = m[None]
        mask = self._state.mask
        if mask is None or mask.shape != m.shape:
            mask = torch.ones_like(m, dtype=torch.bool)
        running = self._state.running.get(layer)
        if running is None:
            running = RunningStats.zeros(m.shape[0], m.device)
            self._state.running[layer] = running
        z = running.update(m, mask)
        gate = torch.nan_to_num(z, nan=-math.inf) >= weights.alpha
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
