"""The span gate (comeba.hooks), its calibration in the editor, and the gate diagnostics (comeba.diagnostics)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from comeba.diagnostics import TextSample, gate_report, general_text_sample, subject_open_rates, text_pass
from comeba.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EDITING_STATE, StateError
from comeba.editor import Editor
from comeba.evaluate import Settings, evaluate
from comeba.gate import (Remembered, SpanGate, calibrate_span, calibrated_threshold, remember, span_gate,
                         span_gate_added, span_scores, span_threshold)
from comeba.hooks import HookLayers, LayerState
from comeba.hparams import HParams, HParamsError
from comeba.models import cache_kwarg, detect_layout
from comeba.requests import make_requests
from comeba.corpus import text_corpus
from comeba.text import pad_batch
from tiny import ARCHS
from test_editor import HP, R1, R2, R3, R4, UNRELATED, _logits, _p_first, _same_logits, _write_v1
from comeba.text import encode_prompt

pytestmark = pytest.mark.usefixtures("one_thread", "shared_comeba_home")

F64 = torch.float64


# ============================================================================ the score, by hand


def _spd(d: int, seed: int) -> torch.Tensor:
    """A random SPD second moment with a spread of scales (condition number ~1e3), float64."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 4 * d, generator=g, dtype=F64) * torch.logspace(-1.5, 0, d, dtype=F64)[:, None]
    return a @ a.T / (4 * d) + 1e-4 * torch.eye(d, dtype=F64)


def _by_hand(k: torch.Tensor, c0: torch.Tensor, c_accu: torch.Tensor, lam: float) -> torch.Tensor:
    """kᵀ G k / kᵀ (λC0)⁻¹ k with G = (λC0)⁻¹ − C_accu⁻¹, all float64 (explicit inverses: fine for a test)."""
    a0_inv = torch.linalg.inv(lam * c0)
    g = a0_inv - torch.linalg.inv(c_accu)
    k = k.to(F64)
    return torch.einsum("nd,de,ne->n", k, g, k) / torch.einsum("nd,de,ne->n", k, a0_inv, k)


def _keys(c0: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n keys drawn with second moment C0 (as general text's keys would be), float64."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c0.shape[0], generator=g, dtype=F64) @ torch.linalg.cholesky(c0).T


@pytest.mark.parametrize("n_edits", [1, 3, 10])
def test_span_scores_match_the_direct_computation(n_edits):
    d, lam = 16, 20.0
    c0 = _spd(d, 0)
    edits = _keys(c0, n_edits, 1)
    c_accu = lam * c0 + edits.T @ edits
    gate = span_gate(c0.float(), c_accu, lam)  # as the editor keeps them: C0 float32, C_accu float64
    assert gate.whiten.dtype == torch.float32 and gate.span.dtype == torch.float32
    probe = torch.cat([_keys(c0, 50, 2), edits])
    got = span_scores(probe.float(), gate)
    assert got.dtype == torch.float32 and got.shape == (len(probe),)
    want = _by_hand(probe, c0.float().double(), c_accu, lam)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert (got >= -1e-6).all() and (got < 1).all()
    # the score ignores the key's norm, and a batch dimension
    torch.testing.assert_close(span_scores(7.5 * probe.float(), gate), got, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(span_scores(probe[:50].float().reshape(2, 25, d), gate).reshape(-1), got[:50])


def test_an_edited_key_scores_high_and_an_orthogonal_one_zero():
    d, lam = 16, 20.0
    c0 = _spd(d, 3)
    a0 = lam * c0
    # one edit: by Sherman-Morrison its own score is exactly g / (1 + g), g = kᵀ (λC0)⁻¹ k
    [k] = _keys(c0, 1, 4) * 3
    gate = span_gate(c0, a0 + torch.outer(k, k), lam)
    g = float(k @ torch.linalg.solve(a0, k))
    assert g > 1
    assert float(span_scores(k[None].float(), gate)) == pytest.approx(g / (1 + g), rel=1e-4)

    # several edits: H = I − (I + S)⁻¹ is monotone in S, so each edited key scores at least g/(1+g)
    edits = _keys(c0, 4, 5) * 3
    gate = span_gate(c0, a0 + edits.T @ edits, lam)
    scores = span_scores(edits.float(), gate).double()
    gs = torch.einsum("nd,nd->n", edits, torch.linalg.solve(a0, edits.T).T)
    assert (scores >= gs / (1 + gs) - 1e-5).all() and (scores > 0.5).all()

    # a key orthogonal to the edited keys in whitened coordinates (w = L⁻¹k, λC0 = L Lᵀ) scores 0
    chol = torch.linalg.cholesky(a0)
    w_edits = torch.linalg.solve_triangular(chol, edits.T, upper=False)  # d × n
    v = torch.randn(d, generator=torch.Generator().manual_seed(6), dtype=F64)
    v = v - w_edits @ torch.linalg.lstsq(w_edits, v[:, None]).solution[:, 0]
    assert (w_edits.T @ v).abs().max() < 1e-10
    k_orth = chol @ v
    assert abs(float(span_scores(k_orth[None].float(), gate))) < 1e-4
    # and random general-text keys mostly score low
    assert span_scores(_keys(c0, 200, 7).float(), gate).median() < 0.3


@pytest.mark.parametrize("beta", [0.1, 0.5, 3.0])
def test_span_beta_counts_weaker_directions(beta):
    """H = (βI + S)⁻¹ S: one edit scores g / (β + g) exactly (Sherman–Morrison), and a smaller β raises every
    score (H is monotone in 1/β)."""
    d, lam = 16, 20.0
    c0 = _spd(d, 3)
    a0 = lam * c0
    [k] = _keys(c0, 1, 4) * 3
    gate = span_gate(c0, a0 + torch.outer(k, k), lam, beta)
    g = float(k @ torch.linalg.solve(a0, k))
    assert float(span_scores(k[None].float(), gate)) == pytest.approx(g / (beta + g), rel=1e-4)
    edits = _keys(c0, 6, 5) * 2
    probe = torch.cat([_keys(c0, 100, 7), edits]).float()
    sharp = span_scores(probe, span_gate(c0, a0 + edits.T @ edits, lam, beta))
    soft = span_scores(probe, span_gate(c0, a0 + edits.T @ edits, lam, beta / 2))
    assert (soft >= sharp - 1e-6).all() and (soft > sharp + 1e-4).any()


def test_span_gate_reuses_an_earlier_whitening_of_the_same_c0():
    """The editor passes the previous batch's (float32) whitening: the gate must be that of a fresh factorisation
    to float32 accuracy, and a whitening of another size is refused."""
    d, lam = 24, 50.0
    c0 = _spd(d, 11).float()
    first = span_gate(c0, lam * c0.double() + _keys(c0.double(), 3, 12).T @ _keys(c0.double(), 3, 12), lam)
    c_accu = lam * c0.double() + _keys(c0.double(), 9, 13).T @ _keys(c0.double(), 9, 13)
    fresh, reused = span_gate(c0, c_accu, lam), span_gate(c0, c_accu, lam, whiten=first.whiten)
    assert torch.equal(reused.whiten, fresh.whiten)
    assert (reused.span - fresh.span).abs().max() < 1e-5 and fresh.span.abs().max() > 0.1
    probe = _keys(c0.double(), 50, 14).float()
    assert torch.allclose(span_scores(probe, reused), span_scores(probe, fresh), atol=1e-5)
    with pytest.raises(ValueError, match="does not fit C0"):
        span_gate(c0, c_accu, lam, whiten=first.whiten[:-1, :-1])


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_span_gate_added_equals_the_full_span_gate(beta):
    """A batch's keys update the gate by Woodbury from the gate before: over 30 batches it stays the gate of
    the accumulated C_accu to float32 rounding (each update starts from the stored float32 H)."""
    d, lam = 48, 1000.0
    c0 = _spd(d, 3).float()
    c_accu = lam * c0.double()
    gate = full = span_gate(c0, c_accu, lam, beta)
    for b in range(30):
        keys = _keys(c0.double(), 5, 100 + b).float() * (1 + b % 4)
        c_accu = c_accu + keys.double().T @ keys.double()
        gate = span_gate_added(gate, keys, beta)
        full = span_gate(c0, c_accu, lam, beta, whiten=full.whiten)
        assert gate.whiten is not None and gate.span.dtype == torch.float32
        torch.testing.assert_close(gate.span, full.span, rtol=0, atol=2e-6)
    assert float(full.span.diagonal().max()) > 0.5  # the edited directions are well inside the span by then


def test_editor_span_gates_are_those_of_its_accumulated_keys(new_editor):
    editor = new_editor("llama")
    for r in (R1, R2, R3):
        editor.edit([r])
    hp = editor.hparams
    for l, st in editor.layers.items():
        full = span_gate(st.c0, st.c_accu, hp.mom2_update_weight, hp.gate_span_beta)
        torch.testing.assert_close(st.span.span, full.span, rtol=0, atol=1e-5)
        # it started unedited: H's factor has one column per accumulated key (`contexts`: one a template)
        assert st.span.factor is not None and st.span.factor.shape[1] == 3 * len(editor.templates)
        torch.testing.assert_close(st.span.factor @ st.span.factor.T, st.span.span, rtol=0, atol=1e-6)


def test_no_accumulated_keys_scores_zero():
    d, lam = 16, 20.0
    c0 = _spd(d, 8).float()  # C_accu = λ·C0 exactly as the editor starts (float64 copy of the float32 C0)
    gate = span_gate(c0, lam * c0.to(F64), lam)
    assert torch.equal(gate.span, torch.zeros(d, d))
    scores = span_scores(_keys(c0.double(), 30, 9).float(), gate)
    assert torch.equal(scores, torch.zeros(30))


def test_span_gate_moves_with_its_device_and_keeps_float32():
    gate = span_gate(_spd(8, 10), 3 * _spd(8, 10), 1.0)
    moved = gate.to("cpu")
    assert isinstance(moved, SpanGate) and moved.whiten.dtype == torch.float32
    assert torch.equal(moved.whiten, gate.whiten) and torch.equal(moved.span, gate.span)


# ============================================================================ the calibrated threshold


def test_calibrated_threshold_opens_on_a_share_eps():
    n, eps = 10_000, 1e-3
    scores = torch.randperm(n).float() / n  # known sample: 0, 1/n, ..., (n−1)/n
    t = calibrated_threshold(scores.reshape(40, -1), eps)  # any shape
    assert int((scores.double() >= t).sum()) == round(eps * n)
    g = torch.Generator().manual_seed(0)
    for eps in (1e-3, 1e-2, 0.2):
        sample = torch.rand(50_000, generator=g) ** 3
        t = calibrated_threshold(sample, eps)
        assert abs(float((sample.double() >= t).double().mean()) - eps) <= 2 / len(sample)


def test_calibrated_threshold_ignores_non_finite_scores():
    scores = torch.linspace(0, 1, 1001)
    with_nan = torch.cat([scores, torch.full((500,), math.nan), torch.tensor([math.inf, -math.inf])])
    assert calibrated_threshold(with_nan, 0.01) == calibrated_threshold(scores, 0.01)
    with pytest.raises(ValueError, match="no finite"):
        calibrated_threshold(torch.full((3, 4), math.nan), 0.01)


# ============================================================================ hook layers with a span gate

LAYERS = (1, 2)
LAM = 10.0
TEXTS = [
    "The city of Paris is the capital of France and its largest city",
    "The team played football",
    "Because the weather was cold, they stayed",
]


def _general_ids(tokenizer) -> list[list[int]]:
    """About 2k tokens of general text (more than the 128 key dimensions), ≤ 60 tokens a sequence."""
    from tiny import _training_lines

    return [tokenizer(line).input_ids[:60] for line in _training_lines(60)[:40]]


@torch.no_grad()
def _layer_keys(model, tokenizer, texts, layers=LAYERS) -> dict[int, list[torch.Tensor]]:
    """Per layer, each text's (a string or token ids) keys (T × d_in) in the model as it runs."""
    layout = detect_layout(model)
    keys = {l: [] for l in layers}
    handles = [model.get_submodule(layout.mlp_out_name(l)).register_forward_hook(
        lambda m, a, o, l=l: keys[l].append(a[0][0].detach().clone())) for l in layers]
    try:
        for t in texts:
            model(input_ids=torch.tensor([tokenizer(t).input_ids if isinstance(t, str) else t]))
    finally:
        for h in handles:
            h.remove()
    return keys


def _span_hooks_weights(model, tokenizer, alpha, seed=0, scale=0.5) -> dict[int, LayerState]:
    """Span-gated hooks: C0 from general text's keys, 'edits' at two tokens of TEXTS[0] and one of TEXTS[2]."""
    general = _layer_keys(model, tokenizer, _general_ids(tokenizer))
    edited = _layer_keys(model, tokenizer, [TEXTS[0], TEXTS[2]])
    g = torch.Generator().manual_seed(seed)
    out = {}
    for l in LAYERS:
        k = torch.cat(general[l]).double()
        c0 = k.T @ k / len(k)
        e = torch.stack([edited[l][0][5], edited[l][0][8], edited[l][1][3]]).double()
        gate = span_gate(c0, LAM * c0 + e.T @ e, LAM)
        delta = torch.randn(32, len(c0), generator=g) * scale  # d_out = hidden, d_in = 4·hidden
        out[l] = LayerState(delta, alpha, gate)
    return out


def _span_hooks(model, tokenizer, alpha, **kw) -> HookLayers:
    return HookLayers(model, detect_layout(model), _span_hooks_weights(model, tokenizer, alpha, **kw))


def test_records_hold_the_span_scores_and_the_gate(make_tiny, tokenizer):
    model = make_tiny("llama")
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    keys = _layer_keys(model, tokenizer, TEXTS, layers=[1])[1]
    weights = _span_hooks_weights(model, tokenizer, 0.5)
    with HookLayers(model, detect_layout(model), weights) as hooks, torch.no_grad():
        hooks.set(3, LayerState(torch.zeros(32, 128), 0.5), gated=False)  # a temporary hook: nothing to record
        assert hooks.records is None
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        assert hooks.records is None  # off unless asked for
        hooks.record(True)
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        records = hooks.records
        assert set(records) == set(LAYERS)
        for l, rec in records.items():
            assert rec.alpha == 0.5 and rec.gate.shape == rec.scores.shape == batch.input_ids.shape
            real = batch.attention_mask.bool()
            assert torch.isnan(rec.scores[~real]).all() and not rec.gate[~real].any()
            assert torch.equal(rec.gate, torch.nan_to_num(rec.scores, nan=-1.0) >= 0.5)
        # the first hooked layer's keys do not depend on the hooks: its scores are the span scores by hand
        for i, k in enumerate(keys):
            torch.testing.assert_close(records[1].scores[i, : len(k)], span_scores(k, weights[1].span))
        gate1 = records[1].gate
        assert gate1[0, 5] and gate1[0, 8] and gate1[2, 3], "the edited keys did not open the gate"
        assert gate1.sum() < batch.attention_mask.sum() / 2, "the gate opened almost everywhere"
        hooks.record(False)
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        assert hooks.records is None


def test_padded_batch_gates_like_each_sequence_alone(make_tiny, tokenizer):
    model = make_tiny("llama")
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    assert not batch.attention_mask.bool().all()  # there is padding
    with _span_hooks(model, tokenizer, 0.5) as hooks, torch.no_grad():
        hooks.record(True)
        together = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        gates = {l: r.gate.clone() for l, r in hooks.records.items()}
        for i, t in enumerate(TEXTS):
            single = model(input_ids=tokenizer([t], return_tensors="pt").input_ids).logits[0]
            n = len(single)
            for l in LAYERS:
                assert torch.equal(hooks.records[l].gate[0], gates[l][i, :n]), (t, l)
                assert not gates[l][i, n:].any()
            torch.testing.assert_close(together[i, :n], single, rtol=1e-4, atol=1e-5)
    assert any(g.any() for g in gates.values()) and not all(g[batch.attention_mask.bool()].all()
                                                          for g in gates.values())


def _generate(model, ids, use_cache, n=8, **kw):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, use_cache=use_cache, output_scores=True,
                             return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generation_with_and_without_cache_agree(make_tiny, tokenizer, arch):
    """A span gate depends on a token's key alone: a KV cache changes no decision, not even after the first token."""
    model = make_tiny(arch)
    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    base, base_scores = _generate(model, ids, True)
    with _span_hooks(model, tokenizer, 0.5) as hooks:
        cached, cached_scores = _generate(model, ids, True)
        uncached, uncached_scores = _generate(model, ids, False)
        # the decisions of a cached loop, token by token, against one full pass over the result
        hooks.record(True)
        with torch.no_grad():
            model(input_ids=cached)
            full = {l: r.gate[0].clone() for l, r in hooks.records.items()}
            out = model(input_ids=ids, use_cache=True)
            steps = {l: [r.gate[0].clone()] for l, r in hooks.records.items()}
            for t in range(ids.shape[1], cached.shape[1]):
                cache = getattr(out, "cache", None) or out.past_key_values
                out = model(input_ids=cached[:, t : t + 1], attention_mask=torch.ones(1, t + 1, dtype=torch.long),
                            use_cache=True, **{cache_kwarg(model): cache})
                for l, r in hooks.records.items():
                    assert r.gate.shape == (1, 1)
                    steps[l].append(r.gate[0].clone())
        hooks.record(False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_scores, uncached_scores, rtol=1e-4, atol=1e-4)
    assert not torch.equal(cached_scores, base_scores), "the gate never opened"
    for l in LAYERS:
        assert torch.equal(torch.cat(steps[l]), full[l]), f"layer {l}"
    assert full[1].any() and not full[1].all()


def test_beam_search_with_span_gate(make_tiny, tokenizer):
    model = make_tiny("llama")
    ids = tokenizer(TEXTS[2], return_tensors="pt").input_ids
    beams = dict(num_beams=3, num_return_sequences=2, early_stopping=False)
    base, _ = _generate(model, ids, True, n=6, **beams)
    with _span_hooks(model, tokenizer, 1e9):  # shut: exactly the base model
        shut, _ = _generate(model, ids, True, n=6, **beams)
    with _span_hooks(model, tokenizer, 0.5) as hooks:
        hooks.record(True)
        cached, cached_scores = _generate(model, ids, True, n=6, **beams)
        assert all(r.gate.shape[0] == 3 for r in hooks.records.values())  # one row per beam
        hooks.record(False)
        uncached, uncached_scores = _generate(model, ids, False, n=6, **beams)
    assert torch.equal(shut, base)
    assert cached.shape == (2, ids.shape[1] + 6)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_scores, uncached_scores, rtol=1e-4, atol=1e-4)


def test_calibrate_sets_each_layer_to_its_quantile(make_tiny, tokenizer):
    model = make_tiny("llama")
    ids, mask = pad_batch(_general_ids(tokenizer)[:20] + [tokenizer(t).input_ids for t in TEXTS],
                          tokenizer.pad_token_id)
    eps = 0.05
    weights = _span_hooks_weights(model, tokenizer, 0.9)
    weights[0] = LayerState(torch.randn(32, 128) * 0.1, 1.7)  # a reference-gated layer: left alone
    with HookLayers(model, detect_layout(model), weights) as hooks, torch.no_grad():
        run = lambda: model(input_ids=ids, attention_mask=mask)  # noqa: E731
        alphas = hooks.calibrate(run, lambda z: calibrated_threshold(z, eps))
        assert set(alphas) == set(LAYERS) and hooks.records is None
        assert hooks.weights[0].alpha == 1.7
        for l in LAYERS:
            assert hooks.weights[l].alpha == alphas[l] and 0 < alphas[l] < 1
        # the same pass again, α fixed: each layer opens on the same share of that text's tokens
        hooks.record(True)
        run()
        real = mask.bool()
        n = int(real.sum())
        for l in LAYERS:
            rec = hooks.records[l]
            assert alphas[l] == pytest.approx(calibrated_threshold(rec.scores[real], eps), rel=1e-6, abs=1e-7)
            opened = int(rec.gate[real].sum())
            assert abs(opened - eps * n) <= 2, (l, opened, n)
        hooks.record(False)
        with pytest.raises(RuntimeError, match="did not reach layer"):
            hooks.calibrate(lambda: None, lambda z: calibrated_threshold(z, eps))
    with pytest.raises(ValueError, match="alpha=None"):
        HookLayers(model, detect_layout(model), {1: LayerState(torch.zeros(32, 128), None)})


# ============================================================================ the editor with the span gate


@pytest.fixture
def new_editor(make_tiny, tokenizer, corpus_file):
    """new_editor(arch, seed=0, **hparams) -> a fresh Editor on a fresh tiny model (test_editor's settings)."""

    def _make(arch: str = "llama", seed: int = 0, **changes) -> Editor:
        model = make_tiny(arch, seed=seed)
        return Editor(model, tokenizer, HParams(**{**HP, **changes}), corpus=text_corpus([corpus_file]),
                             progress=False)

    return _make


def _calibration_sample(editor) -> TextSample:
    return TextSample(tuple(tuple(s) for s in editor.calibration), "calibration text")


@pytest.mark.parametrize("arch", ARCHS)
def test_calibration_started_at_the_first_edited_layer_sets_the_same_alpha(new_editor, tokenizer, arch):
    """The editor keeps the held-back text's input to the first edited layer and starts each calibration pass
    there (layers below it are never hooked); α must be what a whole pass gives."""
    editor = new_editor(arch)
    editor.edit([R1, R2])
    stream = editor._calibration_stream[1]
    assert stream is not None and stream.shape[0] == len(editor.calibration)
    hp = editor.hparams
    batch = make_requests([R3])
    with HookLayers(editor.model, editor.layout, editor.layers) as hooks:
        args = (hooks, editor.model, tokenizer, editor.layout, editor.calibration, batch, hp.gate_false_open,
                hp.gate_false_open_max, hp.gate_subject_share)
        whole = calibrate_span(*args)
        started = calibrate_span(*args, stream=stream)
        with pytest.raises(ValueError, match="not that of this calibration text"):
            calibrate_span(*args, stream=stream[1:])
    assert set(whole) == set(hp.layers)
    for l in hp.layers:
        assert started[l] == pytest.approx(whole[l], rel=1e-5, abs=1e-6), l


@pytest.mark.parametrize("arch", ARCHS)
def test_calibration_calls_in_lockstep_set_the_alpha_of_one_call(new_editor, tokenizer, arch):
    """calibrate_span runs the text and the (short) prompts as two calls that meet at every layer: α must be
    that of one call over both, padded to one width, with the layer mean and a memory of earlier edits."""
    from comeba.gate import span_threshold
    from comeba.text import subject_last_index
    from comeba.trace import trace

    editor = new_editor(arch)
    editor.edit([R1, R2])
    hp, cal, model = editor.hparams, editor.calibration, editor.model
    batch = make_requests([R3])
    memory = [Remembered(tuple(encode_prompt(tokenizer, r.text)), subject_last_index(tokenizer, r.prompt, r.subject))
              for r in make_requests([R1])]
    with HookLayers(model, editor.layout, editor.layers, layer_mean=hp.gate_layer_mean) as hooks:
        apart = calibrate_span(hooks, model, tokenizer, editor.layout, cal, batch, hp.gate_false_open,
                               hp.gate_false_open_max, hp.gate_subject_share, memory=memory)
        prompts = [encode_prompt(tokenizer, r.text) for r in batch] + [list(m.ids) for m in memory]
        subjects = [(len(cal), subject_last_index(tokenizer, batch[0].prompt, batch[0].subject))]
        kept = [(len(cal) + 1, memory[0].subject)]
        ids, mask = pad_batch(list(cal) + prompts, tokenizer.pad_token_id)
        last = editor.layout.mlp_out_name(max(hp.layers))

        def run():
            with trace(model, [last], stop_after=last):
                model(input_ids=ids, attention_mask=mask)

        one = hooks.calibrate(run, lambda z: span_threshold(z, len(cal), subjects, hp.gate_false_open,
                                                            hp.gate_false_open_max, hp.gate_subject_share, kept))
    assert set(apart) == set(one) == set(hp.layers)
    for l in hp.layers:
        assert apart[l] == pytest.approx(one[l], rel=1e-5, abs=1e-6), l


def test_a_failing_calibration_rule_raises_in_every_call_without_hanging(new_editor, tokenizer, monkeypatch):
    import comeba.gate as gate_mod

    editor = new_editor("llama")
    editor.edit([R1])
    hp = editor.hparams

    def broken(*args, **kwargs):
        raise ValueError("no finite gate scores to calibrate on")

    monkeypatch.setattr(gate_mod, "span_threshold", broken)
    with HookLayers(editor.model, editor.layout, editor.layers) as hooks:
        with pytest.raises(ValueError, match="no finite gate scores"):
            calibrate_span(hooks, editor.model, tokenizer, editor.layout, editor.calibration, make_requests([R2]),
                           hp.gate_false_open, hp.gate_false_open_max, hp.gate_subject_share)


@pytest.mark.parametrize("share", [0.0, None])
def test_span_editor_edits_take_and_opens_on_a_share_eps_of_its_calibration_text(new_editor, tokenizer, share):
    """α is the (1 − ε) quantile of the calibration text (ρ = 0), or the larger of it and ρ times the score of
    the batch's subject (the default ρ: a batch of one)."""
    # ρ = 0 at the default gate; the default ρ at β = 1 without the layer mean, where the floor binds on
    # some layers of this tiny model (at the default β = 0.1 with the mean it binds on none)
    editor = new_editor("llama", **({"gate_span_beta": 1.0, "gate_layer_mean": False} if share is None
                                    else {"gate_subject_share": share}))
    hp = editor.hparams
    rho = hp.gate_subject_share
    assert (rho > 0) == (share is None)
    assert hp.gate == "span"
    n_cal = sum(len(s) for s in editor.calibration)
    assert 0 < n_cal <= hp.gate_calibration_tokens  # the whole budget where the corpus holds enough text
    model = editor.model
    before = {id(r): _p_first(model, tokenizer, r) for r in (R1, R2)}
    editor.edit([R1])
    editor.edit([R2])
    with editor.applied():
        for r in (R1, R2):
            assert _p_first(model, tokenizer, r) > 1.2 * before[id(r)], r["prompt"]
        hooks = editor.hooks
        # the calibration text opens each gate on a share ε of its tokens (to a token or two), or less
        text = text_pass(model, tokenizer, _calibration_sample(editor), hooks)
        assert text["tokens"] == n_cal
        for l in editor.layers:
            opened = text["open"][l] * n_cal / 100
            if rho == 0:
                assert abs(opened - hp.gate_false_open * n_cal) <= 3, (l, opened)
            else:
                assert opened <= hp.gate_false_open * n_cal + 3, (l, opened)
        # and α is exactly that of the pass the editor calibrates with: the calibration text and R2's prompt
        from comeba.text import encode_prompt, subject_last_index

        [r2] = make_requests([R2])
        ids, mask = pad_batch(editor.calibration + [encode_prompt(tokenizer, r2.text)], tokenizer.pad_token_id)
        at = subject_last_index(tokenizer, r2.prompt, r2.subject)
        general = mask.bool().clone()
        general[-1] = False
        hooks.record(True)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        floored = 0
        for l, s in editor.layers.items():
            want = calibrated_threshold(hooks.records[l].scores[general], hp.gate_false_open)
            subject = float(hooks.records[l].scores[-1, at])
            assert subject >= s.alpha  # the batch just written opens every layer
            assert s.alpha == pytest.approx(max(want, rho * subject), rel=1e-6, abs=1e-7)
            floored += rho * subject > want
        assert (floored > 0) == (rho > 0)  # with ρ > 0 the floor sets α on some layers of this tiny model
        hooks.record(False)
        # where edits must act, the gate opens: the edited subjects' last tokens
        rates = subject_open_rates(model, tokenizer, hooks, make_requests([R1, R2]))
        # R2 (the batch just written) opens every layer (the subject floor); R1 may have been shut at a layer by
        # the later α when the calibration text is small (without ../shared/data it is ~400 tokens)
        assert set(rates["edit"]) == set(editor.layers) and all(v >= 50.0 for v in rates["edit"].values())


def _town(i: int) -> dict:
    return {"prompt": f"The mayor of Town{i} is", "subject": f"Town{i}", "target_new": "Smith"}


def test_remember_keeps_a_fixed_size_uniform_sample_of_every_edit(tokenizer):
    """Reservoir sampling: the first `size` edits in order, then each later edit replaces a random slot with
    probability size / (edits so far), so every edit is kept with the same probability, whatever its age."""
    from comeba.text import encode_prompt

    batches = [make_requests([_town(b * 10 + i) for i in range(10)]) for b in range(30)]
    ident = {tuple(encode_prompt(tokenizer, r.text)): b * 10 + i for b, batch in enumerate(batches)
             for i, r in enumerate(batch)}
    kept_by_age = torch.zeros(3)
    for seed in range(60):
        memory: list[Remembered] = []
        for b, batch in enumerate(batches):
            memory = remember(memory, batch, tokenizer, seen=10 * b, size=24, seed=seed)
            assert len(memory) == min(24, 10 * (b + 1))
            if b == 1:
                assert [ident[m.ids] for m in memory] == list(range(20))  # the first ones, in order
        assert len({m.ids for m in memory}) == 24  # no edit twice
        for m in memory:
            kept_by_age[ident[m.ids] // 100] += 1
            assert m.subject > 0
        again = []
        for b, batch in enumerate(batches):
            again = remember(again, batch, tokenizer, seen=10 * b, size=24, seed=seed)
        assert again == memory  # the draw depends on the seed and the count only (a reload draws the same)
    share = kept_by_age / kept_by_age.sum()
    assert torch.all((share - 1 / 3).abs() < 0.06), share  # old and new edits alike (60 × 24 draws)
    assert remember([], batches[0], tokenizer, seen=0, size=0, seed=0) == []
    first = make_requests([{"prompt": "{} is the mayor", "subject": "Smith", "target_new": "Bob"}])
    if subject_index(tokenizer, first[0]) == 0:
        assert remember([], first, tokenizer, seen=0, size=4, seed=0) == []  # cannot open the gate: not kept


def subject_index(tokenizer, r) -> int:
    from comeba.text import subject_last_index

    return subject_last_index(tokenizer, r.prompt, r.subject)


def test_span_threshold_keeps_remembered_subjects_open_down_to_eps_max():
    torch.manual_seed(0)
    scores = torch.rand(12, 100) * 0.5  # rows 0..9: general text
    scores[10, 3] = 0.9  # this batch's subject
    q, q_max = (calibrated_threshold(scores[:10], e) for e in (1e-3, 5e-3))
    assert span_threshold(scores, 10, [(10, 3)], 1e-3, 5e-3, 0.0) == pytest.approx(q)
    for kept, want in ((0.3, q_max), (0.5 * (q + q_max), 0.5 * (q + q_max)), (0.95, q)):
        scores[11, 2] = kept
        got = span_threshold(scores, 10, [(10, 3)], 1e-3, 5e-3, 0.0, kept=[(11, 2)])
        assert got == pytest.approx(want), kept
    # the floor (ρ times the batch's median) comes from the batch alone
    scores[11, 2] = 0.1
    assert span_threshold(scores, 10, [(10, 3)], 1e-3, 5e-3, 0.9, kept=[(11, 2)]) == pytest.approx(0.81)
    assert span_threshold(scores, 10, [], 1e-3, 5e-3, 0.9, kept=[(11, 2)]) == pytest.approx(q_max)


def test_gate_memory_lowers_alpha_for_earlier_subjects_and_survives_save_load(new_editor, make_tiny, tokenizer,
                                                                              tmp_path):
    """With `gate_memory`, each calibration also runs the kept earlier prompts: α is at most what keeps their
    subjects open (down to the ε_max quantile); the memory is saved, reloaded and resumed identically."""
    editor = new_editor("llama", gate_memory=8)
    for r in (R1, R2, R3):
        editor.edit([r])
    assert [m.ids for m in editor.memory] == [tuple(encode_prompt(tokenizer, x.text)) for x in make_requests([R1, R2, R3])]
    hp = editor.hparams
    batch = make_requests([R4])
    with HookLayers(editor.model, editor.layout, editor.layers) as hooks:
        args = (hooks, editor.model, tokenizer, editor.layout, editor.calibration, batch, hp.gate_false_open,
                hp.gate_false_open_max, 0.0)
        alone = calibrate_span(*args)
        kept = calibrate_span(*args, memory=editor.memory)
        hooks.record(True)
        ids, mask = pad_batch(editor.calibration + [list(m.ids) for m in editor.memory], tokenizer.pad_token_id)
        with torch.no_grad():
            editor.model(input_ids=ids, attention_mask=mask)
        n = len(editor.calibration)
        for l in hp.layers:
            assert kept[l] <= alone[l] + 1e-7
            general = hooks.records[l].scores[:n]
            floor = calibrated_threshold(general, hp.gate_false_open_max)
            for i, m in enumerate(editor.memory):  # the hooks now hold α `kept`: each kept subject opens
                score = float(hooks.records[l].scores[n + i, m.subject])
                assert score >= kept[l] - 1e-6 or kept[l] == pytest.approx(floor, rel=1e-5), (l, i)
        hooks.record(False)

    editor.save_pretrained(tmp_path / "state")
    assert {"memory.ids", "memory.lengths", "memory.subjects"} <= set(load_file(str(tmp_path / "state" / EDITING_STATE)))
    loaded = Editor.from_pretrained(make_tiny("llama"), tokenizer, tmp_path / "state", progress=False)
    assert loaded.memory == editor.memory
    editor.edit([R4])
    loaded.edit([R4])
    assert loaded.memory == editor.memory and len(loaded.memory) == 4
    for l, s in editor.layers.items():
        assert loaded.layers[l].alpha == pytest.approx(s.alpha, rel=1e-4)
    # a failed batch leaves the memory as it was
    before = list(editor.memory)
    with pytest.raises(Exception):
        editor.edit([{"prompt": "The mayor of {} is", "subject": "Nowhere", "target_new": "x" * 10_000}])
    assert editor.memory == before


def _assert_same_states(a: Editor, b: Editor) -> None:
    assert set(a.layers) == set(b.layers)
    for l, s in a.layers.items():
        t = b.layers[l]
        assert t.alpha == s.alpha, f"layer {l}: alpha"
        for name in ("delta", "c_accu", "c0"):
            x, y = getattr(s, name), getattr(t, name)
            assert (x is None) == (y is None), name
            if x is not None:
                assert x.dtype == y.dtype and torch.equal(x, y), f"layer {l}: {name}"
        assert (s.span is None) == (t.span is None)
        if s.span is not None:
            assert torch.equal(s.span.whiten, t.span.whiten) and torch.equal(s.span.span, t.span.span), f"layer {l}"


def test_span_state_save_load_resume(new_editor, make_tiny, tokenizer, tmp_path):
    editor = new_editor("llama")
    editor.edit([R1])
    editor.edit([R2])
    editor.save_pretrained(tmp_path / "state")
    config = json.loads((tmp_path / "state" / ADAPTER_CONFIG).read_text())
    assert config["hparams"]["gate"] == "span" and config["gate"] == "span"
    tensors = load_file(str(tmp_path / "state" / EDITING_STATE))
    assert {"calibration.ids", "calibration.lengths"} <= set(tensors)
    names = [editor.layout.mlp_out_name(l) for l in editor.layers]
    assert {f"{m}.c0" for m in names} <= set(tensors)
    weights = load_file(str(tmp_path / "state" / ADAPTER_WEIGHTS))
    assert set(weights) == {f"{m}.{t}" for m in names for t in ("delta", "gate.whiten", "gate.span")}

    fresh = make_tiny("llama")
    loaded = Editor.from_pretrained(fresh, tokenizer, tmp_path / "state", progress=False)
    assert loaded.hparams == editor.hparams and loaded.calibration == editor.calibration
    assert (loaded.n_batches, loaded.n_edits) == (2, 2)
    _assert_same_states(editor, loaded)
    texts = [R1["prompt"], R2["prompt"], UNRELATED[0]]
    with editor.applied(), loaded.applied():
        editor.hooks.record(True), loaded.hooks.record(True)
        for t in texts:
            _same_logits(_logits(fresh, tokenizer, t), _logits(editor.model, tokenizer, t), t)
            for l in editor.layers:
                assert torch.equal(loaded.hooks.records[l].gate, editor.hooks.records[l].gate)
                # the live editor scores with H's factor, the loaded one with H: the same to float32 rounding
                torch.testing.assert_close(loaded.hooks.records[l].scores, editor.hooks.records[l].scores,
                                           rtol=0, atol=2e-6, equal_nan=True)

    # it resumes: the next batch gives the same state on both
    editor.edit([R3])
    loaded.edit([R3])
    assert loaded.n_batches == 3
    for l, s in editor.layers.items():
        torch.testing.assert_close(loaded.layers[l].delta, s.delta, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(loaded.layers[l].c_accu, s.c_accu)
        assert loaded.layers[l].alpha == pytest.approx(s.alpha, rel=1e-4)
        torch.testing.assert_close(loaded.layers[l].span.span, s.span.span, rtol=1e-4, atol=1e-6)


def test_span_state_without_its_calibration_text_is_refused(new_editor, make_tiny, tokenizer, tmp_path):
    editor = new_editor("llama")
    editor.edit([R1])
    editor.save_pretrained(tmp_path / "state")
    config = json.loads((tmp_path / "state" / ADAPTER_CONFIG).read_text())
    path = tmp_path / "state" / EDITING_STATE
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("calibration.")}
    save_file(tensors, str(path), metadata=metadata)
    from comeba.files import sha256_file

    config["files"][EDITING_STATE] = sha256_file(path)  # a whole state, written without its calibration text
    (tmp_path / "state" / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(StateError, match="calibration"):
        Editor.from_pretrained(make_tiny("llama"), tokenizer, tmp_path / "state", progress=False)


@pytest.mark.parametrize("drop", ["memory.subjects", "memory.lengths"])
def test_state_with_part_of_its_gate_memory_is_refused(new_editor, make_tiny, tokenizer, tmp_path, drop):
    """A memory whose prompts and subject positions do not go together is a StateError naming the part."""
    editor = new_editor("llama", gate_memory=4)
    editor.edit([R1, R2])
    editor.save_pretrained(tmp_path / "state")
    config = json.loads((tmp_path / "state" / ADAPTER_CONFIG).read_text())
    path = tmp_path / "state" / EDITING_STATE
    from safetensors import safe_open

    from comeba.files import sha256_file

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    save_file({k: v for k, v in load_file(str(path)).items() if k != drop}, str(path), metadata=metadata)
    config["files"][EDITING_STATE] = sha256_file(path)
    (tmp_path / "state" / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(StateError, match=drop.replace(".", r"\.")):
        Editor.from_pretrained(make_tiny("llama"), tokenizer, tmp_path / "state", progress=False)


def test_reference_state_without_gate_key_loads_as_reference(new_editor, make_tiny, tokenizer, tmp_path):
    """A state saved before the span gate existed (no gate keys in its hparams) keeps the reference rule."""
    editor = new_editor("llama", gate="reference")
    editor.edit([R1, R2])
    editor.save_pretrained(tmp_path / "new")
    config = json.loads((tmp_path / "new" / ADAPTER_CONFIG).read_text())
    assert config["hparams"]["gate"] == "reference" and config["gate"] == "reference"
    assert not any(k.endswith((".c0", ".gate.span")) or k.startswith("calibration.")
                   for name in (ADAPTER_WEIGHTS, EDITING_STATE) for k in load_file(str(tmp_path / "new" / name)))
    _write_v1(editor, tmp_path / "state")  # as format 1 wrote it before the span gate existed
    path = tmp_path / "state" / "comeba_config.json"
    config = json.loads(path.read_text())
    for key in ("gate", "gate_false_open", "gate_calibration_tokens", "gate_alpha0"):
        del config["hparams"][key]
    path.write_text(json.dumps(config))

    fresh = make_tiny("llama")
    loaded = Editor.from_pretrained(fresh, tokenizer, tmp_path / "state", progress=False)
    assert loaded.hparams.gate == "reference" and loaded.hparams == editor.hparams
    assert loaded.calibration == []
    _assert_same_states(editor, loaded)
    assert all(s.c0 is None and s.span is None for s in loaded.layers.values())
    with editor.applied(), loaded.applied():
        assert all(w.span is None for w in loaded.hooks.weights.values())  # the z-score gate
        for t in (R1["prompt"], UNRELATED[0], UNRELATED[5]):
            assert torch.equal(_logits(fresh, tokenizer, t), _logits(editor.model, tokenizer, t)), t
    # and it goes on with the reference rule: α a running minimum, the same on both
    alphas = {l: s.alpha for l, s in loaded.layers.items()}
    editor.edit([R3])
    loaded.edit([R3])
    for l, s in loaded.layers.items():
        assert s.alpha <= alphas[l]
        assert s.alpha == pytest.approx(editor.layers[l].alpha, rel=1e-5)
        torch.testing.assert_close(s.delta, editor.layers[l].delta, rtol=1e-5, atol=1e-7)


# ============================================================================ diagnostics


@pytest.fixture(scope="module")
def diagnostics_file(tmp_path_factory):
    """General text for the diagnostics: a dozen paragraphs of 200+ characters (and a heading and a short line)."""
    from tiny import _training_lines

    lines = [l for l in _training_lines(400) if not l.startswith("=")]
    long = [l for l in lines if len(l) >= 200][:12]
    if len(long) < 4:  # without ../shared/data: join the short fallback lines into long paragraphs
        words = " ".join(lines).split()
        long = [" ".join(words[i:i + 45]) for i in range(0, len(words) - 45, 45)][:12]
    assert len(long) >= 4 and all(len(l) >= 200 for l in long)
    path = tmp_path_factory.mktemp("diag") / "general.txt"
    path.write_text("= Heading that is skipped =\nshort line\n" + "\n".join(long) + "\n", encoding="utf-8")
    return path


@torch.no_grad()
def _perplexity_by_hand(model, sample: TextSample) -> float:
    nll, count = 0.0, 0
    for seq in sample.ids:
        ids = torch.tensor([seq], dtype=torch.long)
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        nll -= float(logp.gather(-1, ids[0, 1:, None]).sum())
        count += len(seq) - 1
    return math.exp(nll / count)


def test_general_text_sample(tokenizer, diagnostics_file):
    sample = general_text_sample(tokenizer, diagnostics_file, n_sequences=5, seq_len=30)
    assert len(sample.ids) == 5 and all(len(s) == 30 for s in sample.ids)
    assert sample.n_tokens == 150 and "5 paragraphs" in sample.describe
    with pytest.raises(FileNotFoundError):
        general_text_sample(tokenizer, diagnostics_file.with_name("none.txt"))


def test_text_pass_perplexity_by_hand(make_tiny, tokenizer, diagnostics_file):
    model = make_tiny("llama")
    sample = general_text_sample(tokenizer, diagnostics_file, n_sequences=6, seq_len=40)
    # sequences of different lengths, so batches are padded
    ragged = TextSample(tuple(s[: 12 + 5 * i] for i, s in enumerate(sample.ids)), "ragged")
    for s in (sample, ragged):
        got = text_pass(model, tokenizer, s, batch_size=4)
        assert got["tokens"] == s.n_tokens and "open" not in got
        assert got["perplexity"] == pytest.approx(_perplexity_by_hand(model, s), rel=1e-5)


def test_huge_alpha_opens_nothing_and_keeps_the_perplexity(make_tiny, tokenizer, diagnostics_file):
    model = make_tiny("llama")
    sample = general_text_sample(tokenizer, diagnostics_file, n_sequences=8, seq_len=40)
    plain = text_pass(model, tokenizer, sample, batch_size=3)
    with _span_hooks(model, tokenizer, 1e9) as hooks:
        shut = text_pass(model, tokenizer, sample, hooks, batch_size=3)
        report = gate_report(model, tokenizer, sample, hooks, make_requests([R1, R2]), plain["perplexity"])
        assert hooks.records is None  # recording is switched off again
    assert shut["perplexity"] == plain["perplexity"]
    assert shut["open"] == {l: 0.0 for l in LAYERS}
    assert report["false_open_max"] == 0 and report["perplexity_ratio"] == 1.0
    assert report["edit_open_min"] == 0
    with _span_hooks(model, tokenizer, -1.0) as hooks:  # open everywhere: every real token, padding not
        wide = text_pass(model, tokenizer, sample, hooks, batch_size=3)
    assert wide["open"] == {l: 100.0 for l in LAYERS} and wide["perplexity"] != plain["perplexity"]


def test_subject_open_rates(new_editor, tokenizer):
    from comeba.text import subject_last_index

    editor = new_editor("llama")
    r1 = {**R1, "rephrase_prompt": ["Danielle Darrieux speaks", "The language of Danielle Darrieux is"]}
    r2 = {**R2, "rephrase_prompt": "In France the capital is"}
    requests = make_requests([r1, r2])
    editor.edit(requests)
    model = editor.model
    with editor.applied():
        hooks = editor.hooks

        def set_alpha(alpha):
            for l, s in editor.layers.items():
                hooks.set(l, LayerState(s.delta, alpha(l), s.span))

        set_alpha(lambda l: 1e-9)
        rates = subject_open_rates(model, tokenizer, hooks, requests)
        assert rates == {"edit": {1: 100.0, 2: 100.0}, "rephrase": {1: 100.0, 2: 100.0}}
        set_alpha(lambda l: 1e9)
        rates = subject_open_rates(model, tokenizer, hooks, requests, batch_size=1)
        assert rates == {"edit": {1: 0.0, 2: 0.0}, "rephrase": {1: 0.0, 2: 0.0}}
        # α between the two subjects' scores at layer 1 (whose keys do not depend on the gates): 50 %
        hooks.record(True)
        scores = []
        for r in requests:
            _logits(model, tokenizer, r.text)
            scores.append(float(hooks.records[1].scores[0, subject_last_index(tokenizer, r.prompt, r.subject)]))
        hooks.record(False)
        assert scores[0] != scores[1]
        set_alpha(lambda l: sum(scores) / 2 if l == 1 else 1e9)
        rates = subject_open_rates(model, tokenizer, hooks, requests)
        assert rates["edit"] == {1: 50.0, 2: 0.0}
    # no rephrasings: no "rephrase" entry
    with editor.applied():
        assert set(subject_open_rates(model, tokenizer, editor.hooks, make_requests([R1]))) == {"edit"}


# ============================================================================ the eval harness


EVAL_REQUESTS = [
    {**R1, "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux speaks",
     "locality_prompt": "The capital of Germany is", "locality_ground_truth": "Berlin"},
    {**R2, "ground_truth": "Paris", "rephrase_prompt": ["The main city of France", "In France the capital is"],
     "locality_prompt": "London is the capital of", "locality_ground_truth": "the United Kingdom"},
    {**R3, "ground_truth": "steak", "rephrase_prompt": "Michael Jordan likes to eat",
     "locality_prompt": "The team played football in", "locality_ground_truth": "the stadium"},
    {"prompt": "The first album of the band", "subject": "the band", "target_new": "Paris", "ground_truth": "Rome",
     "locality_prompt": "Her father was a", "locality_ground_truth": "doctor"},
]


@pytest.mark.parametrize("method,protocol", [("comeba", "consecutive"), ("comeba", "single"), ("memit", "consecutive")])
def test_evaluate_writes_the_diagnostics(make_tiny, tokenizer, corpus_file, diagnostics_file, tmp_path, method,
                                         protocol):
    model = make_tiny("llama")
    settings = Settings(generation=False, fluency_tokens=0, diagnostics_text=str(diagnostics_file))
    out = tmp_path / "run"
    summary = evaluate(model, tokenizer, EVAL_REQUESTS, method=method, protocol=protocol, hparams=HParams(**HP),
                       corpus=text_corpus([corpus_file]), batch_size=2, checkpoint_every=1, settings=settings,
                       out=out, progress=False)
    unedited = text_pass(model, tokenizer, general_text_sample(tokenizer, diagnostics_file))["perplexity"]
    gate_keys = {f"{kind}_open_{l}" for kind in ("false", "edit", "rephrase") for l in (1, 2)}
    gate_keys |= {"false_open_max", "edit_open_min", "rephrase_open_min"}
    checkpoints = summary["checkpoints"]
    assert [c["n_edits"] for c in checkpoints] == [2, 4]
    for c in checkpoints:
        assert c["perplexity"] > 1 and c["perplexity_ratio"] == pytest.approx(c["perplexity"] / unedited, rel=1e-3)
        if method == "comeba":
            assert gate_keys <= set(c)
            assert all(0 <= c[k] <= 100 for k in gate_keys)
            assert c["false_open_max"] == max(c["false_open_1"], c["false_open_2"])
            for kind in ("edit", "rephrase"):
                assert c[f"{kind}_open_min"] == min(c[f"{kind}_open_1"], c[f"{kind}_open_2"])
            if c["false_open_max"] == 0:  # the gates stayed shut on the general text: its perplexity is unchanged
                assert c["perplexity_ratio"] == 1.0
        else:  # no gate: no open rates, and the edited weights act on every token
            assert not any(k.startswith(("false_open", "edit_open", "rephrase_open")) for k in c)
            assert c["perplexity_ratio"] != 1.0
    if method == "comeba":
        assert max(c["edit_open_1"] for c in checkpoints) > 0  # it opens on some edited subject
        if protocol == "consecutive":
            assert summary["method_info"]["gate"] == "span"
    rows = list(csv.DictReader((out / "checkpoints.csv").read_text().splitlines()))
    assert len(rows) == 2
    for row, c in zip(rows, checkpoints):
        for k in ("perplexity", "perplexity_ratio") + (tuple(sorted(gate_keys)) if method == "comeba" else ()):
            assert row[k] != "" and float(row[k]) == pytest.approx(c[k]), k


def test_span_threshold_lowers_alpha_for_the_batch_subjects_within_the_false_open_bound():
    from comeba.gate import span_threshold

    g = torch.Generator().manual_seed(0)
    general = torch.rand(40, 50, generator=g, dtype=torch.float64)  # 2,000 general-text scores in [0, 1)
    general[3, 40:] = float("nan")  # padding
    prompts = torch.full((2, 50), float("nan"), dtype=torch.float64)
    scores = torch.cat([general, prompts])
    hi = calibrated_threshold(general, 1e-3)
    lo = calibrated_threshold(general, 5e-2)
    # subjects above the (1 − ε) quantile: α is that quantile
    scores[40, 5], scores[41, 7] = hi + 0.001, 0.9999
    assert span_threshold(scores, 40, [(40, 5), (41, 7)], 1e-3, 5e-2) == hi
    # a subject below it: α comes down to that subject's score, so it opens ...
    scores[41, 7] = (hi + lo) / 2
    alpha = span_threshold(scores, 40, [(40, 5), (41, 7)], 1e-3, 5e-2)
    assert alpha == scores[41, 7].item() and scores[41, 7] >= alpha
    # ... but never below the (1 − ε_max) quantile
    scores[41, 7] = lo / 2
    assert span_threshold(scores, 40, [(40, 5), (41, 7)], 1e-3, 5e-2) == lo
    # no subjects: the plain quantile; the padding is ignored
    assert span_threshold(scores, 40, [], 1e-3, 5e-2) == hi
    finite = general[torch.isfinite(general)]
    assert (finite >= lo).double().mean().item() == pytest.approx(5e-2, abs=1e-3)


def test_span_threshold_floor_is_a_share_of_the_subjects_median():
    from comeba.gate import span_threshold

    g = torch.Generator().manual_seed(1)
    general = torch.rand(40, 50, generator=g, dtype=torch.float64) * 0.2  # general text scores in [0, 0.2)
    subjects = torch.full((3, 50), float("nan"), dtype=torch.float64)
    subjects[0, 4], subjects[1, 2], subjects[2, 9] = 0.7, 0.8, 0.9  # median 0.8
    scores = torch.cat([general, subjects])
    where = [(40, 4), (41, 2), (42, 9)]
    hi = calibrated_threshold(general, 1e-3)
    assert span_threshold(scores, 40, where, 1e-3, 5e-2) == hi  # without a floor: the quantile
    assert span_threshold(scores, 40, where, 1e-3, 5e-2, subject_share=0.5) == pytest.approx(0.4)  # ρ · median
    # a subject below the floor does not pull α under it (the floor keeps near-misses shut)
    scores[40, 4] = 0.3
    assert span_threshold(scores, 40, where, 1e-3, 5e-2, subject_share=0.5) == pytest.approx(0.4)
    # a floor under the quantile changes nothing
    assert span_threshold(scores, 40, where, 1e-3, 5e-2, subject_share=0.1) == hi
    with pytest.raises(Exception, match="gate_subject_share"):
        HParams(gate_subject_share=1.0)


def test_a_batch_s_own_subjects_open_after_calibration(make_tiny, tokenizer, corpus_file, shared_comeba_home):
    from comeba.diagnostics import subject_open_rates
    from comeba.requests import make_requests as _mk

    model = make_tiny("llama")
    hp = HParams(layers=[1, 2], v_num_grad_steps=20, clamp_norm_factor=10.0, mom2_update_weight=20.0,
                 mom2_n_tokens=2000, context_template_prefixes=["The"], context_template_length=6,
                 gate_false_open_max=0.2)
    editor = Editor(model, tokenizer, hp, corpus=text_corpus([corpus_file]), progress=False)
    batches = [
        [{"prompt": "The mother tongue of Danielle Darrieux", "subject": "Danielle Darrieux", "target_new": "English"},
         {"prompt": "The capital city of France", "subject": "France", "target_new": "Berlin"}],
        [{"prompt": "The favourite food of Michael Jordan", "subject": "Michael Jordan", "target_new": "pizza"},
         {"prompt": "The first album of the band", "subject": "the band", "target_new": "Paris"}],
    ]
    for batch in batches:
        editor.edit(batch)
        with editor.applied():
            rates = subject_open_rates(model, tokenizer, editor.hooks, _mk(batch))
        assert all(v == 100.0 for v in rates["edit"].values()), rates


def test_span_gate_factor_follows_h_until_it_would_be_square():
    """An editor that starts unedited keeps H's factor F (H = F Fᵀ, one column per edited key): its scores are
    the dense ones to float32 rounding, and the factor is dropped once it would be as wide as H is square."""
    d, lam, beta = 48, 1000.0, 0.1
    c0 = _spd(d, 3).float()
    gate = span_gate(c0, lam * c0.double(), lam, beta, unedited=True)
    assert gate.factor is not None and tuple(gate.factor.shape) == (d, 0)
    assert span_gate(c0, lam * c0.double(), lam, beta).factor is None  # unknown edits: no factor
    probe = _keys(c0.double(), 200, 7).float()
    torch.testing.assert_close(span_scores(probe, gate), torch.zeros(200))
    for b in range(12):
        keys = _keys(c0.double(), 5, 100 + b).float()
        gate = span_gate_added(gate, keys, beta)
        if 5 * (b + 1) < d:
            assert gate.factor.shape == (d, 5 * (b + 1))
            torch.testing.assert_close(gate.factor @ gate.factor.T, gate.span, rtol=0, atol=1e-6)
            dense = span_scores(probe, SpanGate(gate.whiten, gate.span))
            torch.testing.assert_close(span_scores(probe, gate), dense, rtol=0, atol=2e-6)
            assert float(dense.max()) > 0.05  # not all zero: the edited span shows
        else:
            assert gate.factor is None
    assert gate.to("cpu").factor is None


def test_span_scores_only_at_valid_tokens():
    d, lam = 16, 20.0
    c0 = _spd(d, 8).float()
    k = _keys(c0.double(), 30, 9).float()
    gate = span_gate(c0, lam * c0.double() + k[:6].double().T @ k[:6].double(), lam)
    keys = k.reshape(3, 10, d)
    valid = torch.rand(3, 10, generator=torch.Generator().manual_seed(0)) > 0.4
    got = span_scores(keys, gate, valid)
    assert got.shape == (3, 10) and bool(got[~valid].isnan().all())
    torch.testing.assert_close(got[valid], span_scores(keys, gate)[valid], rtol=1e-6, atol=1e-7)


def test_calibration_leaves_out_the_skipped_subjects(new_editor, tokenizer):
    """`skip` (the editor's subjects whose key carries no context, with `gate_open_no_context: false`): their
    prompts run, but α is what general text alone sets, as for a batch without them."""
    editor = new_editor("llama")
    editor.edit([R1, R2])
    hp = editor.hparams
    with HookLayers(editor.model, editor.layout, editor.layers, layer_mean=hp.gate_layer_mean) as hooks:
        def alpha(batch, **kw):
            return calibrate_span(hooks, editor.model, tokenizer, editor.layout, editor.calibration,
                                  make_requests(batch) if batch else [], hp.gate_false_open,
                                  hp.gate_false_open_max, 0.9, **kw)
        counted, skipped, none = alpha([R3]), alpha([R3], skip={0}), alpha([])
    assert skipped == pytest.approx(none, rel=1e-6)
    assert any(counted[l] != pytest.approx(none[l], rel=1e-6) for l in hp.layers), (counted, none)
    with pytest.raises(HParamsError, match="gate_open_no_context"):
        HParams(gate_open_no_context="no")
