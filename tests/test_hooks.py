"""comeba.hooks: hook layers, the gate, running statistics under a KV cache."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from comeba import models
from comeba.gate import gate_scores
from comeba.hooks import HookLayers, LayerState
from comeba.models import detect_layout, mlp_out_weight

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN, INTER = 32, 128
LAYERS = (1, 2)
PROMPTS = [
    "The city of Paris is the capital of France and its largest city",
    "The team played football",
    "Because the weather was cold, they stayed",
]


def _deltas(seed: int = 0, scale: float = 0.05, layers=LAYERS) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {l: torch.randn(HIDDEN, INTER, generator=g) * scale for l in layers}


def _hooks(model, deltas, alpha, gated=True) -> HookLayers:
    return HookLayers(model, detect_layout(model), {l: LayerState(d, alpha) for l, d in deltas.items()}, gated=gated)


def _batch(tokenizer, prompts=PROMPTS):
    return tokenizer(list(prompts), return_tensors="pt", padding=True)


@torch.no_grad()
def _logits(model, batch):
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def _merge(model, deltas) -> None:
    """Write W_0 + ΔW into the model's own weights (mind GPT-2's transposed Conv1D)."""
    layout = detect_layout(model)
    with torch.no_grad():
        for l, d in deltas.items():
            w = mlp_out_weight(model, layout, l)  # (d_out, d_in) view of the stored weight
            w += d


class _GateProbe:
    """Sees an MLP projection's output before and after the hook layer: which tokens were gated on."""

    def __init__(self, model, name):
        self.module = model.get_submodule(name)
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []
        self._h1 = self.module.register_forward_hook(lambda m, a, o: self.before.append(o.detach().clone()))
        self._h2 = None

    def arm(self):
        """Call after the HookLayers were created, so this hook runs after theirs."""
        self._h2 = self.module.register_forward_hook(lambda m, a, o: self.after.append(o.detach().clone()))

    def gates(self) -> list[torch.Tensor]:
        return [(a != b).any(-1) for a, b in zip(self.after, self.before)]

    def remove(self):
        self._h1.remove()
        if self._h2 is not None:
            self._h2.remove()


# --------------------------------------------------------------------------- exact base / merged weights


def test_huge_alpha_gives_base_logits_exactly(arch, tiny_model, tokenizer):
    batch = _batch(tokenizer)
    base = _logits(tiny_model, batch)
    with _hooks(tiny_model, _deltas(scale=1.0), 1e9):
        hooked = _logits(tiny_model, batch)
    assert torch.equal(hooked, base)
    assert torch.equal(_logits(tiny_model, batch), base)  # removed cleanly


def test_always_on_equals_merged_weights(arch, tiny_model, make_tiny, tokenizer):
    batch = _batch(tokenizer)
    deltas = _deltas()
    base = _logits(tiny_model, batch)
    with _hooks(tiny_model, deltas, -math.inf):
        gated = _logits(tiny_model, batch)
    with _hooks(tiny_model, deltas, 2.2, gated=False):
        temporary = _logits(tiny_model, batch)
    merged_model = make_tiny(arch)
    _merge(merged_model, deltas)
    merged = _logits(merged_model, batch)
    assert not torch.allclose(merged, base, atol=1e-4)  # ΔW matters
    real = batch.attention_mask.bool()
    torch.testing.assert_close(gated[real], merged[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(temporary[real], merged[real], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- the gate


def test_gate_scores_by_hand_and_padding_excluded():
    g = torch.Generator().manual_seed(0)
    lengths = [7, 4, 2, 1]
    m = torch.rand(len(lengths), 7, generator=g)
    mask = torch.zeros(len(lengths), 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    padded = torch.where(mask.bool(), m, torch.full_like(m, 1e6))  # junk at padding
    z = gate_scores(padded, mask)
    assert z.shape == m.shape
    for i, n in enumerate(lengths):
        alone = gate_scores(m[i : i + 1, :n], torch.ones(1, n, dtype=torch.long))[0]
        if n > 1:
            real = m[i, :n].double()
            by_hand = (real - real.mean()) / real.std()
            torch.testing.assert_close(z[i, :n].double(), by_hand)
            torch.testing.assert_close(alone.double(), by_hand)
        else:  # one token: no std, NaN rather than a crash or a number
            assert torch.isnan(z[i, :n]).all() and torch.isnan(alone).all()
        assert torch.isnan(z[i, n:]).all()


def test_padded_batch_gates_like_each_sequence_alone(arch, tiny_model, tokenizer):
    deltas = _deltas(scale=0.5)
    batch = _batch(tokenizer)
    base = _logits(tiny_model, batch)
    with _hooks(tiny_model, deltas, 0.5):
        together = _logits(tiny_model, batch)
        alone = [_logits(tiny_model, tokenizer([p], return_tensors="pt")) for p in PROMPTS]
    changed = False
    for i, single in enumerate(alone):
        n = single.shape[1]
        torch.testing.assert_close(together[i, :n], single[0], rtol=1e-4, atol=1e-5)
        changed |= not torch.allclose(together[i, :n], base[i, :n])
    assert changed, "the gate never opened: the test would not see padding in the statistics"


def test_one_token_input(arch, tiny_model, make_tiny, tokenizer):
    deltas = _deltas()
    ids = torch.tensor([tokenizer(" Paris", add_special_tokens=False).input_ids[:1]])
    assert ids.shape == (1, 1)
    with torch.no_grad():
        base = tiny_model(input_ids=ids).logits
        with _hooks(tiny_model, deltas, 2.2):  # no std for one token: the gate stays shut
            shut = tiny_model(input_ids=ids).logits
        with _hooks(tiny_model, deltas, -math.inf):
            on = tiny_model(input_ids=ids).logits
        merged_model = make_tiny(arch)
        _merge(merged_model, deltas)
        merged = merged_model(input_ids=ids).logits
    assert torch.equal(shut, base)
    torch.testing.assert_close(on, merged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gated", [True, False])
def test_hook_never_edits_outputs_in_place(make_tiny, tokenizer, gated):
    model = make_tiny("gpt2")
    layout = detect_layout(model)
    seen = []  # (the very tensor the projection returned, a copy of its values)
    handle = model.get_submodule(layout.mlp_out_name(1)).register_forward_hook(
        lambda m, a, o: seen.append((o, o.detach().clone()))
    )
    deltas = {l: d.double() for l, d in _deltas(scale=0.5).items()}  # stored in float64
    stored = {l: d.clone() for l, d in deltas.items()}
    try:
        with _hooks(model, deltas, -math.inf, gated=gated):
            _logits(model, _batch(tokenizer))
    finally:
        handle.remove()
    [(out, copy)] = seen
    assert torch.equal(out, copy)
    for l in deltas:  # the stored ΔW is never cast or changed in place
        assert deltas[l].dtype == torch.float64 and torch.equal(deltas[l], stored[l])


def test_low_precision_model_keeps_float32_delta(make_tiny, tokenizer):
    model = make_tiny("llama").to(torch.bfloat16)
    deltas = _deltas()
    stored = {l: d.clone() for l, d in deltas.items()}
    batch = _batch(tokenizer)
    with _hooks(model, deltas, -math.inf) as hooks:
        out = _logits(model, batch)
        assert all(w.delta.dtype == torch.float32 for w in hooks.weights.values())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    for l in deltas:
        assert deltas[l].dtype == torch.float32 and torch.equal(deltas[l], stored[l])


def test_hooks_compute_in_float32_under_autocast(tiny_model, tokenizer):
    """A caller's bfloat16 autocast changes the model's own products, not the hook's: ΔW·k and the gate's
    scores are float32 of the key the projection received."""
    model = tiny_model
    layout = detect_layout(model)
    deltas = _deltas()
    hooks = _span_hooks(model, tokenizer, deltas)
    seen = {}
    handles = [model.get_submodule(layout.mlp_out_name(l)).register_forward_hook(
        lambda m, a, o, l=l: seen.__setitem__(l, (a[0].detach(), o.detach()))) for l in deltas]
    batch = _batch(tokenizer)
    try:
        with hooks, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            hooks.record()
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            records = hooks.records
    finally:
        for h in handles:
            h.remove()
    from comeba.gate import span_scores

    for l in deltas:
        k, _ = seen[l]
        assert k.dtype == torch.bfloat16  # the model ran under autocast
        z = span_scores(k, hooks._span[l])
        assert records[l].scores.dtype == torch.float32
        torch.testing.assert_close(records[l].scores[batch.attention_mask.bool()], z[batch.attention_mask.bool()])


# --------------------------------------------------------------------------- running statistics (KV cache)


def _cache_of(out):
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def _choose_alpha(z: list[float]) -> float:
    """A threshold between two of the scores, far from all of them, with tokens on both sides."""
    finite = sorted(v for v in z if math.isfinite(v))
    gaps = [(b - a, (a + b) / 2) for a, b in zip(finite, finite[1:])]
    gap, alpha = max(gaps)
    assert gap > 1e-3
    return alpha


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
@pytest.mark.parametrize("cache_kwarg", ["cache", "past_key_values"])  # recent transformers 5 name; the older one
def test_running_statistics_with_kv_cache_match_full_passes(arch, tiny_model, tokenizer, cache_kwarg):
    model = tiny_model
    if cache_kwarg == "cache" and models.cache_kwarg(model) != "cache":
        pytest.skip(f"transformers {transformers.__version__} takes the KV cache only as past_key_values")
    layout = detect_layout(model)
    layer = 1  # one hooked layer: its keys do not depend on the gate, so decisions are comparable
    delta = _deltas(scale=0.5, layers=[layer])
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    T, prefill = ids.shape[1], 4
    assert T >= 10

    # scores by hand: a full pass over tokens 0..t gates token t with z_t over those t+1 tokens
    keys = []
    h = model.get_submodule(layout.mlp_out_name(layer)).register_forward_hook(lambda m, a, o: keys.append(a[0]))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    m = (keys[0][0].double() @ delta[layer].double().T).norm(dim=-1)
    z_last = [float("nan")] + [float((m[t] - m[: t + 1].mean()) / m[: t + 1].std()) for t in range(1, T)]
    z_prefill = ((m[:prefill] - m[:prefill].mean()) / m[:prefill].std()).tolist()
    alpha = _choose_alpha(z_last[prefill:] + z_prefill)
    want_full = [z >= alpha for z in z_last]  # NaN compares False: gate shut
    want_prefill = [z >= alpha for z in z_prefill]
    assert any(want_full[prefill:]) and not all(want_full[prefill:])

    probe = _GateProbe(model, layout.mlp_out_name(layer))
    hooks = _hooks(model, delta, alpha)
    probe.arm()
    try:
        with torch.no_grad():
            # full passes over every prefix
            full = []
            for t in range(T):
                model(input_ids=ids[:, : t + 1])
                full.append(bool(probe.gates()[-1][0, t]))
            assert full == want_full
            # prefill, then one token at a time with the cache and the growing mask
            probe.before.clear(), probe.after.clear()
            out = model(input_ids=ids[:, :prefill], attention_mask=torch.ones(1, prefill, dtype=torch.long),
                        use_cache=True)
            cache = _cache_of(out)
            assert probe.gates()[0][0].tolist() == want_prefill
            for t in range(prefill, T):
                out = model(input_ids=ids[:, t : t + 1], attention_mask=torch.ones(1, t + 1, dtype=torch.long),
                            use_cache=True, **{cache_kwarg: cache})
                cache = _cache_of(out)
                assert probe.gates()[-1].shape == (1, 1)
                assert bool(probe.gates()[-1][0, 0]) == want_full[t], f"token {t}"
    finally:
        hooks.remove()
        probe.remove()


def _generate(model, ids, use_cache, n=8):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, use_cache=use_cache,
                             output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("alpha", [1e9, -math.inf])
def test_generate_with_and_without_cache_agree(arch, tiny_model, make_tiny, tokenizer, alpha):
    ids = tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    deltas = _deltas(scale=0.5)
    with _hooks(tiny_model, deltas, alpha):
        cached, cached_scores = _generate(tiny_model, ids, True)
        uncached, uncached_scores = _generate(tiny_model, ids, False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_scores, uncached_scores, rtol=1e-4, atol=1e-4)
    reference = make_tiny(arch)
    if alpha == -math.inf:
        _merge(reference, deltas)
    expected, _ = _generate(reference, ids, True)
    assert torch.equal(cached, expected)


def test_running_statistics_reset_between_generate_calls(arch, tiny_model, tokenizer):
    ids = tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    other = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with _hooks(tiny_model, _deltas(scale=0.5), 0.3):
        first, first_scores = _generate(tiny_model, ids, True)
        second, second_scores = _generate(tiny_model, ids, True)
        _generate(tiny_model, other, True)
        third, third_scores = _generate(tiny_model, ids, True)
    base, base_scores = _generate(tiny_model, ids, True)
    assert not torch.equal(first_scores, base_scores), "the gate never opened"
    assert torch.equal(first, second) and torch.equal(first, third)
    assert torch.equal(first_scores, second_scores) and torch.equal(first_scores, third_scores)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_calls_that_bypass_the_top_module_do_not_leak_gate_state(make_tiny, tokenizer, name):
    """`model.forward(...)` (as PEFT's LoraModel calls it) must not see another call's statistics or mask."""
    model = make_tiny(name)
    a = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    b = tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    padded = _batch(tokenizer, PROMPTS[:2])  # the second row is right-padded
    unpadded = a[:, : padded.input_ids.shape[1]].repeat(2, 1)  # same shape, every token real
    with _hooks(model, _deltas(scale=0.5), 0.3), torch.no_grad():
        ref_a = model(input_ids=a).logits
        ref_unpadded = model(input_ids=unpadded).logits
        model.forward(input_ids=b)
        again_a = model.forward(input_ids=a).logits
        model(input_ids=padded.input_ids, attention_mask=padded.attention_mask)
        again_unpadded = model.forward(input_ids=unpadded).logits
    assert torch.equal(again_a, ref_a), "running statistics of an earlier call leaked into model.forward()"
    assert torch.equal(again_unpadded, ref_unpadded), "an earlier call's padding mask was applied"


# --------------------------------------------------------------------------- beam search, caller's caches, threads


def _span_hooks(model, tokenizer, deltas, layer_mean: bool = False) -> HookLayers:
    """Span-gated hooks whose span holds a few of PROMPTS' keys and whose α opens about half of their tokens."""
    from comeba.gate import span_gate, span_scores

    layout = detect_layout(model)
    keys = {l: [] for l in deltas}
    handles = [model.get_submodule(layout.mlp_out_name(l)).register_forward_hook(
        lambda m, a, o, l=l: keys[l].append(a[0].reshape(-1, a[0].shape[-1]).double())) for l in deltas]
    with torch.no_grad():
        for p in PROMPTS:
            model(input_ids=tokenizer(p, return_tensors="pt").input_ids)
    for h in handles:
        h.remove()
    states = {}
    for l, d in deltas.items():
        k = torch.cat(keys[l])
        c0 = k.T @ k / len(k) + 1e-3 * torch.eye(k.shape[1], dtype=torch.float64)
        gate = span_gate(c0, c0 + k[::4].T @ k[::4], 1.0)
        alpha = float(span_scores(k, gate).median())
        states[l] = LayerState(d, alpha, gate)
    return HookLayers(model, layout, states, layer_mean=layer_mean)


def test_span_gate_beam_search_with_and_without_cache_agree(arch, tiny_model, tokenizer):
    ids = tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    with _span_hooks(tiny_model, tokenizer, _deltas(scale=0.5)) as hooks, torch.no_grad():
        hooks.record()
        tiny_model(input_ids=ids)
        opened = torch.cat([r.gate.reshape(-1) for r in hooks.records.values()])
        assert opened.any() and not opened.all()
        hooks.record(False)
        runs = [tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=3,
                                    max_new_tokens=6, min_new_tokens=6, use_cache=c) for c in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_span_gate_continues_a_callers_cache_as_a_full_pass(arch, tiny_model, tokenizer):
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with _span_hooks(tiny_model, tokenizer, _deltas(scale=0.5)), torch.no_grad():
        full = tiny_model(input_ids=ids).logits
        out = tiny_model(input_ids=ids[:, :5], use_cache=True)
        rest = tiny_model(input_ids=ids[:, 5:], use_cache=True, **{models.cache_kwarg(tiny_model): _cache_of(out)})
    torch.testing.assert_close(rest.logits, full[:, 5:], rtol=1e-4, atol=1e-4)


def test_reference_gate_refuses_a_cache_it_did_not_see(tiny_model, tokenizer):
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        cache = _cache_of(tiny_model(input_ids=ids[:, :5], use_cache=True))  # filled without the hooks
        with _hooks(tiny_model, _deltas(scale=0.5), 0.3):
            with pytest.raises(RuntimeError, match="reference gate has seen 0 of the 5 cached positions"):
                tiny_model(input_ids=ids[:, 5:], use_cache=True, **{models.cache_kwarg(tiny_model): cache})
            # the hooks still work for a whole text afterwards
            tiny_model(input_ids=ids)


def test_concurrent_calls_keep_their_own_gate_state(tiny_model, tokenizer):
    """Two threads through one hooked model: each call sees only its own mask and running statistics."""
    import threading

    batches = [_batch(tokenizer, PROMPTS[:2]), tokenizer(PROMPTS[2:], return_tensors="pt", padding=True)]
    with _hooks(tiny_model, _deltas(scale=0.5), 0.3):
        expected = [_logits(tiny_model, b) for b in batches]
        results, errors = {0: [], 1: []}, []

        def work(i):
            try:
                for _ in range(15):
                    results[i].append(_logits(tiny_model, batches[i]))
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    for i in (0, 1):
        for got in results[i]:
            assert torch.equal(got, expected[i])


def test_reference_gate_statistics_follow_a_cache_reorder(arch, tiny_model, tokenizer):
    """Beam search reorders the cache's rows between steps (`reorder_cache`): the running statistics must follow,
    so a row that continues another row's prefix is gated as if it had run that prefix itself."""
    a, b = (tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS[:2])
    n = min(a.shape[1], b.shape[1])
    a, b = a[:, :n], b[:, :n]
    step = tokenizer(" city", return_tensors="pt").input_ids[:, :1]
    kw = models.cache_kwarg(tiny_model)
    with _hooks(tiny_model, _deltas(scale=0.5), 0.0), torch.no_grad():
        cache = _cache_of(tiny_model(input_ids=torch.cat([a, b]), use_cache=True))
        cache.reorder_cache(torch.tensor([1, 1]))
        moved = tiny_model(input_ids=step.repeat(2, 1), use_cache=True, **{kw: cache}).logits
        cache = _cache_of(tiny_model(input_ids=torch.cat([b, b]), use_cache=True))
        direct = tiny_model(input_ids=step.repeat(2, 1), use_cache=True, **{kw: cache}).logits
    torch.testing.assert_close(moved, direct, rtol=1e-5, atol=1e-5)


def test_layer_mean_gates_on_the_mean_of_the_span_scores_so_far(arch, tiny_model, tokenizer):
    """gate_layer_mean: layer 2 gates on (h₁ + h₂) / 2 of each token, h from the keys each layer really sees."""
    from comeba.gate import span_scores

    batch = _batch(tokenizer, PROMPTS)
    layout = detect_layout(tiny_model)
    keys = {}
    with _span_hooks(tiny_model, tokenizer, _deltas(scale=0.5), layer_mean=True) as hooks, torch.no_grad():
        handles = [tiny_model.get_submodule(layout.mlp_out_name(l)).register_forward_pre_hook(
            lambda m, a, l=l: keys.__setitem__(l, a[0])) for l in LAYERS]
        hooks.record()
        tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        for h in handles:
            h.remove()
        mask = batch.attention_mask.bool()
        h = {l: torch.where(mask, span_scores(keys[l], hooks._span[l]), torch.nan) for l in LAYERS}
        torch.testing.assert_close(hooks.records[1].scores, h[1], equal_nan=True)
        torch.testing.assert_close(hooks.records[2].scores, (h[1] + h[2]) / 2, equal_nan=True)
        assert torch.equal(hooks.records[2].gate, (hooks.records[2].scores >= hooks.weights[2].alpha)
                           & mask)


def test_open_last_opens_only_the_last_position_of_a_shut_gate(arch, tiny_model, tokenizer):
    """The editor's write (`write_gate: subject`): a gate that shuts everywhere still opens at each sequence's
    last position; every earlier position keeps the base model's logits exactly."""
    batch = _batch(tokenizer, PROMPTS[:1])
    base = _logits(tiny_model, batch)
    deltas = _deltas(scale=1.0)
    layout = detect_layout(tiny_model)
    with HookLayers(tiny_model, layout) as hooks:
        for l, d in deltas.items():
            hooks.set(l, LayerState(d, 1e9), open_last=True)
        hooks.record()
        hooked = _logits(tiny_model, batch)
        for l in LAYERS:
            gate = hooks.records[l].gate
            assert gate[:, -1].all() and not gate[:, :-1].any()
    assert torch.equal(hooked[:, :-1], base[:, :-1])
    assert not torch.allclose(hooked[:, -1], base[:, -1], atol=1e-4)


def test_a_cache_seen_by_the_hooks_is_freed_when_dropped(tiny_model, tokenizer):
    """Following beam search's reorders must not tie a cache into a reference cycle: the value optimisation
    deep-copies its prefix cache at every step, and cycles kept those copies until a garbage collection
    (+250 MB in one batch of the embedded model, caught by benchmarks/memory_plan.py)."""
    import copy
    import gc
    import weakref

    ids = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True).input_ids
    with _hooks(tiny_model, _deltas(scale=0.5), 0.3), torch.no_grad():
        cache = _cache_of(tiny_model(input_ids=ids, use_cache=True))
        copied = copy.deepcopy(cache)
        assert copied.reorder_cache._cache() is copied  # a copy reorders itself, not the original
        refs = weakref.ref(cache), weakref.ref(copied)
        gc.disable()
        try:
            del cache, copied
            assert all(r() is None for r in refs)
        finally:
            gc.enable()


def test_span_hook_adds_only_where_the_gate_opens_as_a_full_product(arch, tiny_model, tokenizer):
    """The span hook computes ΔW·k only at the tokens its gate opens: the output is the full product's where it
    opens and the base output elsewhere, exactly."""
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    layout = detect_layout(tiny_model)
    deltas = _deltas(scale=0.5)
    seen = {}
    handles = [tiny_model.get_submodule(layout.mlp_out_name(l)).register_forward_hook(
        lambda m, a, o, l=l: seen.__setitem__(l, (a[0].detach(), o.detach()))) for l in LAYERS]
    try:
        with _span_hooks(tiny_model, tokenizer, deltas) as hooks, torch.no_grad():
            hooks.record()
            hooked = {}
            out_handles = [tiny_model.get_submodule(layout.mlp_out_name(l)).register_forward_hook(
                lambda m, a, o, l=l: hooked.__setitem__(l, o.detach())) for l in LAYERS]
            tiny_model(input_ids=ids)
            for h in out_handles:
                h.remove()
            for l in LAYERS:
                k, base = seen[l]
                gate = hooks.records[l].gate
                assert gate.any() and not gate.all()
                full = base + (k @ deltas[l].T)
                torch.testing.assert_close(hooked[l][gate], full[gate], rtol=1e-6, atol=1e-6)
                assert torch.equal(hooked[l][~gate], base[~gate])
    finally:
        for h in handles:
            h.remove()
