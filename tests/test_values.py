"""Target values (comeba.values): the loss, its grouping by suffix length, the two optimisers; the Cholesky solve."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from comeba.compute import context_templates, solve_update
from comeba.hparams import HParams, HParamsError
from comeba.models import detect_layout
from comeba.requests import make_requests
from comeba.values import OPTIMISERS, _Objective, length_groups, target_values

pytestmark = pytest.mark.usefixtures("one_thread")

HP = HParams(layers=[1, 2], v_num_grad_steps=20, clamp_norm_factor=10.0, context_template_prefixes=["The", "I"],
             context_template_length=4)
# The subject ends each prompt (tiny random models: see test_editor); targets of different lengths.
REQUESTS = [
    {"prompt": "The mother tongue of Danielle Darrieux", "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "The capital city of France", "subject": "France", "target_new": "the old town of Berlin"},
    {"prompt": "The favourite food of Michael Jordan", "subject": "Michael Jordan", "target_new": "pizza with cheese"},
]


def _brute_force(lengths, pass_cost):
    """The cheapest split of the sorted distinct lengths into contiguous groups, by trying them all."""
    widths = sorted(set(lengths))
    best = float("inf")
    for mask in itertools.product([0, 1], repeat=len(widths) - 1):
        cost, start = 0, 0
        for j in range(len(widths)):
            if j == len(widths) - 1 or mask[j]:
                group = [x for x in lengths if widths[start] <= x <= widths[j]]
                cost += pass_cost + len(group) * widths[j]
                start = j + 1
        best = min(best, cost)
    return best


def test_length_groups_is_the_cheapest_split():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.choice([1, 2, 3, 5, 8, 13, 21, 30, 34, 40]) for _ in range(rng.randint(1, 40))]
        cost = rng.choice([0, 5, 48, 500])
        groups = length_groups(lengths, cost)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert all(g == sorted(g) for g in groups)
        got = sum(cost + len(g) * max(lengths[i] for i in g) for g in groups)
        assert got == _brute_force(lengths, cost)


@pytest.fixture
def setup(make_tiny, tokenizer):
    model = make_tiny("llama")
    templates = context_templates(model, tokenizer, HP)
    return model, tokenizer, detect_layout(model), make_requests(REQUESTS), templates


def test_grouped_loss_equals_one_padded_pass(setup, monkeypatch):
    """Grouping suffixes by length changes the padding, never the loss or its gradient."""
    import comeba.values as values

    model, tok, layout, reqs, templates = setup
    torch.manual_seed(0)
    delta = torch.randn(len(reqs), model.config.hidden_size)
    active = torch.tensor([True, True, True])
    monkeypatch.setattr(values.length_groups, "__defaults__", (0,))  # a pass per distinct length
    grouped = _Objective(model, tok, layout, reqs, HP, templates)
    assert len(length_groups([grouped.suffix_len[i] for i in range(grouped.n_seq)])) > 1  # the test needs groups
    l1, g1 = grouped.value_and_grad(torch.zeros_like(delta), active)  # the first call fixes the KL reference
    l1, g1 = grouped.value_and_grad(delta, active)
    monkeypatch.setattr(values.length_groups, "__defaults__", (10**9,))  # one pass, padded to the longest
    single = _Objective(model, tok, layout, reqs, HP, templates)
    assert len(length_groups([single.suffix_len[i] for i in range(single.n_seq)])) == 1
    single.value_and_grad(torch.zeros_like(delta), active)
    l2, g2 = single.value_and_grad(delta, active)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)
    # a request left out contributes nothing, and the others do not change
    l3, g3 = grouped.value_and_grad(delta, torch.tensor([True, False, True]))
    assert l3[1] == 0 and bool((g3[1] == 0).all())
    torch.testing.assert_close(l3[[0, 2]], l1[[0, 2]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(OPTIMISERS))
def test_optimisers_lower_the_loss_within_budget_and_ball(setup, name):
    model, tok, layout, reqs, templates = setup
    hp = HP.replace(v_optimizer=name)
    obj = _Objective(model, tok, layout, reqs, hp, templates)
    start, _ = obj.value_and_grad(torch.zeros_like(obj.h_init), torch.ones(len(reqs), dtype=torch.bool))
    delta, loss, passes = OPTIMISERS[name](obj, hp)
    assert bool((passes >= 1).all()) and bool((passes <= hp.v_num_grad_steps).all())
    assert bool((loss < start - 0.005).all()), (name, loss, start)  # tiny random models move little
    assert bool((delta.norm(dim=-1) <= obj.max_norm[:, 0] * (1 + 1e-5)).all())
    # the loss reported is the loss at the δ returned
    again = _Objective(model, tok, layout, reqs, hp, templates)
    again.value_and_grad(torch.zeros_like(delta), torch.ones(len(reqs), dtype=torch.bool))
    at, _ = again.value_and_grad(delta, torch.ones(len(reqs), dtype=torch.bool))
    torch.testing.assert_close(at, loss, rtol=1e-4, atol=1e-5)


def test_lbfgs_needs_fewer_passes_than_adam_to_the_same_loss(setup):
    """Why it is the default: on the same requests it reaches a loss Adam reaches, in fewer passes."""
    model, tok, layout, reqs, templates = setup
    hp = HP.replace(v_num_grad_steps=40)
    adam = _Objective(model, tok, layout, reqs, hp, templates)
    _, adam_loss, adam_passes = OPTIMISERS["adam"](adam, hp)
    hp = hp.replace(early_stop_loss=float(adam_loss.max()))  # stop where Adam ended
    lbfgs = _Objective(model, tok, layout, reqs, hp, templates)
    _, loss, passes = OPTIMISERS["lbfgs"](lbfgs, hp)
    assert bool((loss <= hp.early_stop_loss).all())
    assert passes.sum() < adam_passes.sum(), (passes, adam_passes)


def test_target_values_match_per_chunk(setup):
    """Chunking (for memory) does not change a request's value."""
    model, tok, layout, reqs, templates = setup
    z_all = target_values(model, tok, layout, reqs, HP, templates, progress=False)
    z_chunks = target_values(model, tok, layout, reqs, HP, templates, progress=False, chunk=2)
    torch.testing.assert_close(z_all, z_chunks, rtol=1e-4, atol=1e-4)


def test_overshoot_stretches_the_found_step(setup):
    """v_overshoot c writes h + c·δ with the δ that c = 1 finds: equal steps between c = 1, 2, 3."""
    model, tok, layout, reqs, templates = setup
    z1, z2, z3 = (target_values(model, tok, layout, reqs, HP.replace(v_overshoot=c), templates, progress=False)
                  for c in (1.0, 2.0, 3.0))
    assert float((z2 - z1).norm()) > 1e-3
    torch.testing.assert_close(z3 - z2, z2 - z1, rtol=1e-4, atol=1e-4)
    with pytest.raises(HParamsError, match="v_overshoot"):
        HParams(v_overshoot=0)


def test_unknown_optimiser_is_refused():
    from comeba.hparams import OPTIMIZERS

    assert set(OPTIMIZERS) == set(OPTIMISERS)  # the names hparams accept are the optimisers that exist
    with pytest.raises(HParamsError, match="v_optimizer"):
        HParams(v_optimizer="sgd")


def test_solve_refuses_a_covariance_that_is_not_positive_definite():
    keys = torch.randn(3, 8, dtype=torch.float64)
    resid = torch.randn(3, 5, dtype=torch.float64)
    good = torch.eye(8, dtype=torch.float64)
    delta = solve_update(resid, keys, good)
    K, R = keys.T, resid.T
    torch.testing.assert_close(delta, R @ K.T @ torch.linalg.inv(good + K @ K.T))
    bad = -10 * torch.eye(8, dtype=torch.float64)
    with pytest.raises(ValueError, match="not positive definite"):
        solve_update(resid, keys, bad)
    with pytest.raises(ValueError, match="NaN"):
        solve_update(resid, keys, torch.full((8, 8), float("nan"), dtype=torch.float64))


def test_solve_refuses_an_ill_conditioned_system():
    d = 8
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    covariance = q @ torch.diag(torch.logspace(0, -15, d, dtype=torch.float64)) @ q.T  # condition number 1e15
    keys = 1e-9 * torch.randn(2, d, generator=g, dtype=torch.float64)
    resid = torch.randn(2, 5, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="ill-conditioned|not positive definite"):
        solve_update(resid, keys, covariance)
    solve_update(resid, keys, q @ torch.diag(torch.logspace(0, -6, d, dtype=torch.float64)) @ q.T)  # 1e6 is fine


def _plain_loss(model, tok, layout, reqs, templates, delta: torch.Tensor) -> torch.Tensor:
    """The loss of docs/method.md §3.1 from scratch: one full, unpadded forward pass per sequence, δ added to
    layer l_n's output at the subject's last token by a plain forward hook, no cache, no replayed layers."""
    from comeba.compute import KL_PROMPT, fill_template
    from comeba.text import encode_prompt, encode_target, subject_last_index

    layer = model.get_submodule(layout.layer_name(HP.layers[-1]))

    def log_probs(ids: list[int], at: int, d: torch.Tensor) -> torch.Tensor:
        def add(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            h[0, at] = h[0, at] + d
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = layer.register_forward_hook(add)
        try:
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        finally:
            handle.remove()
        return torch.log_softmax(logits.float(), -1)

    losses = []
    for i, r in enumerate(reqs):
        target = encode_target(tok, r.target_new)
        nll = []
        for t in templates:
            filled = fill_template(t, r)
            prompt = encode_prompt(tok, filled.format(r.subject))
            lp = log_probs(prompt + target[:-1], subject_last_index(tok, filled, r.subject), delta[i])
            nll.append(-sum(lp[len(prompt) - 1 + j, tok_id] for j, tok_id in enumerate(target)) / len(target))
        kl_ids = encode_prompt(tok, KL_PROMPT.format(r.subject))
        at = subject_last_index(tok, KL_PROMPT, r.subject)
        now = log_probs(kl_ids, at, delta[i])[at]
        with torch.no_grad():
            ref = log_probs(kl_ids, at, torch.zeros_like(delta[i]))[at]
        kl = (now.exp() * (now - ref)).sum()  # KL(p_δ ‖ p_0)
        bare = fill_template(templates[0], r)  # template 0 is the bare prompt
        with torch.no_grad():
            h = _layer_output(model, layer, encode_prompt(tok, bare.format(r.subject)),
                              subject_last_index(tok, bare, r.subject))
        decay = HP.v_weight_decay * delta[i].norm() / h.norm() ** 2
        losses.append(torch.stack(nll).mean() + HP.kl_factor * kl + decay)
    return torch.stack(losses)


def _layer_output(model, layer, ids: list[int], at: int) -> torch.Tensor:
    seen = []
    handle = layer.register_forward_hook(lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o)[0, at]))
    try:
        model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return seen[0].float()


AFTER_SUBJECT = REQUESTS[:2] + [  # tokens after the subject in the prompt
    {"prompt": "Michael Jordan has always liked to eat", "subject": "Michael Jordan", "target_new": "pizza with cheese"},
]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_fast_objective_equals_the_plain_computation(arch, make_tiny, tokenizer, attention):
    """The prefix cache, the replayed layers and the length groups compute exactly the loss and gradient of
    full passes over every prompt (with tokens after the subject, and a KL term at δ ≠ 0)."""
    model = make_tiny(arch)
    model.set_attn_implementation(attention)
    tok, layout, reqs = tokenizer, detect_layout(model), make_requests(AFTER_SUBJECT)
    templates = context_templates(model, tok, HP)
    torch.manual_seed(1)
    delta = 0.5 * torch.randn(len(reqs), model.config.hidden_size)
    active = torch.ones(len(reqs), dtype=torch.bool)
    fast = _Objective(model, tok, layout, reqs, HP, templates)
    fast.value_and_grad(torch.zeros_like(delta), active)  # the first call fixes the KL reference (δ = 0)
    loss, grad = fast.value_and_grad(delta, active)
    param = delta.clone().requires_grad_(True)
    plain = _plain_loss(model, tok, layout, reqs, templates, param)
    (plain_grad,) = torch.autograd.grad(plain.sum(), param)
    assert bool((plain > 0).all())
    torch.testing.assert_close(loss, plain.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-4, atol=1e-6)


def test_solve_satisfies_the_normal_equations():
    """Δ = R Kᵀ (C + K Kᵀ)⁻¹ is the minimiser of ‖Δ Kᵀ... ‖: it satisfies Δ (C + K Kᵀ) = R Kᵀ."""
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n = 24, 10, 6
    a = torch.randn(d_in, 3 * d_in, generator=g, dtype=torch.float64)
    C = a @ a.T / (3 * d_in)
    K = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    R = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    delta = solve_update(R, K, C)
    assert delta.shape == (d_out, d_in)
    torch.testing.assert_close(delta @ (C + K.T @ K), R.T @ K, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(delta, R.T @ K @ torch.linalg.inv(C + K.T @ K), rtol=1e-8, atol=1e-9)


def test_weighted_covariance_keeps_earlier_edits_outputs():
    """edit_key_weight γ: the new batch is solved against λC0 + γ Σ_past K Kᵀ (γ = 1: C_accu itself), and the
    larger γ, the less the update moves the outputs at the earlier edits' keys (γ → ∞: not at all)."""
    from comeba.compute import accumulate_keys, weighted_covariance

    g = torch.Generator().manual_seed(0)
    d_in, d_out, lam = 24, 10, 50.0
    a = torch.randn(d_in, 3 * d_in, generator=g, dtype=torch.float64)
    c0 = a @ a.T / (3 * d_in)
    shared = torch.randn(1, d_in, generator=g, dtype=torch.float64)  # edit keys share a direction, as subjects do
    old = shared + 0.5 * torch.randn(8, d_in, generator=g, dtype=torch.float64)
    new = shared + 0.5 * torch.randn(4, d_in, generator=g, dtype=torch.float64)
    R = torch.randn(4, d_out, generator=g, dtype=torch.float64)
    c_accu = accumulate_keys(lam * c0, old)
    assert weighted_covariance(c_accu, c0, lam, 1.0) is c_accu
    torch.testing.assert_close(weighted_covariance(c_accu, c0, lam, 3.0), lam * c0 + 3.0 * old.T @ old)
    moved = [float((solve_update(R, new, weighted_covariance(c_accu, c0, lam, w)) @ old.T).norm())
             for w in (1.0, 4.0, 16.0, 1e6)]
    assert moved[0] > moved[1] > moved[2] > 1e3 * moved[3], moved
    with pytest.raises(ValueError, match="C0"):
        weighted_covariance(c_accu, None, lam, 2.0)
    for bad in (0, -1.0):
        with pytest.raises(HParamsError, match="edit_key_weight"):
            HParams(edit_key_weight=bad)
    assert HParams(edit_key_weight=0.5).key_weight(5) == 0.5  # γ < 1 forgets: RLS's forgetting factor
    with pytest.raises(HParamsError, match="gate: span"):
        HParams(edit_key_weight=2.0, gate="reference")
    per_layer = HParams(layers=[4, 5, 6], edit_key_weight=[16, 4, 1])  # one γ per edited layer
    assert [per_layer.key_weight(l) for l in (4, 5, 6)] == [16.0, 4.0, 1.0]
    assert HParams(edit_key_weight=4).key_weight(5) == 4.0
    for bad in ([16, 1], [16, 4, 0], True):
        with pytest.raises(HParamsError, match="one per edited layer"):
            HParams(layers=[4, 5, 6], edit_key_weight=bad)
    with pytest.raises(HParamsError, match="gate: span"):
        HParams(layers=[4, 5, 6], edit_key_weight=[1, 1, 2], gate="reference")
    auto = HParams(layers=[3, 5, 9])  # the default: 4 below the last edited layer, 1 at it, whatever the layers
    assert auto.edit_key_weight == "auto" and [auto.key_weight(l) for l in (3, 5, 9)] == [4.0, 4.0, 1.0]
    assert auto.resolved().edit_key_weight == [4.0, 4.0, 1.0] and auto.resolved().resolved() == auto.resolved()
    reference = HParams(layers=[3, 5, 9], gate="reference")  # no C0 to weigh against: MEMIT's γ = 1
    assert [reference.key_weight(l) for l in (3, 5, 9)] == [1.0] * 3 and reference.resolved().edit_key_weight == [1.0] * 3
    with pytest.raises(HParamsError, match="edit_key_weight"):
        HParams(edit_key_weight="automatic")


def test_bfloat16_projections_track_float32_and_leave_the_model_as_it_was(arch, make_tiny, tokenizer):
    """v_dtype bfloat16: the layers above l_n compute their projections in bfloat16 (loss and gradient close
    to float32's), and the model is bit for bit the same object after, also when the optimisation fails."""
    from comeba.values import value_precision

    model = make_tiny(arch)
    tok, layout, reqs = tokenizer, detect_layout(model), make_requests(AFTER_SUBJECT)
    templates = context_templates(model, tok, HP)
    first = HP.layers[-1] + 1  # layer 3 of 4
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    torch.manual_seed(1)
    delta = 0.5 * torch.randn(len(reqs), model.config.hidden_size)
    active = torch.ones(len(reqs), dtype=torch.bool)

    def loss_and_grad():
        obj = _Objective(model, tok, layout, reqs, HP, templates)
        obj.value_and_grad(torch.zeros_like(delta), active)
        first_call = obj.value_and_grad(delta, active)
        again = obj.value_and_grad(delta, active)  # the prefix cache serves every pass unchanged
        assert torch.equal(first_call[0], again[0]) and torch.equal(first_call[1], again[1])
        return first_call

    l32, g32 = loss_and_grad()
    with value_precision(model, layout, first, "bfloat16") as reduced:
        assert reduced
        upper = [p for n, p in model.named_parameters() if f".{first}." in n and p.dim() == 2]
        assert upper and all(p.dtype == torch.bfloat16 for p in upper)
        l16, g16 = loss_and_grad()
    torch.testing.assert_close(l16, l32, rtol=3e-2, atol=1e-2)
    assert float(torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)) > 0.99
    assert not torch.equal(l16, l32)  # it did compute in bfloat16
    with pytest.raises(RuntimeError, match="interrupted"), value_precision(model, layout, first, "bfloat16"):
        raise RuntimeError("interrupted")
    for name, p in model.named_parameters():
        assert p.data_ptr() == before[name][0] and p.dtype == before[name][1].dtype, name
        assert torch.equal(p, before[name][1]), name
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert torch.equal(loss_and_grad()[0], l32)
    with value_precision(model, layout, first, "float32") as reduced:
        assert not reduced
    with value_precision(model.to(torch.bfloat16), layout, first, "auto") as reduced:
        assert not reduced  # a model that is not float32 computes as it is


def test_v_dtype_is_validated():
    with pytest.raises(HParamsError, match="v_dtype"):
        HParams(v_dtype="float16")


def test_context_keys_keep_each_contexts_outer_product():
    """accumulated_keys: contexts — the rows' Σ k kᵀ is the weighted mean of each template key's outer product
    (combine_keys' weights), and the weighted rows sum back to the combined key."""
    from comeba.compute import combine_keys, context_keys

    g = torch.Generator().manual_seed(1)
    k = torch.randn(2 * 3, 7, generator=g)  # 2 requests × 3 templates
    rows = context_keys(k, 3).view(2, 3, 7)
    w = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    kk = k.double().view(2, 3, 7)
    for i in range(2):
        torch.testing.assert_close(rows[i].T @ rows[i], (kk[i].T * w) @ kk[i])
        torch.testing.assert_close((rows[i] * w.sqrt()[:, None]).sum(0), combine_keys(k, 3)[i])
    torch.testing.assert_close(context_keys(k[:2], 1), k[:2].double())
    with pytest.raises(HParamsError, match="accumulated_keys"):
        HParams(accumulated_keys="mean")


def test_context_fit_is_the_weighted_least_squares_over_contexts():
    """fit_keys: contexts — solving `context_residuals` against `context_keys` minimises Σ_i Σ_t w_t ‖Δ k_it − r_i‖² + tr(Δ C Δᵀ)
    (its gradient vanishes), shares the combined fit's R Kᵀ, and is the combined fit with one template."""
    from comeba.compute import combine_keys, context_keys, context_residuals, solve_update

    g = torch.Generator().manual_seed(2)
    n, n_t, d_in, d_out = 3, 3, 6, 4
    k = torch.randn(n * n_t, d_in, generator=g, dtype=torch.float64)
    r = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    a = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    c = a @ a.T + torch.eye(d_in, dtype=torch.float64)
    rows, keys = context_residuals(r, n_t), context_keys(k, n_t)
    delta = solve_update(rows, keys, c)
    w = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    kk = k.view(n, n_t, d_in)
    grad = delta @ c + sum(w[t] * torch.outer(delta @ kk[i, t] - r[i], kk[i, t]) for i in range(n) for t in range(n_t))
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-9, rtol=0)
    torch.testing.assert_close(rows.T @ keys, r.T @ combine_keys(k, n_t))
    one_rows, one_keys = context_residuals(r, 1), context_keys(k[:n], 1)
    torch.testing.assert_close(solve_update(one_rows, one_keys, c), solve_update(r, k[:n], c))
    with pytest.raises(HParamsError, match="fit_keys"):
        HParams(fit_keys="mean")
