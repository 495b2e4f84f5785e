"""comeba.editor: consecutive batches on tiny models, the saved state, transactions."""

from __future__ import annotations

import json
from pathlib import Path
import math

import pytest
import torch

from comeba.models import cache_kwarg

from comeba.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EDITING_STATE, StateError, load_edits
from comeba.editor import Editor
from comeba.gate import SpanGate
from comeba.hooks import LayerState
from comeba.hparams import AUTO_KEY_WEIGHT, HParams, HParamsError
import comeba.editor as editor_module
from comeba.models import weights_checksum
from comeba.requests import RequestError
from comeba.models import input_device
from comeba.corpus import text_corpus

pytestmark = pytest.mark.usefixtures("one_thread", "shared_comeba_home")

EDIT_ARCHS = ("gpt2", "llama", "gpt_neox")

# Tiny random models predict almost uniformly and attention spreads an edit thin, so the
# subject ends each prompt (δ acts where the target's first token is predicted), the
# clamp is wide and λ small. Two layers, two templates, 20 value steps: ~0.2 s a batch.
HP = dict(
    layers=[1, 2],
    v_num_grad_steps=20,
    clamp_norm_factor=10.0,
    mom2_update_weight=100.0,
    mom2_n_tokens=2000,
    context_template_prefixes=["The"],
    context_template_length=6,
)

R1 = {"prompt": "The mother tongue of Danielle Darrieux", "subject": "Danielle Darrieux", "target_new": "English"}
R2 = {"prompt": "The capital city of France", "subject": "France", "target_new": "Berlin"}
R3 = {"prompt": "The favourite food of Michael Jordan", "subject": "Michael Jordan", "target_new": "pizza"}
R4 = {"prompt": "The first album of the band", "subject": "the band", "target_new": "Paris"}
UNRELATED = [
    "Because the weather was cold, they stayed at home.",
    "I think you should read the book before you watch the film.",
    "The team played football in the stadium and won the game.",
    "Her father was a doctor and her mother was a teacher at the local school.",
    "The company was founded by an engineer who worked on computers.",
    # short texts: z ≤ (n-1)/√n, so a 3-token text can never reach an α above 1.16
    "The game",
    "It was",
    "Her father",
]


@pytest.fixture
def new_editor(make_tiny, tokenizer, corpus_file):
    """new_editor(arch, seed=0, **hparams) -> a fresh Editor on a fresh tiny model."""

    def _make(arch: str, seed: int = 0, **changes) -> Editor:
        model = make_tiny(arch, seed=seed)
        return Editor(model, tokenizer, HParams(**{**HP, **changes}), corpus=text_corpus([corpus_file]),
                             progress=False)

    return _make


def _ids(tokenizer, text):
    return torch.tensor([tokenizer(text).input_ids])


@torch.no_grad()
def _p_first(model, tokenizer, request) -> float:
    """P(first token of ' target' | prompt), on the model's device."""
    first = tokenizer(" " + request["target_new"], add_special_tokens=False).input_ids[0]
    logits = model(input_ids=_ids(tokenizer, request["prompt"]).to(input_device(model))).logits[0, -1]
    return torch.softmax(logits.float(), -1)[first].item()


@torch.no_grad()
def _logits(model, tokenizer, text):
    return model(input_ids=_ids(tokenizer, text)).logits


def _same_logits(got: torch.Tensor, want: torch.Tensor, text: str) -> None:
    """A state loaded from disk against the editor that wrote it: the editor scores its gate with H's factor F,
    the loaded state with H, so the logits agree to float32 rounding (bitwise on some CPUs, 1e-7 on others)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{text}: {m}")


def _snapshot(editor):
    return (
        {l: LayerState(s.delta.clone(), s.alpha, c_accu=s.c_accu.clone()) for l, s in editor.layers.items()},
        editor.n_batches,
        editor.n_edits,
        list(editor.templates),
    )


def _assert_state(editor, snap):
    layers, n_batches, n_edits, templates = snap
    assert editor.n_batches == n_batches and editor.n_edits == n_edits
    assert editor.templates == templates
    assert set(editor.layers) == set(layers)
    for l, s in layers.items():
        cur = editor.layers[l]
        assert torch.equal(cur.delta, s.delta), f"layer {l}: ΔW changed"
        assert torch.equal(cur.c_accu, s.c_accu), f"layer {l}: C_accu changed"
        assert cur.alpha == s.alpha, f"layer {l}: alpha changed"


def _hook_count(model) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()
    )


# --------------------------------------------------------------------------- editing works


def _consecutive_batches(editor, tokenizer) -> list[dict[int, float]]:
    """Two batches (R1, then R2): each raises its target, the first does not fade; returns α before and after each."""
    model = editor.model
    before = {k: _p_first(model, tokenizer, r) for k, r in (("r1", R1), ("r2", R2))}
    alphas = [{l: s.alpha for l, s in editor.layers.items()}]

    info = editor.edit([R1])
    assert info["batch"] == 1 and info["n"] == 1
    alphas.append(dict(info["alpha"]))
    with editor.applied():
        assert _p_first(model, tokenizer, R1) > 1.2 * before["r1"]
    assert _p_first(model, tokenizer, R1) == before["r1"]  # detached again

    alphas.append(dict(editor.edit([R2])["alpha"]))
    with editor.applied():
        after = {"r1": _p_first(model, tokenizer, R1), "r2": _p_first(model, tokenizer, R2)}
    assert after["r1"] > 1.2 * before["r1"], "the first batch faded after the second"
    assert after["r2"] > 1.2 * before["r2"]
    assert editor.n_batches == 2 and editor.n_edits == 2
    return alphas


@pytest.mark.parametrize("arch", EDIT_ARCHS)
def test_consecutive_batches_raise_their_targets(new_editor, tokenizer, arch):
    """The default (span) gate: α is a calibrated score in (0, 1), free to rise or fall.

    The clamp is wider than HP's: with 10, R2 on gpt_neox rises only 1.19-fold under the span
    gate (1.31 under the reference gate); the weights written, not the gate, are why (with every
    gate forced open it is the same), and with 20 it rises 1.27-fold.
    """
    editor = new_editor(arch, clamp_norm_factor=20.0)
    assert editor.hparams.gate == "span"
    alphas = _consecutive_batches(editor, tokenizer)
    assert alphas[0] == {l: editor.hparams.gate_alpha0 for l in editor.layers}
    for cur in alphas[1:]:
        for l, a in cur.items():
            assert math.isfinite(a) and 0 < a < 1, f"layer {l}: alpha {a}"


def test_consecutive_batches_raise_their_targets_written_under_the_inference_gate(new_editor, tokenizer):
    """write_gate: subject — the layers are gated while the batch is written (open at the subject): the edits
    take and earlier batches keep theirs, as with the reference's ungated write."""
    editor = new_editor("llama", clamp_norm_factor=20.0, write_gate="subject")
    alphas = _consecutive_batches(editor, tokenizer)
    for cur in alphas[1:]:
        for l, a in cur.items():
            assert math.isfinite(a) and 0 < a < 1, f"layer {l}: alpha {a}"


def test_consecutive_batches_raise_their_targets_with_earlier_edits_weighed_more(new_editor, tokenizer):
    """edit_key_weight > 1: each batch is solved against λC0 + γ Σ_past K Kᵀ; edits still take, the first batch
    is written as with γ = 1 (nothing earlier to weigh), and the second moves the first's keys less."""
    plain = new_editor("llama", clamp_norm_factor=20.0, edit_key_weight=1.0)
    weighted = new_editor("llama", clamp_norm_factor=20.0, edit_key_weight=8.0)
    for ed in (plain, weighted):
        ed.edit([R1])
    for l in plain.layers:
        torch.testing.assert_close(plain.layers[l].delta, weighted.layers[l].delta)
    keys = {l: plain.layers[l].c_accu - plain.hparams.mom2_update_weight * plain.layers[l].c0.double()
            for l in plain.layers}  # R1's keys' outer product, per layer
    first = {l: weighted.layers[l].delta.clone() for l in weighted.layers}
    _consecutive_batches(new_editor("llama", clamp_norm_factor=20.0, edit_key_weight=8.0), tokenizer)
    before = {l: plain.layers[l].delta.clone() for l in plain.layers}
    for ed in (plain, weighted):
        ed.edit([R2])
    for l in plain.layers:
        move = lambda ed, start: float(torch.trace((ed.layers[l].delta - start).double() @ keys[l]
                                                   @ (ed.layers[l].delta - start).double().T))
        assert move(weighted, first[l]) < 0.5 * move(plain, before[l]), f"layer {l}"


def test_edit_key_weight_per_layer(new_editor):
    """A γ per edited layer: the same list everywhere is the scalar, `auto` is AUTO_KEY_WEIGHT below the last
    layer and 1 at it, and γ > 1 at the first edited layer alone keeps the first batch's outputs there (its
    keys are the same for both editors: nothing is edited below)."""
    n = len(HP["layers"])
    plain = new_editor("llama", clamp_norm_factor=20.0, edit_key_weight=1.0)
    lower = new_editor("llama", clamp_norm_factor=20.0, edit_key_weight=[8.0] + [1.0] * (n - 1))
    same = new_editor("llama", clamp_norm_factor=20.0, edit_key_weight=[8.0] * n)
    scalar = new_editor("llama", clamp_norm_factor=20.0, edit_key_weight=8.0)
    auto = new_editor("llama", clamp_norm_factor=20.0)
    spelled = new_editor("llama", clamp_norm_factor=20.0, edit_key_weight=[AUTO_KEY_WEIGHT] * (n - 1) + [1.0])
    for ed in (plain, lower, same, scalar, auto, spelled):
        ed.edit([R1])
    first = HP["layers"][0]
    keys = plain.layers[first].c_accu - plain.hparams.mom2_update_weight * plain.layers[first].c0.double()
    before = {id(ed): ed.layers[first].delta.clone() for ed in (plain, lower)}
    for ed in (plain, lower, same, scalar, auto, spelled):
        ed.edit([R2])
    for l in HP["layers"]:
        torch.testing.assert_close(same.layers[l].delta, scalar.layers[l].delta)
        torch.testing.assert_close(auto.layers[l].delta, spelled.layers[l].delta)
    move = lambda ed: float(torch.trace((ed.layers[first].delta - before[id(ed)]).double() @ keys
                                        @ (ed.layers[first].delta - before[id(ed)]).double().T))
    assert move(lower) < 0.5 * move(plain)


def test_consecutive_batches_with_combined_keys_accumulated(new_editor, tokenizer):
    """accumulated_keys: contexts (the default) adds one key direction per request and template to C_accu
    (here 1 + 1 templates); combined (the reference) one per request, and its edits take as well."""
    _consecutive_batches(new_editor("llama", accumulated_keys="combined"), tokenizer)
    combined = new_editor("llama", accumulated_keys="combined")
    contexts = new_editor("llama", accumulated_keys="contexts")
    n_templates = len(contexts.templates)
    assert n_templates > 1
    for ed in (combined, contexts):
        ed.edit([R1])
    for l in combined.layers:
        rank = lambda ed: int(torch.linalg.matrix_rank(ed.layers[l].c_accu - ed.hparams.mom2_update_weight
                                                       * ed.layers[l].c0.double(), rtol=1e-8))
        assert rank(combined) == 1 and rank(contexts) == n_templates, l


def test_consecutive_batches_raise_their_targets_reference_gate(new_editor, tokenizer):
    """The reference gate: the same edits take, and α (a z-score) is a running minimum."""
    editor = new_editor("llama", gate="reference")
    alphas = _consecutive_batches(editor, tokenizer)
    assert alphas[0] == {l: editor.hparams.alpha for l in editor.layers}
    for prev, cur in zip(alphas, alphas[1:]):
        for l in prev:
            assert math.isfinite(cur[l]) and cur[l] <= prev[l]


def test_alpha_never_increases_and_stays_finite(new_editor, tokenizer):
    """The reference rule: α = min(α, prompts' largest z-scores), NaN scores (one-token prompts) ignored."""
    editor = new_editor("llama", gate="reference")
    one_token = {"prompt": "The", "subject": "The", "target_new": "Paris"}  # a one-token prompt: no std
    assert len(tokenizer(one_token["prompt"]).input_ids) == 1
    prev = {l: s.alpha for l, s in editor.layers.items()}
    for batch in ([one_token], [R1, R2], [one_token], [R3, R4]):
        editor.edit(batch)
        cur = {l: s.alpha for l, s in editor.layers.items()}
        for l in cur:
            assert math.isfinite(cur[l]), f"layer {l}: alpha {cur[l]}"
            assert cur[l] <= prev[l]
        if batch == [one_token]:
            assert cur == prev  # its only score is NaN: ignored
        prev = cur
    for s in editor.layers.values():
        assert s.delta.dtype == torch.float32 and s.c_accu.dtype == torch.float64


def test_span_alpha_stays_finite_in_the_unit_interval(new_editor, tokenizer):
    """The span rule: α is calibrated on general text after every batch, also after a one-token prompt's batch."""
    editor = new_editor("llama")
    one_token = {"prompt": "The", "subject": "The", "target_new": "Paris"}
    assert len(tokenizer(one_token["prompt"]).input_ids) == 1
    seen = []
    for batch in ([one_token], [R1, R2], [one_token], [R3, R4]):
        editor.edit(batch)
        cur = {l: s.alpha for l, s in editor.layers.items()}
        for l, a in cur.items():
            assert math.isfinite(a) and 0 < a < 1, f"layer {l}: alpha {a}"
        seen.append(cur)
    for s in editor.layers.values():
        assert s.delta.dtype == torch.float32 and s.c_accu.dtype == torch.float64
        assert s.c0.dtype == torch.float32 and s.span is not None


def test_base_weights_never_change(new_editor, tokenizer):
    editor = new_editor("gpt2")
    model = editor.model
    model.requires_grad_(True)  # even a model that is not frozen must not be trained
    checksum = weights_checksum(model)
    base = _logits(model, tokenizer, R1["prompt"])
    hooks_before = _hook_count(model)
    editor.edit([R1, R3])
    assert weights_checksum(model) == checksum
    assert all(p.grad is None for p in model.parameters())
    editor.attach()
    edited = _logits(model, tokenizer, R1["prompt"])
    assert not torch.equal(edited, base)
    editor.edit([R2])  # editing while attached
    assert editor.attached
    assert weights_checksum(model) == checksum
    editor.detach()
    assert weights_checksum(model) == checksum
    assert _hook_count(model) == hooks_before
    assert torch.equal(_logits(model, tokenizer, R1["prompt"]), base)


def test_unrelated_text_gives_base_logits_exactly(new_editor, tokenizer):
    """Reference gate: texts whose largest z-score stays below α at every layer get the base logits."""
    editor = new_editor("llama", gate="reference")
    editor.edit([R1, R2])
    editor.edit([R3])
    model = editor.model
    deltas = {l: s.delta for l, s in editor.layers.items()}
    assert all(s.alpha > 1.2 for s in editor.layers.values())
    quiet, loud = [], []
    for text in UNRELATED:  # the z-scores by hand, from the unedited model's keys (no comeba code involved)
        keys = {}
        handles = [model.get_submodule(editor.layout.mlp_out_name(l)).register_forward_hook(
            lambda m, a, o, l=l: keys.__setitem__(l, a[0][0].double())) for l in deltas]
        try:
            _logits(model, tokenizer, text)
        finally:
            for h in handles:
                h.remove()
        z = {l: (m - m.mean()) / m.std() for l in deltas for m in [(keys[l] @ deltas[l].double().T).norm(dim=-1)]}
        (quiet if all(float(z[l].max()) < editor.layers[l].alpha for l in deltas) else loud).append(text)
    assert quiet, "every unrelated text opened some gate"
    base = {t: _logits(model, tokenizer, t) for t in UNRELATED + [R1["prompt"]]}
    with editor.applied():
        for t in quiet:
            assert torch.equal(_logits(model, tokenizer, t), base[t]), t
        for t in loud:  # a gate opened (its first opening is computed from exact keys): the answer moves
            assert not torch.equal(_logits(model, tokenizer, t), base[t]), t
        assert not torch.equal(_logits(model, tokenizer, R1["prompt"]), base[R1["prompt"]])


def test_unrelated_text_gives_base_logits_exactly_span_gate(new_editor, tokenizer):
    """Span gate: where the records show that no gate opened, the logits are the base model's, bit for bit.

    Where some gate opened first at token j, the positions before j are still
    exactly the base model's (causal attention) and later ones are not.
    """
    editor = new_editor("llama")
    editor.edit([R1, R2])
    editor.edit([R3])
    model = editor.model
    texts = UNRELATED + [R1["prompt"]]
    base = {t: _logits(model, tokenizer, t) for t in texts}
    first_open, edited = {}, {}
    with editor.applied():
        hooks = editor.hooks
        hooks.record(True)
        for t in texts:
            edited[t] = _logits(model, tokenizer, t)
            assert set(hooks.records) == set(editor.layers)
            opened = torch.stack([hooks.records[l].gate[0] for l in editor.layers]).any(0)
            first_open[t] = int(opened.nonzero()[0]) if opened.any() else None
        hooks.record(False)
    quiet = [t for t in UNRELATED if first_open[t] is None]
    assert len(quiet) >= len(UNRELATED) - 1, f"the gate opened on unrelated text: {first_open}"
    for t in texts:
        j = first_open[t]
        if j is None:
            assert torch.equal(edited[t], base[t]), t
        else:
            assert torch.equal(edited[t][:, :j], base[t][:, :j]), t
            assert not torch.equal(edited[t][:, j:], base[t][:, j:]), t
    assert first_open[R1["prompt"]] is not None, "the gate stayed shut on an edited prompt"


def test_edited_generation_with_cache_is_consistent(new_editor, tokenizer):
    editor = new_editor("llama")
    editor.edit([R1, R2])
    model = editor.model
    ids = _ids(tokenizer, UNRELATED[1])

    def gen(use_cache):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=10, min_new_tokens=10, use_cache=use_cache)

    with editor.applied():
        cached, uncached, again = gen(True), gen(False), gen(True)
        # A hand-written cached loop: prefill, then one token at a time with the growing mask.
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
            seq = torch.cat([ids, out.logits[:, -1:].argmax(-1)], 1)
            for _ in range(9):
                cache = getattr(out, "cache", None) or out.past_key_values
                out = model(input_ids=seq[:, -1:], attention_mask=torch.ones_like(seq), use_cache=True,
                            **{cache_kwarg(model): cache})
                seq = torch.cat([seq, out.logits[:, -1:].argmax(-1)], 1)
    n = ids.shape[1]
    # The first new token comes from one full pass either way. Later ones may differ without a
    # cache by design: a full recomputation re-gates earlier tokens with statistics that include
    # the new ones, whereas the cache keeps the decisions made when each token was first seen.
    assert torch.equal(cached[:, : n + 1], uncached[:, : n + 1])
    assert torch.equal(cached, seq)
    assert torch.equal(cached, again)
    # and Editor.generate (greedy, cached) agrees with it
    assert editor.generate([UNRELATED[1]], max_new_tokens=10)[0] == tokenizer.decode(
        cached[0, ids.shape[1]:], skip_special_tokens=True
    )


# --------------------------------------------------------------------------- state on disk


@pytest.mark.parametrize("arch", EDIT_ARCHS)
def test_save_load_resume(new_editor, make_tiny, tokenizer, tmp_path, arch):
    editor = new_editor(arch)
    editor.edit([R1])
    editor.save_pretrained(tmp_path / "state")

    fresh = make_tiny(arch, seed=0)
    loaded = Editor.from_pretrained(fresh, tokenizer, tmp_path / "state", progress=False)
    assert loaded.n_batches == 1 and loaded.n_edits == 1
    assert loaded.templates == editor.templates
    assert loaded.hparams == editor.hparams
    for l, s in editor.layers.items():
        assert loaded.layers[l].alpha == s.alpha
        assert torch.equal(loaded.layers[l].delta, s.delta)
        assert torch.equal(loaded.layers[l].c_accu, s.c_accu)
    with editor.applied(), loaded.applied():
        for text in (R1["prompt"], UNRELATED[0]):
            loaded.hooks.record()
            got = _logits(fresh, tokenizer, text)
            editor.hooks.record()
            _same_logits(got, _logits(editor.model, tokenizer, text), text)  # and the gates open at the same tokens:
            for l in editor.layers:
                assert torch.equal(loaded.hooks.records[l].gate, editor.hooks.records[l].gate), f"layer {l}"
            loaded.hooks.record(False)
            editor.hooks.record(False)

    # it resumes: the next batch gives the same state on both
    editor.edit([R2])
    loaded.edit([R2])
    assert loaded.n_batches == 2 and loaded.n_edits == 2
    for l, s in editor.layers.items():
        torch.testing.assert_close(loaded.layers[l].delta, s.delta, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(loaded.layers[l].c_accu, s.c_accu)
        assert loaded.layers[l].alpha == pytest.approx(s.alpha)


def test_state_size_is_fixed_and_save_is_atomic(new_editor, tmp_path):
    editor = new_editor("llama")
    directory = tmp_path / "state"
    editor.edit([R1])
    editor.save_pretrained(directory)
    sizes = {name: (directory / name).stat().st_size for name in (ADAPTER_WEIGHTS, EDITING_STATE)}
    n = sum(w.numel() for s in editor.layers.values() for w in (s.delta, s.c_accu))
    assert sum(sizes.values()) >= 4 * n  # the whole state is in the files
    (directory / "notes.txt").write_text("mine")  # a user's own file in the folder is kept
    (tmp_path / ".tmp-state-abcd1234").mkdir()  # a save killed midway
    (tmp_path / ".tmp-state-abcd1234" / ADAPTER_WEIGHTS).write_bytes(b"half a file")
    for batch in ([R2], [R3, R4]):
        editor.edit(batch)
        editor.save_pretrained(directory)
        files = sorted(p.name for p in directory.iterdir())
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        assert files == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, EDITING_STATE, "notes.txt"])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]  # no temporary leftovers
    assert config["n_batches"] == 3 and config["n_edits"] == 4
    assert {name: (directory / name).stat().st_size for name in sizes} == sizes
    assert {v["layer"]: v["alpha"] for v in config["modules"].values()} == {l: s.alpha for l, s in editor.layers.items()}
    assert sorted(config["modules"]) == [editor.layout.mlp_out_name(l) for l in editor.layers]
    assert (directory / "notes.txt").read_text() == "mine"


def _save_forever(editors, directory) -> None:  # a forked child: saves the versions in turn until killed
    i = 0
    while True:
        editors[i % len(editors)].save_pretrained(directory)
        i += 1


def test_save_killed_at_random_points_leaves_a_whole_committed_state(new_editor, tokenizer, tmp_path):
    """SIGKILL a process that saves two versions in turn, 30 times at random moments: every load then gives one
    of the versions, whole (checksums verified), and the next save removes what the killed one left."""
    import multiprocessing
    import os
    import random
    import signal
    import time

    from comeba.adapter import read_state

    editor = new_editor("llama")
    editor.edit([R1])
    editor.save_pretrained(tmp_path / "v1")
    editor.edit([R2])
    versions = {1: Editor.from_pretrained(editor.model, tokenizer, tmp_path / "v1", progress=False), 2: editor}
    directory = tmp_path / "state"
    editor.save_pretrained(directory)
    rng, ctx, seen = random.Random(0), multiprocessing.get_context("fork"), set()
    for _ in range(30):
        child = ctx.Process(target=_save_forever, args=(list(versions.values()), directory))
        child.start()
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        saved = read_state(directory)  # verifies every file's SHA-256 and that every tensor is finite
        n = int(saved.config["n_batches"])
        seen.add(n)
        for l, st in saved.layers.items():
            assert torch.equal(st.delta, versions[n].layers[l].delta.cpu())
            assert torch.equal(st.c_accu, versions[n].layers[l].c_accu.cpu())
    assert seen == {1, 2}  # the kills landed while either version was being written
    editor.save_pretrained(directory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state", "v1"]  # the killed saves' leftovers are gone


def test_config_is_sorted_and_deterministic(new_editor, tmp_path):
    editor = new_editor("llama")
    editor.edit([R1])
    editor.save_pretrained(tmp_path / "a")
    editor.save_pretrained(tmp_path / "b")
    text = (tmp_path / "a" / ADAPTER_CONFIG).read_text()
    assert text == (tmp_path / "b" / ADAPTER_CONFIG).read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_final_state_holds_only_inference_and_load_edits_applies_it(new_editor, make_tiny, tokenizer, tmp_path):
    editor = new_editor("llama")
    editor.edit([R1, R2])
    editor.save_pretrained(tmp_path / "final", final=True)
    editor.save_pretrained(tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert (tmp_path / "final" / ADAPTER_WEIGHTS).read_bytes() == (tmp_path / "full" / ADAPTER_WEIGHTS).read_bytes()
    with pytest.raises(StateError, match="saved as final"):
        Editor.from_pretrained(make_tiny("llama", seed=0), tokenizer, tmp_path / "final")
    fresh = make_tiny("llama", seed=0)
    base = {t: _logits(fresh, tokenizer, t) for t in (R1["prompt"].format(R1["subject"]), UNRELATED[0])}
    handle = load_edits(fresh, tmp_path / "final")
    assert handle.enabled and handle.n_edits == 2
    with editor.applied():
        for text in base:
            _same_logits(_logits(fresh, tokenizer, text), _logits(editor.model, tokenizer, text), text)
    edited = _logits(fresh, tokenizer, R1["prompt"].format(R1["subject"]))
    assert not torch.equal(edited, base[R1["prompt"].format(R1["subject"])])
    with handle.disabled():
        assert not handle.enabled
        for text, logits in base.items():
            assert torch.equal(_logits(fresh, tokenizer, text), logits)
    assert torch.equal(_logits(fresh, tokenizer, R1["prompt"].format(R1["subject"])), edited)
    handle.remove()
    for text, logits in base.items():
        assert torch.equal(_logits(fresh, tokenizer, text), logits)
    with pytest.raises(RuntimeError, match="removed"):
        handle.enable()
    with pytest.raises(StateError, match="fingerprint"):
        load_edits(make_tiny("llama", seed=1), tmp_path / "final")


def _write_v1(editor, directory: Path) -> None:
    """A state as format 1 wrote it: comeba_config.json naming one tensor file keyed by layer number."""
    from safetensors.torch import save_file

    from comeba.text import pad_batch

    directory.mkdir()
    tensors = {}
    for l, s in editor.layers.items():
        tensors[f"delta.{l}"], tensors[f"c_accu.{l}"] = s.delta, s.c_accu
        if s.c0 is not None:
            tensors[f"c0.{l}"] = s.c0
    if editor.calibration:
        ids, mask = pad_batch(editor.calibration, 0)
        tensors["calibration.ids"], tensors["calibration.lengths"] = ids, mask.sum(1)
    save_file(tensors, str(directory / "state-0123456789ab.safetensors"))
    config = {"format": "comeba-hook-layers", "format_version": 1, **editor.config(),
              "layers": list(editor.layers), "alpha": {str(l): s.alpha for l, s in editor.layers.items()},
              "context_templates": editor.templates, "statistics": editor.stats_provenance,
              "tensors": "state-0123456789ab.safetensors"}
    (directory / "comeba_config.json").write_text(json.dumps(config))


def test_format_1_state_still_loads(new_editor, make_tiny, tokenizer, tmp_path):
    editor = new_editor("llama")
    editor.edit([R1])
    _write_v1(editor, tmp_path / "old")
    loaded = Editor.from_pretrained(make_tiny("llama", seed=0), tokenizer, tmp_path / "old", progress=False)
    assert loaded.n_edits == 1 and loaded.templates == editor.templates
    for l, s in editor.layers.items():
        assert torch.equal(loaded.layers[l].delta, s.delta) and loaded.layers[l].alpha == s.alpha
        assert torch.equal(loaded.layers[l].c_accu, s.c_accu)
    fresh = make_tiny("llama", seed=0)
    load_edits(fresh, tmp_path / "old")
    with editor.applied():
        for text in (R1["prompt"].format(R1["subject"]), UNRELATED[0]):
            _same_logits(_logits(fresh, tokenizer, text), _logits(editor.model, tokenizer, text), text)
    loaded.save_pretrained(tmp_path / "old")  # saving converts it to format 2
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS, EDITING_STATE]


def _damage(path: Path, at: float, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    i = int(len(raw) * at)
    raw[i : i + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name", [ADAPTER_WEIGHTS, EDITING_STATE])
def test_damaged_or_truncated_state_is_refused(new_editor, tokenizer, tmp_path, name):
    editor = new_editor("llama")
    editor.edit([R1])
    directory = tmp_path / "state"
    editor.save_pretrained(directory)
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    tensors = directory / name
    good = tensors.read_bytes()
    Editor.from_pretrained(editor.model, tokenizer, directory)  # intact: loads
    _damage(tensors, 0.6, b"\xff" * 8)
    with pytest.raises(StateError, match="damaged.*checksum"):
        Editor.from_pretrained(editor.model, tokenizer, directory)
    # without the recorded digest the damage is still caught by the finite check ...
    config["files"][name] = None
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(StateError, match="NaN or infinite"):
        Editor.from_pretrained(editor.model, tokenizer, directory)
    # ... and a truncated file by safetensors, as a one-line error
    tensors.write_bytes(good[: len(good) // 2])
    with pytest.raises(StateError, match="cannot be read"):
        Editor.from_pretrained(editor.model, tokenizer, directory)


def test_reader_survives_a_save_between_config_and_tensors(new_editor, tokenizer, tmp_path, monkeypatch):
    import comeba.adapter as adapter_mod

    editor = new_editor("gpt2")
    editor.edit([R1])
    directory = tmp_path / "state"
    editor.save_pretrained(directory)
    real = adapter_mod.read_config
    calls = []

    def racing(folder):
        config = real(folder)
        if not calls:  # a writer replaces the state right after this reader read the config
            editor.edit([R2])
            editor.save_pretrained(directory)
        calls.append(config["files"][ADAPTER_WEIGHTS])
        return config
    monkeypatch.setattr(adapter_mod, "read_config", racing)
    loaded = Editor.from_pretrained(editor.model, tokenizer, directory)
    assert len(calls) >= 2 and calls[0] != calls[-1]
    assert loaded.n_edits == 2


def test_second_writer_is_refused(new_editor, tmp_path):
    from comeba.files import LockedError, writer_lock

    editor = new_editor("gpt2")
    editor.edit([R1])
    directory = tmp_path / "state"
    directory.mkdir()
    with writer_lock(directory):
        with pytest.raises(LockedError, match="another process"):
            editor.save_pretrained(directory)
    editor.save_pretrained(directory)  # the lock is released with its holder


@pytest.mark.parametrize("where", ["values", "update"])
def test_non_finite_batch_is_refused_and_state_untouched(new_editor, tokenizer, monkeypatch, tmp_path, where):
    import comeba.editor as editor_mod

    editor = new_editor("llama")
    editor.edit([R1])
    editor.save_pretrained(tmp_path / "state")
    snap = _snapshot(editor)
    saved = (tmp_path / "state" / ADAPTER_CONFIG).read_text()
    if where == "values":
        real = editor_mod.target_values

        def poisoned(*args, **kwargs):
            z = real(*args, **kwargs)
            z[1, 3] = float("nan")
            return z
        monkeypatch.setattr(editor_mod, "target_values", poisoned)
        match = r"target values of request\(s\) #1 \('France'"
    else:
        monkeypatch.setattr(editor_mod, "solve_update", lambda R, K, C: torch.full((R.shape[1], K.shape[1]), float("inf"),
                                                                                  dtype=torch.float64))
        match = "layer 1: the update for this batch is not finite"
    with pytest.raises(editor_mod.EditError, match=match):
        editor.edit([R3, R2])
    _assert_state(editor, snap)
    assert (tmp_path / "state" / ADAPTER_CONFIG).read_text() == saved
    monkeypatch.undo()
    editor.edit([R3, R2])  # and it still works afterwards
    assert all(bool(torch.isfinite(s.delta).all()) for s in editor.layers.values())


def test_too_long_request_is_refused_before_editing(new_editor):
    editor = new_editor("gpt2")  # 128 positions
    snap = _snapshot(editor)
    long_prompt = " ".join(["word"] * 200) + " of France"
    with pytest.raises(RequestError, match=r"request 1: .*more than the model's 128 positions"):
        editor.edit([R1, {"prompt": long_prompt, "subject": "France", "target_new": "Berlin"}])
    _assert_state(editor, snap)


def test_appended_eos_is_not_the_last_prompt_token(tokenizer):
    from comeba.text import encode_prompt, subject_last_index

    class AppendsEos:  # a tokenizer configured to end every encoding with EOS (add_eos_token=True)
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, text, add_special_tokens=True):
            ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
            return {"input_ids": ids + [self.eos_token_id] if add_special_tokens else ids}

    plain = encode_prompt(tokenizer, "The capital city of France")
    assert tokenizer.eos_token_id not in plain
    assert encode_prompt(AppendsEos(), "The capital city of France") == plain
    assert subject_last_index(AppendsEos(), "The capital city of {}", "France") == len(plain) - 1


def test_load_onto_another_model_is_refused(new_editor, make_tiny, tokenizer, tmp_path):
    editor = new_editor("gpt2")
    editor.edit([R1])
    editor.save_pretrained(tmp_path / "state")
    other = make_tiny("gpt2", seed=1)
    with pytest.raises(StateError, match="fingerprint"):
        Editor.from_pretrained(other, tokenizer, tmp_path / "state")
    with pytest.raises(StateError):
        Editor.from_pretrained(other, tokenizer, tmp_path / "nowhere")


def test_state_saved_by_an_earlier_version_still_loads(new_editor, make_tiny, tokenizer, tmp_path):
    from comeba.models import legacy_fingerprint

    editor = new_editor("gpt2")
    editor.edit([R1])
    editor.save_pretrained(tmp_path / "state")
    path = tmp_path / "state" / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config["base_model"]["fingerprint"] = legacy_fingerprint(editor.model)
    del config["hparams"]["gate_span_beta"]  # a state saved before that setting existed was made with β = 1
    del config["hparams"]["accumulated_keys"]  # and with the combined keys alone
    assert config["hparams"]["edit_key_weight"] == [AUTO_KEY_WEIGHT] * (len(editor.hparams.layers) - 1) + [1.0]  # auto, saved
    del config["hparams"]["edit_key_weight"]  # and with γ = 1
    assert config["hparams"]["gate_open_no_context"] is False  # the default, saved
    del config["hparams"]["gate_open_no_context"]  # and its calibration opened subjects without context
    path.write_text(json.dumps(config))
    again = Editor.from_pretrained(editor.model, tokenizer, tmp_path / "state")
    assert again.n_batches == editor.n_batches and again.hparams.gate_span_beta == 1.0
    assert again.hparams.accumulated_keys == "combined" and again.hparams.edit_key_weight == 1.0
    assert again.hparams.gate_open_no_context is True
    config["base_model"]["fingerprint"] = legacy_fingerprint(make_tiny("gpt2", seed=1))
    path.write_text(json.dumps(config))
    with pytest.raises(StateError, match="fingerprint"):
        Editor.from_pretrained(editor.model, tokenizer, tmp_path / "state")


# --------------------------------------------------------------------------- transactions


BAD_REQUESTS = [
    {"prompt": "The capital city of France", "subject": "Germany", "target_new": "Berlin"},  # subject missing
    {"prompt": "The capital city of France", "subject": "France", "target_new": "   "},  # empty target
    {"prompt": "France is next to France", "subject": "France", "target_new": "Spain"},  # subject twice
    {"prompt": "The capital city of France", "subject": "France"},  # no target
]


@pytest.mark.parametrize("bad", range(len(BAD_REQUESTS)))
def test_bad_request_leaves_state_untouched(new_editor, tokenizer, bad):
    editor = new_editor("gpt2")
    editor.edit([R1])
    snap = _snapshot(editor)
    with pytest.raises(RequestError):
        editor.edit([R2, BAD_REQUESTS[bad]])  # a good one first: nothing of the batch is written
    _assert_state(editor, snap)
    with pytest.raises(RequestError):
        editor.edit([])
    _assert_state(editor, snap)


def test_interrupt_mid_edit_leaves_state_untouched(new_editor, tokenizer, tmp_path):
    editor = new_editor("llama")
    editor.edit([R1])
    editor.save_pretrained(tmp_path / "state")
    model = editor.model

    # count the forward passes one batch makes, then start again from the saved state
    calls = [0]
    counter = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        editor.edit([R2, R3])
    finally:
        counter.remove()
    total = calls[0]
    assert total > 10

    editor = Editor.from_pretrained(model, tokenizer, tmp_path / "state", progress=False)
    editor.attach()
    edited = _logits(model, tokenizer, R1["prompt"])
    snap = _snapshot(editor)
    hooks = _hook_count(model)

    for n in (1, total // 2, total - 1, total):  # in target values, layer writing, the α pass
        calls = [0]

        def interrupt(*_):
            calls[0] += 1
            if calls[0] == n:
                raise KeyboardInterrupt

        handle = model.register_forward_pre_hook(interrupt)
        try:
            with pytest.raises(KeyboardInterrupt):
                editor.edit([R2, R3])
        finally:
            handle.remove()
        _assert_state(editor, snap)
        assert editor.attached
        assert _hook_count(model) == hooks, f"hooks left behind after an interrupt at pass {n}"
        assert torch.equal(_logits(model, tokenizer, R1["prompt"]), edited)

    editor.edit([R2, R3])  # and it still works afterwards
    assert editor.n_batches == 2


# --------------------------------------------------------------------------- batch-mates, precision, odd prompts


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_target_values_and_keys_do_not_depend_on_batch_mates(new_editor, tokenizer, optimizer):
    from comeba.compute import subject_keys
    from comeba.values import target_values
    from comeba.hooks import HookLayers
    from comeba.requests import make_requests

    editor = new_editor("llama")
    editor.edit([R3, R4])  # so the validated hooks are not no-ops
    long_one = {"prompt": "The long and winding history of the old city of Rome", "subject": "Rome",
                "target_new": "London"}
    reqs = make_requests([R1, long_one, R2])  # R1 is right-padded next to the long one
    model, layout, hp = editor.model, editor.layout, editor.hparams.replace(v_optimizer=optimizer)
    with HookLayers(model, layout, editor.layers):
        z_all = target_values(model, tokenizer, layout, reqs, hp, editor.templates, progress=False)
        z_one = target_values(model, tokenizer, layout, reqs[:1], hp, editor.templates, progress=False)
        for layer in hp.layers:
            k_all = subject_keys(model, tokenizer, layout, layer, reqs, editor.templates)
            k_one = subject_keys(model, tokenizer, layout, layer, reqs[:1], editor.templates)
            torch.testing.assert_close(k_all[0], k_one[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_all[0], z_one[0], rtol=1e-4, atol=1e-5)


def test_low_precision_model_keeps_full_precision_state(make_tiny, tokenizer, corpus_file):
    model = make_tiny("llama").to(torch.bfloat16)
    checksum = weights_checksum(model)
    editor = Editor(model, tokenizer, HParams(**HP), corpus=text_corpus([corpus_file]), progress=False)
    before = _p_first(model, tokenizer, R1)
    editor.edit([R1])
    with editor.applied():  # the edit takes in bfloat16 as in float32 (about 2× on these near-uniform heads)
        assert math.log(_p_first(model, tokenizer, R1) / before) > 0.4
    for s in editor.layers.values():
        assert s.delta.dtype == torch.float32 and s.c_accu.dtype == torch.float64
        assert torch.isfinite(s.delta).all() and s.delta.abs().sum() > 0
    assert weights_checksum(model) == checksum
    assert next(model.parameters()).dtype == torch.bfloat16
    with editor.applied():
        assert torch.isfinite(_logits(model, tokenizer, R1["prompt"]).float()).all()


def test_prompt_with_literal_braces(new_editor, tokenizer):
    editor = new_editor("gpt2")
    request = {"prompt": "The {odd} capital city of France", "subject": "France", "target_new": "Berlin"}
    before = _p_first(editor.model, tokenizer, request)
    editor.edit([request])
    with editor.applied():
        assert _p_first(editor.model, tokenizer, request) > before


def test_gate_settings_travel_with_the_saved_state(new_editor, make_tiny, tokenizer, tmp_path):
    """gate_layer_mean and gate_span_beta change the gate: a loaded state applies exactly the editor's gate."""
    editor = new_editor("llama", gate_layer_mean=False, gate_span_beta=1.0)  # not the defaults
    editor.edit([R1, R2])
    editor.save_pretrained(tmp_path / "state", final=True)
    texts = UNRELATED[:3] + [R1["prompt"], R2["prompt"]]
    with editor.applied():
        assert not editor.hooks.layer_mean
        want = {t: _logits(editor.model, tokenizer, t) for t in texts}
    fresh = make_tiny("llama")
    edits = load_edits(fresh, tmp_path / "state")
    assert json.loads((tmp_path / "state" / ADAPTER_CONFIG).read_text())["hparams"]["gate_layer_mean"] is False
    for t in texts:
        _same_logits(_logits(fresh, tokenizer, t), want[t], t)
    edits.remove()


def test_first_token_subject_is_warned_about_before_editing(new_editor, tokenizer):
    editor = new_editor("llama")
    first = {"prompt": "The is a word", "subject": "The", "target_new": "Paris"}
    assert tokenizer(first["prompt"]).input_ids[0] == tokenizer("The").input_ids[-1]  # no start token, one token
    warnings = editor.edit_warnings([R1, first])
    assert len(warnings) == 1 and warnings[0].startswith("request 1: the subject 'The' is the first token")
    info = editor.edit([R1, first])
    assert info["warnings"] == warnings
    assert editor.edit_warnings([R1, R2]) == []


def test_subject_key_without_context_is_warned_about(new_editor):
    """A subject key whose whitened energy kᵀ(λC0)⁻¹k is far under general text's mean d_in/λ gets a warning:
    with C0 taken 10⁴ times larger (the whitening 100 times smaller) every subject key is such a key."""
    editor = new_editor("llama")
    assert editor.edit_warnings([R1, R2]) == []
    layer = editor.hparams.layers[0]
    span = editor.layers[layer].span
    editor.layers[layer].span = SpanGate(span.whiten / 100, span.span, span.factor)
    warnings = editor.edit_warnings([R1, R2])
    assert [w.split(":")[0] for w in warnings] == ["request 0", "request 1"]
    assert all(f"has a key at layer {layer} that carries almost no context" in w for w in warnings)


def test_edit_delivers_most_of_its_target_values_gain(arch, new_editor, tokenizer):
    """The written hooks move P(target) on the edit prompt by at least 80 % (in log-probability) of what the
    optimised target value z itself achieves when put in place at layer l_n: a sharp check on tiny models,
    where every P stays small (a near-uniform head) and ratios like "> 1.2 ×" prove little."""
    from comeba.requests import make_requests
    from comeba.text import subject_last_index
    from comeba.values import target_values

    editor = new_editor(arch)
    model, layout, req = editor.model, editor.layout, make_requests([R1])
    z = target_values(model, tokenizer, layout, req, editor.hparams, editor.templates, progress=False)[0]
    at = subject_last_index(tokenizer, req[0].prompt, req[0].subject)
    layer = model.get_submodule(layout.layer_name(editor.hparams.layers[-1]))

    def put_z(module, args, out):
        h = (out[0] if isinstance(out, tuple) else out).clone()
        h[0, at] = z.to(h)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    before = _p_first(model, tokenizer, R1)
    handle = layer.register_forward_hook(put_z)
    try:
        with_z = _p_first(model, tokenizer, R1)
    finally:
        handle.remove()
    editor.edit([R1])
    with editor.applied():
        after = _p_first(model, tokenizer, R1)
    gain, wanted = math.log(after / before), math.log(with_z / before)
    assert wanted > 0.3, (before, with_z)  # the optimisation found a clearly better value
    assert gain >= 0.8 * wanted, (before, after, with_z)


def test_consecutive_batches_fitting_every_contexts_key(new_editor, tokenizer):
    """fit_keys: contexts — the same edits take, and the update differs from the combined key's fit (the
    contexts' keys differ), so the option reaches the solve."""
    _consecutive_batches(new_editor("llama", accumulated_keys="contexts", fit_keys="contexts"), tokenizer)
    combined = new_editor("llama", accumulated_keys="contexts")
    fit = new_editor("llama", accumulated_keys="contexts", fit_keys="contexts")
    for ed in (combined, fit):
        ed.edit([R1])
    for l in combined.layers:
        assert not torch.allclose(combined.layers[l].delta, fit.layers[l].delta, rtol=1e-3, atol=0), l


def test_second_write_round_brings_the_last_layer_closer_to_its_target(new_editor, tokenizer):
    """write_rounds: 2 — the batch's keys join C_accu once (the same C_accu as one round), and the last edited
    layer's output at the subject ends nearer the target value z than after one round."""
    from comeba.requests import make_requests
    from comeba.text import subject_last_index
    from comeba.values import target_values

    def distance(editor) -> float:
        model, layout, req = editor.model, editor.layout, make_requests([R1])
        z = target_values(model, tokenizer, layout, req, editor.hparams, editor.templates, progress=False)[0]
        at = subject_last_index(tokenizer, req[0].prompt, req[0].subject)
        seen = []
        layer = model.get_submodule(layout.layer_name(editor.hparams.layers[-1]))
        editor.edit([R1])
        handle = layer.register_forward_hook(lambda m, a, out: seen.append((out[0] if isinstance(out, tuple)
                                                                             else out)[0, at].detach().clone()))
        try:
            with editor.applied():
                _p_first(model, tokenizer, R1)
        finally:
            handle.remove()
        return float((seen[-1].double() - z.double()).norm() / z.double().norm())

    one, two = new_editor("llama"), new_editor("llama", write_rounds=2)
    d1, d2 = distance(one), distance(two)
    assert d2 < 0.8 * d1, (d1, d2)
    for l in one.layers:
        assert torch.equal(one.layers[l].c_accu, two.layers[l].c_accu), l
        assert not torch.equal(one.layers[l].delta, two.layers[l].delta), l
    with pytest.raises(HParamsError, match="write_rounds"):
        HParams(write_rounds=0)


def test_calibration_can_leave_out_the_subjects_warned_about(new_editor, monkeypatch):
    """gate_open_no_context: false — a subject `edit` warns carries no context (here: every subject, with the
    share raised) no longer sets α, so α differs from the default's, which opens it; without a warning the two
    agree."""
    alphas = {}
    for share in (0.0, 1e9):
        monkeypatch.setattr(editor_module, "LOW_CONTEXT_SHARE", share)
        for opens in (True, False):
            editor = new_editor("llama", gate_open_no_context=opens, gate_subject_share=0.9)
            editor.edit([R1])
            info = editor.edit([R2, R3])
            assert bool(info["warnings"]) == (share > 0)
            alphas[share, opens] = info["alpha"]
    assert alphas[0.0, True] == alphas[0.0, False]
    assert alphas[1e9, True] == alphas[0.0, True]
    assert alphas[1e9, False] != alphas[1e9, True]
