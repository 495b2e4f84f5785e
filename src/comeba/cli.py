"""The `comeba` command line: write facts, generate with them, precompute statistics.

    comeba edit --edits FILE.json [--model M] [--state DIR] [--batch-size N]
                [--stats-text PATH ...] [--stats-tokens N] [--hparams FILE.yaml]
                [--max-new-tokens N] [--device-map auto|balanced|FILE.json] [--quiet]
    comeba generate [--state DIR] [--model M] [--max-new-tokens N] [--device-map MAP] PROMPT...
    comeba stats [--model M] [--layers L ...] [--stats-text PATH ...]
                 [--stats-tokens N] [--hparams FILE.yaml]
    comeba plan [--model M | --config FILE.json] [--layers L ...] [--batch-size N]
                [--dtype D] [--hparams FILE.yaml] [--gate G] [--memory GIB]
    comeba eval --method METHOD (comeba.methods: comeba, no-hook, memit, ...)
                --data counterfact:PATH|zsre:PATH [--n N] [--offset O]
                [--batch-size B] [--protocol consecutive|single] [--checkpoint-every K]
                [--stats-text PATH ...] [--stats-tokens N] [--hparams FILE.yaml]
                [--model M] --out DIR [--no-generation] [--fluency-tokens N]
                [--device-map MAP] [--overwrite] [--quiet]

User errors (a bad file, a bad request, a state made for another model, a
missing package) print one line ``comeba: error: ...`` on stderr and exit
with status 2; the editor state on disk is only ever written after every
batch succeeded, atomically, so an error or Ctrl-C leaves the old state.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from . import __version__
from .commands import cmd_edit, cmd_eval, cmd_generate, cmd_plan, cmd_stats  # torch is imported when a command runs
from .hparams import GATES  # torch-free
from .methods import METHODS, PROTOCOLS  # torch-free

PROG = "comeba"
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
# The same as comeba.models.DTYPES (kept here so `--help` does not import torch).
DTYPES = ("float32", "bfloat16", "float16")


def _one_line(message: str) -> str:
    """Collapse a (possibly multi-line) message into one line."""
    parts = [line.strip() for line in str(message).splitlines() if line.strip()]
    return " ".join(parts) if parts else "unknown error"


def _quiet_libraries() -> None:
    """Keep transformers' weight-loading bars and generation notices off the terminal."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic only
        pass


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


# ----------------------------------------------------------------------------- parser


STATS_HELP = ("plain-text file(s) or folder(s) of .txt for the key statistics "
              "(default: the hparams' mom2_dataset, 'auto' = wikitext-103 online, else text sampled from the model)")


def _model_placement(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", metavar="D",
                        help="where the model runs: auto (default: CUDA when torch sees it, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="load the model in this dtype (default: the checkpoint's; the embedded model is float32). "
                             "Statistics and states belong to one dtype")


def _device_map_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device-map", metavar="MAP", default=None,
                        help="spread a model too big for one device over several, offloading the rest to the CPU "
                             "or disk (accelerate): auto, balanced, or FILE.json mapping module names to devices "
                             "(0, \"cuda:1\", \"cpu\", \"disk\"); instead of --device")


def _memory_check_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-memory-check", action="store_true",
                        help="start even when the memory plan's peak exceeds the CUDA device's free memory "
                             "(the plan is an estimate; see `comeba plan`)")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Consecutive batch model editing with hook layers (COMEBA-HK): write facts into a Hugging "
                    "Face causal LM, batch after batch, without touching its weights.",
        epilog="example:\n  comeba edit --edits examples/edits.json --state runs/demo "
               "--stats-text ../shared/data/wikitext-2/valid.txt\n"
               "  comeba generate --state runs/demo \"The Eiffel Tower is located in the city of\"\n"
               "\n'comeba COMMAND --help' lists each command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_edit, _add_generate, _add_stats, _add_eval, _add_plan):
        add(sub)
    return parser


def _add_edit(sub) -> None:
    e = sub.add_parser("edit", help="write facts from a JSON/JSONL file into the model (new or resumed state)",
                       description="Write the edits of FILE in consecutive batches; print greedy answers before/after.")
    e.add_argument("--edits", required=True, metavar="FILE", help="JSON list or JSONL of EasyEdit-shaped requests")
    e.add_argument("--model", metavar="M", default=None,
                   help="'embedded' (SmolLM2-135M-Instruct, the default), a HF id or a local folder; "
                        "when resuming, the state's base model")
    e.add_argument("--state", metavar="DIR", help="state folder: resumed if it holds one, else created (saved after success)")
    e.add_argument("--batch-size", type=_positive_int, metavar="N", help="edits per consecutive batch (default: hparams batch_size)")
    e.add_argument("--stats-text", nargs="+", metavar="PATH", help=STATS_HELP)
    e.add_argument("--stats-tokens", type=_positive_int, metavar="N", help="tokens for the key statistics (hparams mom2_n_tokens)")
    e.add_argument("--hparams", metavar="FILE", help="hyperparameter YAML (EasyEdit keys); not allowed when resuming")
    e.add_argument("--gate", choices=GATES, default=None, help="gate of a new state (hparams gate; default span)")
    e.add_argument("--max-new-tokens", type=_positive_int, default=8, metavar="N", help="greedy tokens per answer (default 8)")
    _model_placement(e)
    _device_map_option(e)
    _memory_check_option(e)
    e.add_argument("--quiet", action="store_true", help="no progress bars or chatter; only the results")
    e.set_defaults(func=cmd_edit)


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="greedy continuations with the edits of a state applied",
                       description="Greedy continuations of PROMPT(s) with the edits of --state applied.")
    g.add_argument("--state", metavar="DIR", help="a state written by `comeba edit` (its base model is used)")
    g.add_argument("--model", metavar="M", default=None, help="the base model (default: the state's, else 'embedded')")
    g.add_argument("--max-new-tokens", type=_positive_int, default=20, metavar="N", help="greedy tokens (default 20)")
    _model_placement(g)
    _device_map_option(g)
    g.add_argument("--quiet", action="store_true", help="print only the continuations")
    g.add_argument("prompts", nargs="+", metavar="PROMPT")
    g.set_defaults(func=cmd_generate)


def _add_stats(sub) -> None:
    s = sub.add_parser("stats", help="precompute and cache the key statistics; show where they are",
                       description="Compute (or find in the cache) C0 = E[k kᵀ] for the given layers and print its provenance.")
    s.add_argument("--model", metavar="M", default="embedded", help="'embedded' (default), a HF id or a local folder")
    s.add_argument("--layers", type=_non_negative_int, nargs="+", metavar="L", help="layers (default: hparams layers)")
    s.add_argument("--stats-text", nargs="+", metavar="PATH", help=STATS_HELP)
    s.add_argument("--stats-tokens", type=_positive_int, metavar="N", help="tokens (hparams mom2_n_tokens)")
    s.add_argument("--hparams", metavar="FILE", help="hyperparameter YAML (EasyEdit keys)")
    _model_placement(s)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_stats)


def _add_eval(sub) -> None:
    v = sub.add_parser("eval", help="evaluate a method on CounterFact / zsRE (single-round or consecutive)",
                       description="Edit N records in batches with one method and measure reliability, generality "
                                   "and locality (and CounterFact's scores) before and after. Writes DIR/records.jsonl, "
                                   "summary.json, checkpoints.csv and metrics.png; an interrupted run resumes.")
    v.add_argument("--method", required=True, choices=METHODS, help="editing method")
    v.add_argument("--data", required=True, metavar="KIND:PATH",
                   help="counterfact:PATH, zsre:PATH or easyedit:PATH (a bare PATH is read as EasyEdit records)")
    v.add_argument("--n", type=_positive_int, metavar="N", help="records to edit (default: all from --offset)")
    v.add_argument("--offset", type=_non_negative_int, default=0, metavar="O", help="first record (default 0)")
    v.add_argument("--batch-size", type=_positive_int, metavar="B", help="edits per batch (default: hparams batch_size)")
    v.add_argument("--protocol", choices=PROTOCOLS, default="consecutive",
                   help="consecutive: batches written one after another (default); "
                        "single: each batch from the original model, then removed")
    v.add_argument("--checkpoint-every", type=_positive_int, metavar="K",
                   help="evaluate all edits so far every K batches (default: about 10 checkpoints)")
    v.add_argument("--stats-text", nargs="+", metavar="PATH", help=STATS_HELP)
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
    _device_map_option(v)
    _memory_check_option(v)
    v.add_argument("--quiet", action="store_true", help="no progress bars or chatter; only the results")
    v.set_defaults(func=cmd_eval)


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="what editing a model will hold in memory, from its config alone",
                       description="Print the memory plan of editing a model: weights, editor state (per layer, "
                                   "inference and editing parts), the peaks of computing statistics, starting an "
                                   "editor and one batch, and where float64 is needed. Needs only the config.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="M", default=None,
                        help="'embedded' (default), a HF id or a local folder (only its config is read)")
    source.add_argument("--config", metavar="FILE", help="a transformers config.json (or a folder holding one)")
    p.add_argument("--layers", type=_non_negative_int, nargs="+", metavar="L", help="edited layers (default: hparams layers)")
    p.add_argument("--batch-size", type=_positive_int, metavar="N", help="edits per batch (default: hparams batch_size)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="the weights' dtype (default: the config's)")
    p.add_argument("--hparams", metavar="FILE", help="hyperparameter YAML (EasyEdit keys)")
    p.add_argument("--gate", choices=GATES, default=None, help="the gate (hparams gate; default span)")
    p.add_argument("--memory", type=_positive_float, metavar="GIB",
                   help="say whether the plan fits in this many GiB (exit status 1 when it does not)")
    p.set_defaults(func=cmd_plan)


def _user_errors() -> tuple[type[BaseException], ...]:
    from .adapter import StateError
    from .hparams import HParamsError
    from .inputs import InputError
    from .models import LayoutError
    from .requests import RequestError
    from .runfolder import EvalError

    return (InputError, RequestError, HParamsError, StateError, LayoutError, EvalError, FileNotFoundError,
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
