"""comeba.evaluate and comeba.alphaedit: protocols, methods, output files, AlphaEdit's math."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from comeba import alphaedit
from comeba import evaluate as ev
from comeba.baselines import AlphaEditEditor, make_baseline
from comeba.cli import METHODS as EVAL_METHODS
from comeba.cli import PROTOCOLS as EVAL_PROTOCOLS
from comeba.cli import main
from comeba.evaluate import EvalError, evaluate
from comeba.hparams import HParams
from comeba.methods import METHODS, PROTOCOLS
from comeba.models import detect_layout, mlp_out_weight, weights_checksum
from comeba.reporting import format_summary
from comeba.requests import make_requests
from comeba.scoring import CORE, Settings, aggregate, evaluate_requests, locality_reference
from comeba.stats import load_or_compute_stats
from comeba.corpus import text_corpus
from test_metrics import ShiftModel, _word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread", "shared_comeba_home")

# As test_editor: two layers, one extra context template, a wide clamp, small λ. AlphaEdit's
# L2 is absolute (the paper's "+ I") and the tiny models' keys are tiny (E‖k‖² ≈ 1e-2), so it
# is scaled down with them; the null space keeps the directions holding 30 % of the key energy.
HP = HParams(
    layers=[1, 2],
    v_num_grad_steps=20,
    clamp_norm_factor=10.0,
    mom2_update_weight=100.0,
    mom2_n_tokens=2000,
    context_template_prefixes=["The"],
    context_template_length=6,
    nullspace_energy=0.3,
    L2=1e-4,
)
SETTINGS = Settings(counterfact=True, generation=True, fluency_tokens=5)

REQUESTS = [
    {"prompt": "The mother tongue of Danielle Darrieux", "subject": "Danielle Darrieux", "target_new": "English",
     "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux speaks",
     "locality_prompt": "The capital of Germany is", "locality_ground_truth": "Berlin"},
    {"prompt": "The capital city of France", "subject": "France", "target_new": "Berlin", "ground_truth": "Paris",
     "rephrase_prompt": ["The main city of France", "In France the capital is"],
     "locality_prompt": "London is the capital of", "locality_ground_truth": "the United Kingdom"},
    {"prompt": "The favourite food of Michael Jordan", "subject": "Michael Jordan", "target_new": "pizza",
     "ground_truth": "steak", "rephrase_prompt": "Michael Jordan likes to eat",
     "locality_prompt": "The team played football in", "locality_ground_truth": "the stadium"},
    {"prompt": "The first album of the band", "subject": "the band", "target_new": "Paris", "ground_truth": "Rome",
     "locality_prompt": ["Her father was a", "Because the weather was"],
     "locality_ground_truth": ["doctor", "cold"]},
]

SUMMARY_KEYS = {"method", "protocol", "n_edits", "batch_size", "pre", "post", "checkpoints", "seconds", "peak_rss_mb"}


@pytest.fixture
def corpus(corpus_file):
    return text_corpus([corpus_file])


@pytest.fixture
def llama(make_tiny):
    return make_tiny("llama")


def _run(model, tokenizer, corpus, method, protocol, out=None, requests=REQUESTS, **kw):
    return evaluate(model, tokenizer, requests, method=method, protocol=protocol, hparams=HP, corpus=corpus,
                    batch_size=2, checkpoint_every=1, settings=SETTINGS, out=out, progress=False, **kw)


# ============================================================================ end to end


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_protocol_end_to_end(llama, tokenizer, corpus, tmp_path, method, protocol):
    before = weights_checksum(llama)
    out = tmp_path / "run"
    summary = _run(llama, tokenizer, corpus, method, protocol, out)
    assert weights_checksum(llama) == before  # the model is handed back unedited (weights restored, hooks gone)
    assert not [h for m in llama.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]

    assert SUMMARY_KEYS <= set(summary)
    assert (summary["method"], summary["protocol"], summary["n_edits"], summary["batch_size"]) == (method, protocol, 4, 2)
    for part in ("pre", "post"):
        assert set(CORE) <= set(summary[part])
        assert {"efficacy_score", "paraphrase_score", "neighborhood_score", "fluency",
                "reliability_generation", "generality_generation"} <= set(summary[part])
        for k in CORE:
            assert 0 <= summary[part][k] <= 100
    assert summary["pre"]["locality"] == 100.0
    assert [c["n_edits"] for c in summary["checkpoints"]] == [2, 4]
    for c in summary["checkpoints"]:
        assert set(CORE) <= set(c)
    if protocol == "consecutive":  # the last checkpoint evaluates all edits: the final values
        assert all(summary["checkpoints"][-1][k] == pytest.approx(summary["post"][k], abs=1e-3) for k in CORE)
    assert summary["seconds"] > 0 and summary["peak_rss_mb"] > 0

    # files: records (pre and post per record), summary, CSV, PNG; the resume files are gone
    assert json.loads((out / "summary.json").read_text())["post"] == summary["post"]
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3] and [r["batch"] for r in records] == [1, 1, 2, 2]
    for r in records:
        assert set(CORE) <= set(r["pre"]) and set(CORE) <= set(r["post"])
    assert records[3]["pre"]["generality"] is None  # no rephrase prompt: left out, not counted as 0
    rows = list(csv.DictReader((out / "checkpoints.csv").read_text().splitlines()))
    assert [int(r["n_edits"]) for r in rows] == [2, 4] and set(CORE) <= set(rows[0])
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "progress.json").exists() and not (out / "state").exists()


@pytest.mark.parametrize("method", ["comeba", "memit"])
def test_single_round_batches_start_from_the_original_model(llama, tokenizer, corpus, method):
    """A batch's post-edit values do not depend on the batches edited (and removed) before it."""
    both = _run(llama, tokenizer, corpus, method, "single", requests=REQUESTS[:2] + REQUESTS[2:])
    alone = _run(llama, tokenizer, corpus, method, "single", requests=REQUESTS[2:])
    # records 3-4 of the first run against records 1-2 of the second: checkpoint means over the second batch
    n2 = both["checkpoints"][-1]["n_edits"] - both["checkpoints"][0]["n_edits"]
    for k in ("reliability", "locality"):
        second = (both["checkpoints"][-1][k] * 4 - both["checkpoints"][0][k] * 2) / n2
        assert second == pytest.approx(alone["checkpoints"][0][k], abs=1e-2)


def test_a_record_that_replaces_an_edit_of_its_batch_starts_the_next_batch(llama, tokenizer, corpus, tmp_path):
    """CounterFact repeats some prompts with other targets: a run writes the later one in a later batch."""
    again = dict(REQUESTS[1], target_new="Madrid")
    summary = evaluate(llama, tokenizer, [REQUESTS[0], REQUESTS[1], again, REQUESTS[2]], method="comeba",
                       hparams=HP, corpus=corpus, batch_size=3, checkpoint_every=1, settings=SETTINGS,
                       out=tmp_path / "run", progress=False)
    assert summary["n_batches"] == 2 and [c["n_edits"] for c in summary["checkpoints"]] == [2, 4]
    records = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in records] == [1, 1, 2, 2]
    assert [r["target_new"] for r in records[1:3]] == ["Berlin", "Madrid"]


def test_edits_take_effect_and_comeba_keeps_locality(llama, tokenizer, corpus):
    summary = _run(llama, tokenizer, corpus, "comeba", "consecutive")
    assert summary["post"]["reliability"] > summary["pre"]["reliability"]
    assert summary["post"]["efficacy_score"] >= summary["pre"]["efficacy_score"]
    assert set(summary["method_info"]["alpha"]) == {"1", "2"}
    # the neighbourhood prompts keep their answers, where the same edits written into the weights move them
    ungated = _run(llama, tokenizer, corpus, "seq-memit", "consecutive")
    assert summary["post"]["locality"] == 100.0 and ungated["post"]["locality"] < 95


def test_requests_the_editor_warns_about_are_reported_apart(llama, tokenizer, corpus, tmp_path):
    """A subject that is its prompt's first token gets a warning before editing; the run marks that record and
    gives the final means of the warned records and of the others apart, so a shortfall they cause shows."""
    first = {"prompt": "The is a word", "subject": "The", "target_new": "Paris", "ground_truth": "Rome",
             "locality_prompt": "Her father was a", "locality_ground_truth": "doctor"}
    out = tmp_path / "run"
    summary = _run(llama, tokenizer, corpus, "comeba", "consecutive", out, requests=REQUESTS[:3] + [first])
    assert [b.get("warned") for b in summary["batches"]] == [None, [3]]  # record indices, not batch positions
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r.get("warned", False) for r in records] == [False, False, False, True]
    split = summary["warned"]
    assert split["records"] == [3]
    assert split["post"]["reliability"] == pytest.approx(records[3]["post"]["reliability"], abs=1e-3)
    others = sum(r["post"]["reliability"] for r in records[:3]) / 3
    assert split["post_others"]["reliability"] == pytest.approx(others, abs=1e-3)
    assert json.loads((out / "summary.json").read_text())["warned"] == split
    text = format_summary(summary)
    assert "1 of 4 requests were warned about" in text
    assert f"{split['post_others']['reliability']:.1f} / " in text.split("on them, ")[1]
    # nothing warned (a weight editor does not warn): no split
    assert "warned" not in _run(llama, tokenizer, corpus, "memit", "consecutive", requests=REQUESTS[:2])


def test_resume_after_interrupt(llama, tokenizer, corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    full = _run(llama, tokenizer, corpus, "alphaedit", "consecutive")
    real_edit = AlphaEditEditor.edit
    calls = {"n": 0}

    def flaky(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_edit(self, batch)

    monkeypatch.setattr(AlphaEditEditor, "edit", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(llama, tokenizer, corpus, "alphaedit", "consecutive", out)
    assert json.loads((out / "progress.json").read_text())["batches_done"] == 1
    assert (out / "state.safetensors").is_file() and not (out / "summary.json").exists()
    before = weights_checksum(llama)
    resumed = _run(llama, tokenizer, corpus, "alphaedit", "consecutive", out)
    assert weights_checksum(llama) == before
    assert calls["n"] == 3  # only the second batch was edited again
    assert resumed["post"] == pytest.approx(full["post"], abs=1e-6)
    assert len(resumed["checkpoints"]) == 2
    # a finished run is not run again; another configuration is refused
    assert _run(llama, tokenizer, corpus, "alphaedit", "consecutive", out)["already_complete"]
    with pytest.raises(EvalError, match="another run"):
        _run(llama, tokenizer, corpus, "memit", "consecutive", out)


def test_comeba_resumes_from_its_saved_state(llama, tokenizer, corpus, tmp_path, monkeypatch):
    from comeba.editor import Editor

    out = tmp_path / "run"
    full = _run(llama, tokenizer, corpus, "comeba", "consecutive")
    real_edit = Editor.edit
    calls = {"n": 0}

    def flaky(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_edit(self, batch)

    monkeypatch.setattr(Editor, "edit", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(llama, tokenizer, corpus, "comeba", "consecutive", out)
    assert (out / "state" / "adapter_config.json").is_file()
    resumed = _run(llama, tokenizer, corpus, "comeba", "consecutive", out)
    assert resumed["post"] == pytest.approx(full["post"], abs=1e-6)


def test_bad_settings_are_errors(llama, tokenizer, corpus, tmp_path):
    with pytest.raises(EvalError, match="unknown method"):
        _run(llama, tokenizer, corpus, "rome", "single")
    with pytest.raises(EvalError, match="unknown protocol"):
        _run(llama, tokenizer, corpus, "memit", "sideways")
    (tmp_path / "x.txt").write_text("not a run")
    with pytest.raises(EvalError, match="non-empty folder"):
        _run(llama, tokenizer, corpus, "memit", "single", tmp_path)


# ============================================================================ metrics per record


def test_evaluate_requests_by_hand():
    """ShiftModel(s) predicts next = token + s (test_metrics); every value below is worked out by hand."""
    tok = _word_tokenizer(bos=False)
    reqs = make_requests([
        # after "a b": c then d — both right; rephrasings "b" (c, d: 2/2) and "a c" (d≠c, then d after c: 1/2)
        {"prompt": "a b", "subject": "a", "target_new": "c d", "ground_truth": "e",
         "rephrase_prompt": ["b", "a c"], "locality_prompt": ["a", "c"], "locality_ground_truth": ["b c", "d"]},
        # after "b": c ≠ e; no rephrasing
        {"prompt": "b", "subject": "b", "target_new": "e", "ground_truth": "c",
         "locality_prompt": "d", "locality_ground_truth": "e"},
    ])
    pre_model, post_model = ShiftModel(1), ShiftModel(2)
    reference = locality_reference(pre_model, tok, reqs)
    ids = {w: i for i, w in enumerate(["[PAD]", "[BOS]", "a", "b", "c", "d", "e", "f"])}
    assert reference == [[[ids["b"], ids["c"]], [ids["d"]]], [[ids["e"]]]]
    settings = Settings(counterfact=True, generation=False, fluency_tokens=0)
    pre = evaluate_requests(pre_model, tok, reqs, reference, settings)
    assert pre[0]["reliability"] == 100.0 and pre[1]["reliability"] == 0.0
    assert pre[0]["generality"] == 75.0 and pre[1]["generality"] is None
    assert pre[0]["locality"] == 100.0 and pre[1]["locality"] == 100.0
    # efficacy: nll(new) = ln2 per token < nll(true) = ln14 for record 0; record 1: new "e" ln14 > true "c" ln2
    assert pre[0]["efficacy_score"] == 100.0 and pre[1]["efficacy_score"] == 0.0
    # paraphrase: "b" → c d (ln2) vs e (ln14): yes; "a c" → c d ((ln14+ln2)/2) vs e (ln14): yes
    assert pre[0]["paraphrase_score"] == 100.0 and pre[1]["paraphrase_score"] is None
    # neighbourhood: P(true) > P(new)? "a" → e (ln14) vs c d ((ln14 + ln2)/2): no; "c" → e: no → 0 %
    assert pre[0]["neighborhood_score"] == 0.0
    # record 1: "d" → true "c" (ln14) vs new "e" (ln2): no
    assert pre[1]["neighborhood_score"] == 0.0
    # after the "edit" (shift 2): "a" → c (≠ b), then after gold b → d (≠ c): 0/2; "c" → e (≠ d): 0/1
    post = evaluate_requests(post_model, tok, reqs, reference, settings)
    assert post[0]["locality"] == 0.0
    assert post[0]["reliability"] == 0.0  # "a b" → d ≠ c, then after c → e ≠ d
    assert aggregate(pre)["generality"] == 75.0  # the record without rephrasings is left out
    assert aggregate(pre)["reliability"] == 50.0


def test_aggregate_skips_missing_values():
    assert aggregate([{"a": 100.0, "b": None}, {"a": 50.0, "b": None}]) == {"a": 75.0, "b": None}


# ============================================================================ AlphaEdit


def _low_rank_c0(d=24, rank=6, seed=0):
    """C0 of keys that live (up to tiny noise) in a `rank`-dimensional subspace."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.cat([torch.linspace(10, 1, rank), torch.full((d - rank,), 1e-4)]).to(torch.float64)
    keys = torch.randn(5000, d, generator=g, dtype=torch.float64) * scales.sqrt() @ basis.T
    return keys.T @ keys / len(keys), basis[:, :rank]


def test_null_space_projector_is_a_projector_that_kills_the_principal_directions():
    c0, principal = _low_rank_c0()
    for ns in (alphaedit.null_space(c0, energy=0.01), alphaedit.null_space(c0, threshold=1e-2)):
        P = ns.projector
        assert torch.allclose(P @ P, P, atol=1e-10)
        assert torch.allclose(P, P.T, atol=1e-12)
        assert ns.kept == 24 - 6
        assert (P @ principal).norm() < 1e-2  # the preserved keys' directions are projected away
        assert torch.trace(P @ c0 @ P) / torch.trace(c0) <= 0.01
    # the energy rule bounds the preserved keys' energy in the editable subspace
    ns = alphaedit.null_space(c0, energy=0.2)
    assert ns.energy_fraction <= 0.2
    with pytest.raises(ValueError, match="null space of C0 is empty"):
        alphaedit.null_space(torch.eye(4), threshold=0.5)


def test_alphaedit_update_solves_the_papers_objective_and_spares_preserved_keys():
    c0, principal = _low_rank_c0()
    P = alphaedit.null_space(c0, energy=0.01).projector
    g = torch.Generator().manual_seed(1)
    K = torch.randn(3, 24, generator=g, dtype=torch.float64)  # this batch's keys (rows)
    R = torch.randn(3, 5, generator=g, dtype=torch.float64)  # residuals (rows)
    Kp = torch.randn(4, 24, generator=g, dtype=torch.float64)  # earlier batches' keys
    past = Kp.T @ Kp
    l2 = 0.5
    delta = alphaedit.alphaedit_update(R, K, P, past, l2)  # d_out × d_in
    assert delta.shape == (5, 24)
    # it lies in the null space: Δ = ΔP, so Δ k = 0 for every key in the preserved subspace
    assert torch.allclose(delta, delta @ P, atol=1e-10)
    preserved = principal @ torch.randn(6, 7, generator=g, dtype=torch.float64)
    assert (delta @ preserved).abs().max() < 1e-2 * delta.abs().max() * preserved.abs().max()
    # it is the minimiser of ‖ΔK − R‖² + ‖ΔKp‖² + L2‖Δ‖² over Δ = Δ̃P: the normal equations hold
    A = K.T @ K + past
    assert torch.allclose(delta @ P @ (A + l2 * torch.eye(24, dtype=torch.float64)) @ P, R.T @ K @ P, atol=1e-9)


def test_alphaedit_editor_leaves_preserved_outputs_unchanged(llama, tokenizer, corpus):
    layout = detect_layout(llama)
    c0, _ = load_or_compute_stats(llama, tokenizer, layout, HP.layers, corpus, HP.mom2_n_tokens, HP.mom2_dtype,
                                  progress=False)
    editor = make_baseline("alphaedit", llama, tokenizer, HP, c0, progress=False)
    assert isinstance(editor, AlphaEditEditor)
    w0 = {l: mlp_out_weight(llama, layout, l).detach().clone().double() for l in HP.layers}
    editor.edit(make_requests(REQUESTS[:2]))
    editor.edit(make_requests(REQUESTS[2:]))  # the second batch solves against the first one's keys
    for l in HP.layers:
        delta = mlp_out_weight(llama, layout, l).detach().double() - w0[l]
        assert delta.abs().max() > 0  # the layer was edited ...
        P = editor.projectors[l]
        outside = torch.eye(P.shape[0], dtype=torch.float64) - P  # ... but not along the preserved keys
        assert (delta @ outside).abs().max() <= 1e-4 * delta.abs().max()
        # preserved keys' outputs move by at most what the kept energy allows
        moved = torch.trace(delta @ c0[l] @ delta.T)
        bound = torch.linalg.matrix_norm(delta, 2) ** 2 * editor.null_spaces[l].energy_fraction * torch.trace(c0[l])
        assert moved <= bound * 1.01
    editor.restore()
    assert all(torch.equal(mlp_out_weight(llama, layout, l).double(), w0[l]) for l in HP.layers)
    assert all(c.abs().max() == 0 for c in editor.cov.values())  # Kp Kpᵀ forgotten


def test_no_hook_weighs_earlier_keys_as_comeba_does(llama, make_tiny, tokenizer, corpus):
    """`no-hook` is comeba without the hook: its solve weighs the earlier batches' keys by the same γ
    (`edit_key_weight`), so with γ > 1 the second batch moves the first one's outputs less than with γ = 1."""
    layout = detect_layout(llama)
    c0, _ = load_or_compute_stats(llama, tokenizer, layout, HP.layers, corpus, HP.mom2_n_tokens, HP.mom2_dtype,
                                  progress=False)
    moved = {}
    for gamma in (1.0, 16.0):
        model = make_tiny("llama")
        editor = make_baseline("no-hook", model, tokenizer, HP.replace(edit_key_weight=gamma), c0, progress=False)
        editor.edit(make_requests(REQUESTS[:2]))
        first = {l: mlp_out_weight(model, layout, l).detach().clone().double() for l in HP.layers}
        past = {l: editor.cov[l] - editor.base_cov[l] for l in HP.layers}  # the first batch's keys, Σ K Kᵀ
        editor.edit(make_requests(REQUESTS[2:]))
        l = HP.layers[0]  # nothing edited below: the same keys for both editors
        step = mlp_out_weight(model, layout, l).detach().double() - first[l]
        moved[gamma] = float(torch.trace(step @ past[l] @ step.T))
    assert moved[16.0] < 0.5 * moved[1.0], moved


# ============================================================================ command line


def test_cli_methods_match_the_harness():
    assert EVAL_METHODS == METHODS and EVAL_PROTOCOLS == PROTOCOLS


def test_cli_eval(model_dir, corpus_file, tmp_path, capsys):
    data = tmp_path / "cf.json"
    records = [dict(r, case_id=i) for i, r in enumerate(REQUESTS)]
    records.insert(1, {"prompt": "No subject here", "subject": "Nobody", "target_new": "x"})  # skipped, reported
    data.write_text(json.dumps(records))
    hp = tmp_path / "hp.yaml"
    hp.write_text("layers: [1, 2]\nv_num_grad_steps: 5\nmom2_n_tokens: 1000\ncontext_template_prefixes: [The]\n"
                  "nullspace_energy: 0.3\nL2: 0.0001\n")
    out = tmp_path / "out"
    code = main(["eval", "--method", "alphaedit", "--data", f"counterfact:{data}", "--n", "4", "--batch-size", "2",
                 "--protocol", "single", "--stats-text", str(corpus_file), "--hparams", str(hp), "--model",
                 str(model_dir), "--out", str(out), "--fluency-tokens", "3", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "skipped 1 record" in captured.out and "reliability" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_edits"] == 3 and summary["data"] == f"counterfact:{data}" and summary["skipped"][0][0] == 1
    assert (out / "records.jsonl").is_file() and (out / "checkpoints.csv").is_file() and (out / "metrics.png").is_file()

    # user errors: one line, exit status 2
    assert main(["eval", "--method", "comeba", "--data", f"zsre:{tmp_path / 'missing.json'}", "--out",
                 str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--method", "memit", "--data", f"counterfact:{data}", "--hparams", str(hp), "--model",
                 str(model_dir), "--stats-text", str(corpus_file), "--out", str(out), "--quiet"]) == 2
    assert "another run" in capsys.readouterr().err


def test_cached_metric_generation_matches_the_editor(llama, tokenizer, corpus):
    """The metrics' KV-cache generation runs the gated hooks as Editor.generate does."""
    from comeba import metrics as M
    from comeba.editor import Editor
    from comeba.gate import batch_gate_maxima
    from comeba.text import encode_prompt

    editor = Editor(llama, tokenizer, HP, corpus=corpus, progress=False)
    editor.edit(REQUESTS[:2])
    prompts = [r["prompt"] for r in REQUESTS] + ["Because the weather was cold, they stayed"]
    expected = editor.generate(prompts, max_new_tokens=6)
    with editor.applied():
        ours = M.generate_tokens(llama, tokenizer, prompts, 6, use_cache=True)
        for prompt, tokens, text in zip(prompts, ours, expected):
            if tokenizer.decode(tokens, skip_special_tokens=True) == text:
                continue
            # Left padding and the cache change float rounding, so the two may part where rounding
            # decides: a near tie of the logits, or a gate score on α itself: the edited prompt that
            # set α (α = its max score at a layer) sits on the gate's edge. Seen with torch 2.11.
            ids = encode_prompt(tokenizer, prompt)
            ref = llama.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id)[0, len(ids):]
            k = next(i for i, (a, b) in enumerate(zip(tokens, ref.tolist())) if a != b)
            logits = llama(input_ids=torch.tensor([ids + tokens[:k]])).logits[0, -1]
            tie = abs(float(logits[tokens[k]] - logits[ref[k]])) < 1e-4
            editor.detach()
            maxima = batch_gate_maxima(llama, tokenizer, editor.layout, [prompt],
                                       {l: s.delta for l, s in editor.layers.items()})
            editor.attach()
            on_edge = any(abs(float(maxima[l][0]) - s.alpha) < 1e-5 for l, s in editor.layers.items())
            assert tie or on_edge, (prompt, k, tokens, ref, {l: s.alpha for l, s in editor.layers.items()}, maxima)


def test_pre_cache_is_shared_between_methods_and_keyed(llama, tokenizer, corpus, tmp_path, monkeypatch):
    """The unedited model's evaluation is computed once per record set and reused only for the same records."""
    cache = tmp_path / "pre.json"
    first = _run(llama, tokenizer, corpus, "comeba", "consecutive", tmp_path / "a", pre_cache=cache)
    assert len(json.loads(cache.read_text())["pre"]) == len(REQUESTS)

    calls = []
    real = ev.evaluate_requests
    monkeypatch.setattr(ev, "evaluate_requests", lambda *a, **k: calls.append(k.get("full")) or real(*a, **k))
    second = _run(llama, tokenizer, corpus, "seq-memit", "consecutive", tmp_path / "b", pre_cache=cache)
    assert second["pre"] == first["pre"]
    assert calls == [False, True]  # the two checkpoints only: no second unedited evaluation
    assert json.loads((tmp_path / "b" / "pre.json").read_text())["pre"] == json.loads(cache.read_text())["pre"]

    calls.clear()  # other records: the cache does not match, the unedited model is evaluated again
    _run(llama, tokenizer, corpus, "seq-memit", "consecutive", tmp_path / "c", requests=REQUESTS[:2], pre_cache=cache)
    assert calls[0] is True
    assert len(json.loads(cache.read_text())["pre"]) == 2


def test_runs_recorded_under_the_first_fingerprint_format_are_reused(llama, tokenizer, corpus, tmp_path, monkeypatch):
    """A finished run folder and a pre cache written before the fingerprint changed are this model's: no rerun."""
    from comeba.models import fingerprint, legacy_fingerprint

    cache = tmp_path / "pre.json"
    first = _run(llama, tokenizer, corpus, "seq-memit", "consecutive", tmp_path / "a", pre_cache=cache)
    new, old = fingerprint(llama), legacy_fingerprint(llama)
    for path in (cache, tmp_path / "a" / "run.json"):
        path.write_text(path.read_text().replace(new, old))
    assert new not in cache.read_text()

    calls = []
    real = ev.evaluate_requests
    monkeypatch.setattr(ev, "evaluate_requests", lambda *a, **k: calls.append(k.get("full")) or real(*a, **k))
    again = _run(llama, tokenizer, corpus, "seq-memit", "consecutive", tmp_path / "a", pre_cache=cache)
    assert again.get("already_complete") and calls == []
    assert new in (tmp_path / "a" / "run.json").read_text()
    second = _run(llama, tokenizer, corpus, "comeba", "consecutive", tmp_path / "b", pre_cache=cache)
    assert second["pre"] == first["pre"]
    assert calls == [False, True]  # the two checkpoints only: the unedited evaluation was not redone
    assert json.loads(cache.read_text())["key"]["model_fingerprint"] == new


def test_cli_eval_gate_and_diagnostics(model_dir, corpus_file, tmp_path, capsys):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([dict(r, case_id=i) for i, r in enumerate(REQUESTS)]))
    hp = tmp_path / "hp.yaml"
    hp.write_text("layers: [1, 2]\nv_num_grad_steps: 5\nmom2_n_tokens: 1000\ncontext_template_prefixes: [The]\n")
    text = tmp_path / "general.txt"
    words = corpus_file.read_text().split()
    text.write_text("\n".join(" ".join(words[i:i + 40]) for i in range(0, 400, 40)) + "\n")  # 200+ char paragraphs
    for gate in ("reference", "span"):
        out = tmp_path / f"out-{gate}"
        code = main(["eval", "--method", "comeba", "--gate", gate, "--data", f"counterfact:{data}", "--n", "4",
                     "--batch-size", "2", "--stats-text", str(corpus_file), "--hparams", str(hp), "--model",
                     str(model_dir), "--diagnostics-text", str(text), "--out", str(out), "--fluency-tokens", "0",
                     "--no-generation", "--quiet"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["hparams"]["gate"] == gate and summary["method_info"]["gate"] == gate
        last = summary["checkpoints"][-1]
        assert {"perplexity", "perplexity_ratio", "false_open_1", "false_open_2", "edit_open_min"} <= set(last)
        assert "false_open_max" in (out / "checkpoints.csv").read_text().splitlines()[0]
    assert main(["eval", "--method", "comeba", "--data", f"counterfact:{data}", "--model", str(model_dir),
                 "--diagnostics-text", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o3")]) == 2
    assert "diagnostics text" in capsys.readouterr().err
