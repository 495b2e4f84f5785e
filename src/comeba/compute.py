"""The MEMIT-style pieces every editor shares: templates, keys, residuals, the update.

Each of these equations lives here once (docs/method.md §§2 and 3.2; the
target values are in comeba.values); COMEBA-HK and the baselines differ only
in which covariance they solve against and where they write Δ.
All functions run the model as it is (with whatever hooks the caller has
attached), so the caller decides what "the model as edited so far" means.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .hparams import HParams
from .models import Layout, get_module, input_device
from .requests import Request
from .text import encode_prompt, subject_last_index
from .trace import trace

log = logging.getLogger(__name__)

KL_PROMPT = "{} is a"
SOLVE_TOLERANCE = 1e-6  # relative residual of the update's solve beyond which it is refused
TOKENS_PER_PASS = 8192  # padded tokens per forward pass when only reading activations


# --------------------------------------------------------------------------- context templates


@torch.no_grad()
def context_templates(model, tokenizer, hp: HParams) -> list[str]:
    """["{}"] + one sampled (top-5) continuation of each prefix, then ". {}".

    Generated once by the unedited model and reused for every batch (a saved
    state keeps them); the sampling is seeded and does not disturb the
    caller's random state. It runs on the model's device (the input
    device of a dispatched model), whose random stream is its own: on CUDA
    the same seed draws other templates than on the CPU.
    """
    device = input_device(model)
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


def fill_template(template: str, request: Request) -> str:
    """Context template + request prompt, still holding the subject as {}."""
    return template.format(request.prompt)


# --------------------------------------------------------------------------- running part of the model


_REPLAY_ATTR = "_comeba_replay"
_replay_classes: dict[type, type] = {}


def _replayed(cls: type) -> type:
    """A subclass of a decoder layer's class whose `forward` is the replay function of the instance.

    `forward` is a property (a data descriptor), so it takes precedence over an instance's own `forward`,
    which stays as it is: accelerate keeps its dispatch wrapper there (`add_hook_to_module`). Module hooks
    run as usual; only the computation (and accelerate's loading of offloaded weights) is skipped.
    """
    sub = _replay_classes.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
        # Set after creation: a class's __init_subclass__ (transformers' GradientCheckpointingLayer) may wrap forward.
        sub.forward = property(lambda self: self.__dict__[_REPLAY_ATTR])
        _replay_classes[cls] = sub
    return sub


@contextmanager
def replay_layers(model, layout: Layout, last: int, output: Callable[[], torch.Tensor]):
    """Skip decoder layers 0..last: they pass their input through and `last` returns `output()`.

    What layers up to `last` compute is known (cached), so a pass can start
    at layer last + 1. Forward hooks on layer `last` still run. A layer's own
    `forward` is never touched (accelerate's dispatch hooks live there): the
    layers are switched to a subclass whose `forward` replays, and back.
    """
    layers = get_module(model, layout.layers)

    def passthrough(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def replay(*args, **kwargs):
        return output()

    swapped = []
    try:
        for i in range(last + 1):
            layer = layers[i]
            if _REPLAY_ATTR in layer.__dict__:
                raise RuntimeError(f"decoder layer {i} is already being replayed")
            cls = type(layer)
            layer.__dict__[_REPLAY_ATTR] = replay if i == last else passthrough
            swapped.append((layer, cls))
            layer.__class__ = _replayed(cls)
        yield
    finally:
        for layer, cls in swapped:
            layer.__class__ = cls
            layer.__dict__.pop(_REPLAY_ATTR, None)


@dataclass
class Aligned:
    """Sequences placed so that one position of each (its anchor) falls in one column, `anchor`:
    left-padded before it, right-padded after it, with explicit positions (so padding changes nothing)."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    anchor: int

    @classmethod
    def make(cls, sequences: Sequence[Sequence[int]], anchors: Sequence[int], pad_id: int, device) -> "Aligned":
        anchor = max(anchors)
        width = anchor + max(len(seq) - a for seq, a in zip(sequences, anchors))
        ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, (seq, a) in enumerate(zip(sequences, anchors)):
            ids[i, anchor - a : anchor - a + len(seq)] = torch.tensor(list(seq), dtype=torch.long)
            mask[i, anchor - a : anchor - a + len(seq)] = 1
        ids, mask = ids.to(device), mask.to(device)
        return cls(ids, mask, (mask.cumsum(1) - 1).clamp(min=0), anchor)


def forward_from(model, layout: Layout, batch: Aligned, start: int, stream: torch.Tensor | None, read: str,
                 *, inputs: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The input (or output) of module `read` at every position of `batch`, starting at decoder layer `start`.

    `stream` is the input of layer `start` (all rows of `batch`; None when
    start is 0). The pass stops after `read`; it runs in chunks of rows.
    The result is on the device where `read` computes (a dispatched model's
    layers may be on several devices).
    """
    rows = torch.arange(batch.ids.shape[0], device=batch.ids.device) if rows is None else rows
    per_chunk = max(1, TOKENS_PER_PASS // batch.ids.shape[1])
    out = []
    for c in range(0, len(rows), per_chunk):
        part = rows[c : c + per_chunk]
        replay = (replay_layers(model, layout, start - 1, lambda: stream[part.to(stream.device)])
                  if start > 0 and stream is not None else nullcontext())
        with torch.no_grad(), replay, trace(model, [read], inputs=inputs, outputs=not inputs, stop_after=read) as rec:
            model(input_ids=batch.ids[part], attention_mask=batch.mask[part], position_ids=batch.positions[part],
                  use_cache=False)
        out.append(rec[read].input if inputs else rec[read].output)
    return torch.cat(out)


# --------------------------------------------------------------------------- keys and outputs


def key_prefixes(tokenizer, requests: Sequence[Request], templates: Sequence[str], device) -> Aligned:
    """Each request's prompt in every context template, cut after the subject's last token, which is then the
    last column (request-major)."""
    seqs, ends = [], []
    for req in requests:
        for tmpl in templates:
            filled = fill_template(tmpl, req)
            end = subject_last_index(tokenizer, filled, req.subject)
            seqs.append(encode_prompt(tokenizer, filled.format(req.subject))[: end + 1])
            ends.append(end)
    return Aligned.make(seqs, ends, tokenizer.pad_token_id, device)


def combine_keys(k: torch.Tensor, n_templates: int) -> torch.Tensor:
    """K (n, d_in) from keys per (request, template): ½·k(bare prompt) + ½·mean of k over the other templates."""
    k = k.to(torch.float64).view(-1, n_templates, k.shape[-1])
    if n_templates == 1:
        return k[:, 0]
    return 0.5 * k[:, 0] + 0.5 * k[:, 1:].mean(1)


def template_weights(n_templates: int) -> torch.Tensor:
    """`combine_keys`' weights w_t: ½ for the bare prompt, the other ½ shared by the other templates."""
    if n_templates == 1:
        return torch.ones(1, dtype=torch.float64)
    w = torch.full((n_templates,), 0.5 / (n_templates - 1), dtype=torch.float64)
    w[0] = 0.5
    return w


def context_keys(k: torch.Tensor, n_templates: int) -> torch.Tensor:
    """Rows √w_t·k_t per (request, template), with `template_weights`: their Σ k kᵀ is the weighted mean of the
    edit's keys' outer products, which keeps its output at each context's key, not only at the mean (and
    Σ_t √w_t·row is the combined key)."""
    k = k.to(torch.float64).view(-1, n_templates, k.shape[-1])
    w = template_weights(n_templates).to(k.device)
    return (k * w.sqrt()[None, :, None]).reshape(-1, k.shape[-1])


def context_residuals(residuals: torch.Tensor, n_templates: int) -> torch.Tensor:
    """Each request's residual once per template, scaled by √w_t: with `context_keys` as the keys, `solve_update`
    then minimises Σ_t w_t ‖Δk_t − r‖² + ‖Δ‖²_C (fitting every context's key). Its R Kᵀ equals the combined
    key's (Σ_t w_t k_t = K); only the covariance in the solve changes, from K Kᵀ to Σ_t w_t k_t k_tᵀ."""
    w = template_weights(n_templates).to(residuals.device).sqrt()
    return (residuals.to(torch.float64)[:, None, :] * w[None, :, None]).reshape(-1, residuals.shape[-1])


def subject_keys(model, tokenizer, layout: Layout, layer: int, requests: Sequence[Request], templates: Sequence[str]) -> torch.Tensor:
    """K (n, d_in) at `layer` for the model as it is (`combine_keys` of the subject's last token in each template)."""
    batch = key_prefixes(tokenizer, requests, templates, input_device(model))
    k = forward_from(model, layout, batch, 0, None, layout.mlp_out_name(layer), inputs=True)[:, -1]
    return combine_keys(k, len(templates))


# --------------------------------------------------------------------------- the update


def solve_update(residuals: torch.Tensor, keys: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """Δ = R Kᵀ (C + K Kᵀ)⁻¹ in float64, by a Cholesky solve (C + K Kᵀ is symmetric positive definite).

    `residuals` (n, d_out), `keys` (n, d_in), `covariance` C (d_in, d_in)
    already scaled (λ·C0 plus any accumulated keys). The current batch is
    inside the solve. Δ is on the covariance's device.
    """
    K = keys.to(covariance.device, torch.float64).T
    R = residuals.to(covariance.device, torch.float64).T
    A = covariance.to(torch.float64) + K @ K.T
    chol, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        finite = bool(torch.isfinite(A).all())
        raise ValueError("the covariance C + K Kᵀ is not positive definite"
                         + ("" if finite else " (it holds NaN or infinite values)")
                         + f" (leading minor {int(info)} of {A.shape[0]}): check the key statistics and the keys")
    X = torch.cholesky_solve(K, chol)  # A⁻¹ K; A is symmetric so (A⁻¹ K)ᵀ = Kᵀ A⁻¹
    # A nearly singular A gives a huge, meaningless update: check that the solve holds.
    residual = float((A @ X - K).norm() / K.norm().clamp(min=1e-300))
    if not residual < SOLVE_TOLERANCE:
        raise ValueError(f"the covariance C + K Kᵀ is too ill-conditioned to solve against (relative residual "
                         f"{residual:.1e}): check the key statistics (too few tokens?) and λ")
    return R @ X.T


def weighted_covariance(c_accu: torch.Tensor, c0: torch.Tensor | None, lam: float, weight: float) -> torch.Tensor:
    """λC0 + γ Σ_past K Kᵀ from C_accu = λC0 + Σ_past K Kᵀ: the covariance a new batch is solved against when
    earlier edits' keys weigh γ times its own (γ = 1: C_accu itself)."""
    if weight == 1:
        return c_accu
    if c0 is None:
        raise ValueError("weighing the accumulated keys needs C0")
    return weight * c_accu - (weight - 1) * lam * c0.to(c_accu)


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
    accumulated: str = "combined",
    fit: str = "combined",
) -> dict[int, torch.Tensor]:
    """Write the targets into `layers` in order, spreading the residual over the layers left.

    For layer l_i: K at l_i, R = (Z − current output of l_n) / (layers left),
    Δ = solve(l_i, R, K) — `solve_update` against the method's covariance, or
    a variant such as AlphaEdit's — then `apply(l_i, Δ, K)`, which must make
    the model compute with the new weights before the next layer's keys are
    read (and may accumulate K).

    Speed: layers before l_1 are run once; after each write only the layers
    from l_i to l_{i+1} are run again (the key prompts are cut after the
    subject, whose last token is all the keys need), so writing n layers
    costs about 2n layer passes instead of a whole prefix pass per layer.
    Returns the keys per layer (to accumulate). K and R are on the device
    of layer l_i (a dispatched model's layers may be on several devices).
    `accumulated`: the keys handed to `apply` and returned, `combined` (K,
    one per request) or `contexts` (`context_keys`, one per request and template).
    `fit`: the keys `solve` maps to the residuals, `combined` (as MEMIT) or
    `contexts` (`context_keys`, with `context_residuals`: least squares over
    every context's key).
    """
    keys: dict[int, torch.Tensor] = {}
    last = layers[-1]
    n_t = len(templates)
    batch = key_prefixes(tokenizer, requests, templates, input_device(model))
    bare = torch.arange(len(requests), device=batch.ids.device) * n_t  # template 0 is the bare prompt
    stream = (forward_from(model, layout, batch, 0, None, layout.layer_name(layers[0] - 1), inputs=False)
              if layers[0] > 0 else None)
    for i, layer in enumerate(tqdm(layers, desc="writing layers", disable=not progress)):
        raw = forward_from(model, layout, batch, layer, stream, layout.mlp_out_name(layer), inputs=True)[:, -1]
        K = combine_keys(raw, n_t)
        current = forward_from(model, layout, batch, layer, stream, layout.layer_name(last), inputs=False,
                               rows=bare)[:, -1].to(torch.float64)
        R = ((targets.to(current.device) - current) / (len(layers) - i)).to(K.device)
        rows = context_keys(raw, n_t) if "contexts" in (fit, accumulated) else None
        delta = solve(layer, R, K) if fit == "combined" else solve(layer, context_residuals(R, n_t), rows)
        keys[layer] = K if accumulated == "combined" else rows
        apply(layer, delta, keys[layer])
        if i + 1 < len(layers):  # the input of the next edited layer, with this layer's new weights
            stream = forward_from(model, layout, batch, layer, stream, layout.layer_name(layers[i + 1] - 1),
                                  inputs=False)
        log.debug("layer %d: |R| %.3f |Δ| %.3f", layer, R.norm(dim=1).mean().item(), delta.norm().item())
    return keys
