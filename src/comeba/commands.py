"""What the `comeba` commands do: edit, generate, stats, eval and plan (comeba.cli parses and dispatches here).

Each command takes the parsed arguments, prints its results on stdout and its
progress on stderr (not with --quiet), and raises comeba.inputs.InputError
(or the library's own errors) for what the user got wrong. Everything that
can be checked without the model is checked before the model is loaded.
torch is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .inputs import (InputError, base_model_of, check_stats_text, read_dataset, read_hparams, read_requests,
                     resolve_corpus, state_kind)
from .reporting import build_table, edit_summary, flat, format_summary, format_table, format_times
from .requests import consecutive_batches

NO_TEXT_NOTE = "  (no real text given: pass --stats-text FILE.txt for better statistics)"


def _say(args: argparse.Namespace, *parts: Any) -> None:
    """Progress chatter (suppressed by --quiet); results are printed regardless."""
    if not getattr(args, "quiet", False):
        print(*parts, file=sys.stderr, flush=True)


def _placement(model) -> str:
    """'cpu, float32': where a loaded model runs and in what dtype (statistics and states depend on both);
    with --device-map, where its modules are."""
    from .models import describe_device_map

    param = next(model.parameters())
    where = describe_device_map(model) if getattr(model, "hf_device_map", None) else str(param.device)
    return f"{where}, {str(param.dtype).replace('torch.', '')}"


def load_model_for(name: str, args: argparse.Namespace):
    from .models import load_model

    _say(args, f"model: {name}")
    start = time.perf_counter()
    device_map = getattr(args, "device_map", None)
    if device_map is not None and args.device not in (None, "auto"):
        raise InputError("give either --device or --device-map, not both")
    model, tokenizer = load_model(name, dtype=args.dtype, device=None if device_map is not None else args.device,
                                  device_map=device_map)
    _say(args, f"  loaded in {time.perf_counter() - start:.1f} s ({_placement(model)})")
    return model, tokenizer


# ----------------------------------------------------------------------------- edit


def _edit_inputs(args: argparse.Namespace) -> tuple[list, str, Any]:
    """(requests, state kind, hparams of a new state or None): everything checked before the model loads."""
    from .adapter import read_config

    requests = read_requests(args.edits)
    kind = state_kind(args.state)
    if kind == "existing":
        read_config(args.state)  # a broken or foreign-format state fails here, before loading a model
        if args.hparams:
            raise InputError(
                f"--hparams cannot be given when resuming the state in {args.state!r}: "
                "its hyperparameters are fixed by the state (start a new state to change them)"
            )
        hp = None
    else:
        hp = read_hparams(args.hparams, mom2_n_tokens=args.stats_tokens, gate=args.gate)
    if kind == "existing" and args.gate:
        raise InputError(f"--gate cannot be given when resuming the state in {args.state!r}: "
                         "its gate is fixed by the state")
    check_stats_text(args.stats_text)
    return requests, kind, hp


def _open_editor(args: argparse.Namespace, kind: str, hp, model, tokenizer):
    """The state of --state when it holds one, else a new editor (statistics computed or found in the cache)."""
    from .editor import Editor
    from .stats import stats_dir

    progress = not args.quiet
    if kind == "existing":
        editor = Editor.from_pretrained(model, tokenizer, args.state, progress=progress)
        print(f"resuming the state in {args.state}: {editor.n_edits} edits in {editor.n_batches} batches so far")
        prov = editor.stats_provenance or {}
        print(f"statistics corpus: {prov.get('corpus', 'unknown')} (from the saved state)")
        if args.stats_text or args.stats_tokens:
            print("  note: --stats-text/--stats-tokens are ignored when resuming: the state already holds its statistics")
        return editor
    corpus = resolve_corpus(args.stats_text, hp)
    note = "" if corpus.kind != "samples" else NO_TEXT_NOTE
    print(f"statistics corpus: {corpus.describe}, {hp.mom2_n_tokens} tokens{note}")
    editor = Editor(model, tokenizer, hp, corpus=corpus, progress=progress)
    n_tok = {m.get("n_tokens") for m in (editor.stats_provenance.get("layers") or {}).values()}
    print(f"  key statistics for layers {list(editor.hparams.layers)}: "
          f"{', '.join(str(n) for n in sorted(n_tok, key=str))} tokens, "
          f"cached in {stats_dir(editor.model_fingerprint, corpus)}")
    return editor


def cmd_edit(args: argparse.Namespace) -> int:
    from .editor import greedy_generate

    # 1. Everything that can be checked without the model, before anything else.
    requests, kind, hp = _edit_inputs(args)

    # 2. Model and editor.
    model_name = args.model or (base_model_of(args.state) if kind == "existing" else "embedded")
    _memory_plan_line(args, model_name, hp, len(requests), resume=args.state if kind == "existing" else None)
    model, tokenizer = load_model_for(model_name, args)
    editor = _open_editor(args, kind, hp, model, tokenizer)
    hp = editor.hparams
    size = args.batch_size or hp.batch_size
    n_batches = len(consecutive_batches(requests, size))

    # 3. Greedy answers before editing (the model as edited so far when resuming).
    table = build_table(requests)
    _say(args, f"greedy answers before editing ({len(table.rows)} prompts)...")
    if editor.n_edits == 0:
        before = greedy_generate(model, tokenizer, table.prompts(), args.max_new_tokens)
    else:
        before = editor.generate(table.prompts(), args.max_new_tokens)
    for row, text in zip(table.rows, before):
        row.before = text

    # 4. Write the batches; the state on disk changes only after all of them succeeded.
    for warning in editor.edit_warnings(requests):
        print(f"comeba: warning: {warning}", file=sys.stderr)
    _say(args, f"writing {len(requests)} edits in {n_batches} consecutive batch(es) of up to {size} "
               f"(layers {list(hp.layers)}, λ {hp.mom2_update_weight:g})...")
    start = time.perf_counter()
    infos = editor.edit_batches(requests, batch_size=size)
    seconds = time.perf_counter() - start
    alphas = infos[-1]["alpha"] if infos else {}
    print(f"wrote {len(requests)} edits in {len(infos)} batch(es) in {seconds:.1f} s "
          f"({seconds / len(requests):.1f} s per edit); gate α: "
          + ", ".join(f"L{l} {a:.2f}" for l, a in alphas.items()))
    if args.state:
        editor.save_pretrained(args.state)
        args.saved_to = args.state
        print(f"saved the state to {args.state} ({editor.n_edits} edits in {editor.n_batches} batches)")
    else:
        print("no --state given: the edits are not saved")

    # 5. Greedy answers after editing.
    _say(args, f"greedy answers after editing ({len(table.rows)} prompts)...")
    after = editor.generate(table.prompts(), args.max_new_tokens)
    for row, text in zip(table.rows, after):
        row.after = text
    print()
    print(format_table(table, requests))
    print()
    print(edit_summary(table))
    if args.state:
        ask = requests[0].text if requests else "Your question"
        print(f"\nthe edited state is in {args.state}; ask the edited model with:\n"
              f"  comeba generate --state {shlex.quote(str(args.state))} {shlex.quote(ask)}")
    return 0


# ----------------------------------------------------------------------------- generate


def cmd_generate(args: argparse.Namespace) -> int:
    from .adapter import read_config
    from .editor import Editor, greedy_generate

    if args.state is not None:
        read_config(args.state)
        name = args.model or base_model_of(args.state)
    else:
        name = args.model or "embedded"
    model, tokenizer = load_model_for(name, args)
    if args.state is not None:
        editor = Editor.from_pretrained(model, tokenizer, args.state, progress=False)
        _say(args, f"state: {args.state} ({editor.n_edits} edits in {editor.n_batches} batches)")
        outputs = editor.generate(args.prompts, args.max_new_tokens)
    else:
        _say(args, "no --state: the unedited model")
        outputs = greedy_generate(model, tokenizer, args.prompts, args.max_new_tokens)
    for prompt, text in zip(args.prompts, outputs):
        print(f"{prompt} →{flat(text)}")
    return 0


# ----------------------------------------------------------------------------- stats


def cmd_stats(args: argparse.Namespace) -> int:
    """Under torchrun (WORLD_SIZE > 1) the processes join one group and share the work; rank 0 prints."""
    layers = sorted(set(args.layers)) if args.layers else None
    hp = read_hparams(args.hparams, mom2_n_tokens=args.stats_tokens, layers=layers)
    check_stats_text(args.stats_text)
    return _in_group(args, lambda: _stats(args, hp))


def _in_group(args: argparse.Namespace, body: Callable[[], int]) -> int:
    """`body()` in the process group torchrun describes (joined here and left after), or alone without one.

    Rank 0 speaks for all: the other ranks run quietly, their standard output discarded."""
    import contextlib
    import os

    from .distributed import dist_context, init_distributed_from_env, is_lead, leave_group

    joined = init_distributed_from_env(args.device)
    finished = False
    try:
        if dist_context() is not None:
            _prepare_model_in_turn(args.model or "embedded")
        if is_lead():
            code = body()
        else:
            args.quiet = True
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                code = body()
        finished = True
        return code
    finally:
        if joined:
            leave_group(finished)


def _prepare_model_in_turn(name: str) -> None:
    """Build the embedded model's folder (a one-off) in one process before the others load it: first rank 0,
    then the first process of each node (whose file system may be its own), then everyone."""
    import os

    import torch.distributed as dist

    from .embedded import resolve_model_path

    if dist.get_rank() == 0:
        resolve_model_path(name)
    dist.barrier()
    if dist.get_rank() != 0 and int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
        resolve_model_path(name)
    dist.barrier()


def _stats(args: argparse.Namespace, hp) -> int:
    from .models import detect_layout, fingerprint, num_layers
    from .stats import load_or_compute_stats, stats_dir
    from .distributed import dist_context

    ctx = dist_context()
    model, tokenizer = load_model_for(args.model, args)
    layout = detect_layout(model)
    hp.check_model(num_layers(model, layout))
    corpus = resolve_corpus(args.stats_text, hp)
    fp = fingerprint(model)
    folder = stats_dir(fp, corpus)
    print(f"statistics corpus: {corpus.describe}")
    print(f"model: {args.model} (fingerprint {fp}, {layout.name} layout, {_placement(model)})")
    print(f"layers {list(hp.layers)}, {hp.mom2_n_tokens} tokens requested, {hp.mom2_dtype}")
    if ctx is not None:
        import torch.distributed as dist

        print(f"{ctx[1]} processes ({dist.get_backend()}): each computes its share of the batches, rank 0 writes the cache")
    _, provenance = load_or_compute_stats(model, tokenizer, layout, hp.layers, corpus, hp.mom2_n_tokens,
                                          hp.mom2_dtype, model_fp=fp, progress=not args.quiet)
    print(f"cache folder: {folder}")
    for l in hp.layers:
        meta = provenance["layers"][str(l)]
        how = "cached" if meta.get("cached") else "computed now"
        procs = f" on {meta['world_size']} processes" if meta.get("world_size", 1) > 1 else ""
        print(f"  layer {l} ({meta.get('module')}): {Path(meta['file']).name}, {meta.get('n_tokens')} tokens, "
              f"{how} (created {meta.get('created')}, took {meta.get('seconds')} s{procs})")
    return 0


# ----------------------------------------------------------------------------- eval


def _eval_inputs(args: argparse.Namespace) -> tuple[str, Any, Any]:
    """(data kind, loaded records, hparams): everything checked before the model loads."""
    kind, loaded = read_dataset(args.data, offset=args.offset, n=args.n)
    if loaded.skipped:
        print(f"{args.data}: skipped {len(loaded.skipped)} record(s) that cannot be edited "
              f"(first: record {loaded.skipped[0][0]}: {loaded.skipped[0][1]})")
    hp = read_hparams(args.hparams, mom2_n_tokens=args.stats_tokens, gate=args.gate)
    check_stats_text(args.stats_text)
    if args.diagnostics_text and not Path(args.diagnostics_text).is_file():
        raise InputError(f"diagnostics text {args.diagnostics_text!r} does not exist")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {args.out!r} is a file, not a folder")
    return kind, loaded, hp


def _solver(method: str, hp) -> str:
    """How a method solves for Δ, in a few words."""
    if method == "alphaedit":
        rule = (f"null space: eigenvalues < {hp.nullspace_threshold:g}" if hp.nullspace_threshold is not None
                else f"null space: {hp.nullspace_energy:g} of the key energy")
        return f"{rule}, L2 {hp.L2:g}"
    return f"λ {hp.mom2_update_weight:g}"


def cmd_eval(args: argparse.Namespace) -> int:
    """Under torchrun (WORLD_SIZE > 1) every process makes the same edits and evaluates its share of the
    records; rank 0 prints and writes the run folder."""
    # 1. Everything that can be checked without the model.
    kind, loaded, hp = _eval_inputs(args)
    args.resume_hint = (f"run the same command again to resume {args.out} from its last checkpoint")
    return _in_group(args, lambda: _eval(args, kind, loaded, hp))


def _eval(args: argparse.Namespace, kind: str, loaded, hp) -> int:
    from .evaluate import Settings, evaluate

    # 2. Model, statistics, the run.
    out = Path(args.out)
    model_name = args.model or "embedded"
    if args.method == "comeba":
        _memory_plan_line(args, model_name, hp, len(loaded.requests))
    model, tokenizer = load_model_for(model_name, args)
    corpus = resolve_corpus(args.stats_text, hp)
    note = "" if corpus.kind != "samples" else NO_TEXT_NOTE
    print(f"statistics corpus: {corpus.describe}, {hp.mom2_n_tokens} tokens{note}")
    settings = Settings(counterfact=(kind == "counterfact"), generation=not args.no_generation,
                        fluency_tokens=args.fluency_tokens,
                        diagnostics_text=str(Path(args.diagnostics_text).resolve()) if args.diagnostics_text else None)
    size = args.batch_size or hp.batch_size
    n = len(loaded.requests)
    print(f"{args.method}, {args.protocol} protocol: {n} edits from {args.data} (offset {args.offset}) "
          f"in {len(consecutive_batches(loaded.requests, size))} batch(es) of up to {size}; layers {list(hp.layers)}, {_solver(args.method, hp)}")
    meta = {"data": args.data, "data_kind": kind, "offset": args.offset, "n_requested": args.n,
            "skipped": [list(s) for s in loaded.skipped], "model": model_name}
    summary = evaluate(model, tokenizer, loaded.requests, method=args.method, protocol=args.protocol, hparams=hp,
                       corpus=corpus, batch_size=size, checkpoint_every=args.checkpoint_every, settings=settings,
                       out=out, overwrite=args.overwrite, progress=not args.quiet, meta=meta,
                       pre_cache=args.pre_cache)
    if summary.get("already_complete"):
        print(f"{args.out} already holds this completed run (pass --overwrite to run it again)")
    print()
    print(format_summary(summary))
    print()
    print(format_times(summary))
    if not summary.get("already_complete"):
        print(f"wrote {out / 'summary.json'}, records.jsonl, checkpoints.csv, metrics.png")
    return 0


# ----------------------------------------------------------------------------- plan


def cmd_plan(args: argparse.Namespace) -> int:
    """The memory plan as a table; with --memory, exit status 1 when it does not fit."""
    from .plan import ModelShape, PlanError, load_config, memory_plan
    from .reporting import format_plan

    hp = read_hparams(args.hparams, layers=sorted(set(args.layers)) if args.layers else None, gate=args.gate)
    label = args.model or (Path(args.config).name if args.config else "embedded")
    shape = ModelShape.from_config(load_config(args.model, args.config), args.dtype, name=label)
    memory = None if args.memory is None else int(args.memory * 2**30)
    plan = memory_plan(shape, hp, args.batch_size, args.dtype or shape.dtype, memory)
    print(format_plan(plan))
    try:
        if memory is not None:
            plan.check(memory)
    except PlanError:
        return 1
    return 0


def _memory_plan_line(args: argparse.Namespace, name: str, hp, n_edits: int, resume: str | None = None) -> None:
    """Print the plan's one-line summary before the model loads; refuse (PlanError) when a CUDA device has less
    free memory than the plan's peak, warn when the CPU has less available. A plan that cannot be made is
    skipped: loading the model then reports what is wrong. A resumed state only needs the batch's peak."""
    from .models import resolve_device
    from .plan import available_ram, human, load_config, memory_plan

    phases = ["batch"] if resume else None
    try:
        if resume:
            from .adapter import read_config
            from .hparams import HParams

            hp = HParams.from_dict(read_config(resume)["hparams"])
        size = min(args.batch_size or hp.batch_size, max(1, n_edits))
        plan = memory_plan(load_config(name), hp, size, args.dtype)
    except Exception as err:  # noqa: BLE001 - advice only
        _say(args, f"memory plan: not available ({type(err).__name__}: {err})")
        return
    line = plan.summary(phases)
    if getattr(args, "device_map", None) is not None:
        print(f"{line}; spread by --device-map, not checked")
        return
    device = resolve_device(args.device)
    if device.type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        print(f"{line}; {device} has {human(free)} free")
        if not args.no_memory_check:
            plan.check(free, phases, where=f"{device} ({human(free)} free of {human(total)}; "
                                           "--no-memory-check starts anyway)")
        return
    ram = available_ram()
    print(line + (f"; {human(ram)} of memory available" if ram is not None else ""))
    if ram is not None and plan.worst(phases).peak > ram:
        print(f"comeba: warning: the plan's peak ({human(plan.worst(phases).peak)}) is more than the memory "
              f"available ({human(ram)}); the system may swap or stop the process", file=sys.stderr)
