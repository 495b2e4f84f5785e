"""The gate of a hook layer: which tokens get the hook's output, and how its threshold α is calibrated.

A hook layer at layer l holds ΔW = W_h − W_0 (float32, never the model's
weight). Attached to the model it adds ΔW·k to the projection's output: a
*temporary* hook everywhere, a *validated* hook only at tokens whose gate
score reaches the layer's threshold α. Two gates:

- ``span`` (the default): a per-token score of how much of the key k lies in
  the span of the edited keys, both whitened against general text (C0):
  h(k) = kᵀ G k / kᵀ (λC0)⁻¹ k with G = (λC0)⁻¹ − C_accu⁻¹, in [0, 1). It needs
  no per-sequence statistics and does not depend on the key's norm, so it
  has the same meaning in a 3-token prompt and a long document. α is
  calibrated after every batch as the (1 − ε) quantile of h over held-back
  general text run through the hooks as at inference, so it rises as well
  as falls. A token's gate depends on its key alone, with or without a KV
  cache.
- ``reference`` (the authors' rule, kept reproducible): the z-score
  z_j = (m_j − mean(m)) / std(m), m_j = ‖ΔW·k_j‖, over the non-padding tokens
  of each sequence seen so far in the current call (so generation with a KV
  cache gates each new token with the statistics of the whole text up to
  it); α is a running minimum of the edited prompts' largest z-scores.
"""


from __future__ import annotations

import math
import random
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection, Sequence

import torch

from .compute import Aligned, forward_from, replay_layers
from .models import Layout, dispatched, input_device
from .text import encode_prompt, pad_batch, subject_last_index
from .trace import StopForward, trace

if TYPE_CHECKING:  # the hooks call the gate; calibration drives the hooks
    from .hooks import HookLayers
    from .requests import Request


def hook_addition(k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """ΔW·k in float32: what a hook adds to the projection's output (its norm is the gate magnitude m)."""
    return k.to(torch.float32) @ delta.T


@dataclass
class SpanGate:
    """The span gate of one layer: whitening P = L⁻¹ (λC0 = L Lᵀ) and H = (βI + S_w)⁻¹ S_w, both float32.

    With w = P k the key whitened against general text and S_w = P (Σ K Kᵀ) Pᵀ
    the accumulated edit keys in the same coordinates, the score
    h(k) = wᵀ H w / wᵀ w = kᵀ G k / kᵀ (λC0)⁻¹ k, G = (λC0)⁻¹ − C_accu⁻¹, is the
    share of the key's whitened energy that lies in the span of the edited
    keys: in [0, 1), independent of the key's norm and of the sequence.

    `factor` F (d_in × r, float32), when known, is H = F Fᵀ with r the number of
    edited keys: an editor that started from no edits appends each batch's
    rank-n term (`span_gate_added`) while r < d_in, and the score's quadratic
    form then costs d_in·r per token instead of d_in². Saved states keep H only
    (a loaded editor scores with H).
    """

    whiten: torch.Tensor
    span: torch.Tensor
    factor: torch.Tensor | None = None

    def to(self, device) -> "SpanGate":
        factor = None if self.factor is None else self.factor.to(device=device, dtype=torch.float32)
        return SpanGate(self.whiten.to(device=device, dtype=torch.float32),
                        self.span.to(device=device, dtype=torch.float32), factor)


def span_gate(c0: torch.Tensor, c_accu: torch.Tensor, lam: float, beta: float = 1.0,
              whiten: torch.Tensor | None = None, unedited: bool = False) -> SpanGate:
    """The span gate of C_accu = λC0 + Σ K Kᵀ with H = (βI + S_w)⁻¹ S_w, computed in float64 (H is well
    conditioned: eigenvalues in [0, 1)).

    `whiten`: the whitening of an earlier span gate of the same C0 and λ
    (it depends on nothing else), reused instead of factorising λC0 again:
    the editor's batches then spend a third less on their gates.
    `unedited`: C_accu holds no edit keys yet, so H = 0 has the empty factor
    (d_in × 0) that `span_gate_added` extends.
    """
    c0 = c0.to(torch.float64)
    c_accu = c_accu.to(torch.float64)
    a0 = lam * c0
    eye = torch.eye(a0.shape[0], dtype=torch.float64, device=a0.device)
    if whiten is None:
        chol = _cholesky_with_jitter(a0, eye)
        whiten = torch.linalg.solve_triangular(chol, eye, upper=False)  # L⁻¹
    elif whiten.shape != a0.shape:
        raise ValueError(f"the whitening {tuple(whiten.shape)} does not fit C0 {tuple(a0.shape)}")
    whiten = whiten.to(a0.device, torch.float64)
    s_w = whiten @ (c_accu - a0) @ whiten.T
    s_w = 0.5 * (s_w + s_w.T)
    h = torch.cholesky_solve(s_w, torch.linalg.cholesky(beta * eye + s_w))
    h = 0.5 * (h + h.T)
    factor = h.new_zeros((h.shape[0], 0), dtype=torch.float32) if unedited else None
    return SpanGate(whiten.to(torch.float32), h.to(torch.float32), factor)


def span_gate_added(gate: SpanGate, keys: torch.Tensor, beta: float = 1.0) -> SpanGate:
    """The span gate after `keys` (n, d_in) join C_accu, from the gate before them.

    New keys add V Vᵀ (V = P Kᵀ, whitened) to S_w, and by the Woodbury
    identity H = I − β(βI + S_w)⁻¹ grows by β·MV (I + VᵀMV)⁻¹ (MV)ᵀ with
    MV = (V − HV)/β: O(d_in² n) in float64, where `span_gate` costs O(d_in³) —
    a batch's span gates became a rounding error of its time. Equal to
    `span_gate` on the new C_accu up to the float32 rounding of the stored H,
    which each update starts from. That rank-n term is also what the factor
    grows by (until it would be as wide as H is square).
    """
    h = gate.span.to(torch.float64)
    v = gate.whiten.to(torch.float64) @ keys.to(h).T
    mv = (v - h @ v) / beta
    inner = torch.eye(v.shape[1], dtype=h.dtype, device=h.device) + v.T @ mv
    w = torch.linalg.solve_triangular(torch.linalg.cholesky(0.5 * (inner + inner.T)), mv.T, upper=False)
    cols = math.sqrt(beta) * w.T  # (d_in, n): the update is cols colsᵀ
    factor = gate.factor
    if factor is not None:
        factor = (torch.cat([factor, cols.to(factor)], dim=1) if factor.shape[1] + cols.shape[1] < h.shape[0]
                  else None)
    return SpanGate(gate.whiten, (h + cols @ cols.T).to(torch.float32), factor)


def _cholesky_with_jitter(a: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of a symmetric PSD matrix; a C0 from little text can be singular, so add the
    smallest ridge (relative to its mean diagonal) that makes it positive definite."""
    chol, info = torch.linalg.cholesky_ex(a)
    scale = float(a.diagonal().mean().clamp(min=1e-30))
    for rel in (1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
        if int(info) == 0:
            return chol
        chol, info = torch.linalg.cholesky_ex(a + rel * scale * eye)
    if int(info) != 0:
        raise ValueError("the key statistics C0 are not positive semi-definite (non-finite values?)")
    return chol


def whitened_energy(k: torch.Tensor, gate: SpanGate) -> torch.Tensor:
    """kᵀ(λC0)⁻¹k = ‖L⁻¹k‖² per key (float32, on the gate's device): d_in/λ on average for general text, so a
    key far below that carries almost no context (`Editor.edit_warnings`)."""
    return (k.to(gate.whiten) @ gate.whiten.T).square().sum(-1)


def span_scores(k: torch.Tensor, gate: SpanGate, valid: torch.Tensor | None = None) -> torch.Tensor:
    """h(k) = wᵀ H w / wᵀ w per token (float32, NaN for a zero key): the span gate's score.

    `valid` (k's shape without the last dimension): score only these tokens (NaN elsewhere), so that
    padding costs no d_in² products.
    """
    rows = k.reshape(-1, k.shape[-1])
    at = None
    if valid is not None:
        at = valid.reshape(-1).nonzero().squeeze(1)
        rows = rows[at]
    w = rows.to(torch.float32) @ gate.whiten.T
    if gate.factor is not None:
        energy = (w @ gate.factor).square().sum(-1)
    else:
        energy = ((w @ gate.span) * w).sum(-1)
    z = energy / (w * w).sum(-1)
    if at is None:
        return z.reshape(k.shape[:-1])
    out = torch.full((k[..., 0].numel(),), math.nan, dtype=z.dtype, device=z.device)
    out[at] = z
    return out.reshape(k.shape[:-1])


def calibrated_threshold(scores: torch.Tensor, false_open: float) -> float:
    """The (1 − ε) quantile of general-text scores: the gate then opens on a share ε of such tokens."""
    flat = scores.reshape(-1).to(torch.float64)
    flat = flat[torch.isfinite(flat)]
    if flat.numel() == 0:
        raise ValueError("no finite gate scores to calibrate on")
    return float(torch.quantile(flat, 1.0 - false_open))


def span_threshold(scores: torch.Tensor, general_rows: int, subjects: Sequence[tuple[int, int]],
                   false_open: float, false_open_max: float, subject_share: float = 0.0,
                   kept: Sequence[tuple[int, int]] = ()) -> float:
    """The span gate's α from one calibration pass: rows [0, general_rows) are held-back general text,
    `subjects` the (row, position) of this batch's edited subjects in the rows after them, `kept` those of
    earlier edits (the gate's memory, `remember`).

    α is the (1 − ε) quantile of the general text, but at least a share ρ
    (`subject_share`) of the median score of the batch's subjects: a key must
    look about as much like the edited keys as the edits themselves do, which
    keeps the gate shut on other subjects that merely end in the same word
    ("… County", "… Airport"), whose scores lie between general text and the
    edits. Below that floor, α is lowered just enough that every subject of
    the batch, and every kept earlier one, opens the gate, but never below
    the (1 − ε_max) quantile: α may rise as the edited span fills, and
    without the kept subjects a rise would shut earlier edits unseen.
    """
    general = scores[:general_rows]
    alpha = calibrated_threshold(general, false_open)
    batch, earlier = _scores_at(scores, subjects), _scores_at(scores, kept)
    if batch.numel() or earlier.numel():
        floor = subject_share * float(batch.median()) if batch.numel() else 0.0
        need = float(torch.cat([batch, earlier]).min())
        alpha = max(calibrated_threshold(general, false_open_max), floor, min(max(alpha, floor), need))
    return alpha


def _scores_at(scores: torch.Tensor, where: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The finite scores at (row, position) pairs, float64."""
    if not where:
        return scores.new_zeros(0, dtype=torch.float64)
    rows = torch.tensor([r for r, _ in where], device=scores.device)
    cols = torch.tensor([c for _, c in where], device=scores.device)
    got = scores[rows, cols].to(torch.float64)
    return got[torch.isfinite(got)]


def gate_scores(m: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """z-scores of per-token magnitudes `m` (B, T) within each sequence, padding excluded.

    Non-valid positions and sequences with fewer than two tokens get NaN.
    """
    stats = RunningStats.zeros(m.shape[0], m.device)
    return stats.update(m, mask)


@dataclass
class RunningStats:
    """Per-sequence count, sum and sum of squares of gate magnitudes (float64)."""

    n: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor

    @classmethod
    def zeros(cls, batch: int, device: torch.device) -> "RunningStats":
        z = torch.zeros(batch, dtype=torch.float64, device=device)
        return cls(z.clone(), z.clone(), z.clone())

    def select(self, rows: torch.Tensor) -> "RunningStats":
        """The statistics of the given rows (beam search reorders its sequences between steps)."""
        rows = rows.to(self.n.device)
        return RunningStats(self.n[rows], self.s1[rows], self.s2[rows])

    def update(self, m: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Add this chunk's valid tokens, then return their z-scores (NaN elsewhere)."""
        valid = mask.to(torch.bool)
        m64 = m.to(torch.float64)
        w = valid.to(torch.float64)
        self.n = self.n + w.sum(1)
        self.s1 = self.s1 + (m64 * w).sum(1)
        self.s2 = self.s2 + (m64 * m64 * w).sum(1)
        mean = self.s1 / self.n.clamp(min=1)
        var = (self.s2 - self.n * mean * mean) / (self.n - 1)
        std = var.clamp(min=0).sqrt()
        std = torch.where(self.n > 1, std, torch.full_like(std, math.nan))
        z = (m64 - mean[:, None]) / std[:, None]
        return torch.where(valid, z, torch.full_like(z, math.nan))


# ---------------------------------------------------------------------------- calibration


@torch.no_grad()
def calibration_stream(model, tokenizer, layout: Layout, calibration: Sequence[Sequence[int]], first: int
                       ) -> torch.Tensor | None:
    """The held-back text's input to the first edited layer (None when that is layer 0).

    No hook acts below the first edited layer, so this is the same for every
    batch: an editor computes it once and `calibrate_span` starts each
    calibration pass there (rows × tokens × hidden size, float32 for a
    float32 model: 9 MB for 4,096 tokens of the embedded model).
    """
    if first == 0:
        return None
    batch = Aligned.make(calibration, [0] * len(calibration), tokenizer.pad_token_id, input_device(model))
    return forward_from(model, layout, batch, 0, None, layout.layer_name(first - 1), inputs=False)


@torch.no_grad()
def calibrate_span(hooks: "HookLayers", model, tokenizer, layout: Layout, calibration: Sequence[Sequence[int]],
                   batch: Sequence["Request"], false_open: float, false_open_max: float,
                   subject_share: float = 0.0, stream: torch.Tensor | None = None,
                   memory: Sequence[Remembered] = (), skip: Collection[int] = ()) -> dict[int, float]:
    """The span gate's α per layer: one pass over the held-back general text, the batch's bare prompts and
    the remembered earlier ones (`memory`), with the hooks as they are at inference (`span_threshold` is the
    rule).

    `stream` (from `calibration_stream`) lets the pass start at the first
    edited layer: only the prompts run through the layers below it.
    A subject that is its prompt's first token (no start token before it) does not count: its key there
    carries no context and scores like general text, and would drag α down for the whole batch. Nor do the
    requests listed in `skip` (the batch's subjects whose key carries no context at all).

    The text (rows of up to a few hundred tokens) and the prompts (a dozen) run as two calls in lockstep
    (`_Lockstep`), so that the prompts are not padded to the text's width: at each layer both calls' scores
    make that layer's α, as in one call over both (which a model dispatched by accelerate still makes).
    """
    prompts = [encode_prompt(tokenizer, r.text) for r in batch]
    subjects = [(len(calibration) + i, j) for i, r in enumerate(batch) if i not in skip
                for j in [subject_last_index(tokenizer, r.prompt, r.subject)] if j > 0]
    start = len(calibration) + len(prompts)
    kept = [(start + i, m.subject) for i, m in enumerate(memory)]
    prompts += [list(m.ids) for m in memory]
    device = input_device(model)
    last = layout.mlp_out_name(max(hooks.weights))
    first = min(hooks.weights)
    text = pad_batch(list(calibration), tokenizer.pad_token_id, device)
    if stream is not None and (stream.shape[0] != len(calibration) or stream.shape[1] != text[0].shape[1]):
        raise ValueError(f"the calibration stream ({tuple(stream.shape)}) is not that of this calibration text")
    head = calibration_stream(model, tokenizer, layout, prompts, first) if stream is not None and prompts else None
    if not prompts:
        parts, streams = [text], [stream]
    elif not dispatched(model):
        parts, streams = [text, pad_batch(prompts, tokenizer.pad_token_id, device)], [stream, head]
    else:  # accelerate moves weights around each call: one call over both, the prompts padded to the text's width
        parts = [pad_batch(list(calibration) + prompts, tokenizer.pad_token_id, device)]
        streams = [None]
        if stream is not None:
            full = stream.new_zeros((parts[0][0].shape[0], parts[0][0].shape[1], stream.shape[2]))
            full[: stream.shape[0], : stream.shape[1]] = stream
            full[stream.shape[0]:, : head.shape[1]] = head.to(full.device)
            streams = [full]
    rule = _Lockstep(len(parts), lambda z: span_threshold(z, len(calibration), subjects, false_open,
                                                          false_open_max, subject_share, kept))

    def run() -> None:
        replay = replay_layers(model, layout, first - 1, rule.stream) if stream is not None else nullcontext()
        with replay, trace(model, [last], stop_after=last):
            rule.run(model, parts, streams)

    return hooks.calibrate(run, rule)


class _Lockstep:
    """Forward calls (one per part, each in its own thread) that meet at every calibrated layer: each hands
    its scores (B_i, T_i) to the rule, which sees them as one (Σ B_i, max T_i) batch, NaN-padded, in part
    order, and every call then gates with the same α. The calibration's hooks call it (`HookLayers.calibrate`)."""

    def __init__(self, n: int, rule):
        self.rule, self.n = rule, n
        self.local = threading.local()
        self.scores: list[torch.Tensor | None] = [None] * n
        self.alpha: float | None = None
        self.error: BaseException | None = None
        self.barrier = threading.Barrier(n, action=self._decide)

    def stream(self) -> torch.Tensor:
        """The calling part's input to the first edited layer (for `replay_layers`)."""
        return self.local.stream

    def _decide(self) -> None:
        try:
            width = max(z.shape[1] for z in self.scores)
            self.alpha = self.rule(torch.cat([torch.nn.functional.pad(z, (0, width - z.shape[1]), value=math.nan)
                                              for z in self.scores]))
        except BaseException as err:  # handed to every part
            self.error = err
            raise

    def __call__(self, z: torch.Tensor) -> float:
        if self.n == 1:
            return self.rule(z)
        self.scores[self.local.part] = z
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            if self.error is not None:
                raise self.error from None
            raise RuntimeError("another part of the gate's calibration pass failed") from None
        return self.alpha

    def run(self, model, parts, streams) -> None:
        """Run every part's forward call, the first in this thread; the first error is raised."""
        errors: list[BaseException] = []

        def work(i: int) -> None:
            self.local.part, self.local.stream = i, streams[i]
            ids, mask = parts[i]
            try:
                with torch.no_grad():  # grad mode is per thread
                    model(input_ids=ids, attention_mask=mask)
            except StopForward:
                pass
            except BaseException as err:
                errors.append(err)
                self.barrier.abort()  # the other parts stop waiting

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(1, len(parts))]
        for t in threads:
            t.start()
        work(0)
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


@dataclass(frozen=True)
class Remembered:
    """An earlier edit kept in the span gate's memory: its bare prompt's token ids and its subject's last position."""

    ids: tuple[int, ...]
    subject: int


def remember(memory: Sequence[Remembered], batch: Sequence["Request"], tokenizer, seen: int, size: int,
             seed: int) -> list[Remembered]:
    """The gate's memory after `batch`: a uniform sample of at most `size` of every edit so far (reservoir
    sampling over the `seen` edits before this batch), so its cost stays fixed however many edits pile up.

    Each calibration keeps these subjects open as far as ε_max allows. The
    draw depends only on `seed` and `seen`: a saved and reloaded editor, or a
    batch retried after a failure, draws the same. Subjects at their prompt's
    first token are not kept (they cannot open the gate; `calibrate_span`).
    """
    out = list(memory)
    if size <= 0:  # the default: nothing to keep, nothing to tokenise
        return out
    rng = random.Random(f"comeba-gate-memory:{seed}:{seen}")
    for i, r in enumerate(batch):
        j = subject_last_index(tokenizer, r.prompt, r.subject)
        if j <= 0:
            continue
        item = Remembered(tuple(encode_prompt(tokenizer, r.text)), j)
        if len(out) < size:
            out.append(item)
        else:
            slot = rng.randint(0, seen + i)
            if slot < size:
                out[slot] = item
    return out


@torch.no_grad()
def batch_gate_maxima(model, tokenizer, layout: Layout, prompts: Sequence[str],
                      deltas: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Reference gate: per layer, each prompt's largest z-score under ΔW, keys from the model as it runs (no hooks)."""
    device = input_device(model)
    ids, mask = pad_batch([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id, device)
    names = {l: layout.mlp_out_name(l) for l in deltas}
    last = names[max(deltas)]
    with trace(model, list(names.values()), inputs=True, stop_after=last) as rec:
        model(input_ids=ids, attention_mask=mask)
    out = {}
    for l, name in names.items():
        m = hook_addition(rec[name].input, deltas[l].to(device, torch.float32)).norm(dim=-1)
        z = gate_scores(m, mask)
        out[l] = torch.nan_to_num(z, nan=-math.inf).max(dim=1).values
    return out


def adapt_alpha(alpha: float, prompt_maxima: torch.Tensor) -> float:
    """Reference gate: α = min(α, min over prompts of their max z-score); never increases, ignores non-finite scores."""
    finite = prompt_maxima[torch.isfinite(prompt_maxima)]
    if finite.numel() == 0:
        return alpha
    return min(alpha, float(finite.min()))
