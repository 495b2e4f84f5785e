"""The `comeba` command line: write facts, generate with them, precompute statistics.

    comeba edit --edits FILE.json [--model M] [--state DIR] [--batch-size N]
                [--stats-text PATH ...] [--stats-tokens N] [--hparams FILE.yaml]
                [--max-new-tokens N] [--quiet]
    comeba generate [--state DIR] [--model M] [--max-new-tokens N] PROMPT...
    comeba stats [--model M] [--layers L ...] [--stats-text PATH ...]
                 [--stats-tokens N] [--hparams FILE.yaml]
    comeba eval --method comeba|no-hook|memit|seq-memit|alphaedit
                --data counterfact:PATH|zsre:PATH [--n N] [--offset O]
                [--batch-size B] [--protocol consecutive|single] [--checkpoint-every K]
                [--stats-text PATH ...] [--stats-tokens N] [--hparams FILE.yaml]
                [--model M] --out DIR [--no-generation] [--fluency-tokens N]
                [--overwrite] [--quiet]

User errors (a bad file, a bad request, a state made for another model, a
missing package) print one line ``comeba: error: ...`` on stderr and exit
with status 2; the editor state on disk is only ever written after every
batch succeeded, atomically, so an error or Ctrl-C leaves the old state.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .hparams import GATES  # torch-free

PROG = "comeba"
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
# The same as comeba.evaluate.METHODS / PROTOCOLS (kept here so `--help` does not import torch).
EVAL_METHODS = ("comeba", "no-hook", "memit", "seq-memit", "alphaedit")
EVAL_PROTOCOLS = ("consecutive", "single")
# The same as comeba.models.DTYPES.
DTYPES = ("float32", "bfloat16", "float16")


class CLIError(Exception):
    """A user error reported as one line, exit status 2."""


# ----------------------------------------------------------------------------- helpers


def _one_line(message: str) -> str:
    """Collapse a (possibly multi-line) message into one line."""
    parts = [line.strip() for line in str(message).splitlines() if line.strip()]
    return " ".join(parts) if parts else "unknown error"


def _say(args: argparse.Namespace, *parts: Any) -> None:
    """Progress chatter (suppressed by --quiet); results are printed regardless."""
    if not getattr(args, "quiet", False):
        print(*parts, file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    """Keep transformers' weight-loading bars and generation notices off the terminal."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic only
        pass


def _flat(text: str, width: int | None = None) -> str:
    """A continuation on one line (newlines shown as ⏎), cut to `width` characters."""
    text = text.replace("\r", "").replace("\n", "⏎")
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def taken(answer: str, target: str) -> bool:
    """An edit is taken when the greedy continuation (stripped) starts with the target (stripped)."""
    return answer.strip().startswith(target.strip())


def _int_at_least(minimum: int, what: str):
    """An argparse type for integers ≥ `minimum`, with a message that names the bound."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


# ----------------------------------------------------------------------------- reading inputs


def read_requests(path: str) -> list:
    """Every record of FILE validated as an edit request; the first bad one is an error."""
    from .data import easyedit_record, read_records
    from .requests import RequestError, make_request

    file = Path(path)
    if not file.is_file():
        raise CLIError(f"edits file {path!r} does not exist" if not file.exists() else f"edits file {path!r} is not a file")
    try:
        records = read_records(file)
    except UnicodeDecodeError as err:
        raise CLIError(f"edits file {path!r} is not UTF-8 text: {err}") from None
    except json.JSONDecodeError as err:
        raise CLIError(f"edits file {path!r} is not valid JSON: {err}") from None
    except ValueError as err:
        raise CLIError(f"edits file {path!r}: {err}") from None
    if not records:
        raise CLIError(f"edits file {path!r} holds no edit requests")
    requests = []
    for index, record in enumerate(records):
        try:
            request = make_request(easyedit_record(record, index), index)
        except RequestError as err:
            message = str(err)
            if not message.startswith("request "):
                message = f"request {index}: {message}"
            raise CLIError(f"{path}: {message}") from None
        except (TypeError, KeyError, AttributeError) as err:
            raise CLIError(f"{path}: request {index}: {err}") from None
        if any(not t.strip() for t in request.locality_ground_truths):
            raise CLIError(f"{path}: request {index}: empty locality_ground_truth")
        requests.append(request)
    return requests


def read_hparams(path: str | None, **overrides: Any):
    from .hparams import HParams

    hp = HParams.from_yaml(path) if path else HParams()
    changes = {k: v for k, v in overrides.items() if v is not None}
    return hp.replace(**changes) if changes else hp


def resolve_corpus(stats_text: Sequence[str] | None, hp) -> Any:
    """--stats-text wins; else the hparams' mom2_dataset ("auto", "samples", a local path or a HF spec)."""
    from .stats import corpus_from_spec, text_corpus

    if stats_text:
        return text_corpus(stats_text)
    return corpus_from_spec(str(getattr(hp, "mom2_dataset", "auto") or "auto"), hp.seed)


def state_kind(directory: str | None) -> str:
    """"none" (no --state), "new" (absent or empty folder) or "existing" (holds a state)."""
    from .editor import CONFIG_FILE

    if directory is None:
        return "none"
    path = Path(directory)
    if not path.exists():
        return "new"
    if not path.is_dir():
        raise CLIError(f"--state {directory!r} is a file, not a folder")
    if (path / CONFIG_FILE).exists():
        return "existing"
    if any(path.iterdir()):
        raise CLIError(
            f"--state {directory!r} is a non-empty folder without a comeba state ({CONFIG_FILE} missing); "
            "give a new or empty folder, or a folder written by `comeba edit`"
        )
    return "new"


def base_model_of(directory: str) -> str:
    """The base model recorded in a saved state (its name_or_path)."""
    from .editor import read_config

    config = read_config(directory)
    name = str((config.get("base_model") or {}).get("name_or_path") or "")
    if not name:
        raise CLIError(f"the state in {directory!r} does not record its base model; pass --model")
    return name


def _placement(model) -> str:
    """'cpu, float32': where a loaded model runs and in what dtype (statistics and states depend on both)."""
    param = next(model.parameters())
    return f"{param.device}, {str(param.dtype).replace('torch.', '')}"


def load_model_for(name: str, args: argparse.Namespace):
    from .models import load_model

    _say(args, f"model: {name}")
    start = time.perf_counter()
    model, tokenizer = load_model(name, dtype=args.dtype, device=args.device)
    _say(args, f"  loaded in {time.perf_counter() - start:.1f} s ({_placement(model)})")
    return model, tokenizer


# ----------------------------------------------------------------------------- edit


@dataclass
class Row:
    """One prompt shown in the before/after table."""

    kind: str  # "edit" | "rephrase" | "control"
    index: int
    prompt: str
    expected: str  # target for edit/rephrase; control ground truth
    before: str = ""
    after: str = ""

    @property
    def mark(self) -> str:
        if self.kind == "control":
            return "unchanged" if self.after == self.before else "CHANGED"
        return "taken" if taken(self.after, self.expected) else "not taken"


@dataclass
class Table:
    rows: list[Row] = field(default_factory=list)

    def prompts(self) -> list[str]:
        return [r.prompt for r in self.rows]

    def of(self, kind: str) -> list[Row]:
        return [r for r in self.rows if r.kind == kind]


def build_table(requests) -> Table:
    table = Table()
    for i, r in enumerate(requests):
        table.rows.append(Row("edit", i, r.text, r.target_new))
        for p in r.rephrase_prompts:
            table.rows.append(Row("rephrase", i, p, r.target_new))
        for j, p in enumerate(r.locality_prompts):
            truth = r.locality_ground_truths[j] if j < len(r.locality_ground_truths) else ""
            table.rows.append(Row("control", i, p, truth))
    return table


def format_table(table: Table, requests, width: int = 30, prompt_width: int = 52) -> str:
    headers = ("#", "kind", "prompt", "expected", "before", "after", "result")
    lines: list[tuple[str, ...]] = []
    for row in table.rows:
        req = requests[row.index]
        expected = row.expected.strip()
        if row.kind != "control" and req.ground_truth:
            expected = f"{expected} (was {req.ground_truth.strip()})"
        lines.append((
            str(row.index + 1) if row.kind == "edit" else "",
            row.kind,
            _flat(row.prompt, prompt_width),
            _flat(expected, 26),
            _flat(row.before.strip(), width),
            _flat(row.after.strip(), width),
            row.mark,
        ))
    widths = [max(len(h), *(len(l[c]) for l in lines)) for c, h in enumerate(headers)]
    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [fmt(headers), fmt(["-" * w for w in widths])]
    for i, l in enumerate(lines):
        if l[0] and i:
            out.append("")
        out.append(fmt(l))
    return "\n".join(out)


def summary(table: Table) -> str:
    edits, reph, ctrl = table.of("edit"), table.of("rephrase"), table.of("control")
    n_taken = sum(taken(r.after, r.expected) for r in edits)
    n_before = sum(taken(r.before, r.expected) for r in edits)
    parts = [f"edits taken: {n_taken}/{len(edits)} (answer starts with the new target; {n_before}/{len(edits)} before)"]
    if reph:
        parts.append(f"rephrases taken: {sum(taken(r.after, r.expected) for r in reph)}/{len(reph)}")
    if ctrl:
        parts.append(f"controls unchanged: {sum(r.after == r.before for r in ctrl)}/{len(ctrl)}")
    return "; ".join(parts)


def cmd_edit(args: argparse.Namespace) -> int:
    from .editor import Editor, greedy_generate, read_config
    from .stats import stats_dir

    # 1. Everything that can be checked without the model, before anything else.
    requests = read_requests(args.edits)
    kind = state_kind(args.state)
    if kind == "existing":
        read_config(args.state)  # a broken or foreign-format state fails here, before loading a model
        if args.hparams:
            raise CLIError(
                f"--hparams cannot be given when resuming the state in {args.state!r}: "
                "its hyperparameters are fixed by the state (start a new state to change them)"
            )
        hp = None
    else:
        hp = read_hparams(args.hparams, mom2_n_tokens=args.stats_tokens, gate=args.gate)
    if kind == "existing" and args.gate:
        raise CLIError(f"--gate cannot be given when resuming the state in {args.state!r}: its gate is fixed by the state")
    batch_size = args.batch_size
    if args.stats_text:
        for p in args.stats_text:  # fail early on a missing statistics file
            if not Path(p).exists():
                raise CLIError(f"statistics text {p!r} does not exist")

    # 2. Model and editor.
    model_name = args.model or (base_model_of(args.state) if kind == "existing" else "embedded")
    model, tokenizer = load_model_for(model_name, args)
    progress = not args.quiet
    if kind == "existing":
        editor = Editor.load(args.state, model, tokenizer, progress=progress)
        print(f"resuming the state in {args.state}: {editor.n_edits} edits in {editor.n_batches} batches so far")
        prov = editor.stats_provenance or {}
        print(f"statistics corpus: {prov.get('corpus', 'unknown')} (from the saved state)")
        if args.stats_text or args.stats_tokens:
            print("  note: --stats-text/--stats-tokens are ignored when resuming: the state already holds its statistics")
    else:
        corpus = resolve_corpus(args.stats_text, hp)
        note = "" if corpus.kind != "samples" else "  (no real text given: pass --stats-text FILE.txt for better statistics)"
        print(f"statistics corpus: {corpus.describe}, {hp.mom2_n_tokens} tokens{note}")
        editor = Editor.create(model, tokenizer, hp, corpus=corpus, progress=progress)
        n_tok = {m.get("n_tokens") for m in (editor.stats_provenance.get("layers") or {}).values()}
        print(f"  key statistics for layers {list(editor.hparams.layers)}: "
              f"{', '.join(str(n) for n in sorted(n_tok, key=str))} tokens, "
              f"cached in {stats_dir(editor.model_fingerprint, corpus)}")
    hp = editor.hparams
    size = batch_size or hp.batch_size
    n_batches = (len(requests) + size - 1) // size

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
        editor.save(args.state)
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
    print(summary(table))
    return 0


# ----------------------------------------------------------------------------- generate


def cmd_generate(args: argparse.Namespace) -> int:
    from .editor import Editor, greedy_generate, read_config

    if args.state is not None:
        read_config(args.state)
        name = args.model or base_model_of(args.state)
    else:
        name = args.model or "embedded"
    model, tokenizer = load_model_for(name, args)
    if args.state is not None:
        editor = Editor.load(args.state, model, tokenizer, progress=False)
        _say(args, f"state: {args.state} ({editor.n_edits} edits in {editor.n_batches} batches)")
        outputs = editor.generate(args.prompts, args.max_new_tokens)
    else:
        _say(args, "no --state: the unedited model")
        outputs = greedy_generate(model, tokenizer, args.prompts, args.max_new_tokens)
    for prompt, text in zip(args.prompts, outputs):
        print(f"{prompt} →{_flat(text)}")
    return 0


# ----------------------------------------------------------------------------- stats


def cmd_stats(args: argparse.Namespace) -> int:
    from .models import detect_layout, fingerprint, num_layers
    from .stats import load_or_compute_stats, stats_dir

    layers = sorted(set(args.layers)) if args.layers else None
    hp = read_hparams(args.hparams, mom2_n_tokens=args.stats_tokens, layers=layers)
    if args.stats_text:
        for p in args.stats_text:
            if not Path(p).exists():
                raise CLIError(f"statistics text {p!r} does not exist")
    model, tokenizer = load_model_for(args.model, args)
    layout = detect_layout(model)
    hp.check_model(num_layers(model, layout))
    corpus = resolve_corpus(args.stats_text, hp)
    fp = fingerprint(model)
    folder = stats_dir(fp, corpus)
    print(f"statistics corpus: {corpus.describe}")
    print(f"model: {args.model} (fingerprint {fp}, {layout.name} layout, {_placement(model)})")
    print(f"layers {list(hp.layers)}, {hp.mom2_n_tokens} tokens requested, {hp.mom2_dtype}")
    _, provenance = load_or_compute_stats(model, tokenizer, layout, hp.layers, corpus, hp.mom2_n_tokens,
                                          hp.mom2_dtype, model_fp=fp, progress=not args.quiet)
    print(f"cache folder: {folder}")
    for l in hp.layers:
        meta = provenance["layers"][str(l)]
        how = "cached" if meta.get("cached") else "computed now"
        print(f"  layer {l} ({meta.get('module')}): {Path(meta['file']).name}, {meta.get('n_tokens')} tokens, "
              f"{how} (created {meta.get('created')}, took {meta.get('seconds')} s)")
    return 0


# ----------------------------------------------------------------------------- eval


def _data_path(spec: str) -> tuple[str, str]:
    """(kind, path) of a --data spec: counterfact:PATH, zsre:PATH, easyedit:PATH or a bare PATH."""
    from .data import DATASET_KINDS

    kind, sep, rest = spec.partition(":")
    if sep and kind.lower() in DATASET_KINDS:
        return kind.lower(), rest
    return "easyedit", spec


def format_summary(summary: dict) -> str:
    pre, post = summary.get("pre") or {}, summary.get("post") or {}
    keys = [k for k in pre if k in post] + [k for k in post if k not in pre]
    rows = [("metric", "pre", "post")]
    for k in keys:
        unit = " (bits)" if k == "fluency" else ""
        rows.append((k.replace("_", " ") + unit,
                     "-" if pre.get(k) is None else f"{pre[k]:.1f}",
                     "-" if post.get(k) is None else f"{post[k]:.1f}"))
    w0 = max(len(r[0]) for r in rows)
    lines = [f"{r[0]:<{w0}}  {r[1]:>7}  {r[2]:>7}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    cps = summary.get("checkpoints") or []
    if len(cps) > 1:
        lines.append("")
        lines.append("checkpoints (edits: reliability / generality / locality)")
        for c in cps:
            vals = " / ".join("-" if c.get(k) is None else f"{c[k]:.1f}" for k in ("reliability", "generality", "locality"))
            lines.append(f"  {c['n_edits']:>6}: {vals}")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import load_dataset_spec
    from .evaluate import Settings, evaluate

    # 1. Everything that can be checked without the model.
    kind, path = _data_path(args.data)
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"data file {path!r} does not exist" if not file.exists() else f"data file {path!r} is not a file")
    try:
        loaded = load_dataset_spec(args.data, offset=args.offset, n=args.n)
    except UnicodeDecodeError as err:
        raise CLIError(f"data file {path!r} is not UTF-8 text: {err}") from None
    except json.JSONDecodeError as err:
        raise CLIError(f"data file {path!r} is not valid JSON: {err}") from None
    except ValueError as err:
        raise CLIError(f"data file {path!r}: {err}") from None
    if not loaded.requests:
        why = f" (skipped {len(loaded.skipped)}; first: record {loaded.skipped[0][0]}: {loaded.skipped[0][1]})" if loaded.skipped else ""
        raise CLIError(f"{args.data}: no usable records from offset {args.offset}"
                       + (f" in the next {args.n}" if args.n else "") + why)
    if loaded.skipped:
        print(f"{args.data}: skipped {len(loaded.skipped)} record(s) that cannot be edited "
              f"(first: record {loaded.skipped[0][0]}: {loaded.skipped[0][1]})")
    hp = read_hparams(args.hparams, mom2_n_tokens=args.stats_tokens, gate=args.gate)
    if args.stats_text:
        for p in args.stats_text:
            if not Path(p).exists():
                raise CLIError(f"statistics text {p!r} does not exist")
    if args.diagnostics_text and not Path(args.diagnostics_text).is_file():
        raise CLIError(f"diagnostics text {args.diagnostics_text!r} does not exist")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out!r} is a file, not a folder")
    args.resume_hint = (f"run the same command again to resume {args.out} from its last checkpoint")

    # 2. Model, statistics, the run.
    model_name = args.model or "embedded"
    model, tokenizer = load_model_for(model_name, args)
    corpus = resolve_corpus(args.stats_text, hp)
    note = "" if corpus.kind != "samples" else "  (no real text given: pass --stats-text FILE.txt for better statistics)"
    print(f"statistics corpus: {corpus.describe}, {hp.mom2_n_tokens} tokens{note}")
    settings = Settings(counterfact=(kind == "counterfact"), generation=not args.no_generation,
                        fluency_tokens=args.fluency_tokens,
                        diagnostics_text=str(Path(args.diagnostics_text).resolve()) if args.diagnostics_text else None)
    size = args.batch_size or hp.batch_size
    n = len(loaded.requests)
    if args.method == "alphaedit":
        rule = (f"null space: eigenvalues < {hp.nullspace_threshold:g}" if hp.nullspace_threshold is not None
                else f"null space: {hp.nullspace_energy:g} of the key energy")
        solver = f"{rule}, L2 {hp.L2:g}"
    else:
        solver = f"λ {hp.mom2_update_weight:g}"
    print(f"{args.method}, {args.protocol} protocol: {n} edits from {args.data} (offset {args.offset}) "
          f"in {(n + size - 1) // size} batch(es) of up to {size}; layers {list(hp.layers)}, {solver}")
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
    print(f"time {summary['seconds']:.1f} s (editing {summary['edit_seconds']:.1f} s, "
          f"{summary['seconds_per_edit']:.2f} s per edit; evaluation {summary['eval_seconds']:.1f} s); "
          f"peak RSS {summary['peak_rss_mb']:.0f} MB"
          + (f", peak GPU memory {summary['peak_gpu_mb']:.0f} MB" if summary.get("peak_gpu_mb") is not None else ""))
    if not summary.get("already_complete"):
        print(f"wrote {out / 'summary.json'}, records.jsonl, checkpoints.csv, metrics.png")
    return 0


# ----------------------------------------------------------------------------- parser


def _model_placement(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", metavar="D",
                        help="where the model runs: auto (default: CUDA when torch sees it, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="load the model in this dtype (default: the checkpoint's; the embedded model is float32). "
                             "Statistics and states belong to one dtype")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Consecutive batch model editing with hook layers (COMEBA-HK).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    stats_help = ("plain-text file(s) or folder(s) of .txt for the key statistics "
                  "(default: the hparams' mom2_dataset, 'auto' = wikitext-103 online, else text sampled from the model)")

    e = sub.add_parser("edit", help="write facts from a JSON/JSONL file into the model (new or resumed state)",
                       description="Write the edits of FILE in consecutive batches; print greedy answers before/after.")
    e.add_argument("--edits", required=True, metavar="FILE", help="JSON list or JSONL of EasyEdit-shaped requests")
    e.add_argument("--model", metavar="M", default=None,
                   help="'embedded' (SmolLM2-135M-Instruct, the default), a HF id or a local folder; "
                        "when resuming, the state's base model")
    e.add_argument("--state", metavar="DIR", help="state folder: resumed if it holds one, else created (saved after success)")
    e.add_argument("--batch-size", type=_positive_int, metavar="N", help="edits per consecutive batch (default: hparams batch_size)")
    e.add_argument("--stats-text", nargs="+", metavar="PATH", help=stats_help)
    e.add_argument("--stats-tokens", type=_positive_int, metavar="N", help="tokens for the key statistics (hparams mom2_n_tokens)")
    e.add_argument("--hparams", metavar="FILE", help="hyperparameter YAML (EasyEdit keys); not allowed when resuming")
    e.add_argument("--gate", choices=GATES, default=None, help="gate of a new state (hparams gate; default span)")
    e.add_argument("--max-new-tokens", type=_positive_int, default=8, metavar="N", help="greedy tokens per answer (default 8)")
    _model_placement(e)
    e.add_argument("--quiet", action="store_true", help="no progress bars or chatter; only the results")
    e.set_defaults(func=cmd_edit)

    g = sub.add_parser("generate", help="greedy continuations with the edits of a state applied",
                       description="Greedy continuations of PROMPT(s) with the edits of --state applied.")
    g.add_argument("--state", metavar="DIR", help="a state written by `comeba edit` (its base model is used)")
    g.add_argument("--model", metavar="M", default=None, help="the base model (default: the state's, else 'embedded')")
    g.add_argument("--max-new-tokens", type=_positive_int, default=20, metavar="N", help="greedy tokens (default 20)")
    _model_placement(g)
    g.add_argument("--quiet", action="store_true", help="print only the continuations")
    g.add_argument("prompts", nargs="+", metavar="PROMPT")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("stats", help="precompute and cache the key statistics; show where they are",
                       description="Compute (or find in the cache) C0 = E[k kᵀ] for the given layers and print its provenance.")
    s.add_argument("--model", metavar="M", default="embedded", help="'embedded' (default), a HF id or a local folder")
    s.add_argument("--layers", type=_non_negative_int, nargs="+", metavar="L", help="layers (default: hparams layers)")
    s.add_argument("--stats-text", nargs="+", metavar="PATH", help=stats_help)
    s.add_argument("--stats-tokens", type=_positive_int, metavar="N", help="tokens (hparams mom2_n_tokens)")
    s.add_argument("--hparams", metavar="FILE", help="hyperparameter YAML (EasyEdit keys)")
    _model_placement(s)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_stats)

    v = sub.add_parser("eval", help="evaluate a method on CounterFact / zsRE (single-round or consecutive)",
                       description="Edit N records in batches with one method and measure reliability, generality "
                                   "and locality (and CounterFact's scores) before and after. Writes DIR/records.jsonl, "
                                   "summary.json, checkpoints.csv and metrics.png; an interrupted run resumes.")
    v.add_argument("--method", required=True, choices=EVAL_METHODS, help="editing method")
    v.add_argument("--data", required=True, metavar="KIND:PATH",
                   help="counterfact:PATH, zsre:PATH or easyedit:PATH (a bare PATH is read as EasyEdit records)")
    v.add_argument("--n", type=_positive_int, metavar="N", help="records to edit (default: all from --offset)")
    v.add_argument("--offset", type=_non_negative_int, default=0, metavar="O", help="first record (default 0)")
    v.add_argument("--batch-size", type=_positive_int, metavar="B", help="edits per batch (default: hparams batch_size)")
    v.add_argument("--protocol", choices=EVAL_PROTOCOLS, default="consecutive",
                   help="consecutive: batches written one after another (default); "
                        "single: each batch from the original model, then removed")
    v.add_argument("--checkpoint-every", type=_positive_int, metavar="K",
                   help="evaluate all edits so far every K batches (default: about 10 checkpoints)")
    v.add_argument("--stats-text", nargs="+", metavar="PATH", help=stats_help)
    v.add_argument("--stats-tokens", type=_positive_int, metavar="N", help="tokens for the key statistics (hparams mom2_n_tokens)")
    v.add_argument("--hparams", metavar="FILE", help="hyperparameter YAML (EasyEdit keys)")
    v.add_argument("--model", metavar="M", default=None, help="'embedded' (default), a HF id or a local folder")
    v.add_argument("--out", required=True, metavar="DIR", help="output folder (a new one, or a run to resume)")
    v.add_argument("--gate", choices=GATES, default=None,
                   help="comeba's gate: span (default) or reference (the authors' z-score rule)")
    v.add_argument("--diagnostics-text", metavar="FILE",
                   help="general text (not the statistics text) for the gate diagnostics at every checkpoint: "
                        "false-open rate, subjects' open rate, perplexity against the unedited model")
    v.add_argument("--no-generation", action="store_true", help="skip the greedy-generation exact match")
    v.add_argument("--fluency-tokens", type=_non_negative_int, default=100, metavar="N",
                   help="sampled tokens per CounterFact fluency text (default 100; 0 = no fluency)")
    v.add_argument("--pre-cache", metavar="FILE",
                   help="the unedited model's evaluation of these records, shared by runs of other methods "
                        "(used if it matches, else computed and written)")
    v.add_argument("--overwrite", action="store_true", help="replace a different or finished run in --out")
    _model_placement(v)
    v.add_argument("--quiet", action="store_true", help="no progress bars or chatter; only the results")
    v.set_defaults(func=cmd_eval)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from .editor import StateError
    from .evaluate import EvalError
    from .hparams import HParamsError
    from .models import LayoutError
    from .requests import RequestError

    return (CLIError, RequestError, HParamsError, StateError, LayoutError, EvalError, FileNotFoundError,
            NotADirectoryError, IsADirectoryError, PermissionError, ImportError, ValueError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_ERROR
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    _quiet_libraries()
    errors = _user_errors()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if getattr(args, "resume_hint", None):
            what = args.resume_hint
        elif getattr(args, "saved_to", None):
            what = f"the new state was already saved to {args.saved_to}"
        elif getattr(args, "state", None):
            what = f"nothing was saved: the state in {args.state} is unchanged"
        else:
            what = "nothing was saved"
        print(f"\n{PROG}: interrupted; {what}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as err:  # noqa: BLE001 - user errors become one line, the rest propagate
        if args.debug or not isinstance(err, errors):
            raise
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
