"""Target values: the output z of the last edited layer that makes each new fact likely (docs/method.md §3.1).

The loss lives in one place (`_Objective`); two optimisers minimise it over
δ, one row per request, each row on its own schedule so that a request's
value does not depend on its batch-mates:

* ``lbfgs`` (default): limited-memory BFGS with a trust radius per request.
  δ has a few hundred coordinates and the loss is smooth, so curvature pays:
  it reaches the early-stop loss in a fraction of Adam's passes.
* ``adam``: the reference schedule (Adam, lr `v_lr`, `v_num_grad_steps` steps).

Both stop a request once its loss is below `early_stop_loss` and never spend
more than `v_num_grad_steps` forward/backward passes on it.
"""

from __future__ import annotations

import copy
import ctypes
import logging
import math
import sys
from dataclasses import dataclass
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .compute import KL_PROMPT, Aligned, fill_template, replay_layers
from .hparams import HParams
from .models import Layout, cache_kwarg, get_module, has_bf16_matmul, input_device, layer_device, num_layers
from .requests import Request
from .text import encode_prompt, encode_target, subject_last_index
from .trace import trace

log = logging.getLogger(__name__)

# One extra forward pass costs about this many padded suffix tokens (measured on the embedded model, 2 CPU threads):
# rows are grouped by suffix length only where that saves more than it costs.
PASS_COST_TOKENS = 48


@dataclass
class _Seqs:
    """The rewriting prompts (one per context template) and the KL prompt of each request, tokenised once."""

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
            filled = fill_template(tmpl, req)
            prompt_ids = encode_prompt(tokenizer, filled.format(req.subject))
            s.ids.append(prompt_ids + target_ids[:-1])
            s.owner.append(r_i)
            s.lookup.append(subject_last_index(tokenizer, filled, req.subject))
            base = len(prompt_ids) - 1
            s.targets.append([(base + j, t) for j, t in enumerate(target_ids)])
            s.is_kl.append(False)
        kl_lookup = subject_last_index(tokenizer, KL_PROMPT, req.subject)
        # only the subject's last position is scored: the tokens after it cannot change it (causal attention)
        s.ids.append(encode_prompt(tokenizer, KL_PROMPT.format(req.subject))[: kl_lookup + 1])
        s.owner.append(r_i)
        s.lookup.append(kl_lookup)
        s.targets.append([])
        s.is_kl.append(True)
    return s


def length_groups(lengths: Sequence[int], pass_cost: int = PASS_COST_TOKENS) -> list[list[int]]:
    """Split items into groups padded to their longest, minimising padded tokens + pass_cost per group.

    Exact: a dynamic programme over the distinct lengths (few, however many
    items). Returns item indices per group, each in increasing order.
    """
    widths = sorted(set(lengths))
    count = [sum(1 for x in lengths if x == w) for w in widths]
    k = len(widths)
    best = [0.0] + [float("inf")] * k  # best[j]: cost of grouping the items of the j shortest lengths
    cut = [0] * (k + 1)
    for j in range(1, k + 1):
        for i in range(j):
            cost = best[i] + pass_cost + sum(count[i:j]) * widths[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], k
    while j > 0:
        bounds.append((widths[cut[j]], widths[j - 1]))
        j = cut[j]
    return [[i for i, x in enumerate(lengths) if lo <= x <= hi] for lo, hi in reversed(bounds)]


def new_cache(model):
    """An empty KV cache for `model` (passed in explicitly, so a pass stopped early still fills it)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers 4
        return DynamicCache()


def _tensors(obj, depth: int = 4) -> list[torch.Tensor]:
    """The tensors a cache object holds (in attributes, lists, tuples and dicts, a few levels deep)."""
    if torch.is_tensor(obj):
        return [obj]
    if depth == 0:
        return []
    if isinstance(obj, (list, tuple)):
        items = obj
    elif isinstance(obj, dict):
        items = list(obj.values())
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return []
    return [t for item in items for t in _tensors(item, depth - 1)]


class _Objective:
    """The target-value loss (docs/method.md §3.1) for a chunk of requests, as a function of δ (n, d_model).

    Every sequence is split at the subject's last token. The prefix
    (left-padded, explicit positions) is run once with a KV cache; each
    evaluation then runs only the suffixes, through the layers after l_n, with
    δ added at suffix position 0 — exactly the computation of the whole
    sequence. Suffixes are grouped by length (`length_groups`) so that little
    is spent on padding.

    δ, the loss and the bookkeeping live on the device of layer l_n (where δ
    is added); the ids on the model's input device. A dispatched model's
    later layers and head may be elsewhere: their results are moved back.
    """

    def __init__(self, model, tokenizer, layout: Layout, requests: Sequence[Request], hp: HParams,
                 templates: Sequence[str]):
        self.model, self.layout, self.hp = model, layout, hp
        self.last = hp.layers[-1]
        self.device = device = layer_device(model, layout, self.last)
        # A dispatched model's KV cache is spread over its layers' devices: select rows with CPU indices there.
        self.single_device = len({t.device for t in model.parameters()}) == 1
        self.layer_name = layout.layer_name(self.last)
        self.norm_name = layout.final_norm
        self.lm_head = get_module(model, layout.lm_head)
        self.cache_kw = cache_kwarg(model)
        seqs = _rewrite_sequences(tokenizer, requests, templates)
        self.n, self.n_seq = n, n_seq = len(requests), len(seqs.ids)

        # Layout [left-padded prefix | right-padded suffix], the suffix starting at the subject's last token.
        aligned = Aligned.make(seqs.ids, seqs.lookup, tokenizer.pad_token_id, input_device(model))
        self.ids, self.mask, self.positions, self.P = aligned.ids, aligned.mask, aligned.positions, aligned.anchor
        P = self.P
        self.suffix_len = [len(ids) - lk for ids, lk in zip(seqs.ids, seqs.lookup)]
        S = max(self.suffix_len)

        cache = new_cache(model)
        # One pass over the whole sequences (the caller's hooks active): l_n's output and the prefix cache.
        # (Running the prefix alone and the suffix only up to l_n saved 2 % of a batch, but in one zsRE dev run
        # it gave 95.3 reliability at 100 edits where the whole pass gives 97.3: not kept until understood.)
        with torch.no_grad(), trace(model, [self.layer_name, self.norm_name], outputs=True,
                                    stop_after=self.norm_name) as rec:  # the cache is filled by then; no logits
            model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.positions, use_cache=True,
                  **{self.cache_kw: cache})
        self.h_suffix = rec[self.layer_name].output[:, P:].detach().to(device)
        cache.crop(-S)  # negative: drop the suffix (same meaning in transformers 4 and 5)
        self.cache = cache

        self.owner = torch.tensor(seqs.owner, device=device)
        bare = torch.arange(n, device=device) * (len(templates) + 1)  # template 0 is the bare prompt
        self.h_init = self.h_suffix[bare, 0].float()
        # Target tokens in suffix coordinates: (sequence, position, token id).
        self.tgt = torch.tensor([(i, p - seqs.lookup[i], t) for i in range(n_seq) for p, t in seqs.targets[i]],
                                device=device)
        self.n_prompts = torch.zeros(n, device=device).index_add(  # rewriting prompts per request
            0, self.owner, torch.tensor([0.0 if k else 1.0 for k in seqs.is_kl], device=device))
        self.kl_seq = torch.tensor([i for i in range(n_seq) if seqs.is_kl[i]], device=device)
        self.kl_init: torch.Tensor | None = None  # log p at δ = 0, per request (set by the first evaluation)
        self.max_norm = hp.clamp_norm_factor * self.h_init.norm(dim=-1, keepdim=True)

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        """Into the ball of radius clamp_norm_factor·‖h‖ (per request)."""
        norm = delta.norm(dim=-1, keepdim=True)
        return torch.where(norm > self.max_norm, delta * self.max_norm / norm.clamp(min=1e-12), delta)

    def _hidden(self, delta: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
        """Final-norm output of the suffixes `rows` (first `width` positions) with δ added at l_n."""
        P, owner = self.P, self.owner[rows]
        # A copy of the cache's structure sharing its tensors: the pass replaces them (selected rows, the suffix
        # appended) and never writes into them, so the prefix cache serves every pass uncopied.
        step_cache = copy.deepcopy(self.cache, memo={id(t): t for t in _tensors(self.cache)})
        if len(rows) != self.n_seq or bool((rows != torch.arange(self.n_seq, device=rows.device)).any()):
            step_cache.batch_select_indices(rows if self.single_device else rows.cpu())  # any layer's device
        at = rows.to(self.ids.device)

        def add_delta(name: str, h: torch.Tensor) -> torch.Tensor:
            if name != self.layer_name:
                return h
            add = torch.zeros_like(h)
            add[:, 0] = delta[owner].to(h.device, h.dtype)
            return h + add

        with replay_layers(self.model, self.layout, self.last, lambda: self.h_suffix[rows, :width]), trace(
            self.model, [self.layer_name, self.norm_name], outputs=True, edit_output=add_delta,
            stop_after=self.norm_name,
        ) as rec:
            self.model(input_ids=self.ids[at, P : P + width], attention_mask=self.mask[at, : P + width],
                       position_ids=self.positions[at, P : P + width], use_cache=True,
                       **{self.cache_kw: step_cache})
        return rec[self.norm_name].output

    def __call__(self, delta: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Loss per request (n,) at `delta`, differentiable; 0 for requests not `active`.

        Rewriting NLL (per prompt: summed over target tokens / their number; mean over the request's
        prompts) + kl_factor · KL(p now ‖ p at δ=0) on "{subject} is a" at the subject's last token
        + v_weight_decay · ‖δ‖ / ‖h‖².
        """
        hp, device, n = self.hp, self.device, self.n
        live_seq = active[self.owner].nonzero().squeeze(1).tolist()
        seq_lp = torch.zeros(self.n_seq, device=device)
        kl_logp: dict[int, torch.Tensor] = {}
        # The final-norm outputs the loss reads, from every length group: the vocabulary head then runs once
        # per pass (its weight read once, where a call per group would read it again for a few rows).
        scored: list[torch.Tensor] = []
        parts: list[tuple[str, torch.Tensor]] = []  # ("target", (seq, pos, token) rows) or ("kl", KL sequences)
        for group in length_groups([self.suffix_len[i] for i in live_seq]):
            rows = torch.tensor([live_seq[g] for g in group], device=device)
            width = max(self.suffix_len[live_seq[g]] for g in group)
            hidden = self._hidden(delta, rows, width)
            on = hidden.device  # a dispatched model's final norm and head may be on other devices than δ
            where = torch.full((self.n_seq,), -1, dtype=torch.long, device=device)
            where[rows] = torch.arange(len(rows), device=device)
            sel = self.tgt[where[self.tgt[:, 0]] >= 0]
            if len(sel):
                scored.append(hidden[where[sel[:, 0]].to(on), sel[:, 1].to(on)])
                parts.append(("target", sel))
            kl_rows = self.kl_seq[where[self.kl_seq] >= 0]
            if len(kl_rows):
                scored.append(hidden[where[kl_rows].to(on), 0])
                parts.append(("kl", kl_rows))
        if scored:
            logp = torch.log_softmax(self.lm_head(torch.cat(scored)).float(), -1).to(device)
            for (kind, index), lp in zip(parts, logp.split([len(x) for x in scored])):
                if kind == "target":
                    picked = lp.gather(1, index[:, 2:3]).squeeze(1)
                    seq_lp = seq_lp.index_add(0, index[:, 0], picked)
                else:
                    kl_logp.update(zip(index.tolist(), lp))
        seq_len = torch.zeros(self.n_seq, device=device).index_add(
            0, self.tgt[:, 0], torch.ones(len(self.tgt), device=device))
        seq_nll = -seq_lp / seq_len.clamp(min=1)
        nll = torch.zeros(n, device=device).index_add(0, self.owner, seq_nll) / self.n_prompts.clamp(min=1)

        kl = torch.zeros(n, device=device)
        if kl_logp:
            kl_rows = torch.tensor(sorted(kl_logp), device=device)
            now = torch.stack([kl_logp[i] for i in kl_rows.tolist()])
            kl_owner = self.owner[kl_rows]
            if self.kl_init is None:
                self.kl_init = torch.zeros(n, now.shape[-1], device=device)
                self.kl_init[kl_owner] = now.detach()
            ref = self.kl_init[kl_owner]
            kl = kl.index_add(0, kl_owner, (now.exp() * (now - ref)).sum(-1))  # KL(now ‖ at δ=0), as EasyEdit
        decay = hp.v_weight_decay * delta.norm(dim=-1) / self.h_init.norm(dim=-1) ** 2
        return torch.where(active, nll + hp.kl_factor * kl + decay, torch.zeros_like(nll))

    def value_and_grad(self, delta: torch.Tensor, active: torch.Tensor,
                       need_grad: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """(loss (n,), gradient (n, d)) at `delta` for the `active` requests.

        `need_grad(loss)` may narrow the requests whose gradient is needed (a
        rejected trial step needs none): the backward pass then skips the rest.
        """
        param = delta.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = self(param, active)
            want = active if need_grad is None else active & need_grad(loss.detach())
            if bool(want.any()):
                (grad,) = torch.autograd.grad(loss[want].sum(), param)
            else:
                grad = torch.zeros_like(param)
        return loss.detach(), grad.detach()


# --------------------------------------------------------------------------- optimisers


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


def _adam(obj: _Objective, hp: HParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference schedule: Adam steps, projected into the norm ball. Returns (δ, loss, passes)."""
    n, device = obj.n, obj.device
    delta = torch.zeros_like(obj.h_init)
    adam = _Adam(delta.shape, hp.v_lr, device)
    active = torch.ones(n, dtype=torch.bool, device=device)
    final = torch.full((n,), float("nan"), device=device)
    passes = torch.zeros(n, dtype=torch.long, device=device)
    for it in range(hp.v_num_grad_steps):
        last = it == hp.v_num_grad_steps - 1
        loss, grad = obj.value_and_grad(
            delta, active, need_grad=lambda l: torch.zeros_like(active) if last else l >= hp.early_stop_loss)
        passes += active
        final = torch.where(active, loss, final)
        active &= ~(loss < hp.early_stop_loss)
        if last or not bool(active.any()):
            break
        new = delta.clone()
        adam.step(new, grad, active.nonzero().squeeze(1))
        delta = obj.project(new)
    return delta, final, passes


def _lbfgs(obj: _Objective, hp: HParams, memory: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Limited-memory BFGS per request with a trust radius; every trial costs one pass. Returns (δ, loss, passes).

    A trial step is the L-BFGS direction, cut to the trust radius and
    projected into the norm ball. It is accepted if it lowers the loss (the
    radius then grows when the step was cut by it); otherwise the request stays
    where it was, the radius shrinks to a quarter of the step, and no gradient
    is computed for it. The first radius is twice Adam's first step length,
    2·v_lr·√d (the fastest of the radii tried on CounterFact). Curvature pairs with sᵀy ≤ 0 (the loss is not convex) are not stored.
    """
    n, d, device = obj.n, obj.h_init.shape[1], obj.device
    x = torch.zeros_like(obj.h_init)
    active = torch.ones(n, dtype=torch.bool, device=device)
    passes = torch.zeros(n, dtype=torch.long, device=device)
    f, g = obj.value_and_grad(x, active, need_grad=lambda l: l >= hp.early_stop_loss)
    passes += 1
    active &= ~(f < hp.early_stop_loss)
    radius = torch.full((n,), 2 * hp.v_lr * d**0.5, device=device)
    S = torch.zeros(memory, n, d, device=device)
    Y = torch.zeros(memory, n, d, device=device)
    valid = torch.zeros(memory, n, dtype=torch.bool, device=device)

    for _ in range(hp.v_num_grad_steps - 1):
        if not bool(active.any()):
            break
        # Two-loop recursion, all requests at once (slots without a pair contribute nothing).
        sy = (S * Y).sum(-1)
        rho = torch.where(valid, 1.0 / sy.clamp(min=1e-30), torch.zeros_like(sy))
        q, a = g.clone(), torch.zeros(memory, n, device=device)
        for i in reversed(range(memory)):
            a[i] = rho[i] * (S[i] * q).sum(-1)
            q -= a[i, :, None] * Y[i]
        has = valid[-1]
        gamma = torch.where(has, sy[-1] / (Y[-1] * Y[-1]).sum(-1).clamp(min=1e-30), torch.ones_like(sy[-1]))
        r = gamma[:, None] * q
        for i in range(memory):
            b = rho[i] * (Y[i] * r).sum(-1)
            r += (a[i] - b)[:, None] * S[i]
        step = torch.where(has[:, None], -r, -g)
        gnorm = g.norm(dim=-1)
        descent = (step * g).sum(-1) < 0
        step = torch.where(descent[:, None], step, -g)
        length = step.norm(dim=-1).clamp(min=1e-30)
        # Without curvature yet the step is the radius along −g; otherwise the L-BFGS step, cut to the radius.
        scale = torch.where(has & descent, torch.clamp(radius / length, max=1.0), radius / length)
        cut = scale < 1.0
        trial = obj.project(x + scale[:, None] * step)
        s = trial - x

        f_new, g_new = obj.value_and_grad(trial, active, need_grad=lambda l: (l < f) & (l >= hp.early_stop_loss))
        passes += active
        accept = active & (f_new < f)
        y = g_new - g
        s_norm = s.norm(dim=-1)
        keep = accept & ((s * y).sum(-1) > 1e-10 * s_norm * y.norm(dim=-1))
        if bool(keep.any()):
            S = torch.where(keep[None, :, None], torch.cat([S[1:], s[None]]), S)
            Y = torch.where(keep[None, :, None], torch.cat([Y[1:], y[None]]), Y)
            valid = torch.where(keep[None], torch.cat([valid[1:], keep[None]]), valid)
        radius = torch.where(accept & cut, 2 * radius, radius)
        radius = torch.where(active & ~accept, 0.25 * s_norm.clamp(min=1e-6), radius)
        x = torch.where(accept[:, None], trial, x)
        f = torch.where(accept, f_new, f)
        g = torch.where(accept[:, None], g_new, g)
        active &= ~(f < hp.early_stop_loss) & (gnorm > 0)
    return x, f, passes


OPTIMISERS = {"lbfgs": _lbfgs, "adam": _adam}


@contextmanager
def value_precision(model, layout: Layout, first: int, setting: str) -> Iterator[bool]:
    """The projections of layers `first`.. (those the optimised δ passes through) in bfloat16 while it runs,
    when `setting` (hparam `v_dtype`) is `bfloat16`, or `auto` on a device with bfloat16 matrix units.

    Each projection's float32 weight is set aside and put back on exit (the model is unchanged after); its
    input is cast to bfloat16 and its output back to float32. Everything else stays float32: the layers up
    to l_n (so h and the keys are exact), the attention itself (whose bfloat16 backward is slow on CPUs),
    the norms, the vocabulary head (a logit rounded to bfloat16 moves the loss by as much as the early-stop
    threshold), δ, the loss and the hooks. Yields whether it reduced anything: not for a model that is not
    float32, nor where accelerate offloads these weights (it loads them itself at each call)."""
    projections = [m for l in range(first, num_layers(model, layout))
                   for m in get_module(model, layout.layer_name(l)).modules()
                   if next(m.children(), None) is None and getattr(m, "weight", None) is not None
                   and m.weight.dim() == 2]
    params = [p for m in projections for p in m.parameters(recurse=False)]
    reduce = setting == "bfloat16" or (setting == "auto" and bool(params) and has_bf16_matmul(params[0].device))
    if not reduce or not params or any(p.dtype != torch.float32 or p.device.type == "meta" for p in params):
        yield False
        return
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    handles = []
    try:
        for p in params:
            saved.append((p, p.data))
            p.data = p.data.to(torch.bfloat16)
        shapes: list[torch.Size] = []  # the input shapes of the calls under way (a stack; calls do not nest)
        for m in projections:
            handles.append(m.register_forward_pre_hook(partial(_to_bfloat16, shapes)))
            handles.append(m.register_forward_hook(partial(_to_float32, shapes)))
        yield True
    finally:
        for h in handles:
            h.remove()
        for p, data in saved:
            p.data = data


TOKEN_BUCKET = 64  # bfloat16 products see token counts rounded up to this: few distinct shapes, few cached kernels


def _to_bfloat16(shapes: list, _module, args: tuple) -> tuple:
    """The input as (tokens rounded up to TOKEN_BUCKET, features) in bfloat16: oneDNN keeps a kernel (and its
    buffers) per distinct shape, and the passes' token counts vary batch by batch — unrounded, the process
    grew by about a gigabyte over a thousand edits before the kernel cache filled."""
    x, rest = args[0], args[1:]
    shapes.append(x.shape)
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    pad = -flat.shape[0] % TOKEN_BUCKET
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad, flat.shape[1])])
    return (flat, *rest)


def _to_float32(shapes: list, _module, _args, out: torch.Tensor) -> torch.Tensor:
    shape = shapes.pop()
    n = math.prod(shape[:-1])
    return out[:n].reshape(*shape[:-1], out.shape[-1]).to(torch.float32)


def target_values(
    model,
    tokenizer,
    layout: Layout,
    requests: Sequence[Request],
    hp: HParams,
    templates: Sequence[str],
    progress: bool = True,
    chunk: int = 32,
) -> torch.Tensor:
    """Z (n, d_model): the output of the last edited layer at the subject that makes each target likely
    (h + δ, with δ stretched by `hp.v_overshoot`).

    Optimises δ added at layer l_n's output (subject's last token) with the
    optimiser `hp.v_optimizer`; only δ takes gradients. Requests are processed
    in chunks of `chunk` (memory), and each stops on its own.
    """
    out = []
    bar = tqdm(total=len(requests), desc="target values", unit="edit", disable=not progress)
    # the precision is set once for every chunk: the bfloat16 weight copies are made once per batch
    with value_precision(model, layout, hp.layers[-1] + 1, hp.v_dtype) as reduced:
        try:
            for start in range(0, len(requests), chunk):
                part = requests[start : start + chunk]
                obj = _Objective(model, tokenizer, layout, part, hp, templates)
                delta, loss, passes = OPTIMISERS[hp.v_optimizer](obj, hp)
                log.debug("target values (%s): passes %s, final losses %s", hp.v_optimizer, passes.tolist(),
                          [round(v, 4) for v in loss.tolist()])
                out.append((obj.h_init + hp.v_overshoot * delta).to(torch.float64))
                bar.update(len(part))
        finally:
            bar.close()
    if reduced:
        release_freed_memory()
    return torch.cat(out)


def release_freed_memory() -> None:
    """Hand the C heap's freed pages back to the system (glibc's malloc_trim; elsewhere nothing).

    The bfloat16 passes free hundreds of megabytes of buffers that glibc keeps
    in the process: without this, a long bfloat16 run sat about 0.7 GB above
    float32's resident memory (benchmarks/precision_memory.py)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl)
        pass
