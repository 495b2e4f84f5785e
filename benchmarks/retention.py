"""Where reliability goes at scale: the gate, or the written values fading as later batches arrive?

    python benchmarks/retention.py write OUT [--n 1000] [--start 0] [--hparam KEY=VALUE ...]   # ~20 min on 1 CPU thread
    python benchmarks/retention.py diagnose OUT/1000                                 # ~10 min
    python benchmarks/retention.py regate OUT/1000 OUT2 --hparam gate_span_beta=0.1  # then diagnose OUT2
    python benchmarks/retention.py drift OUT/1000                                    # ~2 min
    python benchmarks/retention.py contexts OUT/200 OUT/1000                         # ~1 min
    python benchmarks/retention.py shut OUT/1000                                     # ~3 min

`write` edits counterfact-scale.json records start..start+n−1 (none in the dev file; the
scale protocol scores 0..999, so tune on --start 1000) in
consecutive batches of 20 into one editor (WikiText-2 statistics, span gate,
`v_dtype: bfloat16` for speed unless --hparam says otherwise) and saves the
state after 200, 500 and n edits, each with `z.pt`: every request's target
value Z (the output of the last edited layer at the subject's last token of
the bare prompt that the batch was written to reach), and `keys.pt`: per edited layer every
request's key K and hook output ΔW·K just after its batch was written.

`diagnose STATE` measures, for every record of that state: teacher-forced
reliability / generality / locality (as `comeba eval`'s checkpoints); whether
the gate opens at the subject's last token of the edit prompt at every edited
layer; and the *retention* of its value, 1 − ‖Z − h‖ / ‖Z − h₀‖ with h the
last edited layer's output now and h₀ the unedited model's (1: the value as
written; 0: nothing left). Grouped by the age of the edit (records 0–99 were
the first batches) and by retention. The gate diagnostics on WikiText-2 test
text as in `comeba eval`. Writes STATE/retention.json.

`regate STATE OUT` asks what another gate would do with the same written
edits: it changes only the gate's settings (`gate_span_beta`,
`gate_layer_mean`, `gate_memory`, the ε's), rebuilds the span gates from the
saved C0 and C_accu, and calibrates α once, as the last batch's calibration
would have (its 20 records, and the memory `gate.remember` draws over the
records before them: a state's own, or the one a state written without would
have had). Without changes it repeats the state's α. ΔW is
untouched, so this isolates the gate from the trajectory (a run with the
gate from the start writes later batches under it too). `--bare-extra W` also builds the span gates with
every record's bare-prompt key weighed W more (its key at inference, where reliability reads it).

`drift STATE` asks whether an old edit's hook output moved because later batches wrote over it at
its key (interference) or because the key itself moved (the hooks below the layer answer differently
now). Writes STATE/drift.json.

`contexts EARLY LATE` asks which of an edit's keys the solve protects: between two states of one run,
how much the first edited layer's output moved at the first 100 records' combined key (the one the
solve fits, and the only one C_accu accumulates with `accumulated_keys: combined`) and at their bare prompt's key (the one reliability reads).

`shut STATE` asks which edited subjects the gate shuts, and whether the position of the subject's last
token in the edit prompt explains it (against general text's scores at the same positions). Writes
STATE/shut.json.

`capacity STATE` asks how full each edited layer's key space is: the
eigenvalues of the edited keys' Σ K Kᵀ whitened by C0 (S = C0^-½ Σ K Kᵀ
C0^-½), counted against λ. A direction with s > λ is one where the edits
outweigh general text in the solve; a new key can be written cleanly only
along directions the earlier edits leave free. Writes STATE/capacity.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from comeba.compute import forward_from, key_prefixes, subject_keys, template_weights
from comeba.corpus import text_corpus
from comeba.data import load_counterfact
from comeba.diagnostics import gate_report, general_text_sample, subject_gates, subject_items, text_pass
from comeba.editor import Editor
from comeba.gate import whitened_energy
from comeba.hparams import HParams
from comeba.models import input_device, load_model
from comeba.scoring import Settings, evaluate_requests, locality_reference
import comeba.editor as editor_module

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SCALE = DATA / "counterfact" / "counterfact-scale.json"
STATS = DATA / "wikitext-2" / "valid.txt"
DIAGNOSTICS = DATA / "wikitext-2" / "test.txt"
PRE = ROOT / "benchmarks" / "results" / "scale" / "1000" / "pre.json"  # the unedited model's answers, records 0..999


def write(out: Path, n: int, overrides: dict, threads: int, start: int = 0) -> None:
    torch.set_num_threads(threads)
    targets: list[torch.Tensor] = []
    optimise = editor_module.target_values

    def keep(*args, **kwargs):  # the editor's own target values, kept for `diagnose`
        z = optimise(*args, **kwargs)
        targets.append(z.detach().cpu().clone())
        return z

    editor_module.target_values = keep
    model, tokenizer = load_model("embedded")
    hp = HParams(**{"v_dtype": "bfloat16", **overrides})
    editor = Editor(model, tokenizer, config=hp, corpus=text_corpus([STATS]), progress=False)
    keys: dict[int, list[torch.Tensor]] = {l: [] for l in hp.layers}  # per layer: each batch's K as written
    outputs: dict[int, list[torch.Tensor]] = {l: [] for l in hp.layers}  # and ΔW·K just after its write
    write_layers = editor_module.write_layers

    written: set[int] = set()  # batches whose first round was kept (`write_rounds` > 1 writes a batch again)
    so_far: dict[int, torch.Tensor] = {}  # ΔW as the batch's rounds have left it so far

    def write_and_keep(*args, apply, **kwargs):
        again = editor.n_batches in written
        written.add(editor.n_batches)
        if not again:
            so_far.update({l: editor.layers[l].delta.double() for l in hp.layers})

        def keep_apply(layer: int, delta: torch.Tensor, K: torch.Tensor) -> None:
            so_far[layer] = so_far[layer] + delta.double()
            after = so_far[layer]
            if again:  # the same keys, the output after this round
                outputs[layer][-1] = keys[layer][-1] @ after.T.cpu()
                apply(layer, delta, K)
                return
            k = K.detach().double().cpu()
            n_requests = len(args[3])  # write_layers(model, tokenizer, layout, requests, ...), as Editor.edit calls it
            if len(k) > n_requests:  # `accumulated_keys: contexts`: rows √w_t·k_t, combined as Σ_t √w_t·row
                k = k.view(n_requests, -1, k.shape[-1])
                k = (k * template_weights(k.shape[1]).sqrt()[None, :, None]).sum(1)
            keys[layer].append(k)
            outputs[layer].append((k @ after.T.cpu()))
            apply(layer, delta, K)
        return write_layers(*args, apply=keep_apply, **kwargs)

    editor_module.write_layers = write_and_keep
    requests = load_counterfact(SCALE, start, n).requests
    if len(requests) < n:
        raise SystemExit(f"{SCALE} has {len(requests)} records from {start}, not {n}")
    began = time.time()
    log = []
    for i in range(0, n, 20):
        info = editor.edit(requests[i : i + 20])
        done = i + 20
        log.append({"edits": done, "seconds": round(time.time() - began, 1),
                    "alpha": {l: round(a, 4) for l, a in info["alpha"].items()}})
        print(json.dumps(log[-1]), flush=True)
        if done in (200, 500, n):
            folder = out / str(done)
            editor.save_pretrained(folder)
            torch.save(torch.cat(targets), folder / "z.pt")
            torch.save({l: (torch.cat(keys[l]), torch.cat(outputs[l])) for l in hp.layers}, folder / "keys.pt")
            (folder / "written.json").write_text(json.dumps({"hparams": overrides, "threads": threads, "start": start,
                                                             "batches": log}, indent=1))


def _first_record(state: Path) -> int:
    """The first counterfact-scale record a `write` state edited (0 for states written before --start)."""
    written = state / "written.json"
    return json.loads(written.read_text()).get("start", 0) if written.exists() else 0


GATE_KEYS = ("gate_span_beta", "gate_layer_mean", "gate_memory", "gate_false_open", "gate_false_open_max",
             "gate_subject_share")


def regate(state: Path, out: Path, overrides: dict, threads: int, bare_extra: float = 0.0) -> dict:
    """`bare_extra` w > 0: the span gates are built from C_accu + w·Σ k kᵀ over every record's bare-prompt key
    as the hooks now give it (C_accu itself, and so ΔW and the solve, untouched): would the gate open on the
    edit prompts if it weighed the key they are read at more?"""
    import shutil

    from comeba.gate import calibrate_span, calibration_stream, remember, span_gate
    from comeba.hooks import HookLayers

    bad = sorted(set(overrides) - set(GATE_KEYS))
    if bad:
        raise SystemExit(f"regate changes only the gate's settings ({', '.join(GATE_KEYS)}), not {', '.join(bad)}")
    torch.set_num_threads(threads)
    model, tokenizer = load_model("embedded")
    editor = Editor.from_pretrained(model, tokenizer, state, progress=False)
    hp = editor.hparams.replace(**overrides)
    n = editor.n_edits
    requests = load_counterfact(SCALE, _first_record(state), n).requests
    editor.memory = []
    for i in range(0, n - 20, 20):  # the memory the last batch's calibration had (or would have had)
        editor.memory = remember(editor.memory, requests[i : i + 20], tokenizer, i, hp.gate_memory, hp.seed)
    editor.hparams = hp
    bare = {}
    if bare_extra:
        with torch.no_grad(), editor.applied():
            bare = {l: torch.cat([subject_keys(model, tokenizer, editor.layout, l, requests[i:i + 100], ["{}"])
                                  .double().cpu() for i in range(0, n, 100)]) for l in editor.layers}
    for l, st in editor.layers.items():
        c = st.c_accu if l not in bare else st.c_accu.double() + bare_extra * bare[l].T @ bare[l].to(st.c_accu.device)
        st.span = span_gate(st.c0, c, hp.mom2_update_weight, hp.gate_span_beta)
    with torch.no_grad(), HookLayers(model, editor.layout, editor.layers, layer_mean=hp.gate_layer_mean) as hooks:
        stream = calibration_stream(model, tokenizer, editor.layout, editor.calibration, hp.layers[0])
        alphas = calibrate_span(hooks, model, tokenizer, editor.layout, editor.calibration, requests[n - 20:],
                                hp.gate_false_open, hp.gate_false_open_max, hp.gate_subject_share, stream=stream,
                                memory=editor.memory)
    for l, a in alphas.items():
        editor.layers[l].alpha = a
    editor.save_pretrained(out)
    shutil.copy(state / "z.pt", out / "z.pt")
    if (state / "written.json").exists():  # which records these are
        shutil.copy(state / "written.json", out / "written.json")
    info = {"from": str(state), "changed": overrides, "alpha_before": json.loads((state / "adapter_config.json")
            .read_text())["modules"], "alpha": alphas, "memory": len(editor.memory), "bare_extra": bare_extra}
    (out / "regate.json").write_text(json.dumps(info, indent=1))
    return info


def _last_layer_output(model, tokenizer, editor: Editor, requests) -> torch.Tensor:
    batch = key_prefixes(tokenizer, requests, ["{}"], input_device(model))
    name = editor.layout.layer_name(editor.hparams.layers[-1])
    return forward_from(model, editor.layout, batch, 0, None, name, inputs=False)[:, -1].double()


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 1) if values else None


def diagnose(state: Path, threads: int) -> dict:
    model, tokenizer, editor, requests = _open(state, threads)
    n = editor.n_edits
    start = _first_record(state)
    reference = (json.loads(PRE.read_text())["reference"][:n] if PRE.exists() and start == 0 and n <= 1000
                 else locality_reference(model, tokenizer, requests))
    z = torch.load(state / "z.pt").double()
    h0 = _last_layer_output(model, tokenizer, editor, requests)
    sample = general_text_sample(tokenizer, DIAGNOSTICS)
    ppl0 = float(text_pass(model, tokenizer, sample, None)["perplexity"])
    with editor.applied():
        report = gate_report(model, tokenizer, sample, editor.hooks, requests, ppl0)
        opened = subject_gates(model, tokenizer, editor.hooks, subject_items(tokenizer, requests)[0])
        gates = torch.stack([opened[l] for l in sorted(opened)], 1)  # (records, layers)
        records = evaluate_requests(model, tokenizer, requests, reference,
                                    Settings(counterfact=True, generation=False, fluency_tokens=0), full=False)
        h = _last_layer_output(model, tokenizer, editor, requests)
    retention = 1 - (z - h).norm(dim=1) / (z - h0).norm(dim=1)
    open_all = gates.all(1)
    reliability = torch.tensor([r["reliability"] for r in records], dtype=torch.float64)
    out = {"state": str(state), "edits": n, "first_record": start, "alpha": {l: s.alpha for l, s in editor.layers.items()},
           "metrics": {k: _mean(r[k] for r in records) for k in ("reliability", "generality", "locality")},
           "gate_report": report,
           "subjects_open_at_every_layer": round(100 * float(open_all.double().mean()), 1),
           "reliability_where_open": _mean(reliability[open_all].tolist()),
           "reliability_where_some_layer_shut": _mean(reliability[~open_all].tolist()),
           "retention_median_where_open": round(float(retention[open_all].median()), 3),
           "by_age": [], "by_retention": []}
    for lo in range(0, n, 100):
        sl = slice(lo, min(n, lo + 100))
        o = open_all[sl]
        out["by_age"].append({"records": f"{start + lo}-{start + sl.stop - 1}",
                              **{k: _mean(r[k] for r in records[sl]) for k in ("reliability", "generality", "locality")},
                              "open_at_every_layer": round(100 * float(o.double().mean()), 1),
                              "reliability_where_open": _mean(reliability[sl][o].tolist()),
                              "retention_median_where_open": round(float(retention[sl][o].median()), 3)})
    for lo, hi in ((-1e9, 0.5), (0.5, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.01)):
        m = (retention >= lo) & (retention < hi)
        out["by_retention"].append({"retention": f"[{lo:g}, {hi:g})" if lo > -1e8 else f"below {hi:g}", "records": int(m.sum()),
                                    "reliability": _mean(reliability[m].tolist())})
    (state / "retention.json").write_text(json.dumps(out, indent=1))
    return out


def _open(state: Path, threads: int, what: str | None = None):
    """The embedded model with STATE's editor and the counterfact-scale records it edited; `what` names a
    command that needs the span gate's state."""
    torch.set_num_threads(threads)
    model, tokenizer = load_model("embedded")
    editor = Editor.from_pretrained(model, tokenizer, state, progress=False)
    if what is not None:
        _need_span(state, editor, what)
    return model, tokenizer, editor, load_counterfact(SCALE, _first_record(state), editor.n_edits).requests


def _need_span(state: Path, editor: Editor, what: str) -> None:
    if any(s.span is None for s in editor.layers.values()):
        raise SystemExit(f"{state}: {what} needs a span-gate state (C0 and the gate's whitening)")


def _whitened_move(old: torch.Tensor, new: torch.Tensor, whiten: torch.Tensor) -> torch.Tensor:
    """‖P(new − old)‖ / ‖P old‖ per row, P = L⁻¹ the span gate's whitening (λC0 = L Lᵀ)."""
    p = whiten.double().cpu()
    return ((new - old) @ p.T).norm(dim=1) / (old @ p.T).norm(dim=1)


def drift(state: Path, threads: int) -> dict:
    """Does an old edit's value fade because later batches overwrite it at its key (interference), or because
    its key itself has moved (the edited layers below it answer differently now)?

    Per edited layer and record, from `keys.pt` (K and ΔW·K as written) and the state's ΔW now, all relative
    to ‖ΔW·k‖ as written: *interference* ‖ΔW_now k_w − o_w‖, *drift* ‖ΔW_now (k_now − k_w)‖ and *total*
    ‖ΔW_now k_now − o_w‖, with k_now the key under the hooks as at inference; and the key's own move
    ‖L⁻¹(k_now − k_w)‖ / ‖L⁻¹ k_w‖ in C0's whitening (λC0 = L Lᵀ). Medians by age.
    """
    model, tokenizer, editor, requests = _open(state, threads, "drift")
    n = editor.n_edits
    written = torch.load(state / "keys.pt")
    out = {"state": str(state), "edits": n, "layers": {}}
    with torch.no_grad(), editor.applied():
        now = {l: torch.cat([subject_keys(model, tokenizer, editor.layout, l, requests[i:i + 100], editor.templates)
                             .double().cpu() for i in range(0, n, 100)]) for l in editor.layers}
    for l, s in editor.layers.items():
        k_w, o_w = written[l]
        w = s.delta.double().cpu()
        scale = o_w.norm(dim=1)
        rel = {"interference": (k_w @ w.T - o_w).norm(dim=1) / scale,
               "drift": ((now[l] - k_w) @ w.T).norm(dim=1) / scale,
               "total": (now[l] @ w.T - o_w).norm(dim=1) / scale}
        rel["key_move"] = _whitened_move(k_w, now[l], s.span.whiten)
        out["layers"][l] = [{"records": f"{lo}-{min(n, lo + 100) - 1}",
                             **{k: round(float(v[lo:lo + 100].median()), 3) for k, v in rel.items()}}
                            for lo in range(0, n, 100)]
        out["layers"][l].append({"records": "all", **{k: round(float(v.median()), 3) for k, v in rel.items()}})
    (state / "drift.json").write_text(json.dumps(out, indent=1))
    return out


def contexts(early: Path, late: Path, threads: int, n: int = 100) -> dict:
    """Which key does the solve protect? Between two states of one `write` run, how much the first edited layer's
    output moved for the first n records at their combined key (the one the solve fits by default) and at
    the bare prompt's key (the one reliability reads); that layer's keys do not move, so this is overwriting
    alone. Then the bare prompt's key move at the layers above (whitened, as `drift`)."""
    torch.set_num_threads(threads)
    model, tokenizer = load_model("embedded")
    a = Editor.from_pretrained(model, tokenizer, early, progress=False)
    b = Editor.from_pretrained(model, tokenizer, late, progress=False)
    _need_span(late, b, "contexts")
    requests = load_counterfact(SCALE, _first_record(late), n).requests
    first = a.hparams.layers[0]
    out = {"early": str(early), "late": str(late), "records": n, "first_layer_output_moved": {}, "bare_key_moved": {}}
    with torch.no_grad():
        wa, wb = a.layers[first].delta.double().cpu(), b.layers[first].delta.double().cpu()
        for name, templates in (("combined", a.templates), ("bare", ["{}"])):
            k = subject_keys(model, tokenizer, a.layout, first, requests, templates).double().cpu()
            moved = (k @ (wb - wa).T).norm(dim=1) / (k @ wa.T).norm(dim=1)
            out["first_layer_output_moved"][name] = round(float(moved.median()), 3)
        for l in a.hparams.layers[1:]:
            with a.applied():
                ka = subject_keys(model, tokenizer, a.layout, l, requests, ["{}"]).double().cpu()
            with b.applied():
                kb = subject_keys(model, tokenizer, b.layout, l, requests, ["{}"]).double().cpu()
            out["bare_key_moved"][l] = round(float(_whitened_move(ka, kb, b.layers[l].span.whiten).median()), 3)
    (late / f"contexts-since-{a.n_edits}.json").write_text(json.dumps(out, indent=1))
    return out


POSITIONS = ((0, 1), (1, 2), (2, 3), (3, 4), (4, 8), (8, 10**9))  # buckets of the token position


def shut(state: Path, threads: int) -> dict:
    """Which edited subjects does the gate shut, and is it the position of the subject's last token? Per record:
    that position in the edit prompt and the score the gate compares with α there at every edited layer (the
    layer mean, with `gate_layer_mean`); per position bucket, the
    records, those shut at some layer, their median score and their bare key's whitened energy kᵀ(λC0)⁻¹k at
    the first edited layer, against the scores of WikiText-2 test text (the diagnostics sample) at the same
    positions; and (from `keys.pt`) the *written share* ‖ΔW k‖ / ‖ΔW k_fit‖ there: how much of what ΔW
    writes at the key its batch fitted it writes at the bare prompt's key, where the gate would let it act.
    Writes STATE/shut.json."""
    from comeba.models import input_device
    from comeba.text import encode_prompt, pad_batch

    model, tokenizer, editor, requests = _open(state, threads, "shut")
    n = editor.n_edits
    items = subject_items(tokenizer, requests)[0]
    alpha = {l: s.alpha for l, s in editor.layers.items()}
    device = input_device(model)

    def scores(seqs) -> dict[int, torch.Tensor]:  # per layer, (sequences, tokens), NaN at padding
        out: dict[int, list[torch.Tensor]] = {}
        for i in range(0, len(seqs), 16):
            ids, mask = pad_batch(seqs[i : i + 16], tokenizer.pad_token_id, device)
            model(input_ids=ids, attention_mask=mask)
            for l, rec in editor.hooks.records.items():
                out.setdefault(l, []).append(rec.scores.float().cpu())
        width = max(len(s) for s in seqs)
        return {l: torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=float("nan")) for t in v])
                for l, v in out.items()}

    with torch.no_grad(), editor.applied():
        editor.hooks.record(True)
        try:
            edit = scores([encode_prompt(tokenizer, t) for t, _ in items])
            text = scores(list(general_text_sample(tokenizer, DIAGNOSTICS, n_sequences=400).ids))
        finally:
            editor.hooks.record(False)
    pos = torch.tensor([j for _, j in items])
    at = {l: v[torch.arange(n), pos] for l, v in edit.items()}
    is_shut = torch.stack([at[l] < alpha[l] for l in sorted(at)], 1).any(1)
    first = min(at)
    # kᵀ(λC0)⁻¹k of each bare key at the first edited layer (no hook below it): d_in / λ on average for general text
    with torch.no_grad():
        k = torch.cat([subject_keys(model, tokenizer, editor.layout, first, requests[i:i + 100], ["{}"]).float().cpu()
                       for i in range(0, n, 100)])
    energy = whitened_energy(k, editor.layers[first].span).cpu()
    # what ΔW now writes at that key, against what it writes at the key the batch fitted (keys.pt, as written)
    w = editor.layers[first].delta.double().cpu()
    fitted = torch.load(state / "keys.pt")[first][0] if (state / "keys.pt").exists() else None
    written = None if fitted is None else (k.double() @ w.T).norm(dim=1) / (fitted @ w.T).norm(dim=1)
    out = {"state": str(state), "edits": n, "alpha": alpha,
           "general_text_mean_whitened_energy": round(k.shape[1] / editor.hparams.mom2_update_weight, 3), "shut": int(is_shut.sum()), "by_position": [], "records": []}
    for lo, hi in POSITIONS:
        m = (pos >= lo) & (pos < hi)
        general = text[first][:, lo:hi].flatten()
        general = general[torch.isfinite(general)]
        out["by_position"].append({
            "position": f"{lo}" if hi == lo + 1 else f"{lo}+" if hi > 10**8 else f"{lo}-{hi - 1}",
            "records": int(m.sum()), "shut": int((m & is_shut).sum()),
            f"median_score_layer_{first}": round(float(at[first][m].median()), 3) if m.any() else None,
            f"median_whitened_energy_layer_{first}": round(float(energy[m].median()), 3) if m.any() else None,
            f"median_written_share_layer_{first}": (round(float(written[m].median()), 3)
                                                    if m.any() and written is not None else None),
            f"general_text_median_layer_{first}": round(float(general.median()), 3),
            f"general_text_q99_layer_{first}": round(float(torch.quantile(general, 0.99)), 3)})
    for i in is_shut.nonzero().flatten().tolist():
        out["records"].append({"record": _first_record(state) + i, "subject": requests[i].subject, "prompt": items[i][0],
                               "position": int(pos[i]), "score": {l: round(float(at[l][i]), 3) for l in sorted(at)},
                               f"whitened_energy_layer_{first}": round(float(energy[i]), 3),
                               f"written_share_layer_{first}": None if written is None else round(float(written[i]), 3)})
    if written is not None:
        out[f"median_written_share_layer_{first}"] = {"shut": round(float(written[is_shut].median()), 3),
                                                      "open": round(float(written[~is_shut].median()), 3)}
    (state / "shut.json").write_text(json.dumps(out, indent=1))
    return out


def capacity(state: Path) -> dict:
    model, tokenizer = load_model("embedded")
    editor = Editor.from_pretrained(model, tokenizer, state, progress=False)
    _need_span(state, editor, "capacity")
    lam = editor.hparams.mom2_update_weight
    out = {"state": str(state), "edits": editor.n_edits, "lambda": lam, "layers": {}}
    for l, s in editor.layers.items():
        # the gate's own whitening P = L⁻¹ (λC0 = L Lᵀ): S_w = P Σ K Kᵀ Pᵀ has the eigenvalues of
        # C0^-½ Σ K Kᵀ C0^-½ / λ, so an eigenvalue above 1 is a direction where the edits outweigh λC0
        p = s.span.whiten.double()
        eig = torch.linalg.eigvalsh(p @ (s.c_accu.double() - lam * s.c0.double()) @ p.T).flip(0)
        out["layers"][l] = {"d_in": eig.numel(),
                            "mean_whitened_key_energy": round(lam * float(eig.sum()) / max(editor.n_edits, 1), 1),
                            **{f"directions_above_{f:g}_lambda": int((eig > f).sum()) for f in (0.1, 1, 10)}}
    (state / "capacity.json").write_text(json.dumps(out, indent=1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("out")
    w.add_argument("--n", type=int, default=1000)
    w.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE", help="YAML value, e.g. "
                   "mom2_update_weight=100")
    w.add_argument("--threads", type=int, default=1)
    w.add_argument("--start", type=int, default=0, help="first record (default 0; tune on records the "
                   "scale protocol does not score, e.g. 1000)")
    g = sub.add_parser("regate")
    g.add_argument("state")
    g.add_argument("out")
    g.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--bare-extra", type=float, default=0.0, metavar="W", help="build the span gates with every "
                   "record's bare-prompt key weighed W more (C_accu and ΔW unchanged)")
    g.add_argument("--threads", type=int, default=1)
    d = sub.add_parser("diagnose")
    d.add_argument("state")
    d.add_argument("--threads", type=int, default=1)
    r = sub.add_parser("drift")
    r.add_argument("state")
    r.add_argument("--threads", type=int, default=1)
    x = sub.add_parser("contexts")
    x.add_argument("early")
    x.add_argument("late")
    x.add_argument("--threads", type=int, default=1)
    c = sub.add_parser("capacity")
    c.add_argument("state")
    h = sub.add_parser("shut")
    h.add_argument("state")
    h.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.command == "write":
        import yaml
        if args.n % 20 or args.n < 20:
            p.error("--n must be a positive multiple of 20 (the batch size)")
        overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.hparam)}
        write(Path(args.out), args.n, overrides, args.threads, args.start)
    elif args.command == "regate":
        import yaml
        overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.hparam)}
        print(json.dumps(regate(Path(args.state), Path(args.out), overrides, args.threads, args.bare_extra),
                         indent=1))
    elif args.command == "drift":
        print(json.dumps(drift(Path(args.state), args.threads)["layers"], indent=1))
    elif args.command == "contexts":
        print(json.dumps(contexts(Path(args.early), Path(args.late), args.threads), indent=1))
    elif args.command == "capacity":
        print(json.dumps(capacity(Path(args.state)), indent=1))
    elif args.command == "shut":
        out = shut(Path(args.state), args.threads)
        print(json.dumps({k: v for k, v in out.items() if k != "records"}, indent=1))
    else:
        out = diagnose(Path(args.state), args.threads)
        print(json.dumps({k: v for k, v in out.items() if k != "gate_report"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
