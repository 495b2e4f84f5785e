"""Tiny, randomly initialised Hugging Face causal LMs for fast tests.

Nothing is downloaded: the tokenizer is a small byte-level BPE trained in memory
on a few hundred lines of WikiText-2 (or a built-in paragraph when the data set
is absent), and every model is built from its transformers config class.

    tok = make_tokenizer()
    model = make_model("llama", tok)        # float32, eval mode

Module paths (N = layer index):

    arch       decoder layers          MLP output projection            final norm              lm head
    gpt2       transformer.h.N         transformer.h.N.mlp.c_proj (Conv1D, weight [d_in, d_out])
                                                                        transformer.ln_f        lm_head
    gptj       transformer.h.N         transformer.h.N.mlp.fc_out       transformer.ln_f        lm_head
    gpt_neox   gpt_neox.layers.N       gpt_neox.layers.N.mlp.dense_4h_to_h
                                                                        gpt_neox.final_layer_norm
                                                                                                lm_head
    llama, mistral, qwen2, qwen3, gemma
               model.layers.N          model.layers.N.mlp.down_proj     model.norm              lm_head
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma")

# Path templates of the modules comeba edits/reads, per architecture.
LAYER_PATHS = {
    "gpt2": "transformer.h.{}",
    "gptj": "transformer.h.{}",
    "gpt_neox": "gpt_neox.layers.{}",
    "llama": "model.layers.{}",
    "mistral": "model.layers.{}",
    "qwen2": "model.layers.{}",
    "qwen3": "model.layers.{}",
    "gemma": "model.layers.{}",
}
MLP_OUT_PATHS = {
    "gpt2": "transformer.h.{}.mlp.c_proj",
    "gptj": "transformer.h.{}.mlp.fc_out",
    "gpt_neox": "gpt_neox.layers.{}.mlp.dense_4h_to_h",
    "llama": "model.layers.{}.mlp.down_proj",
    "mistral": "model.layers.{}.mlp.down_proj",
    "qwen2": "model.layers.{}.mlp.down_proj",
    "qwen3": "model.layers.{}.mlp.down_proj",
    "gemma": "model.layers.{}.mlp.down_proj",
}
FINAL_NORM_PATHS = {
    "gpt2": "transformer.ln_f",
    "gptj": "transformer.ln_f",
    "gpt_neox": "gpt_neox.final_layer_norm",
    "llama": "model.norm",
    "mistral": "model.norm",
    "qwen2": "model.norm",
    "qwen3": "model.norm",
    "gemma": "model.norm",
}
LM_HEAD_PATH = "lm_head"  # every arch, including GPT-NeoX, in transformers 5.x

WIKITEXT_VALID = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"

_FALLBACK_TEXT = """\
The city of Paris is the capital of France and its largest city. It lies on the
river Seine in the north of the country. The mother tongue of Danielle Darrieux is
French. Many people in the world speak English, Spanish, German or Chinese as their
first language. The Eiffel Tower was built in 1889 for the World Fair and is one of
the most visited monuments in the world. London is the capital of the United
Kingdom, and Berlin is the capital of Germany. Rome, the capital of Italy, is known
for its history, its art and its food. The team played football in the stadium and
won the game. Because the weather was cold, they stayed at home. Therefore the
result of the election was announced on the next day. I think you should read the
book before you watch the film. The company was founded by an engineer who worked on
computers, phones and televisions. Her father was a doctor and her mother was a
teacher at the local school. The album was released in the summer and reached the
top of the chart in several countries.
"""

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")


def _training_lines(max_lines: int = 400) -> list[str]:
    lines: list[str] = []
    if WIKITEXT_VALID.is_file():
        with open(WIKITEXT_VALID, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("="):
                    continue
                lines.append(line)
                if len(lines) >= max_lines:
                    break
    if not lines:
        lines = [l for l in _FALLBACK_TEXT.splitlines() if l.strip()]
    # Always include the fallback paragraph so common test words get merges.
    lines += [l for l in _FALLBACK_TEXT.splitlines() if l.strip()]
    return lines


def make_tokenizer(vocab_size: int = 768):
    """A small GPT-2-like byte-level BPE tokenizer (fast), trained in memory.

    A leading space is part of the following word (" Paris" -> "ĠParis"...).
    eos = "<|endoftext|>" (also bos/unk), pad = "<|pad|>", padding side right.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_training_lines(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
        padding_side="right",
        model_max_length=512,
    )
    return tok


def make_model(arch: str, tokenizer, seed: int = 0, n_layers: int = 4, hidden: int = 32):
    """A tiny random causal LM of architecture `arch` (one of ARCHS), float32, eval mode."""
    import transformers as tf

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    vocab = len(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    heads = 4
    head_dim = hidden // heads
    inter = 4 * hidden
    common = dict(
        vocab_size=vocab,
        eos_token_id=eos,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    if arch == "gpt2":
        cfg = tf.GPT2Config(
            n_embd=hidden, n_layer=n_layers, n_head=heads, n_inner=inter, n_positions=128,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
    elif arch == "gptj":
        cfg = tf.GPTJConfig(
            n_embd=hidden, n_layer=n_layers, n_head=heads, n_inner=inter, n_positions=128,
            rotary_dim=head_dim // 2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(
            hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=heads,
            intermediate_size=inter, max_position_embeddings=128, rotary_pct=0.5,
            attention_dropout=0.0, hidden_dropout=0.0, **common,
        )
    else:
        cls = {
            "llama": tf.LlamaConfig,
            "mistral": tf.MistralConfig,
            "qwen2": tf.Qwen2Config,
            "qwen3": tf.Qwen3Config,
            "gemma": tf.GemmaConfig,
        }[arch]
        kw = dict(
            hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=heads,
            num_key_value_heads=2, intermediate_size=inter, max_position_embeddings=128,
            head_dim=head_dim, **common,
        )
        cfg = cls(**kw)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = eos
    return model


def get_module(model, path: str):
    """model.get_submodule with the same dotted paths as LAYER_PATHS / MLP_OUT_PATHS."""
    return model.get_submodule(path)
