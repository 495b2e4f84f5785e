"""The MEMIT-style pieces every editor shares: templates, keys, target values, the update.

Each equation of DESIGN.md §2 lives here once; COMEBA-HK and the baselines
differ only in which covariance they solve against and where they write Δ.
All functions run the model as it is (with whatever hooks the caller has
attached), so the caller decides what "the model as edited so far" means.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .hparams import HParams
from .models import Layout, cache_kwarg, get_module
from .requests import Request
from .text import encode_prompt, encode_target, model_device, pad_batch, subject_last_index
from .trace import trace

log = logging.getLogger(__name__)

KL_PROMPT = "{} is a"
FORWARD_CHUNK = 64  # sequences per forward pass when only reading activations


# --------------------------------------------------------------------------- context templates


@torch.no_grad()
def context_templates(model, tokenizer, hp: HParams) -> list[str]:
    """["{}"] + one sampled (top-5) continuation of each prefix, then ". {}".

    Generated once by the unedited model and reused for every batch (a saved
    state keeps them); the sampling is seeded and does not disturb the
    caller's random state. It runs on the model's device, whose random
    stream is its own: on CUDA the same seed draws other templates than on
    the CPU.
    """
    device = model_device(model)
    out = ["{}"]
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # manual_seed reseeds every CUDA device
        torch.manual_seed(hp.seed)
        for prefix in hp.context_template_prefixes:
            ids = torch.tensor([encode_prompt(tokenizer, prefix)], device=device)
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_k=5,
                max_new_tokens=hp.context_template_length,
                pad_token_id=tokenizer.pad_token_id,
            )
            text = tokenizer.decode(gen[0], skip_special_tokens=True)
            out.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return out


def _fill(template: str, request: Request) -> str:
    """Context template + request prompt, still holding the subject as {}."""
    return template.format(request.prompt)


# --------------------------------------------------------------------------- keys and outputs


def _read_at(
    model, tokenizer, module: str, texts_and_idx: Sequence[tuple[str, int]], *, inputs: bool
) -> torch.Tensor:
    """Input (or output) of `module` at one position per text, in chunks, stopping after `module`."""
    device = model_device(model)
    rows = []
    for start in range(0, len(texts_and_idx), FORWARD_CHUNK):
        chunk = texts_and_idx[start : start + FORWARD_CHUNK]
        ids, mask = pad_batch([encode_prompt(tokenizer, t) for t, _ in chunk], tokenizer.pad_token_id, device)
        with torch.no_grad(), trace(model, [module], inputs=inputs, outputs=not inputs, stop_after=module) as rec:
            model(input_ids=ids, attention_mask=mask)
        act = rec[module].input if inputs else rec[module].output
        idx = torch.tensor([i for _, i in chunk], device=device)
        rows.append(act[torch.arange(len(chunk), device=device), idx])
    return torch.cat(rows)


def subject_keys(model, tokenizer, layout: Layout, layer: int, requests: Sequence[Request], templates: Sequence[str]) -> torch.Tensor:
    """K (n, d_in): ½·k(bare prompt) + ½·mean of k over the other templates, at the subject's last token."""
    items = []
    for req in requests:
        for tmpl in templates:
            filled = _fill(tmpl, req)
            items.append((filled.format(req.subject), subject_last_index(tokenizer, filled, req.subject)))
    k = _read_at(model, tokenizer, layout.mlp_out_name(layer), items, inputs=True).to(torch.float64)
    k = k.view(len(requests), len(templates), -1)
    if len(templates) == 1:
        return k[:, 0]
    return 0.5 * k[:, 0] + 0.5 * k[:, 1:].mean(1)


def subject_outputs(model, tokenizer, layout: Layout, layer: int, requests: Sequence[Request]) -> torch.Tensor:
    """Output of decoder layer `layer` at the subject's last token of each bare prompt (n, d_model)."""
    items = [(r.text, subject_last_index(tokenizer, r.prompt, r.subject)) for r in requests]
    return _read_at(model, tokenizer, layout.layer_name(layer), items, inputs=False).to(torch.float64)


# --------------------------------------------------------------------------- target values


@dataclass
class _Seqs:
    """The 6 rewriting prompts and the KL prompt of each request, tokenised once."""

    ids: list[list[int]]
    owner: list[int]  # request index of each sequence
    lookup: list[int]  # subject's last token per sequence
    targets: list[list[tuple[int, int]]]  # (position predicting it, token id) per rewriting sequence; [] for KL
    is_kl: list[bool]


def _rewrite_sequences(tokenizer, requests: Sequence[Request], templates: Sequence[str]) -> _Seqs:
    s = _Seqs([], [], [], [], [])
    for r_i, req in enumerate(requests):
        target_ids = encode_target(tokenizer, req.target_new)
        for tmpl in templates:
            filled = _fill(tmpl, req)
            prompt_ids = encode_prompt(tokenizer, filled.format(req.subject))
            s.ids.append(prompt_ids + target_ids[:-1])
            s.owner.append(r_i)
            s.lookup.append(subject_last_index(tokenizer, filled, req.subject))
            base = len(prompt_ids) - 1
            s.targets.append([(base + j, t) for j, t in enumerate(target_ids)])
            s.is_kl.append(False)
        s.ids.append(encode_prompt(tokenizer, KL_PROMPT.format(req.subject)))
        s.owner.append(r_i)
        s.lookup.append(subject_last_index(tokenizer, KL_PROMPT, req.subject))
        s.targets.append([])
        s.is_kl.append(True)
    return s


class _Adam:
    """Adam over the rows of one tensor, where each row is stepped on its own schedule.

    Equivalent to one torch.optim.Adam per request, so a request's result does
    not depend on its batch-mates or on which of them stopped early.
    """

    def __init__(self, shape: torch.Size, lr: float, device, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, betas[0], betas[1], eps
        self.m = torch.zeros(shape, device=device)
        self.v = torch.zeros(shape, device=device)
        self.t = torch.zeros(shape[0], device=device)

    @torch.no_grad()
    def step(self, param: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor) -> None:
        self.t[rows] += 1
        t = self.t[rows][:, None]
        self.m[rows] = self.b1 * self.m[rows] + (1 - self.b1) * grad[rows]
        self.v[rows] = self.b2 * self.v[rows] + (1 - self.b2) * grad[rows] ** 2
        m_hat = self.m[rows] / (1 - self.b1**t)
        v_hat = self.v[rows] / (1 - self.b2**t)
        param[rows] -= self.lr * m_hat / (v_hat.sqrt() + self.eps)


def target_values(
    model,
    tokenizer,
    layout: Layout,
    requests: Sequence[Request],
    hp: HParams,
    templates: Sequence[str],
    progress: bool = True,
    chunk: int = 16,
) -> torch.Tensor:
    """Z (n, d_model): the output of the last edited layer at the subject that makes each target likely.

    Optimises δ added at layer l_n's output (subject's last token) on the
    rewriting prompts, with the KL term on "{subject} is a", weight decay and
    the norm clamp; only δ takes gradients. Requests are processed in chunks
    and each stops on its own once its loss drops below `early_stop_loss`.
    """
    out = []
    bar = tqdm(total=len(requests), desc="target values", unit="edit", disable=not progress)
    try:
        for start in range(0, len(requests), chunk):
            out.append(_target_values_chunk(model, tokenizer, layout, requests[start : start + chunk], hp, templates))
            bar.update(len(requests[start : start + chunk]))
    finally:
        bar.close()
    return torch.cat(out)


@contextmanager
def _replay_layers(model, layout: Layout, last: int, output: Callable[[], torch.Tensor]):
    """Skip decoder layers 0..last: they pass their input through and `last` returns `output()`.

    Layers up to the edited layer l_n do not depend on δ (it is added at l_n's
    output), so their result is computed once and replayed in every step.
    Forward hooks on layer `last` (which add δ) still run.
    """
    layers = get_module(model, layout.layers)

    def passthrough(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def replay(*args, **kwargs):
        return output()

    try:
        for i in range(last + 1):
            layers[i].forward = replay if i == last else passthrough
        yield
    finally:
        for i in range(last + 1):
            layers[i].__dict__.pop("forward", None)


def _target_values_chunk(model, tokenizer, layout, requests, hp: HParams, templates) -> torch.Tensor:
    """Optimise δ for a few requests at once (each on its own Adam schedule).

    Speed: every sequence is split at the subject's last token. The prefix
    (left-padded, explicit positions) is run once with a KV cache; each step
    then runs only the suffix, through the layers after l_n, with δ added at
    suffix position 0 — exactly the computation of the whole sequence.
    """
    device = model_device(model)
    last = hp.layers[-1]
    layer_name = layout.layer_name(last)
    norm_name = layout.final_norm
    lm_head = get_module(model, layout.lm_head)
    seqs = _rewrite_sequences(tokenizer, requests, templates)
    n, n_seq = len(requests), len(seqs.ids)
    pad = tokenizer.pad_token_id

    # Layout [left-padded prefix | right-padded suffix], the suffix starting at the subject's last token.
    P = max(seqs.lookup)
    S = max(len(ids) - lk for ids, lk in zip(seqs.ids, seqs.lookup))
    ids = torch.full((n_seq, P + S), pad, dtype=torch.long)
    mask = torch.zeros((n_seq, P + S), dtype=torch.long)
    for i, (row, lk) in enumerate(zip(seqs.ids, seqs.lookup)):
        ids[i, P - lk : P + len(row) - lk] = torch.tensor(row)
        mask[i, P - lk : P + len(row) - lk] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)

    # One pass over the whole sequences (the caller's hooks active): l_n's output and the prefix cache.
    cache_kw = cache_kwarg(model)
    with torch.no_grad(), trace(model, [layer_name], outputs=True) as rec:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    h_suffix = rec[layer_name].output[:, P:].detach()
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "crop"):
        raise RuntimeError(f"{type(model).__name__} returned no croppable KV cache")
    cache.crop(-S)  # negative: drop the suffix (same meaning in transformers 4 and 5)
    del out

    owner_all = torch.tensor(seqs.owner, device=device)
    bare = torch.arange(n, device=device) * (len(templates) + 1)  # template 0 is the bare prompt
    h_init = h_suffix[bare, 0].float()
    # Target tokens in suffix coordinates: (sequence, position, token id).
    tgt = torch.tensor([(i, p - seqs.lookup[i], t) for i in range(n_seq) for p, t in seqs.targets[i]], device=device)
    kl_seq = torch.tensor([i for i in range(n_seq) if seqs.is_kl[i]], device=device)

    delta = torch.zeros_like(h_init)
    adam = _Adam(delta.shape, hp.v_lr, device)
    kl_init: torch.Tensor | None = None
    active = torch.ones(n, dtype=torch.bool, device=device)
    final_loss = torch.full((n,), float("nan"))

    for it in range(hp.v_num_grad_steps):
        rows = active[owner_all].nonzero().squeeze(1)
        owner = owner_all[rows]
        delta_param = delta.detach().clone().requires_grad_(True)
        step_cache = copy.deepcopy(cache)
        if len(rows) != n_seq:
            step_cache.batch_select_indices(rows)

        def add_delta(name: str, h: torch.Tensor) -> torch.Tensor:
            if name != layer_name:
                return h
            add = torch.zeros_like(h)
            add[:, 0] = delta_param[owner].to(h.dtype)
            return h + add

        with torch.enable_grad(), _replay_layers(model, layout, last, lambda: h_suffix[rows]), trace(
            model, [layer_name, norm_name], outputs=True, edit_output=add_delta, stop_after=norm_name
        ) as rec:
            model(input_ids=ids[rows, P:], attention_mask=mask[rows], position_ids=positions[rows, P:],
                  use_cache=True, **{cache_kw: step_cache})
        hidden = rec[norm_name].output
        # Map global sequence index -> row in this step's batch.
        where = torch.full((n_seq,), -1, dtype=torch.long, device=device)
        where[rows] = torch.arange(len(rows), device=device)

        # Rewriting NLL: per prompt summed over target tokens / their number; mean over a request's prompts.
        live = where[tgt[:, 0]] >= 0
        t_rows, t_pos, t_ids = where[tgt[live, 0]], tgt[live, 1], tgt[live, 2]
        logp = torch.log_softmax(lm_head(hidden[t_rows, t_pos]).float(), -1)
        tok_lp = logp.gather(1, t_ids[:, None]).squeeze(1)
        seq_lp = torch.zeros(len(rows), device=device).index_add(0, t_rows, tok_lp)
        seq_len = torch.zeros(len(rows), device=device).index_add(0, t_rows, torch.ones_like(tok_lp))
        is_rewrite = seq_len > 0
        seq_nll = torch.where(is_rewrite, -seq_lp / seq_len.clamp(min=1), torch.zeros_like(seq_lp))
        nll = torch.zeros(n, device=device).index_add(0, owner, seq_nll) / torch.zeros(n, device=device).index_add(
            0, owner, is_rewrite.float()
        ).clamp(min=1)

        # KL(p at δ=0 ‖ p now) on "{subject} is a", at the subject's last token (suffix position 0).
        kl_live = kl_seq[where[kl_seq] >= 0]
        kl_logp = torch.log_softmax(lm_head(hidden[where[kl_live], 0]).float(), -1)
        kl_owner = owner_all[kl_live]
        if kl_init is None:
            kl_init = torch.zeros(n, kl_logp.shape[-1], device=device)
            kl_init[kl_owner] = kl_logp.detach()
        ref = kl_init[kl_owner]
        kl = torch.zeros(n, device=device).index_add(0, kl_owner, (ref.exp() * (ref - kl_logp)).sum(-1))

        decay = hp.v_weight_decay * delta_param.norm(dim=-1) / h_init.norm(dim=-1) ** 2
        loss = nll + hp.kl_factor * kl + decay
        with torch.no_grad():
            final_loss[active.cpu()] = loss[active].detach().cpu()
            active &= ~(loss.detach() < hp.early_stop_loss)
        if not bool(active.any()) or it == hp.v_num_grad_steps - 1:
            break
        (grad,) = torch.autograd.grad(loss[active].sum(), delta_param)
        new = delta_param.detach().clone()
        adam.step(new, grad, active.nonzero().squeeze(1))
        # Project δ into the ball of radius clamp_norm_factor·‖h‖.
        max_norm = hp.clamp_norm_factor * h_init.norm(dim=-1, keepdim=True)
        norm = new.norm(dim=-1, keepdim=True)
        delta = torch.where(norm > max_norm, new * max_norm / norm, new)

    log.debug("target values: %d steps, final losses %s", it + 1, final_loss.tolist())
    return (h_init + delta).to(torch.float64)


# --------------------------------------------------------------------------- the update


def solve_update(residuals: torch.Tensor, keys: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """Δ = R Kᵀ (C + K Kᵀ)⁻¹ in float64, solving rather than inverting.

    `residuals` (n, d_out), `keys` (n, d_in), `covariance` C (d_in, d_in)
    already scaled (λ·C0 plus any accumulated keys). The current batch is
    inside the solve.
    """
    K = keys.to(torch.float64).T
    R = residuals.to(torch.float64).T
    A = covariance.to(torch.float64) + K @ K.T
    X = torch.linalg.solve(A, K)  # A⁻¹ K; A is symmetric so (A⁻¹ K)ᵀ = Kᵀ A⁻¹
    return R @ X.T


def accumulate_keys(covariance: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """C + K Kᵀ with `keys` (n, d_in) as rows: a batch's keys joining the accumulated covariance."""
    K = keys.to(covariance)
    return covariance + K.T @ K


def write_layers(
    model,
    tokenizer,
    layout: Layout,
    requests: Sequence[Request],
    layers: Sequence[int],
    templates: Sequence[str],
    targets: torch.Tensor,
    solve: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
    apply: Callable[[int, torch.Tensor, torch.Tensor], None],
    progress: bool = False,
) -> dict[int, torch.Tensor]:
    """Write the targets into `layers` in order, spreading the residual over the layers left.

    For layer l_i: K at l_i, R = (Z − current output of l_n) / (layers left),
    Δ = solve(l_i, R, K) — `solve_update` against the method's covariance, or
    a variant such as AlphaEdit's — then `apply(l_i, Δ, K)`, which must make
    the model compute with the new weights before the next layer's keys are
    read (and may accumulate K).
    Returns the keys per layer (to accumulate).
    """
    keys: dict[int, torch.Tensor] = {}
    last = layers[-1]
    for i, layer in enumerate(tqdm(layers, desc="writing layers", disable=not progress)):
        K = subject_keys(model, tokenizer, layout, layer, requests, templates)
        current = subject_outputs(model, tokenizer, layout, last, requests)
        R = (targets.to(current.device) - current) / (len(layers) - i)
        delta = solve(layer, R, K)
        apply(layer, delta, K)
        keys[layer] = K
        log.debug("layer %d: |R| %.3f |Δ| %.3f", layer, R.norm(dim=1).mean().item(), delta.norm().item())
    return keys
