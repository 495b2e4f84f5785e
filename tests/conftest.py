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


# --------------------------------------------------------------------------- core-test helpers


@pytest.fixture
def one_thread():
    """Run tiny models on one thread: a 2-core box shared with other jobs makes OpenMP spin badly."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A small local statistics corpus (about 6k tokens).

    Lines are at most 100 characters, so no sequence outruns the tiny models'
    128 positions (comeba truncates statistics sequences at 256 tokens).
    """
    import textwrap

    from tiny import _training_lines

    lines = [w for line in _training_lines(200) for w in textwrap.wrap(line, 100) if len(w) >= 20]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def comeba_home(tmp_path, monkeypatch) -> Path:
    """A private, empty COMEBA_HOME for one test (never the user's cache)."""
    home = tmp_path / "comeba-home"
    monkeypatch.setenv("COMEBA_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def _shared_home_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("comeba-home-shared")


@pytest.fixture
def shared_comeba_home(_shared_home_dir, monkeypatch) -> Path:
    """A COMEBA_HOME in the session's tmp dir, shared between tests so statistics are computed once."""
    monkeypatch.setenv("COMEBA_HOME", str(_shared_home_dir))
    return _shared_home_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny llama saved as a Hugging Face folder (for the CLI and `load_model`), one per test module."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
