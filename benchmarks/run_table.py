"""The editing-quality comparison table (issue 3.7): every method, both protocols, CounterFact and zsRE.

    python benchmarks/run_table.py                 # the full table (hours on a CPU; resumable)
    python benchmarks/run_table.py --methods comeba --datasets zsre        # a part of it
    python benchmarks/run_table.py --report-only   # only rewrite RESULTS.md and the plots
    python benchmarks/run_table.py --methods seq-memit alphaedit --hparams H.yaml --out-dir D
        # other hyperparameters for every cell (e.g. `v_optimizer: adam`), in their own folder
    python benchmarks/run_table.py --n 4 --batch-size 2 --methods comeba seq-memit \\
        --datasets counterfact --protocols consecutive --stats-tokens 2000 --out-dir /tmp/table-test   # smoke run

On the embedded model (SmolLM2-135M-Instruct), for each dataset (dev records
0..n-1), protocol and method, one *cell*: one ``comeba eval`` run in its own
subprocess (so its peak RSS is its own and a crash or Ctrl-C of one cell
leaves the others) writing ``OUT/runs/<dataset>-<protocol>-<method>/``.

- A finished cell (its ``summary.json`` written, with the same settings) is
  skipped; an interrupted one resumes from its last checkpoint, because
  ``comeba eval`` resumes from its output folder. Run the same command again
  after an interrupt, a crash or a reboot.
- MEMIT and sequential MEMIT are the same editor (C = λ·C0 every batch); the
  protocol decides which one it is. So ``memit`` runs only under the single
  protocol and ``seq-memit`` only under the consecutive one; the table says so
  for the other two combinations instead of running the same thing twice.
- The key statistics (WikiText-2 valid, --stats-tokens tokens) are computed
  once, up front, by ``comeba stats`` (cached in COMEBA_HOME), so that no
  cell's time includes them.
- After every cell, ``OUT/RESULTS.md`` is rewritten from all finished
  ``summary.json`` files (missing cells say "not run yet"), each cell's
  ``metrics.png`` is copied to ``OUT/plots/<cell>.png`` and one comparison
  plot per dataset and protocol is drawn (``OUT/plots/<dataset>-<protocol>.png``).

Consecutive runs evaluate all edits so far every --checkpoint-every batches
(default 5: after 100 and 200 edits). The unedited model's evaluation of a
dataset's records is computed by its first cell and shared by the others
(``OUT/runs/<dataset>-pre.json``, keyed by records, settings and model).
Each cell holds a lock while it runs, so on a machine with cores to spare two
invocations can share the table (``--threads 1`` each): the second skips the
cell the first is running.

OUT is --out-dir (default: benchmarks/results/table/). Finished cells under
``benchmarks/results/table/runs/`` are committed with RESULTS.md and plots/, so
the table is rebuilt (--report-only) and resumed from any checkout; a running
cell's resume state, progress file and lock are not (.gitignore). Each cell's
command, commit, times and the load average at its start go to
``OUT/runs/<cell>.json`` (committed); its console output, progress bars
included, to ``OUT/runs/<cell>.log`` (not committed: .gitignore).
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import yaml

from comeba import methods as registry
from machine import cpu_model, git_commit  # noqa: E402 (benchmarks/ is sys.path[0])

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "table"

# comeba eval's methods (comeba.methods), with comeba-reference after comeba: comeba with the
# authors' z-score gate (`--gate reference`), the paper's method as published.
METHODS = (registry.METHODS[0], "comeba-reference", *registry.METHODS[1:])
PROTOCOLS = registry.PROTOCOLS
# Table method -> (comeba eval --method, comeba's gate or None).
EVAL_METHOD = {"comeba": ("comeba", "span"), "comeba-reference": ("comeba", "reference")}
DIAGNOSTICS_TEXT = "wikitext-2/test.txt"
DATASETS = {  # name -> (comeba eval kind, file under --data-dir, title)
    "counterfact": ("counterfact", "counterfact/counterfact-dev.json", "CounterFact"),
    "zsre": ("zsre", "zsre/zsre-dev.json", "zsRE"),
}
STATS_TEXT = "wikitext-2/valid.txt"
# MEMIT and sequential MEMIT are one editor; the protocol decides (comeba.methods.REGISTRY).
SAME_AS = {("memit", "consecutive"): "seq-memit", ("seq-memit", "single"): "memit"}

# (summary key, column title, format); fluency is in bits, the rest in percent.
COLUMNS = [
    ("reliability", "reliability", "{:.1f}"),
    ("generality", "generality", "{:.1f}"),
    ("locality", "locality", "{:.1f}"),
    ("efficacy_score", "efficacy score", "{:.1f}"),
    ("paraphrase_score", "paraphrase score", "{:.1f}"),
    ("neighborhood_score", "neighbourhood score", "{:.1f}"),
    ("reliability_generation", "reliability (generation EM)", "{:.1f}"),
    ("generality_generation", "generality (generation EM)", "{:.1f}"),
    ("fluency", "fluency (bits)", "{:.2f}"),
]


# ============================================================================ options


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Resumable: run the same command again; finished cells are skipped.")
    p.add_argument("--n", type=int, default=200, help="dev records 0..n-1 of each dataset (default 200)")
    p.add_argument("--batch-size", type=int, default=20, help="edits per batch (default 20: 10 batches of 20)")
    p.add_argument("--datasets", nargs="+", choices=tuple(DATASETS), default=list(DATASETS), metavar="D",
                   help="counterfact and/or zsre (default both)")
    p.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS), metavar="P",
                   help="consecutive and/or single (default both)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="M",
                   help=f"methods (default all: {' '.join(METHODS)}); memit runs only single, seq-memit only consecutive")
    p.add_argument("--checkpoint-every", type=int, default=5,
                   help="consecutive protocol: evaluate all edits so far every K batches (default 5)")
    p.add_argument("--stats-tokens", type=int, default=100_000, help="WikiText-2 tokens for the key statistics (default 100000)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder holding counterfact/, zsre/, wikitext-2/ "
                                                                  "(default ../shared/data)")
    p.add_argument("--out-dir", default=str(DEFAULT_OUT),
                   help="where runs/, plots/ and RESULTS.md go (default benchmarks/results/table/)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per cell (OMP_NUM_THREADS; default: torch's own default)")
    p.add_argument("--hparams", metavar="FILE",
                   help="hyperparameter YAML given to every cell (e.g. `v_optimizer: adam`); a finished cell is "
                        "reused only if its hparams have these values")
    p.add_argument("--report-only", action="store_true", help="run nothing; rewrite RESULTS.md and the plots")
    p.add_argument("--dry-run", action="store_true", help="print the cells and their commands; run nothing")
    args = p.parse_args(argv)
    for name in ("n", "batch_size", "stats_tokens", "checkpoint_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be positive")
    args.hparam_values = {}
    if args.hparams:
        try:
            args.hparam_values = yaml.safe_load(Path(args.hparams).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            p.error(f"--hparams {args.hparams}: {exc}")
        if not isinstance(args.hparam_values, dict):
            p.error(f"--hparams {args.hparams}: expected a mapping of hyperparameters, got {type(args.hparam_values).__name__}")
    args.datasets = list(dict.fromkeys(args.datasets))
    args.protocols = list(dict.fromkeys(args.protocols))
    args.methods = list(dict.fromkeys(args.methods))
    return args


def display_path(path: Path) -> str:
    """A path relative to the repository root where it is near it (the commands run there), else absolute."""
    path = Path(os.path.abspath(path))
    try:
        rel = os.path.relpath(path, ROOT)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith(os.pardir + os.sep + os.pardir) else rel


def canonical_command(args: argparse.Namespace) -> str:
    """This script's command with every option spelled out (reproduces the cells it names)."""
    parts = ["python", "benchmarks/run_table.py", "--n", str(args.n), "--batch-size", str(args.batch_size),
             "--datasets", *args.datasets, "--protocols", *args.protocols, "--methods", *args.methods,
             "--checkpoint-every", str(args.checkpoint_every),
             "--stats-tokens", str(args.stats_tokens), "--data-dir", display_path(Path(args.data_dir))]
    if Path(args.out_dir).resolve() != DEFAULT_OUT.resolve():
        parts += ["--out-dir", display_path(Path(args.out_dir))]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    if args.hparams:
        parts += ["--hparams", display_path(Path(args.hparams))]
    return shlex.join(parts)


# ============================================================================ cells


class Cell:
    def __init__(self, dataset: str, protocol: str, method: str, args: argparse.Namespace, runs: Path):
        self.dataset, self.protocol, self.method = dataset, protocol, method
        self.name = f"{dataset}-{protocol}-{method}"
        self.folder = runs / self.name
        self.log = runs / f"{self.name}.log"
        self.sidecar = runs / f"{self.name}.json"
        self.same_as = SAME_AS.get((method, protocol))
        kind, rel, _ = DATASETS[dataset]
        data = Path(args.data_dir) / rel
        self.data_spec = f"{kind}:{display_path(data)}"
        eval_method, self.gate = EVAL_METHOD.get(method, (method, None))
        self.command = ["comeba", "eval", "--method", eval_method, "--protocol", protocol, "--data", self.data_spec,
                        "--n", str(args.n), "--batch-size", str(args.batch_size),
                        "--checkpoint-every", str(args.checkpoint_every),
                        "--pre-cache", display_path(runs / f"{dataset}-pre.json"),
                        "--stats-text", display_path(Path(args.data_dir) / STATS_TEXT),
                        "--stats-tokens", str(args.stats_tokens), "--out", display_path(self.folder)]
        if self.gate == "span":  # the gate diagnostics (cells run before them have none)
            self.command[-2:-2] = ["--gate", "span", "--diagnostics-text",
                                   display_path(Path(args.data_dir) / DIAGNOSTICS_TEXT)]
        elif self.gate:
            self.command[-2:-2] = ["--gate", self.gate]
        if args.hparams:
            self.command[-2:-2] = ["--hparams", display_path(Path(args.hparams))]
        self.hparam_values = args.hparam_values
        self.expected = {"method": eval_method, "protocol": protocol, "batch_size": args.batch_size,
                         "n_requested": args.n, "offset": 0, "data_kind": kind, "mom2_n_tokens": args.stats_tokens,
                         "checkpoint_every": args.checkpoint_every, "gate": self.gate}

    def read_json(self, name: str) -> dict | None:
        try:
            return json.loads((self.folder / name).read_text())
        except (OSError, ValueError):
            return None

    def summary(self) -> dict | None:
        return self.read_json("summary.json")

    def mismatch(self, summary: dict) -> list[str]:
        """Settings in which a finished run differs from what this invocation asks for."""
        got = {"method": summary.get("method"), "protocol": summary.get("protocol"),
               "batch_size": summary.get("batch_size"), "n_requested": summary.get("n_requested"),
               "offset": summary.get("offset"), "data_kind": summary.get("data_kind"),
               "mom2_n_tokens": (summary.get("hparams") or {}).get("mom2_n_tokens"),
               "checkpoint_every": summary.get("checkpoint_every"),
               # runs from before the span gate used the reference gate
               "gate": ((summary.get("hparams") or {}).get("gate", "reference")
                        if summary.get("method") == "comeba" else None)}
        hparams = summary.get("hparams") or {}
        return ([k for k, v in self.expected.items() if got.get(k) != v]
                + [f"hparams.{k}" for k, v in self.hparam_values.items() if hparams.get(k) != v])

    def finished(self) -> bool:
        s = self.summary()
        return s is not None and not self.mismatch(s)

    def status(self) -> str:
        """A short description of an unfinished cell."""
        s = self.summary()
        if s is not None:
            return "other settings in its folder: " + ", ".join(self.mismatch(s))
        side = read_sidecar(self.sidecar)
        prog = self.read_json("progress.json")
        run = self.read_json("run.json")
        if prog and run:
            n_batches = -(-int(run.get("n_edits", 0)) // max(1, int(run.get("batch_size", 1))))
            what = f"interrupted after {prog.get('batches_done', 0)}/{n_batches} batches (resumes)"
        elif run:
            what = "interrupted before its first checkpoint (resumes)"
        else:
            what = "not run yet"
        if side.get("returncode") not in (None, 0, 130, -signal.SIGINT):
            what = f"failed (exit {side['returncode']}, see runs/{self.log.name}); " + what
        return what


def make_cells(args: argparse.Namespace, runs: Path) -> list[Cell]:
    return [Cell(d, p, m, args, runs) for d in args.datasets for p in args.protocols for m in args.methods]


def read_sidecar(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def package_note(commits: Sequence[str]) -> str:
    """Whether the package the runs measured (src/, pyproject.toml) is the same in all their commits."""
    hashes = [c.split()[0] for c in commits]
    try:
        differ = any(subprocess.run(["git", "diff", "--quiet", hashes[0], h, "--", "src", "pyproject.toml"],
                                    cwd=ROOT, capture_output=True).returncode != 0 for h in hashes[1:])
    except OSError:
        return "could not compare them (no git)."
    dirty = any("uncommitted" in c for c in commits)
    return ("src/ and pyproject.toml differ between them." if differ else
            "src/ and pyproject.toml are the same in all of them" + (" (as committed)." if dirty else "."))


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)


def child_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def comeba_argv(command: Sequence[str]) -> list[str]:
    """`comeba ...` as run here: this interpreter's package, not whatever `comeba` is on PATH."""
    assert command[0] == "comeba"
    return [sys.executable, "-m", "comeba", *command[1:]]


def run_logged(argv: Sequence[str], log: Path, env: dict[str, str]) -> int:
    """Run argv, its stdout and stderr both to the terminal and (appended) to `log`; return its exit status.

    On Ctrl-C the child (same process group) gets the SIGINT too, saves what it
    can and exits; this waits for it and re-raises KeyboardInterrupt.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"\n===== {dt.datetime.now().isoformat(timespec='seconds')} $ {shlex.join(argv)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        interrupted = False
        while True:
            try:
                chunk = os.read(proc.stdout.fileno(), 8192)
            except KeyboardInterrupt:
                interrupted = True
                continue  # the child got the SIGINT too: let it finish its message and exit
            if not chunk:
                break
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            fh.write(chunk)
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:
                interrupted = True
        fh.write(f"===== exit status {rc}\n".encode())
    if interrupted:
        raise KeyboardInterrupt
    return rc


def precompute_stats(args: argparse.Namespace, runs: Path) -> None:
    command = ["comeba", "stats", "--stats-text", display_path(Path(args.data_dir) / STATS_TEXT),
               "--stats-tokens", str(args.stats_tokens)]
    print(f"\n[run_table] key statistics (computed once, cached): {shlex.join(command)}", flush=True)
    rc = run_logged(comeba_argv(command), runs / "stats.log", child_env(args))
    if rc != 0:
        raise SystemExit(f"[run_table] `{shlex.join(command)}` failed (exit {rc}); see {runs / 'stats.log'}")


def run_cell(cell: Cell, args: argparse.Namespace) -> int:
    side = read_sidecar(cell.sidecar)
    sessions = side.get("sessions", [])
    session = {"started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
               "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
               "commit": git_commit(), "command": shlex.join(cell.command)}
    sessions.append(session)
    write_json(cell.sidecar, {"cell": cell.name, "command": shlex.join(cell.command), "sessions": sessions,
                              "returncode": None})
    t = time.perf_counter()
    rc: int | None = None
    try:
        rc = run_logged(comeba_argv(cell.command), cell.log, child_env(args))
    except KeyboardInterrupt:
        rc = 130
        raise
    finally:
        session.update(finished=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                       wall_seconds=round(time.perf_counter() - t, 1), returncode=rc)
        write_json(cell.sidecar, {"cell": cell.name, "command": shlex.join(cell.command), "sessions": sessions,
                                  "returncode": rc})
    return rc


# ============================================================================ environment


def memory_total_gb() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return "unknown"


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


_THREADS: dict[str, str] = {}


def torch_threads(args: argparse.Namespace) -> str:
    """torch.get_num_threads() in a child with the cells' environment (asked once, in a subprocess)."""
    if "n" not in _THREADS:
        try:
            out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                                 env=child_env(args), capture_output=True, text=True, timeout=120)
            _THREADS["n"] = out.stdout.strip() or "unknown"
        except Exception:  # noqa: BLE001 - informational only
            _THREADS["n"] = "unknown"
    return _THREADS["n"]


# ============================================================================ RESULTS.md


def fmt(value: Any, pattern: str = "{:.1f}") -> str:
    return "—" if value is None else pattern.format(value)


def table_for(dataset: str, cells: list[Cell], out: Path) -> tuple[list[str], list[Path]]:
    """The markdown lines of one dataset's table (and the comparison plots drawn for it)."""
    _, _, title = DATASETS[dataset]
    summaries = {c.name: c.summary() for c in cells if c.finished()}
    done = [summaries[c.name] for c in cells if c.name in summaries]
    # Columns that any finished cell (or, before any, the dataset's kind) has.
    present = [col for col in COLUMNS
               if any(col[0] in (s.get("post") or {}) or col[0] in (s.get("pre") or {}) for s in done)]
    if not done:
        present = [col for col in COLUMNS if dataset == "counterfact" or col[0] not in
                   ("efficacy_score", "paraphrase_score", "neighborhood_score", "fluency")]
    header = (["protocol", "method", "edits"] + [c[1] for c in present]
              + ["false-open % (worst layer)", "perplexity ratio", "seconds", "s / edit", "peak RSS MB"])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]

    if done:
        pre0 = done[0].get("pre") or {}
        lines.append("| — | unedited (pre) | " + str(done[0].get("n_edits")) + " | "
                     + " | ".join(fmt(pre0.get(k), f) for k, _, f in present) + " | — | 1 | — | — | — |")
    notes = []
    # Pre values are the unedited model on the same records: they should agree across cells.
    diffs = {}
    for k, _, _ in present:
        vals = [s["pre"][k] for s in done if (s.get("pre") or {}).get(k) is not None]
        if vals and max(vals) - min(vals) > 1e-6:
            diffs[k] = max(vals) - min(vals)
    if diffs:
        notes.append("The pre-edit values differ between cells by up to " +
                     ", ".join(f"{v:.3g} ({k})" for k, v in diffs.items()) + "; the row shows the first cell's.")
    elif len(done) > 1:
        notes.append(f"The pre-edit values are identical in all {len(done)} finished cells.")

    for c in cells:
        cols = len(header) - 2
        if c.same_as:
            text = (f"= {c.same_as} (the same editor: under the {c.protocol} protocol "
                    f"{'MEMIT is sequential MEMIT' if c.method == 'memit' else 'sequential MEMIT is MEMIT'}; not run twice)")
            lines.append(f"| {c.protocol} | {c.method} | {text} |" + " |" * (cols - 1))
            continue
        s = summaries.get(c.name)
        if s is None:
            lines.append(f"| {c.protocol} | {c.method} | {c.status()} |" + " |" * (cols - 1))
            continue
        post = s.get("post") or {}
        row = [c.protocol, f"[{c.method}](plots/{c.name}.png)", str(s.get("n_edits"))]
        row += [fmt(post.get(k), f) for k, _, f in present]
        last = (s.get("checkpoints") or [{}])[-1]
        row += [fmt(max((last[k] for k in last if k.startswith("false_open_") and k != "false_open_max"), default=None),
                    "{:.2f}"), fmt(last.get("perplexity_ratio"), "{:.4f}")]
        row += [fmt(s.get("seconds"), "{:.0f}"), fmt(s.get("seconds_per_edit"), "{:.2f}"),
                fmt(s.get("peak_rss_mb"), "{:.0f}")]
        lines.append("| " + " | ".join(row) + " |")
    skipped = {len(s.get("skipped") or []) for s in done}
    if any(skipped):
        notes.append(f"{title}: {max(skipped)} of the first {done[0].get('n_requested')} records cannot be edited "
                     "as given (see `skipped` in the summaries) and are left out, so there are fewer edits.")
    plots = draw_comparisons(dataset, cells, summaries, out)
    return lines + ([""] + notes if notes else []), plots


def draw_comparisons(dataset: str, cells: list[Cell], summaries: dict[str, dict], out: Path) -> list[Path]:
    """One figure per protocol: reliability / generality / locality against edits, one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    _, _, title = DATASETS[dataset]
    written = []
    for protocol in PROTOCOLS:
        runs = [(c.method, summaries[c.name]) for c in cells if c.protocol == protocol and c.name in summaries]
        if not runs:
            continue
        keys = ("reliability", "generality", "locality")
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=110, sharey=True)
        for ax, key in zip(axes, keys):
            for i, (method, s) in enumerate(runs):
                cps = s.get("checkpoints") or []
                xs = [cp["n_edits"] for cp in cps]
                ys = [cp.get(key) for cp in cps]
                k = METHODS.index(method)  # a fixed colour, marker and dash per method: equal curves stay visible
                ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="osD^vp"[k], ms=4 + (k % 2),
                        linestyle=("-", "--", "-.", ":", "-", "--")[k], color=f"C{k}", label=method, alpha=0.85)
            pre = (runs[0][1].get("pre") or {}).get(key)
            if pre is not None and key != "locality":
                ax.axhline(pre, color="grey", linestyle=":", linewidth=1)
            ax.set_title(key, fontsize=10)
            ax.set_xlabel("edits" + (" evaluated so far" if protocol == "single" else " so far"))
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("percent (teacher-forced)")
        axes[0].legend(fontsize=8, loc="lower left")
        s0 = runs[0][1]
        fig.suptitle(f"{title}, {protocol} protocol, batches of {s0.get('batch_size')}, "
                     f"{s0.get('n_edits')} edits (dotted: unedited model)", fontsize=10)
        fig.tight_layout()
        path = out / "plots" / f"{dataset}-{protocol}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        fig.savefig(tmp, format="png")
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    return written


def copy_plots(cells: list[Cell], out: Path) -> None:
    for c in cells:
        src = c.folder / "metrics.png"
        if c.finished() and src.is_file():
            dst = out / "plots" / f"{c.name}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


def write_results(args: argparse.Namespace, cells: list[Cell], out: Path, invocation: str) -> Path:
    copy_plots(cells, out)
    real = [c for c in cells if not c.same_as]
    finished = [c for c in real if c.finished()]
    now = dt.datetime.now().astimezone()
    lines = [
        "# Editing quality: every method, both protocols, CounterFact and zsRE",
        "",
        f"Written by `benchmarks/run_table.py` on {now.strftime('%Y-%m-%d %H:%M %Z')}: "
        f"{len(finished)} of {len(real)} runs finished.",
        "",
        "Reproduce (finished runs are skipped, an interrupted one resumes from its last checkpoint; "
        "run it again after an interrupt):",
        "",
        "```bash",
        canonical_command(args),
        "```",
        "",
        f"This file was last written by: `{invocation}`",
        "",
        "## Setup",
        "",
        "- Model: the embedded SmolLM2-135M-Instruct (float32), default hyperparameters "
        "(`comeba.hparams.HParams`)"
        + (f" except {', '.join(f'`{k}: {v}`' for k, v in args.hparam_values.items())} "
           f"(`--hparams {display_path(Path(args.hparams))}`, every cell)" if args.hparam_values else "")
        + ", on the CPU.",
        f"- Records: dev records 0–{args.n - 1} of each dataset (`{display_path(Path(args.data_dir))}`), "
        f"in batches of {args.batch_size} ({-(-args.n // args.batch_size)} batches).",
        f"- Key statistics: {args.stats_tokens:,} tokens of WikiText-2 valid, computed once by `comeba stats` "
        "before the runs (cached), so no run's time includes them.",
        "- Consecutive protocol: the batches are written one after another; the post-edit values are all "
        "edits evaluated after the last batch. Single-round protocol: each batch is edited from the original "
        "model, its records evaluated, the edit removed.",
        "- MEMIT and sequential MEMIT are one editor (C = λ·C0 every batch): under the single protocol it is "
        "MEMIT, under the consecutive protocol sequential MEMIT. So `memit` runs single only and `seq-memit` "
        "consecutive only.",
        "- Metrics in percent (fluency: ROME's weighted 2/3-gram entropy of 100 sampled tokens, bits): "
        "reliability, generality and locality are teacher-forced token accuracies (locality: argmax tokens "
        "unchanged from the unedited model); CounterFact's efficacy / paraphrase / neighbourhood scores compare "
        "P(new) and P(true) the MEMIT way; generation EM is the exact match of greedy generation of the new "
        "target. See `comeba.evaluate`.",
        "- seconds: the whole run (pre-edit evaluation, editing, evaluation; summed over the sessions of a "
        "resumed run); s / edit: editing time only, per edit; peak RSS: of the run's own process "
        "(of its last session if it was resumed).",
        "- Each method links to its run's plot of the metrics over the run.",
        "",
    ]
    for dataset in args.datasets:
        _, _, title = DATASETS[dataset]
        ds_cells = [c for c in cells if c.dataset == dataset]
        table, plots = table_for(dataset, ds_cells, out)
        lines += [f"## {title} (dev records 0–{args.n - 1})", ""] + table + [""]
        for path in plots:
            lines += [f"![{path.stem}](plots/{path.name})", ""]

    # Time estimate for what is left, from the finished runs.
    todo = [c for c in real if not c.finished()]
    per_edit = [c.summary()["seconds"] / max(1, c.summary()["n_edits"]) for c in finished]
    if todo and per_edit:
        mean = sum(per_edit) / len(per_edit)
        left = mean * args.n * len(todo)
        lines += [f"Left to run: {len(todo)} run(s), about {left / 3600:.1f} h at the finished runs' mean of "
                  f"{mean:.1f} s per record (whole run time / edits).", ""]

    # Environment: this machine now, and what each run recorded.
    load = os.getloadavg()
    lines += [
        "## Machine and software",
        "",
        f"- Commit now: `{git_commit()}`",
        f"- CPU: {cpu_model()}; os.cpu_count() = {os.cpu_count()}; torch threads per run: {torch_threads(args)}"
        + (f" (--threads {args.threads})" if args.threads else " (torch's default)")
        + f"; memory {memory_total_gb()}",
        f"- Python {platform.python_version()}, torch {version('torch')}, transformers {version('transformers')}, "
        f"comeba {version('comeba')}; {platform.platform()}",
        f"- Load average when this file was written: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        "(1 / 5 / 15 min). Timings from a busy machine are only comparable within one run.",
        "",
        "| run | command | commit | started | load avg at start | wall s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in real:
        side = read_sidecar(c.sidecar)
        sessions = side.get("sessions") or []
        if not sessions:
            if c.finished():
                lines.append(f"| {c.name} | `{shlex.join(c.command)}` | (not recorded) | | | |")
            continue
        for i, s in enumerate(sessions):
            name = c.name if i == 0 else f"{c.name} (session {i + 1})"
            la = s.get("load_average_at_start") or []
            lines.append(f"| {name} | `{s.get('command', '')}` | `{s.get('commit', '')}` | {s.get('started', '')} "
                         f"| {' / '.join(f'{x:.2f}' for x in la)} | {fmt(s.get('wall_seconds'), '{:.0f}')}"
                         + ("" if s.get("returncode") in (0, None) else f" (exit {s.get('returncode')})") + " |")
    commits = {s.get("commit") for c in real for s in (read_sidecar(c.sidecar).get("sessions") or [])}
    if len(commits) > 1:
        lines += ["", f"Note: the runs come from {len(commits)} different commits (see the table); "
                  + package_note(sorted(str(c) for c in commits if c))]
    lines.append("")
    path = out / "RESULTS.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path


# ============================================================================ main


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    invocation = shlex.join(["python", display_path(Path(__file__))] + list(sys.argv[1:] if argv is None else argv))
    out = Path(args.out_dir)
    runs = out / "runs"
    cells = make_cells(args, runs)
    # RESULTS.md always shows the whole table, whichever part this invocation runs.
    whole = argparse.Namespace(**{**vars(args), "datasets": list(DATASETS), "protocols": list(PROTOCOLS),
                                  "methods": list(METHODS)})
    table = make_cells(whole, runs)
    for d in args.datasets:
        data = Path(args.data_dir) / DATASETS[d][1]
        if not data.is_file():
            print(f"[run_table] error: {data} does not exist (--data-dir)", file=sys.stderr)
            return 2
    if not (Path(args.data_dir) / STATS_TEXT).is_file():
        print(f"[run_table] error: {Path(args.data_dir) / STATS_TEXT} does not exist (--data-dir)", file=sys.stderr)
        return 2

    todo = [c for c in cells if not c.same_as and not c.finished()]
    for c in cells:
        state = ("same editor as " + c.same_as + ", not run" if c.same_as
                 else "finished, skipped" if c.finished() else c.status())
        print(f"[run_table] {c.name}: {state}")
    if args.dry_run:
        for c in todo:
            print(shlex.join(c.command))
        return 0
    if args.report_only or not todo:
        print(f"[run_table] wrote {write_results(whole, table, out, invocation)}")
        return 0

    failed, elsewhere = [], []
    runs.mkdir(parents=True, exist_ok=True)
    try:
        precompute_stats(args, runs)
        for i, c in enumerate(todo, 1):
            # One lock per cell (held while it runs): several invocations can share the table, e.g. one per core.
            with open(runs / f"{c.name}.lock", "w") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    elsewhere.append(c.name)
                    print(f"\n[run_table] {c.name}: running in another run_table.py; skipped here", flush=True)
                    continue
                if c.finished():  # finished by another invocation meanwhile
                    continue
                print(f"\n[run_table] run {i}/{len(todo)}: {c.name}\n[run_table] $ {shlex.join(c.command)}",
                      flush=True)
                rc = run_cell(c, args)
            if rc != 0 or not c.finished():
                failed.append(c.name)
                print(f"[run_table] {c.name} did not finish (exit {rc}); see {c.log}; going on", flush=True)
            print(f"[run_table] wrote {write_results(whole, table, out, invocation)}", flush=True)
    except KeyboardInterrupt:
        print(f"\n[run_table] interrupted; wrote {write_results(whole, table, out, invocation)}; "
              "run the same command again to resume", file=sys.stderr)
        return 130
    if elsewhere:
        print(f"[run_table] left to the other invocation(s): {', '.join(elsewhere)}")
    if failed:
        print(f"[run_table] {len(failed)} run(s) did not finish: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("[run_table] all runs finished" if not elsewhere else "[run_table] all runs here finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
