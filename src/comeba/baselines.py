"""Baselines that write into the model's own weights: MEMIT, sequential MEMIT, the no-hook ablation.

They reuse compute.py's target values, keys and update equation, and differ
from COMEBA-HK only in where Δ goes (W_0 in place, no gate) and in the
covariance they solve against:

- ``memit``: C = λ·C0 every batch. Single-round when the caller restores the
  weights after each batch; *sequential MEMIT* when it does not.
- ``no-hook``: C_accu = λ·C0 + Σ_past K Kᵀ, exactly the hook variant's
  accumulation (unlike the reference's wohk, which also weights past keys by
  λ), so the two differ only by the hook.

These editors modify the model: `restore()` puts W_0 back.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Mapping, Sequence

import torch

from .compute import context_templates, target_values, write_layers
from .hparams import HParams
from .models import detect_layout, mlp_out_weight, num_layers
from .requests import Request, make_requests

METHODS = ("memit", "seq-memit", "no-hook")


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
        self.accumulate = accumulate
        self.progress = progress
        self.templates = list(templates) if templates is not None else context_templates(model, tokenizer, hparams)
        self.original = {l: mlp_out_weight(model, self.layout, l).detach().clone() for l in hparams.layers}
        self.base_cov = {l: hparams.mom2_update_weight * c0[l].to(torch.float64) for l in hparams.layers}
        self.cov = {l: c.clone() for l, c in self.base_cov.items()}
        self.n_edits = 0

    def edit(self, requests: Iterable[Mapping[str, Any] | Request]) -> dict[str, Any]:
        """One batch written in place (the model as edited so far gives Z and the residuals)."""
        batch = make_requests(requests)
        start = time.perf_counter()
        hp = self.hparams
        z = target_values(self.model, self.tokenizer, self.layout, batch, hp, self.templates, progress=self.progress)

        def apply(layer: int, delta: torch.Tensor) -> None:
            weight = mlp_out_weight(self.model, self.layout, layer)
            with torch.no_grad():
                weight.add_(delta.to(weight))

        keys = write_layers(self.model, self.tokenizer, self.layout, batch, hp.layers, self.templates, z,
                            covariance=lambda l: self.cov[l], apply=apply)
        if self.accumulate:
            for l, K in keys.items():
                self.cov[l] = self.cov[l] + K.T.to(self.cov[l]) @ K.to(self.cov[l])
        self.n_edits += len(batch)
        return {"n": len(batch), "seconds": time.perf_counter() - start}

    @torch.no_grad()
    def restore(self) -> None:
        """Put W_0 back and forget accumulated keys."""
        for l, w0 in self.original.items():
            mlp_out_weight(self.model, self.layout, l).copy_(w0)
        self.cov = {l: c.clone() for l, c in self.base_cov.items()}
        self.n_edits = 0


def make_baseline(method: str, model, tokenizer, hparams: HParams, c0: Mapping[int, torch.Tensor],
                  templates: Sequence[str] | None = None, progress: bool = True) -> WeightEditor:
    """`memit` / `seq-memit` (C = λ·C0 each batch) or `no-hook` (accumulated C_accu)."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; choose from {', '.join(METHODS)}")
    return WeightEditor(model, tokenizer, hparams, c0, accumulate=(method == "no-hook"),
                        templates=templates, progress=progress)
