"""Shared pytest fixtures: a tiny in-memory tokenizer and tiny random models of every arch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import ARCHS, make_model, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """A small byte-level BPE tokenizer trained once per test session."""
    return make_tokenizer()


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    """Each supported architecture name in turn."""
    return request.param


@pytest.fixture
def make_tiny(tokenizer):
    """Factory: make_tiny(arch, seed=0, n_layers=4, hidden=32) -> fresh tiny model (float32, eval)."""

    def _make(arch: str, seed: int = 0, n_layers: int = 4, hidden: int = 32):
        return make_model(arch, tokenizer, seed=seed, n_layers=n_layers, hidden=hidden)

    return _make


@pytest.fixture
def tiny_model(arch, make_tiny):
    """A fresh tiny model of each arch in turn (parametrised over ARCHS via `arch`)."""
    return make_tiny(arch)
