"""``moe-report``: a routing-imbalance report from a statistics file, a live server, or a model run over prompts.

    moe-report --stats routing_stats.json --out report/          # a file written by moe-serve or RoutingStats.save
    moe-report --url http://127.0.0.1:8000 --ep-sizes 2,4,8      # GET {url}/v1/moe/routing of a running server
    moe-report --prompts prompts.jsonl [--model DIR] --wandb     # run serve.LLM over {"prompt"|"text": ...} lines

Prints a per-layer table (max/mean, CV, normalised entropy, hottest and dead experts), per EP size and placement
the rank loads, balancedness (mean/max) and straggler, and the EPLB recommendation (``--redundant`` replica
slots: predicted balancedness, speed-up, replica memory). Writes to ``--out``: ``report.json``,
``routing_stats.json``, ``heatmap.png`` (layers x experts), ``ranks.png`` (per-rank loads) and, with
``--wandb``, an offline wandb run (``WANDB_MODE`` overrides). Bad input fails with one line and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

import numpy as np

from expert_parallel.imbalance import LayerLoad, as_counts, ep_loads
from routing.stats import RoutingStats
from serve.launch.report_figures import plot_heatmap, plot_ranks, short_name

FORMAT = "moe-report/1"


class ReportError(Exception):
    """A one-line failure the CLI prints without a traceback."""


# -- sources ----------------------------------------------------------------------------------------------------
def fetch_stats(url: str, timeout: float = 10.0) -> RoutingStats:
    """``GET {url}/v1/moe/routing`` of a running ``moe-serve`` (``url`` with or without ``/v1``)."""
    base = url.rstrip("/").removesuffix("/v1")
    endpoint = base + "/v1/moe/routing"
    try:
        with urllib.request.urlopen(endpoint, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        raise ReportError(f"{endpoint} answered HTTP {e.code}: {_error_message(e.read()) or e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ReportError(f"cannot reach {endpoint}: {getattr(e, 'reason', e)}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise ReportError(f"{endpoint} did not answer JSON") from None
    return RoutingStats.from_dict(data)


def _error_message(body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
        return str(error.get("message") if isinstance(error, dict) else error or "")
    except (ValueError, AttributeError):
        return ""


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a JSONL file: one object per line with ``"prompt"`` or ``"text"``; blank lines skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"cannot read prompts {str(path)!r}: {e}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
        if not isinstance(text, str) or not text:
            raise ReportError(f"{path} line {number}: expected a JSON object with a non-empty \"prompt\" or "
                              "\"text\" string")
        prompts.append(text)
    if not prompts:
        raise ReportError(f"{path} has no prompts")
    return prompts


def run_prompts(prompts: list[str], model: str | None, max_tokens: int, window: int) -> RoutingStats:
    """Generate greedily over ``prompts`` with ``serve.LLM(model)``, counting routing per engine step."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from serve import LLM, SamplingParams

    try:
        engine = LLM(model).engine
    except (OSError, ValueError, KeyError) as e:
        raise ReportError(f"cannot load model {model or '(default)'}: {e}") from None
    stats = RoutingStats.attach(engine.model, window, name=Path(model).name if model else "moe-serve-default")
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    for i, prompt in enumerate(prompts):
        try:
            engine.add_request(f"report-{i}", prompt, params)
        except ValueError as e:
            raise ReportError(f"prompt {i + 1}: {e}") from None
    columns = (TextColumn("routing"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:  # stdout stays the report
        task = progress.add_task("prompts", total=len(prompts))
        while engine.has_unfinished_requests():
            steps = engine.stats.steps
            outputs = engine.step()
            if engine.stats.steps == steps:
                raise ReportError("the engine scheduled nothing; the prompts do not fit its KV cache")
            stats.step()
            progress.advance(task, sum(out.finished for out in outputs))
    stats.detach()
    return stats


# -- the report -------------------------------------------------------------------------------------------------
def default_ep_sizes(num_experts: int) -> list[int]:
    """Powers of two from 2 that divide the expert count, up to 64 (``E=8 -> [2, 4, 8]``)."""
    return [w for w in (2, 4, 8, 16, 32, 64) if w <= num_experts and num_experts % w == 0]


def build_report(stats: RoutingStats, counts: str = "cumulative", ep_sizes: list[int] | None = None,
                 redundant: int | None = None, expert_bytes: int | None = None) -> dict:
    """The machine-readable report (JSON-able): per-layer metrics, per EP size and placement the rank loads,
    the EPLB advice. ``ValueError`` naming the EP size when a placement does not fit."""
    counts_LE = as_counts(stats.cumulative_counts() if counts == "cumulative" else stats.window_counts())
    sizes = default_ep_sizes(stats.num_experts) if ep_sizes is None else ep_sizes
    expert_bytes = stats.expert_bytes if expert_bytes is None else expert_bytes
    placements, advice = [], []
    for size in sizes:
        try:
            loads, adv = ep_loads(counts_LE, size, redundant, expert_bytes)
        except ValueError as e:
            raise ValueError(f"EP size {size} does not fit {stats.num_experts} experts: {e} (choose --redundant N "
                             f"so that {stats.num_experts} + N is a multiple of {size})") from None
        placements += [{k: v for k, v in asdict(load).items() if k != "phy2log"} for load in loads]
        advice.append(adv.to_dict())
    routed = int(counts_LE.sum())
    return {
        "format": FORMAT, "model": stats.model, "counts": counts, "num_layers": stats.num_layers,
        "num_experts": stats.num_experts, "top_k": stats.top_k, "steps": stats.steps, "window": stats.window,
        "routed": routed, "tokens": routed // (stats.top_k * stats.num_layers) if stats.top_k else None,
        "layer_names": stats.layer_names, "counts_LE": counts_LE.astype(np.int64).tolist(),
        "layers": [asdict(LayerLoad.of(name, c)) for name, c in zip(stats.layer_names, counts_LE, strict=True)],
        "all_layers": asdict(LayerLoad.of("all", counts_LE.sum(axis=0))),
        "ep": placements, "eplb": advice, "expert_bytes": expert_bytes,
        "notes": ["balancedness = mean/max rank load (1 = perfect); step_balancedness = sum over layers of the mean "
                  "/ sum of the max rank load (each layer waits for its straggler)",
                  "EPLB predictions are in-sample: the placement is fitted to the counts it is scored on",
                  "replica memory = expert weights as stored (SwiGLU: 3*D*F*bytes per element) x redundant slots "
                  "x layers; activations and KV cache are not included"],
    }


# -- terminal ---------------------------------------------------------------------------------------------------
def print_report(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not console.is_terminal:  # a pipe or a file: 80 columns would wrap the tables
        console.width = max(console.width, 120)
    tokens = f", {report['tokens']:,} tokens" if report["tokens"] is not None else ""
    title = f"Routing load per layer — {report['model'] or 'model'} ({report['routed']:,} routed{tokens}, " \
            f"{report['counts']} counts)"
    table = Table(title=title)
    for column in ("layer", "routed", "max/mean", "CV", "norm. entropy", "hottest expert:share", "dead experts"):
        table.add_column(column, justify="right" if column in ("routed", "max/mean", "CV", "norm. entropy") else "left")
    for row in report["layers"] + [report["all_layers"]]:
        hot = " ".join(f"{e}:{s:.0%}" for e, s in zip(row["hottest"], row["hottest_share"], strict=True))
        dead = " ".join(map(str, row["dead"][:8])) + (" …" if len(row["dead"]) > 8 else "") or "-"
        table.add_row(short_name(row["name"]), f"{row['routed']:,}", f"{row['max_over_mean']:.2f}", f"{row['cv']:.2f}",
                      f"{row['normalized_entropy']:.3f}", hot or "-", dead, end_section=row["name"] == "all")
    console.print(table)
    if report["ep"]:
        console.print(_ep_table(report["ep"]))
        console.print(_eplb_table(report["eplb"]))
    else:
        console.print(f"no power-of-two EP size divides {report['num_experts']} experts: pass --ep-sizes (and "
                      "--redundant to make them fit)")
    for note in report["notes"]:
        console.print(f"[dim]{note}[/dim]")


def _ep_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="Per EP rank (all layers)")
    for column in ("EP", "placement", "rank loads", "balancedness", "step bal.", "straggler"):
        table.add_column(column, justify="left" if column in ("placement", "rank loads") else "right")
    for row in rows:
        loads = row["loads"]
        shown = " ".join(f"{v:,.0f}" for v in loads) if len(loads) <= 8 else f"{min(loads):,.0f} … {max(loads):,.0f}"
        name = row["placement"] + (f" +{row['num_redundant']}" if row["num_redundant"] else "")
        table.add_row(str(row["ep_size"]), name, shown, f"{row['balancedness']:.3f}",
                      f"{row['step_balancedness']:.3f}", f"rank {row['straggler']}")
    return table


def _eplb_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="EPLB recommendation (balanced placement with redundant replicas)")
    for column in ("EP", "redundant", "baseline step bal.", "EPLB step bal.", "speed-up", "replica memory"):
        table.add_column(column, justify="right")
    for row in rows:
        base = "-" if row["baseline"] is None else f"{row['baseline_step_balancedness']:.3f} ({row['baseline']})"
        speedup = "-" if row["predicted_speedup"] is None else f"{row['predicted_speedup']:.2f}x"
        memory = "unknown (--expert-bytes)" if row["replica_bytes"] is None else \
            f"{_bytes(row['replica_bytes'])} ({_bytes(row['replica_bytes_per_rank'])}/rank)"
        table.add_row(str(row["ep_size"]), str(row["num_redundant"]), base,
                      f"{row['predicted_step_balancedness']:.3f}", speedup, memory)
    return table


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- the CLI ----------------------------------------------------------------------------------------------------
def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"EP sizes ({text!r}) must be integers >= 1")
    return sizes


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="moe-report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--stats", help="routing statistics JSON file (RoutingStats.save, moe-serve report.output_dir)")
    source.add_argument("--url", help="a running moe-serve, e.g. http://127.0.0.1:8000")
    source.add_argument("--prompts", help="JSONL file of {\"prompt\": ...} or {\"text\": ...} lines to run")
    ap.add_argument("--model", help="with --prompts: checkpoint directory (default: the embedded default model)")
    ap.add_argument("--max-tokens", type=int, default=16, help="with --prompts: tokens generated per prompt")
    ap.add_argument("--window", type=int, default=100, help="with --prompts: engine steps in the windowed counts")
    ap.add_argument("--counts", choices=("cumulative", "window"), default="cumulative")
    ap.add_argument("--ep-sizes", type=_sizes, help="e.g. 2,4,8 (default: powers of two dividing the experts)")
    ap.add_argument("--redundant", type=_non_negative,
                    help="EPLB replica slots (default: the fewest >= 1 that fit each EP size)")
    ap.add_argument("--expert-bytes", type=_non_negative, help="bytes of one expert's weights (default: from the "
                    "statistics, i.e. the model's experts as stored)")
    ap.add_argument("--out", default="moe-report", help="directory for the JSON and PNG files (default: %(default)s)")
    ap.add_argument("--wandb", action="store_true", help="log the figures and tables to a wandb run (offline "
                    "unless WANDB_MODE says otherwise)")
    ap.add_argument("--wandb-project", default="moe-report")
    ap.add_argument("--timeout", type=float, default=10.0, help="with --url: seconds to wait for the server")
    args = ap.parse_args(argv)
    if args.model is not None and args.prompts is None:
        ap.error("--model needs --prompts")
    if args.max_tokens < 1 or args.window < 1:
        ap.error(f"--max-tokens ({args.max_tokens}) and --window ({args.window}) must be >= 1")
    return args


def load_stats(args: argparse.Namespace) -> RoutingStats:
    if args.stats is not None:
        return RoutingStats.load(args.stats)
    if args.url is not None:
        return fetch_stats(args.url, args.timeout)
    return run_prompts(read_prompts(args.prompts), args.model, args.max_tokens, args.window)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        stats = load_stats(args)
        report = build_report(stats, args.counts, args.ep_sizes, args.redundant, args.expert_bytes)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        files = write_figures(report, out)
        if args.stats is None:
            files["stats"] = str(out / "routing_stats.json")
            stats.save(files["stats"])
        print_report(report)
        if args.wandb:
            files["wandb_run_dir"] = log_wandb(report, files, out, args.wandb_project)
        files["report"] = str(out / "report.json")
        report["files"] = dict(files)
        Path(files["report"]).write_text(json.dumps(report, indent=1))
    except (ReportError, ValueError, OSError) as e:
        print(f"moe-report: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(str(p) for p in files.values() if p)}")
    return 0


def write_figures(report: dict, out: Path) -> dict:
    files = {"heatmap": str(out / "heatmap.png"), "ranks": str(out / "ranks.png") if report["ep"] else None}
    plot_heatmap(report, files["heatmap"])
    if files["ranks"]:
        plot_ranks(report, files["ranks"])
    return files


def log_wandb(report: dict, files: dict, out: Path, project: str) -> str | None:
    """One wandb run with the figures, the per-layer and per-rank tables and summary figures; its directory."""
    try:
        import wandb
    except ImportError:
        raise ReportError("--wandb needs wandb: pip install wandb") from None
    mode = os.environ.get("WANDB_MODE", "offline")
    config = {k: report[k] for k in ("model", "counts", "num_layers", "num_experts", "top_k", "steps", "routed")}
    run = wandb.init(project=project, dir=str(out), mode=mode, config=config, job_type="moe-report")
    layer_cols = ["layer", "routed", "max_over_mean", "cv", "normalized_entropy", "hottest", "dead"]
    log = {"routing/heatmap": wandb.Image(files["heatmap"]),
           "routing/layers": wandb.Table(columns=layer_cols, data=[
               [r["name"], r["routed"], r["max_over_mean"], r["cv"], r["normalized_entropy"], str(r["hottest"]),
                str(r["dead"])] for r in report["layers"]])}
    if files.get("ranks"):
        log["routing/ranks"] = wandb.Image(files["ranks"])
        log["routing/ep"] = wandb.Table(columns=["ep_size", "placement", "balancedness", "step_balancedness",
                                                 "straggler"], data=[
            [r["ep_size"], r["placement"], r["balancedness"], r["step_balancedness"], r["straggler"]]
            for r in report["ep"]])
    run.log(log)
    run.summary["max_over_mean"] = report["all_layers"]["max_over_mean"]
    for advice in report["eplb"]:
        run.summary[f"eplb/ep{advice['ep_size']}/predicted_speedup"] = advice["predicted_speedup"]
    run_dir = None if mode == "disabled" else str(Path(run.dir).parent)
    run.finish()
    return run_dir


if __name__ == "__main__":
    sys.exit(main())
