"""The editing methods and protocols of the evaluation: one registry, torch-free.

Every place that names a method (the harness, `comeba eval --method`, the
baselines, the tests, benchmarks/run_table.py) reads it from here. A method
is run in the harness (comeba.evaluate) by one of two adapters:

- ``hook``: COMEBA-HK's hook layers (editor.Editor); W_0 never changes;
- ``weight``: a comeba.baselines editor that writes into W_0 in place
  (``baseline`` names it) and `restore()` puts W_0 back.

This module imports nothing heavy, so that `comeba --help` does not load torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class Method:
    """How the harness runs a method, and what it is."""

    adapter: str  # "hook" or "weight" (comeba.evaluate's adapters)
    baseline: str | None  # the comeba.baselines editor of a "weight" method
    note: str  # one line on the method (summary.json's method_note)


REGISTRY: Mapping[str, Method] = MappingProxyType({
    "comeba": Method(
        "hook", None,
        "COMEBA-HK: hook layers (W_0 untouched), C_accu = λ·C0 + Σ_past K Kᵀ, gate α adapted per batch"),
    "no-hook": Method(
        "weight", "no-hook",
        "ablation without hooks: written into W_0 with C_accu = λ·C0 + Σ_past K Kᵀ, the earlier keys weighed by "
        "comeba's γ (not the reference's wohk, which solves with λ·(C0 + Σ_past K Kᵀ) + K Kᵀ)"),
    "memit": Method(
        "weight", "memit",
        "MEMIT: C = λ·C0 every batch, written into W_0 (under the consecutive protocol this is sequential MEMIT)"),
    # MEMIT and sequential MEMIT are one editor; the protocol decides which one a run is.
    "seq-memit": Method(
        "weight", "memit",
        "sequential MEMIT: C = λ·C0 every batch, re-applied on the edited W_0 "
        "(under the single protocol this is MEMIT)"),
    "alphaedit": Method(
        "weight", "alphaedit",
        "AlphaEdit (Fang et al., ICLR 2025): Δ = R Kᵀ P (Kp Kpᵀ P + K Kᵀ P + L2·I)⁻¹, "
        "P the null-space projector of C0, Kp the earlier batches' keys; written into W_0"),
})

METHODS = tuple(REGISTRY)
# The methods that write into W_0 (comeba.baselines), in registry order.
WEIGHT_METHODS = tuple(name for name, m in REGISTRY.items() if m.adapter == "weight")
PROTOCOLS = ("consecutive", "single")
