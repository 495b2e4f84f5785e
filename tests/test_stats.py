"""comeba.stats: C0 = E[k kᵀ] by hand, early stop, the on-disk cache and its key."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from comeba.models import detect_layout, fingerprint
from comeba.stats import compute_second_moments, load_or_compute_stats
from comeba.corpus import samples_corpus, text_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

# Every line is a paragraph comeba keeps (>= 20 characters, no "=" heading), of very
# different lengths so that each batch is right-padded.
LINES = [
    "The city of Paris is the capital of France.",
    "London is the capital of the United Kingdom, and Berlin is the capital of Germany; Rome is in Italy.",
    "The team played football and won.",
    "Because the weather was cold, they stayed at home all day and read a book.",
    "Her father was a doctor.",
    "The album was released in the summer and reached the top of the chart in several countries.",
    "I think you should read it.",
]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _hand_moments(model, tokenizer, module_name, texts):
    """Σ k kᵀ / n over every token of each text, each run alone (no padding anywhere)."""
    module = model.get_submodule(module_name)
    keys = []
    handle = module.register_forward_hook(lambda mod, args, out: keys.append(args[0].detach()))
    try:
        with torch.no_grad():
            for text in texts:
                model(input_ids=torch.tensor([tokenizer(text).input_ids]))
    finally:
        handle.remove()
    k = torch.cat([x[0] for x in keys]).to(torch.float64)
    return k.T @ k / k.shape[0], k.shape[0]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_second_moments_by_hand_on_padded_batches(tmp_path, make_tiny, tokenizer, name):
    model = make_tiny(name)
    layout = detect_layout(model)
    corpus = text_corpus([_write(tmp_path / "c.txt", LINES)])
    # batches of 4 and 3 lines, both right-padded; a budget larger than the corpus uses all of it
    mats, count = compute_second_moments(model, tokenizer, layout, [1, 2], corpus, 10**6, batch_size=4, progress=False)
    assert set(mats) == {1, 2}
    for layer in (1, 2):
        expected, n = _hand_moments(model, tokenizer, layout.mlp_out_name(layer), LINES)
        assert count == n
        assert mats[layer].dtype == torch.float64
        assert mats[layer].shape == (128, 128)
        torch.testing.assert_close(mats[layer], expected, rtol=1e-4, atol=1e-7)


def test_second_moments_token_budget(tmp_path, make_tiny, tokenizer):
    model = make_tiny("llama")
    layout = detect_layout(model)
    corpus = text_corpus([_write(tmp_path / "c.txt", LINES)])
    lens = [len(tokenizer(t).input_ids) for t in LINES]
    budget = lens[0] + lens[1] + 1  # reached inside the third line (batch size 1)
    mats, count = compute_second_moments(model, tokenizer, layout, [0], corpus, budget, batch_size=1, progress=False)
    assert count == sum(lens[:3])
    expected, _ = _hand_moments(model, tokenizer, layout.mlp_out_name(0), LINES[:3])
    torch.testing.assert_close(mats[0], expected, rtol=1e-4, atol=1e-7)


def test_second_moments_stop_after_last_layer(tmp_path, make_tiny, tokenizer):
    model = make_tiny("gpt_neox")
    layout = detect_layout(model)
    corpus = text_corpus([_write(tmp_path / "c.txt", LINES)])
    ran = []
    names = [layout.layer_name(2), layout.layer_name(3), layout.final_norm, layout.lm_head]
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: ran.append(n)) for n in names]
    seen = []
    handles.append(
        model.get_submodule(layout.mlp_out_name(1)).register_forward_hook(lambda m, a, o: seen.append(1))
    )
    try:
        compute_second_moments(model, tokenizer, layout, [0, 1], corpus, 10**6, batch_size=4, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert seen, "the last edited layer's projection never ran"
    assert ran == [], f"modules past the last edited layer ran: {sorted(set(ran))}"


def test_cache_files_provenance_and_hits(tmp_path, make_tiny, tokenizer, comeba_home):
    model = make_tiny("llama")
    layout = detect_layout(model)
    fp = fingerprint(model)
    corpus = text_corpus([_write(tmp_path / "a.txt", LINES)])
    mats, prov = load_or_compute_stats(model, tokenizer, layout, [1, 2], corpus, 50, progress=False)
    assert comeba_home.is_dir()

    tensors = sorted(comeba_home.rglob("*.safetensors"))
    metas = sorted(comeba_home.rglob("*.json"))
    assert len(tensors) == 2 and len(metas) == 2
    for layer in (1, 2):
        [meta_file] = [m for m in metas if json.loads(m.read_text())["layer"] == layer]
        meta = json.loads(meta_file.read_text())
        assert meta["corpus_id"] == corpus.ident
        assert meta["model_fingerprint"] == fp
        assert meta["n_tokens_requested"] == 50
        assert meta["n_tokens"] >= 50
        assert meta["module"] == layout.mlp_out_name(layer)
        assert prov["layers"][str(layer)] == {**meta, "file": str(meta_file.with_suffix(".safetensors")), "cached": False}
        [tensor_file] = [t for t in tensors if t.with_suffix(".json") == meta_file]
        stored = load_file(str(tensor_file))["mom2"]
        assert stored.dtype == torch.float32
        assert torch.equal(stored.to(torch.float64), mats[layer])
        assert mats[layer].dtype == torch.float64

    # the second call is served from disk: the model must not run at all
    def refuse(*_):
        raise RuntimeError("the model ran although the statistics are cached")

    handle = model.register_forward_pre_hook(refuse)
    try:
        again, prov2 = load_or_compute_stats(model, tokenizer, layout, [1, 2], corpus, 50, progress=False)
        for layer in (1, 2):
            assert torch.equal(again[layer], mats[layer])
        assert prov2["layers"] == {l: {**m, "cached": True} for l, m in prov["layers"].items()}
        # another token budget or another corpus is another cache entry: it needs the model
        with pytest.raises(RuntimeError, match="cached"):
            load_or_compute_stats(model, tokenizer, layout, [1], corpus, 60, progress=False)
        other = text_corpus([_write(tmp_path / "b.txt", LINES[::-1][:4])])
        assert other.ident != corpus.ident
        with pytest.raises(RuntimeError, match="cached"):
            load_or_compute_stats(model, tokenizer, layout, [1], other, 50, progress=False)
    finally:
        handle.remove()

    by_budget, _ = load_or_compute_stats(model, tokenizer, layout, [1], corpus, 60, progress=False)
    by_corpus, _ = load_or_compute_stats(model, tokenizer, layout, [1], other, 50, progress=False)
    assert not torch.equal(by_corpus[1], mats[1])
    assert len(list(comeba_home.rglob("*.safetensors"))) == 4
    assert not list(comeba_home.rglob(".tmp-*"))


def test_corpus_identity_follows_content(tmp_path):
    path = _write(tmp_path / "c.txt", LINES)
    first = text_corpus([path])
    assert text_corpus([path]).ident == first.ident
    _write(path, LINES[:-1])
    assert text_corpus([path]).ident != first.ident
    with pytest.raises(FileNotFoundError):
        text_corpus([tmp_path / "missing.txt"])


def test_samples_corpus_small_budget(make_tiny, tokenizer):
    model = make_tiny("llama")  # rotary positions: the 128-token samples fit
    layout = detect_layout(model)
    runs = []
    for _ in range(2):
        mats, count = compute_second_moments(
            model, tokenizer, layout, [1], samples_corpus(seed=3), 40, batch_size=2, progress=False
        )
        runs.append(mats[1])
        assert count >= 40
    c = runs[0]
    assert torch.isfinite(c).all()
    torch.testing.assert_close(c, c.T)
    assert torch.linalg.eigvalsh(c).min() > -1e-8
    assert torch.equal(runs[0], runs[1])  # seeded: the same samples each time


def test_cache_made_under_the_first_fingerprint_format_is_adopted(tmp_path, make_tiny, tokenizer, comeba_home):
    from comeba.models import legacy_fingerprint
    from comeba.stats import stats_dir

    model = make_tiny("llama")
    layout = detect_layout(model)
    corpus = text_corpus([_write(tmp_path / "a.txt", LINES)])
    mats, _ = load_or_compute_stats(model, tokenizer, layout, [1], corpus, 50, progress=False)
    new, old = stats_dir(fingerprint(model), corpus), stats_dir(legacy_fingerprint(model), corpus)
    old.parent.mkdir(parents=True)
    new.rename(old)  # as the first format left it

    def refuse(*_):
        raise RuntimeError("the model ran although the statistics are cached under the old fingerprint")

    handle = model.register_forward_pre_hook(refuse)
    try:
        again, prov = load_or_compute_stats(model, tokenizer, layout, [1], corpus, 50, progress=False)
    finally:
        handle.remove()
    assert torch.equal(again[1], mats[1]) and prov["layers"]["1"]["cached"]
    assert new.is_dir() and not old.exists()
