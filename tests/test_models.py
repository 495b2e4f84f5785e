"""comeba.models: layout detection, weight orientation, identities of weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from comeba.models import (
    LayoutError,
    detect_layout,
    FINGERPRINT_PREFIX,
    fingerprint,
    legacy_fingerprint,
    same_model,
    load_model,
    mlp_out_weight,
    num_layers,
    weights_checksum,
)
from tiny import FINAL_NORM_PATHS, LAYER_PATHS, LM_HEAD_PATH, MLP_OUT_PATHS

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUT_NAME = {
    "gpt2": "gpt2",
    "gptj": "gptj",
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "llama",
}
HIDDEN, INTER = 32, 128  # make_tiny defaults: d_out = hidden, d_in = 4 * hidden


def test_detect_layout(arch, tiny_model):
    layout = detect_layout(tiny_model)
    assert layout.name == LAYOUT_NAME[arch]
    assert layout.transposed == (arch == "gpt2")
    assert num_layers(tiny_model, layout) == 4
    for i in range(4):
        assert layout.layer_name(i) == LAYER_PATHS[arch].format(i)
        assert layout.mlp_out_name(i) == MLP_OUT_PATHS[arch].format(i)
        tiny_model.get_submodule(layout.mlp_out_name(i))
    assert layout.final_norm == FINAL_NORM_PATHS[arch]
    assert layout.lm_head == LM_HEAD_PATH
    assert tiny_model.get_submodule(layout.lm_head) is tiny_model.get_output_embeddings()


def test_mlp_out_weight_is_out_by_in(arch, tiny_model):
    layout = detect_layout(tiny_model)
    module = tiny_model.get_submodule(MLP_OUT_PATHS[arch].format(2))
    w = mlp_out_weight(tiny_model, layout, 2)
    assert w.shape == (HIDDEN, INTER)
    # a view of the model's own weight, never a copy
    assert w.data_ptr() == module.weight.data_ptr()
    k = torch.randn(2, 5, INTER)
    bias = getattr(module, "bias", None)
    with torch.no_grad():
        expected = module(k)
        got = k @ w.T + (bias if bias is not None else 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_sequential_is_unsupported():
    seq = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with pytest.raises(LayoutError) as err:
        detect_layout(seq)
    assert "Sequential" in str(err.value)


def test_bert_is_unsupported():
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32,
    )
    model = transformers.BertForMaskedLM(cfg)
    with pytest.raises(LayoutError) as err:
        detect_layout(model)
    msg = str(err.value)
    assert "BertForMaskedLM" in msg  # what kind of model was found
    assert "encoder" in msg and "attention" in msg  # which modules it has


def test_gpt2_with_linear_projection_is_not_taken_for_gpt2(make_tiny):
    """A GPT-2 whose c_proj is an nn.Linear would be read in the wrong orientation: refuse it."""
    model = make_tiny("gpt2")
    model.transformer.h[0].mlp.c_proj = torch.nn.Linear(INTER, HIDDEN)
    with pytest.raises(LayoutError):
        detect_layout(model)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_fingerprint_tells_seeds_apart_and_is_stable(make_tiny, name):
    a, a2, b = make_tiny(name, seed=0), make_tiny(name, seed=0), make_tiny(name, seed=1)
    fa = fingerprint(a)
    assert fa == fingerprint(a)  # stable across calls
    assert fa == fingerprint(a2)  # same weights, other object
    assert fa != fingerprint(b)
    assert isinstance(fa, str) and len(fa) >= 16


def test_fingerprint_is_exact_across_thread_counts_and_sees_one_changed_weight(make_tiny):
    """Integer arithmetic: no dependence on the reduction order; one ulp in one weight changes it."""
    model = make_tiny("llama")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fingerprint(model)
        torch.set_num_threads(2)
        assert fingerprint(model) == one
    finally:
        torch.set_num_threads(before)
    assert one.startswith(FINGERPRINT_PREFIX)
    w = model.get_submodule("model.layers.3.mlp.down_proj").weight
    with torch.no_grad():
        old = w[5, 7].clone()
        w[5, 7] = torch.nextafter(old, old + 1)
    assert fingerprint(model) != one
    with torch.no_grad():
        w[5, 7] = old
    assert fingerprint(model) == one
    model.to(torch.bfloat16)  # other stored bits, other model
    assert fingerprint(model) != one


def test_older_fingerprints_are_recognised(make_tiny):
    model, other = make_tiny("llama", seed=0), make_tiny("llama", seed=1)
    fp = fingerprint(model)
    assert same_model(fp, model, fp)
    assert same_model(legacy_fingerprint(model), model, fp)
    assert not same_model(legacy_fingerprint(other), model, fp)
    assert not same_model(fingerprint(other), model, fp)
    assert not same_model(None, model, fp)


def test_weights_checksum_sees_one_changed_weight(make_tiny):
    model = make_tiny("llama")
    before = weights_checksum(model)
    assert before == weights_checksum(make_tiny("llama"))
    w = model.get_submodule("model.layers.3.mlp.down_proj").weight
    with torch.no_grad():
        old = w[5, 7].item()
        w[5, 7] = old + 1e-6
    assert weights_checksum(model) != before
    with torch.no_grad():
        w[5, 7] = old
    assert weights_checksum(model) == before


def test_load_model_from_folder(tmp_path, make_tiny, tokenizer):
    model = make_tiny("llama")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, tok = load_model(str(tmp_path / "m"))
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert tok.pad_token_id is not None and tok.padding_side == "right"
    assert fingerprint(loaded) == fingerprint(model)
    ids = torch.tensor([tok("The capital of France").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
