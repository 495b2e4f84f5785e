"""Soak: 1,000 consecutive one-edit batches on a tiny model — the state's size and the memory stay flat.

The timing per batch is recorded by benchmarks/soak.py (same function), not asserted here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from soak import soak  # noqa: E402


@pytest.mark.slow
def test_thousand_one_edit_batches_keep_state_and_memory_flat():
    result = soak(1000, 50, "span", progress=False)
    sizes = {w["state_bytes"] for w in result["windows"]}
    assert len(sizes) == 1, f"the saved tensors grew: {sorted(sizes)}"
    assert result["last_over_first"]["rss_mb"] <= 1.05, result["windows"]
