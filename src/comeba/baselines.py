"""Baselines that write into the model's own weights: MEMIT, sequential MEMIT, the no-hook ablation.

They reuse compute.py's target values, keys and update equation, and differ
from COMEBA-HK only in where Δ goes (W_0 in place, no gate) and in the
covariance they solve against:

- ``memit``: C = λ·C0 every batch. Single-round when the caller restores the
  weights after each batch; *sequential MEMIT* when it does not.
- ``no-hook``: C_accu = λ·C0 + Σ_past K Kᵀ, exactly the hook variant's
  accumulation (unlike the reference's wohk, which also weights past keys by
  λ), so the two differ only by the hook.
- ``alphaedit``: AlphaEdit (comeba.alphaedit): Δ projected onto the null
  space of C0, solved against the earlier batches' keys Σ_past K Kᵀ (no λ·C0).

These editors modify the model: `restore()` puts W_0 back.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Mapping, Sequence

import torch

from . import alphaedit
from .compute import accumulate_keys, context_templates, solve_update, weighted_covariance, write_layers
from .hparams import HParams
from .methods import WEIGHT_METHODS
from .models import detect_layout, mlp_out_weight, num_layers
from .requests import Request, make_requests
from .values import target_values


class WeightEditor:
    """MEMIT-family editing written directly into W_0 (for comparison; not reversible except by `restore`)."""

    def __init__(
        self,
        model,
        tokenizer,
        hparams: HParams,
        c0: Mapping[int, torch.Tensor],
        *,
        accumulate: bool,
        templates: Sequence[str] | None = None,
        progress: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.hparams = hparams
        self.layout = detect_layout(model)
        hparams.check_model(num_layers(model, self.layout))
        offloaded = [l for l in hparams.layers if mlp_out_weight(model, self.layout, l).device.type == "meta"]
        if offloaded:
            raise ValueError(f"the weight-editing baselines write into the model's weights, but the MLP output "
                             f"weights of layer(s) {offloaded} are offloaded (on the meta device): keep the edited "
                             "layers on a device in the device map, or use comeba's hook layers")
        self.accumulate = accumulate
        self.progress = progress
        self.templates = list(templates) if templates is not None else context_templates(model, tokenizer, hparams)
        self.original = {l: mlp_out_weight(model, self.layout, l).detach().clone() for l in hparams.layers}
        self.base_cov = self._base_covariance(c0)
        self.cov = {l: c.clone() for l, c in self.base_cov.items()}
        self.n_edits = 0

    # The pieces a variant changes: the covariance at the start and the per-layer solve.
    def _base_covariance(self, c0: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {l: self.hparams.mom2_update_weight * c0[l].to(torch.float64) for l in self.hparams.layers}

    def solve(self, layer: int, residuals: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        cov = self.cov[layer]
        if self.accumulate:  # the earlier batches' keys weigh γ, as in comeba's own solve (`no-hook`)
            lam = self.hparams.mom2_update_weight
            cov = weighted_covariance(cov, self.base_cov[layer] / lam, lam, self.hparams.key_weight(layer))
        return solve_update(residuals, keys, cov.to(keys.device))

    def edit(self, requests: Iterable[Mapping[str, Any] | Request]) -> dict[str, Any]:
        """One batch written in place (the model as edited so far gives Z and the residuals)."""
        batch = make_requests(requests)
        start = time.perf_counter()
        hp = self.hparams
        z = target_values(self.model, self.tokenizer, self.layout, batch, hp, self.templates, progress=self.progress)

        def apply(layer: int, delta: torch.Tensor, keys: torch.Tensor) -> None:
            weight = mlp_out_weight(self.model, self.layout, layer)
            with torch.no_grad():
                weight.add_(delta.to(weight))

        keys = write_layers(self.model, self.tokenizer, self.layout, batch, hp.layers, self.templates, z,
                            solve=self.solve, apply=apply)
        if self.accumulate:
            for l, K in keys.items():
                self.cov[l] = accumulate_keys(self.cov[l], K)
        self.n_edits += len(batch)
        return {"n": len(batch), "seconds": time.perf_counter() - start}

    @torch.no_grad()
    def restore(self) -> None:
        """Put W_0 back and forget accumulated keys."""
        for l, w0 in self.original.items():
            mlp_out_weight(self.model, self.layout, l).copy_(w0)
        self.cov = {l: c.clone() for l, c in self.base_cov.items()}
        self.n_edits = 0

    # ------------------------------------------------------------------ resuming a run
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What the edits so far changed: the edited weights (d_out × d_in) and the accumulated covariance."""
        out = {}
        for l in self.hparams.layers:
            out[f"weight.{l}"] = mlp_out_weight(self.model, self.layout, l).detach().cpu().contiguous().clone()
            out[f"cov.{l}"] = self.cov[l].detach().cpu().contiguous()
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], n_edits: int) -> None:
        """Put back what `state_tensors` saved (onto the same base model)."""
        for l in self.hparams.layers:
            weight = mlp_out_weight(self.model, self.layout, l)
            saved = tensors[f"weight.{l}"]
            if tuple(saved.shape) != tuple(weight.shape):
                raise ValueError(f"saved weight of layer {l} has shape {tuple(saved.shape)}, the model's {tuple(weight.shape)}")
            weight.copy_(saved.to(weight))
            self.cov[l] = tensors[f"cov.{l}"].to(self.cov[l])
        self.n_edits = n_edits


class AlphaEditEditor(WeightEditor):
    """AlphaEdit written in place: Δ = R Kᵀ P (Kp Kpᵀ P + K Kᵀ P + L2·I)⁻¹ per layer.

    P projects onto the null space of each layer's C0 (`hparams.nullspace_energy`
    or `nullspace_threshold`); Kp Kpᵀ accumulates the keys of every earlier
    batch (reset by `restore`). See comeba.alphaedit.
    """

    def __init__(self, model, tokenizer, hparams: HParams, c0: Mapping[int, torch.Tensor], *,
                 templates: Sequence[str] | None = None, progress: bool = True):
        self.null_spaces = {
            l: alphaedit.null_space(c0[l], energy=hparams.nullspace_energy, threshold=hparams.nullspace_threshold)
            for l in hparams.layers
        }
        super().__init__(model, tokenizer, hparams, c0, accumulate=True, templates=templates, progress=progress)
        self.projectors = {l: ns.projector for l, ns in self.null_spaces.items()}

    def _base_covariance(self, c0: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        # Kp Kpᵀ starts empty: the projection, not λ·C0, protects the preserved knowledge.
        return {l: torch.zeros_like(c0[l], dtype=torch.float64) for l in self.hparams.layers}

    def solve(self, layer: int, residuals: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return alphaedit.alphaedit_update(residuals, keys, self.projectors[layer].to(keys.device),
                                          self.cov[layer].to(keys.device), self.hparams.L2)


def make_baseline(method: str, model, tokenizer, hparams: HParams, c0: Mapping[int, torch.Tensor],
                  templates: Sequence[str] | None = None, progress: bool = True) -> WeightEditor:
    """`memit` / `seq-memit` (C = λ·C0 each batch), `no-hook` (accumulated C_accu) or `alphaedit`."""
    if method not in WEIGHT_METHODS:
        raise ValueError(f"unknown baseline {method!r}; choose from {', '.join(WEIGHT_METHODS)}")
    if method == "alphaedit":
        return AlphaEditEditor(model, tokenizer, hparams, c0, templates=templates, progress=progress)
    return WeightEditor(model, tokenizer, hparams, c0, accumulate=(method == "no-hook"),
                        templates=templates, progress=progress)
