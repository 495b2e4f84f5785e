"""Metrics on a toy causal model whose next-token distribution is known by hand.

Vocabulary (ids): [PAD]=0 [BOS]=1 a=2 b=3 c=4 d=5 e=6 f=7, V = 8.
The toy model predicts next = (token + shift) % V from the current token only:
logit ln(7) for `next`, 0 for the other 7 tokens, so
P(next) = 7 / (7 + 7) = 1/2 and P(any other) = 1/14.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from comeba import metrics as M

WORDS = ["[PAD]", "[BOS]", "a", "b", "c", "d", "e", "f"]
V = len(WORDS)


def _word_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[PAD]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {}
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", special_tokens=[("[BOS]", 1)]
        )
        extra = {"bos_token": "[BOS]"}
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", **extra)


@pytest.fixture(scope="module")
def word_tok() -> PreTrainedTokenizerFast:
    return _word_tokenizer(bos=False)


@pytest.fixture(scope="module")
def bos_tok() -> PreTrainedTokenizerFast:
    return _word_tokenizer(bos=True)


class ShiftModel(torch.nn.Module):
    """next = (token + shift) % V; records each call and insists on an attention mask."""

    def __init__(self, shift: int = 1):
        super().__init__()
        self.shift = shift
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # gives the model a device
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        assert attention_mask is not None, "metrics must pass an explicit attention mask"
        assert attention_mask.shape == input_ids.shape
        self.calls.append((input_ids.clone(), attention_mask.clone()))
        nxt = (input_ids + self.shift) % V
        logits = torch.zeros(*input_ids.shape, V) + self.dummy
        logits.scatter_(-1, nxt[..., None], math.log(7.0))
        return SimpleNamespace(logits=logits)


LN2, LN14 = math.log(2.0), math.log(14.0)


# ------------------------------------------------------------- teacher forcing


def test_token_accuracy_by_hand(word_tok):
    model = ShiftModel(1)
    prompts = ["a b", "a b", "a b", "c", "a b c d e"]
    targets = [
        "c d",  # after b -> c ok; after c -> d ok: 2/2
        "c c",  # c ok; after gold c the model says d, not c: 1/2
        "e d",  # after b says c (not e); after e says f (not d): 0/2
        "d e f",  # after c: d, after d: e, after e: f: 3/3
        "f",  # after e: f: 1/1
    ]
    assert M.token_accuracy(model, word_tok, prompts, targets) == [1.0, 0.5, 0.0, 1.0, 1.0]
    # Batching and padding do not change anything.
    assert M.token_accuracy(model, word_tok, prompts, targets, batch_size=1) == [1.0, 0.5, 0.0, 1.0, 1.0]
    assert M.token_accuracy(model, word_tok, prompts, targets, batch_size=2) == [1.0, 0.5, 0.0, 1.0, 1.0]


def test_right_padding_and_mask(word_tok):
    model = ShiftModel(1)
    M.token_accuracy(model, word_tok, ["a b c", "a"], ["d", "b"])
    (ids, mask), = model.calls
    # prompt+target right padded with [PAD]=0, mask marks the real tokens.
    assert ids.tolist() == [[2, 3, 4, 5], [2, 3, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_targets_are_continuations(word_tok):
    model = ShiftModel(1)
    # " c d", "c d" and "  c d " score the same tokens.
    assert M.token_accuracy(model, word_tok, ["a b"] * 3, [" c d", "c d", "  c d "]) == [1.0] * 3
    assert M.continuation("Paris ") == " Paris"


def test_bos_tokenizer(bos_tok):
    model = ShiftModel(1)
    # encode_prompt adds [BOS]; input = [BOS] a b | c, target scored at position 2 (after b).
    assert M.token_accuracy(model, bos_tok, ["a b", "a b"], ["c", "d"]) == [1.0, 0.0]
    (ids, _), = model.calls
    assert ids.tolist() == [[1, 2, 3, 4], [1, 2, 3, 5]]
    # A one-token prompt still has a position to predict from: after [BOS] comes a.
    assert M.argmax_tokens(model, bos_tok, ["a"], ["b c"]) == [[3, 4]]


def test_argmax_tokens_and_locality(word_tok):
    before_model, after_model = ShiftModel(1), ShiftModel(2)
    prompts, truths = ["a b", "a b c", "d"], ["c d", "d f", "e"]
    before = M.argmax_tokens(before_model, word_tok, prompts, truths)
    # positions: after b, after c | after c, after d | after d
    assert before == [[4, 5], [5, 6], [6]]
    after = M.argmax_tokens(after_model, word_tok, prompts, truths)
    assert after == [[5, 6], [6, 7], [7]]
    assert M.locality(before, before) == [1.0, 1.0, 1.0]
    assert M.locality(before, after) == [0.0, 0.0, 0.0]
    assert M.locality([[4, 5], [1, 2, 3]], [[4, 0], [1, 2, 3]]) == [0.5, 1.0]
    with pytest.raises(ValueError):
        M.locality([[1, 2]], [[1]])
    with pytest.raises(ValueError):
        M.locality([[1]], [[1], [2]])


def test_target_nll_by_hand(word_tok):
    model = ShiftModel(1)
    nll = M.target_nll(model, word_tok, ["a b", "a b", "a b"], ["c d", "c c", "e"])
    # right tokens cost ln 2, wrong ones ln 14.
    assert nll == pytest.approx([LN2, (LN2 + LN14) / 2, LN14], abs=1e-5)


def test_counterfact_scores(word_tok):
    model = ShiftModel(1)
    prompts = ["a b", "a b", "a b"]
    new = ["c d", "e", "c"]  # nll: ln2, ln14, ln2
    true = ["e d", "c", "c"]  # nll: ln14, ln2, ln2
    assert M.prefers_new(model, word_tok, prompts, new, true) == [True, False, False]
    assert M.prefers_true(model, word_tok, prompts, new, true) == [False, True, False]


def test_length_mismatch_is_an_error(word_tok):
    with pytest.raises(ValueError):
        M.token_accuracy(ShiftModel(), word_tok, ["a", "b"], ["c"])
    with pytest.raises(TypeError):
        M.token_accuracy(ShiftModel(), word_tok, "a", "b")
    with pytest.raises(ValueError):
        M.token_accuracy(ShiftModel(), word_tok, ["a"], ["   "])


# ------------------------------------------------------------------ generation


def test_greedy_generation_and_exact_match(word_tok):
    model = ShiftModel(1)
    assert M.generate_tokens(model, word_tok, ["a", "c d"], 3) == [[3, 4, 5], [6, 7, 0]]
    assert M.generate_tokens(model, word_tok, ["a", "c d"], [1, 2]) == [[3], [6, 7]]
    # Each step is a full, masked call: no state between steps.
    assert all(mask.sum() > 0 for _, mask in model.calls)
    got = M.exact_match_generation(
        model, word_tok, ["a", "a", "a b", "d"], ["b c d", "b c e", "c", "e f"], batch_size=3
    )
    assert got == [True, False, True, True]
    # Free generation differs from teacher forcing: "b d c" gets 1/3 teacher-forced
    # (after a: b ok; after b: c != d; after d: e != c) and no exact match.
    assert M.token_accuracy(model, word_tok, ["a"], ["b d c"]) == [pytest.approx(1 / 3)]
    assert M.exact_match_generation(model, word_tok, ["a"], ["b d c"]) == [False]


def test_sampling_is_seeded(word_tok):
    model = ShiftModel(1)
    one = M.generate_tokens(model, word_tok, ["a", "b"], 12, top_k=5, seed=3)
    two = M.generate_tokens(model, word_tok, ["a", "b"], 12, top_k=5, seed=3)
    assert one == two
    assert M.generate_tokens(model, word_tok, ["b"], 12, top_k=5, seed=3) == one[1:]  # alone as in company
    assert all(len(x) == 12 for x in one)
    # top_k=1 is greedy.
    assert M.generate_tokens(model, word_tok, ["a"], 3, top_k=1) == [[3, 4, 5]]
    # With P(next) = 1/2 over 12 draws, a sample that is all greedy has chance 2^-24.
    assert one[0] != [(2 + k + 1) % V for k in range(12)] or one[1] != [(3 + k + 1) % V for k in range(12)]


def test_generate_text_includes_prompt(word_tok):
    model = ShiftModel(1)
    assert M.generate_text(model, word_tok, ["a"], 3, top_k=None) == ["a b c d"]
    assert M.generate_text(model, word_tok, ["a"], 3, top_k=None, include_prompt=False) == ["b c d"]


# --------------------------------------------------------------------- fluency


def test_ngram_entropy_by_hand():
    # words a b a b: bigrams ab, ba, ab -> (2/3, 1/3); trigrams aba, bab -> (1/2, 1/2).
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    assert M.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert M.ngram_entropy("a a a a a") == 0.0
    assert M.ngram_entropy("word") == 0.0
    assert M.ngram_entropy("") == 0.0
    # punctuation is a word: "x, y" -> x , y: two distinct bigrams (1 bit), one trigram (0).
    assert M.ngram_entropy("x, y") == pytest.approx((2 / 3 * 1.0) / 2)


def test_fluency_of_greedy_cycle(word_tok):
    model = ShiftModel(1)
    # top_k=1 is greedy: "a" + 5 tokens = a b c d e f (all distinct n-grams).
    (score,) = M.fluency(model, word_tok, ["a"], 5, top_k=1)
    assert score == pytest.approx((2 / 3 * math.log2(5) + 4 / 3 * math.log2(4)) / 2)


# --------------------------------------------------------- a real tiny HF model


def test_real_model_batching_matches_single(tokenizer, make_tiny):
    """On a real (tiny, random) HF model, right padding gives the same numbers as one at a time."""
    model = make_tiny("gpt2")
    prompts = ["The mother tongue of Danielle Darrieux is", "Paris is the capital of", "Hi"]
    targets = ["English", "France and more", "there"]
    batched = M.argmax_tokens(model, tokenizer, prompts, targets)
    single = [M.argmax_tokens(model, tokenizer, [p], [t])[0] for p, t in zip(prompts, targets)]
    assert batched == single
    nll_b = M.target_nll(model, tokenizer, prompts, targets)
    nll_s = [M.target_nll(model, tokenizer, [p], [t])[0] for p, t in zip(prompts, targets)]
    assert nll_b == pytest.approx(nll_s, rel=1e-4)
    # Greedy generation without cache matches transformers' own greedy decoding.
    ours = M.generate_tokens(model, tokenizer, prompts[:1], 4)
    ids = torch.tensor([tokenizer(prompts[0])["input_ids"]])
    ref = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    assert ours[0] == ref[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_cached_generation_matches_uncached(tokenizer, make_tiny, arch):
    """use_cache=True (left-padded batches, KV cache) gives the tokens of the cache-free loop."""
    torch.manual_seed(0)
    model = make_tiny(arch)
    prompts = ["The mother tongue of Danielle Darrieux is", "Hi", "Paris is the capital of"]
    uncached = M.generate_tokens(model, tokenizer, prompts, [6, 3, 4])
    assert [len(t) for t in uncached] == [6, 3, 4]
    for batch_size in (1, 2, 3):  # unpadded, and left-padded batches of different lengths
        assert M.generate_tokens(model, tokenizer, prompts, [6, 3, 4], use_cache=True,
                                 batch_size=batch_size) == uncached
    # sampling: a generator per prompt, so a prompt's sample is the same with or without the cache, alone or
    # in any batch (what lets several processes share the records of an evaluation)
    a = M.generate_tokens(model, tokenizer, prompts, 5, top_k=5, seed=3, use_cache=True)
    assert a == M.generate_tokens(model, tokenizer, prompts, 5, top_k=5, seed=3)
    assert [a[2], a[0]] == M.generate_tokens(model, tokenizer, [prompts[2], prompts[0]], 5, top_k=5, seed=3,
                                             use_cache=True, batch_size=1)
    assert a != M.generate_tokens(model, tokenizer, prompts, 5, top_k=5, seed=4, use_cache=True)
    assert M.exact_match_generation(model, tokenizer, prompts[:1], ["x"], use_cache=True) == [False]
