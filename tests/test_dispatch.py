"""Models dispatched with accelerate (device_map, CPU/disk offload): the same edits, gates and logits.

A tiny llama is dispatched over "cpu" and "disk" (an offload folder in
tmp_path), so accelerate's AlignDevicesHooks are really installed on every
layer and the offloaded weights wait on the meta device between calls. CPU
only: every execution device is the CPU, so what is checked is that comeba
keeps accelerate's hooks working (never replacing a layer's `forward`) and
places its tensors by execution device, not by weight device.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from comeba import load_model
from comeba.adapter import load_edits
from comeba.compute import replay_layers
from comeba.editor import Editor
from comeba.hparams import HParams
from comeba.models import (detect_layout, fingerprint, get_module, input_device, mlp_out_device, resolve_device_map,
                           weights_checksum)
from comeba.corpus import text_corpus
from test_editor import HP, R1, R2, UNRELATED

# Offloaded weights cannot be swapped for bfloat16 copies (values.value_precision then keeps float32), so the
# plain model they are compared with computes its target values in float32 too.
HP = {**HP, "v_dtype": "float32"}

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [R1["prompt"], R2["prompt"], UNRELATED[0], UNRELATED[2]]


# Edited layer 1 and layers 0 and 3 offloaded to disk (weights on meta), edited layer 2 on the CPU; the head
# offloaded too. The embeddings stay on the CPU, where the inputs go.
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "disk",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.layers.3": "disk",
    "model.norm": "cpu",
    "lm_head": "disk",
}


def _dispatch(model, folder):
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=DEVICE_MAP, offload_dir=str(folder),
                          skip_keys=model._skip_keys_device_placement)


def _layers(model):
    return list(get_module(model, detect_layout(model).layers))


def _accelerate_forward(module) -> bool:
    """`module.forward` is still accelerate's dispatch wrapper (add_hook_to_module's partial of new_forward)."""
    forward = module.__dict__.get("forward")
    return (isinstance(forward, functools.partial) and forward.func.__name__ == "new_forward"
            and module.forward is forward and hasattr(module, "_hf_hook"))


def _assert_dispatch_intact(model, forwards):
    for i, layer in enumerate(_layers(model)):
        assert hasattr(layer, "_hf_hook"), f"layer {i} lost its accelerate hook"
        assert _accelerate_forward(layer), f"layer {i}: forward is no longer accelerate's wrapper"
        assert layer.__dict__["forward"] is forwards[i], f"layer {i}: forward was replaced"
        assert type(layer).__name__ == "LlamaDecoderLayer" and "_comeba_replay" not in layer.__dict__
    # nothing left loaded: the offloaded weights wait on the meta device again
    for name in ("model.layers.0", "model.layers.1", "model.layers.3", "lm_head"):
        assert all(p.device.type == "meta" for p in get_module(model, name).parameters()), name


@torch.no_grad()
def _logits(model, tokenizer, text):
    return model(input_ids=torch.tensor([tokenizer(text).input_ids], device=input_device(model))).logits


@torch.no_grad()
def _gates(editor, tokenizer, text):
    """Each validated hook's gate and scores on `text`, and the logits."""
    hooks = editor.hooks
    hooks.record(True)
    logits = _logits(editor.model, tokenizer, text)
    out = {l: (r.gate.clone(), r.scores.clone()) for l, r in hooks.records.items()}
    hooks.record(False)
    return logits, out


@pytest.fixture
def pair(make_tiny, tokenizer, corpus_file, tmp_path, monkeypatch):
    """pair(**hparams) -> (editor on a plain tiny llama, editor on the same llama dispatched), each with its own
    statistics cache (so the dispatched model computes its statistics itself)."""

    def _make(**changes):
        hp = {**HP, **changes}
        corpus = text_corpus([corpus_file])
        monkeypatch.setenv("COMEBA_HOME", str(tmp_path / "home-plain"))
        plain = Editor(make_tiny("llama", seed=0), tokenizer, HParams(**hp), corpus=corpus, progress=False)
        monkeypatch.setenv("COMEBA_HOME", str(tmp_path / "home-dispatched"))
        model = _dispatch(make_tiny("llama", seed=0), tmp_path / "offload")
        dispatched = Editor(model, tokenizer, HParams(**hp), corpus=corpus, progress=False)
        return plain, dispatched

    return _make


def test_dispatch_really_offloads(make_tiny, tokenizer, tmp_path):
    """The set-up is what it claims: hooks on every layer, offloaded weights on meta, the same function."""
    plain = make_tiny("llama", seed=0)
    model = _dispatch(make_tiny("llama", seed=0), tmp_path / "offload")
    layout = detect_layout(model)
    assert all(_accelerate_forward(layer) for layer in _layers(model))
    assert get_module(model, layout.mlp_out_name(1)).weight.device.type == "meta"
    assert mlp_out_device(model, layout, 1) == torch.device("cpu")
    assert input_device(model) == torch.device("cpu")
    # the fingerprint reads offloaded weights where accelerate keeps them: states and statistics carry over
    assert fingerprint(model) == fingerprint(plain)
    assert weights_checksum(model) == weights_checksum(plain)
    torch.testing.assert_close(_logits(model, tokenizer, TEXTS[0]), _logits(plain, tokenizer, TEXTS[0]))


def test_replay_keeps_accelerate_forward(make_tiny, tmp_path):
    """replay_layers never sets or pops a layer's `forward`: accelerate's wrapper stays, also on an error."""
    model = _dispatch(make_tiny("llama", seed=0), tmp_path / "offload")
    layout = detect_layout(model)
    forwards = [layer.__dict__["forward"] for layer in _layers(model)]
    with replay_layers(model, layout, 2, lambda: torch.zeros(1)):
        assert _layers(model)[0](torch.ones(1, 2, 3)).shape == (1, 2, 3)  # passes its input through
        assert torch.equal(_layers(model)[2](torch.ones(1, 2, 3)), torch.zeros(1))  # replays
        assert _accelerate_forward(_layers(model)[3])
    with pytest.raises(KeyError):
        with replay_layers(model, layout, 1, lambda: torch.zeros(1)):
            raise KeyError("inside")
    _assert_dispatch_intact(model, forwards)
    # a plain model gets no instance `forward` either
    plain = make_tiny("llama", seed=0)
    with replay_layers(plain, layout, 1, lambda: torch.zeros(1)):
        pass
    assert all("forward" not in layer.__dict__ and type(layer).__name__ == "LlamaDecoderLayer"
               for layer in _layers(plain))


@pytest.mark.parametrize("gate", ["span", "reference"])
def test_dispatched_model_edits_like_the_plain_one(pair, tokenizer, gate):
    """Same seed, same edits (ΔW, C_accu, α), same gate decisions and the same logits with the hooks; and
    accelerate's hooks are all still in place after editing."""
    plain, dispatched = pair(gate=gate)
    forwards = [layer.__dict__["forward"] for layer in _layers(dispatched.model)]
    assert dispatched.templates == plain.templates
    assert dispatched.model_fingerprint == plain.model_fingerprint
    for l, s in plain.layers.items():
        torch.testing.assert_close(dispatched.layers[l].c_accu, s.c_accu)
    for batch in ([R1], [R2]):
        plain.edit(batch)
        dispatched.edit(batch)
        for l, s in plain.layers.items():
            d = dispatched.layers[l]
            assert d.delta.device.type == "cpu" and d.c_accu.device.type == "cpu"
            torch.testing.assert_close(d.delta, s.delta, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(d.c_accu, s.c_accu, rtol=1e-6, atol=1e-8)
            assert d.alpha == pytest.approx(s.alpha, rel=1e-4, abs=1e-6)
    _assert_dispatch_intact(dispatched.model, forwards)

    with plain.applied(), dispatched.applied():
        for text in TEXTS:
            want_logits, want = _gates(plain, tokenizer, text)
            got_logits, got = _gates(dispatched, tokenizer, text)
            assert set(got) == set(want) == set(plain.layers)
            for l in want:
                assert torch.equal(got[l][0], want[l][0]), f"{text!r}, layer {l}: other gate decisions"
                torch.testing.assert_close(got[l][1], want[l][1], rtol=1e-4, atol=1e-5, equal_nan=True)
            torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
        # the edit took on both
        assert any(bool(g.any()) for g in (r[0] for r in _gates(dispatched, tokenizer, TEXTS[0])[1].values()))
        assert dispatched.generate([R1["prompt"]], 3) == plain.generate([R1["prompt"]], 3)
    _assert_dispatch_intact(dispatched.model, forwards)


OTHER_MAPS = {
    "gpt2": {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu", "transformer.h.0": "disk",
             "transformer.h.1": "disk", "transformer.h.2": "cpu", "transformer.h.3": "disk", "transformer.ln_f": "cpu",
             "lm_head": "disk"},
    "gpt_neox": {"gpt_neox.embed_in": "cpu", "gpt_neox.rotary_emb": "cpu", "gpt_neox.emb_dropout": "cpu",
                 "gpt_neox.layers.0": "disk", "gpt_neox.layers.1": "disk", "gpt_neox.layers.2": "cpu",
                 "gpt_neox.layers.3": "disk", "gpt_neox.final_layer_norm": "cpu", "lm_head": "disk"},
}


@pytest.mark.parametrize("arch", sorted(OTHER_MAPS))
def test_other_layouts_dispatched(make_tiny, tokenizer, corpus_file, tmp_path, monkeypatch, arch):
    """GPT-2 (Conv1D, tuple-returning blocks) and GPT-NeoX: one batch gives the same ΔW and α when dispatched."""
    from accelerate import dispatch_model

    monkeypatch.setenv("COMEBA_HOME", str(tmp_path / "home"))
    hp, corpus = HParams(**HP), text_corpus([corpus_file])
    plain = Editor(make_tiny(arch, seed=0), tokenizer, hp, corpus=corpus, progress=False)
    model = make_tiny(arch, seed=0)
    model = dispatch_model(model, device_map=OTHER_MAPS[arch], offload_dir=str(tmp_path / "offload"),
                           skip_keys=model._skip_keys_device_placement)
    forwards = [layer.__dict__["forward"] for layer in _layers(model)]
    dispatched = Editor(model, tokenizer, hp, corpus=corpus, progress=False)
    plain.edit([R1])
    dispatched.edit([R1])
    for l, s in plain.layers.items():
        torch.testing.assert_close(dispatched.layers[l].delta, s.delta, rtol=1e-4, atol=1e-6)
        assert dispatched.layers[l].alpha == pytest.approx(s.alpha, rel=1e-4, abs=1e-6)
    for layer, forward in zip(_layers(model), forwards):
        assert layer.__dict__["forward"] is forward and _accelerate_forward(layer)


def test_saved_edits_load_onto_a_dispatched_model(pair, make_tiny, tokenizer, tmp_path):
    """A state made on the plain model goes on editing, and loads for inference, on the dispatched one."""
    plain, dispatched = pair()
    plain.edit([R1])
    plain.save_pretrained(tmp_path / "state")
    model = dispatched.model
    forwards = [layer.__dict__["forward"] for layer in _layers(model)]

    handle = load_edits(model, tmp_path / "state")
    with plain.applied():
        for text in TEXTS:
            torch.testing.assert_close(_logits(model, tokenizer, text), _logits(plain.model, tokenizer, text),
                                       rtol=1e-4, atol=1e-5)
    handle.remove()

    resumed = Editor.from_pretrained(model, tokenizer, tmp_path / "state", progress=False)
    plain.edit([R2])
    resumed.edit([R2])
    for l, s in plain.layers.items():
        torch.testing.assert_close(resumed.layers[l].delta, s.delta, rtol=1e-4, atol=1e-6)
    _assert_dispatch_intact(model, forwards)


# --------------------------------------------------------------------------- loading with a device map


def test_load_model_with_a_device_map(model_dir, tokenizer, tmp_path):
    """load_model(device_map=...) dispatches through from_pretrained; a JSON file is a device map too."""
    plain, _ = load_model(str(model_dir))
    path = tmp_path / "map.json"
    path.write_text(json.dumps(DEVICE_MAP))
    for spec in (DEVICE_MAP, str(path)):
        model, tok = load_model(str(model_dir), device_map=spec, offload_folder=tmp_path / "offload")
        assert model.hf_device_map == DEVICE_MAP
        assert all(_accelerate_forward(layer) for layer in _layers(model))
        assert get_module(model, "model.layers.1.mlp.down_proj").weight.device.type == "meta"
        assert fingerprint(model) == fingerprint(plain)
        torch.testing.assert_close(_logits(model, tok, TEXTS[2]), _logits(plain, tok, TEXTS[2]))
    model, _ = load_model(str(model_dir), device_map="auto")  # one device here: no hooks needed
    torch.testing.assert_close(_logits(model, tokenizer, TEXTS[2]), _logits(plain, tokenizer, TEXTS[2]))


def test_bad_device_maps_are_refused(tmp_path, model_dir):
    assert resolve_device_map(None) is None and resolve_device_map("balanced") == "balanced"
    with pytest.raises(ValueError, match="neither one of auto"):
        resolve_device_map("everywhere")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        resolve_device_map(str(bad))
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        resolve_device_map(str(bad))
    with pytest.raises(ValueError, match="not both"):
        load_model(str(model_dir), device="cpu", device_map="auto")


def test_cli_device_map(model_dir, tmp_path, monkeypatch, capsys):
    """--device-map FILE.json on `generate` gives what the plain model gives; --device with it is refused."""
    from comeba.cli import build_parser, main

    monkeypatch.setenv("COMEBA_HOME", str(tmp_path / "home"))
    path = tmp_path / "map.json"
    path.write_text(json.dumps(DEVICE_MAP))
    for command in ("edit", "generate", "eval"):
        assert "--device-map" in build_parser()._subparsers._group_actions[0].choices[command].format_help()
    assert main(["generate", "--model", str(model_dir), "--quiet", "--max-new-tokens", "4", "Hello"]) == 0
    want = capsys.readouterr().out
    assert main(["generate", "--model", str(model_dir), "--device-map", str(path), "--max-new-tokens", "4",
                 "Hello"]) == 0
    got = capsys.readouterr()
    assert got.out == want
    assert "disk (" in got.err  # the placement names the offload
    assert main(["generate", "--model", str(model_dir), "--device-map", "auto", "--device", "cpu", "Hello"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--device-map", str(tmp_path / "nope.json"), "Hi"]) == 2
    assert "device map" in capsys.readouterr().err


def test_offloaded_input_embeddings(make_tiny, tokenizer, corpus_file, tmp_path, monkeypatch):
    """Even the input embeddings offloaded (their weight on the meta device): statistics, editing, calibration,
    diagnostics and generation feed their ids to accelerate's execution device and match the plain model."""
    from accelerate import dispatch_model

    from comeba.diagnostics import TextSample, text_pass

    monkeypatch.setenv("COMEBA_HOME", str(tmp_path / "home"))
    hp, corpus = HParams(**HP), text_corpus([corpus_file])
    plain = Editor(make_tiny("llama", seed=0), tokenizer, hp, corpus=corpus, progress=False)
    model = make_tiny("llama", seed=0)
    model = dispatch_model(model, device_map={**DEVICE_MAP, "model.embed_tokens": "disk"},
                           offload_dir=str(tmp_path / "offload"), skip_keys=model._skip_keys_device_placement)
    assert get_module(model, "model.embed_tokens").weight.device.type == "meta"
    monkeypatch.setenv("COMEBA_HOME", str(tmp_path / "home-dispatched"))
    dispatched = Editor(model, tokenizer, hp, corpus=corpus, progress=False)
    plain.edit([R1])
    dispatched.edit([R1])
    for l, s in plain.layers.items():
        torch.testing.assert_close(dispatched.layers[l].delta, s.delta, rtol=1e-4, atol=1e-6)
    assert dispatched.generate([R1["prompt"]], 3) == plain.generate([R1["prompt"]], 3)
    sample = TextSample(tuple(tuple(tokenizer(t).input_ids) for t in UNRELATED[:3]), "three texts")
    with plain.applied(), dispatched.applied():
        want, got = text_pass(plain.model, tokenizer, sample, plain.hooks), text_pass(model, tokenizer, sample,
                                                                                     dispatched.hooks)
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-4)


def test_weight_editing_baselines_refuse_offloaded_layers(make_tiny, tokenizer, corpus_file, tmp_path):
    """seq-memit and AlphaEdit write into W_0: with an edited layer offloaded that cannot work, so they say so."""
    from comeba.baselines import make_baseline

    model = _dispatch(make_tiny("llama", seed=0), tmp_path / "offload")  # layer 1 on disk, layer 2 on the CPU
    c0 = {l: torch.eye(128, dtype=torch.float64) for l in (1, 2)}
    for method in ("seq-memit", "alphaedit"):
        with pytest.raises(ValueError, match=r"layer\(s\) \[1\] are offloaded"):
            make_baseline(method, model, tokenizer, HParams(**HP), c0)
