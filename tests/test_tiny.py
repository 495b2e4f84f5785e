"""Smoke tests for the tiny test models and tokenizer."""

import torch

from tiny import FINAL_NORM_PATHS, LAYER_PATHS, LM_HEAD_PATH, MLP_OUT_PATHS


def test_tokenizer(tokenizer):
    ids = tokenizer(" Paris", add_special_tokens=False).input_ids
    assert len(ids) > 0
    assert tokenizer.decode(ids) == " Paris"
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"
    # the leading space belongs to the first token of the word
    assert tokenizer.convert_ids_to_tokens(ids)[0].startswith("\u0120")
    assert 256 < len(tokenizer) <= 1024


def test_tiny_model_builds(arch, tiny_model, tokenizer):
    model = tiny_model
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    for i in range(model.config.num_hidden_layers):
        model.get_submodule(LAYER_PATHS[arch].format(i))
        proj = model.get_submodule(MLP_OUT_PATHS[arch].format(i))
        assert proj.weight.dim() == 2
    model.get_submodule(FINAL_NORM_PATHS[arch])
    assert model.get_submodule(LM_HEAD_PATH) is model.get_output_embeddings()

    batch = tokenizer(["The capital of France is", " Paris"], return_tensors="pt", padding=True)
    assert batch.attention_mask[1, -1] == 0  # right padded
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch.input_ids.shape, len(tokenizer))
    assert torch.isfinite(logits).all()
    # right padding does not change the real tokens' logits
    with torch.no_grad():
        single = model(**tokenizer([" Paris"], return_tensors="pt")).logits
    n = single.shape[1]
    torch.testing.assert_close(logits[1, :n], single[0], atol=1e-5, rtol=1e-4)


def test_tiny_model_seeded(make_tiny):
    a, b, c = make_tiny("llama", seed=1), make_tiny("llama", seed=1), make_tiny("llama", seed=2)
    wa, wb, wc = (m.get_submodule("model.layers.0.mlp.down_proj").weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_readme_hyperparameter_table_is_generated_from_the_config():
    """Every setting's default and help in the README come from HParams itself (one source)."""
    from pathlib import Path

    from comeba.hparams import markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme


def test_every_public_name_resolves():
    """`import comeba` exports lazily; each name must point at a module that still holds it."""
    import comeba

    for name in comeba.__all__:
        assert getattr(comeba, name) is not None, name
    assert {"Editor", "load_edits", "HParams", "load_model", "text_corpus"} <= set(comeba.__all__)
