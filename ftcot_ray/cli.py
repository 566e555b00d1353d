"""`ftcot` console script: one sub-command per stage.

The command table below owns argument parsing; a stage module exposes only `run(cfg, ...)` and
knows nothing of argparse (so stages never import the CLI). Only the invoked stage's module is
imported, so `ftcot --help` is instant. Every config-taking command shares `--config PRESET|FILE`,
dotted overrides (`train.lr=1e-4`) and `-v` (framework logs on the terminal, not only in
`<run_dir>/logs/`).

Errors: the project's own error types (ftcot_ray.errors) become one line and exit code 2; Ctrl-C
says what was kept and exits 130; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from typing import Any, Callable

from . import logs
from .config import Config, load_config, preset_names, with_overrides
from .errors import FtcotError


# --------------------------------------------------------------------------- what each command takes


def stage_options(stage: str, input_help: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", help=f"output folder (default: <run_dir>/{stage}/<key>)")
        p.add_argument("--in", dest="inp", help=input_help)

    return add


def run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", action="store_true", help="print the stages, their folders and which are done; run nothing")


def data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", help="a paper benchmark (e.g. multiarith), a synthetic task, or a name for your own file")
    p.add_argument("--source", help="raw benchmark folder (zero_shot_cot/dataset), one raw file, or your JSONL/CSV")
    p.add_argument("--out", help="exact output folder (default: <run_dir>/data/<key>)")


def teach_options(p: argparse.ArgumentParser) -> None:
    stage_options("teach", "data-stage folder (default: the config's)")(p)
    p.add_argument("--retry-errors", action="store_true", help="re-ask the rows of a finished run that ended with an error")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.add_argument("--migrate-cache", action="store_true",
                   help="move a per-answer teacher cache (written before 2026-12) into blocks, and stop "
                        "(a run does this by itself the first time it meets one)")
    p.add_argument("--dry-run", action="store_true",
                   help="print requests, tokens and dollars per step (for D_max and each D) and send nothing; "
                        "with teacher.pilot=N, N questions are answered for real first")
    # nargs="+": the file follows `--from SOURCE` on the command line (`import` itself lands in the
    # overrides positional, which argparse has already closed by then).
    p.add_argument("--from", dest="source", nargs="+", default=None, metavar="SOURCE FILE",
                   help="`ftcot teach import --from reasoning-teacher D_<key>.json --out DIR`: import released completions")
    p.add_argument("--split", default=None, help="import: the paper's split file (<key>__default.json)")


def report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run folder (config run_dir), holding eval/ and curate/")


# --------------------------------------------------------------------------- what each command does


def print_summary(summary: dict) -> None:
    print(json.dumps(summary, default=str), flush=True)


def call_stage(module, args: argparse.Namespace, cfg: Config) -> int:
    print_summary(module.run(cfg, args.out, args.inp))
    return 0


def call_data(module, args: argparse.Namespace, cfg: Config) -> int:
    # Set as raw values, not YAML-parsed override strings, so a name like "yes" or a path stays a string.
    flags = {"data.dataset": args.dataset, "data.source": args.source}
    cfg = with_overrides(cfg, {k: v for k, v in flags.items() if v is not None})
    print_summary(module.run(cfg, args.out))
    return 0


def call_teach(module, args: argparse.Namespace, cfg: Config) -> int:
    if list(args.overrides or [])[:1] == ["import"]:
        return _teach_import(args)
    from .teacher.fanout import format_figures

    if args.migrate_cache:
        print_summary(module.migrate(cfg))
        return 0
    if args.dry_run:
        plan = module.project(cfg, args.inp)
        logs.say(module.projection_text(plan))
        print_summary({"dry_run": True, "projection": plan})
        return 0
    summary = module.run(cfg, args.out, args.inp, retry_errors=args.retry_errors, progress=not args.no_progress)
    if not summary.get("reused"):
        logs.say(f"teacher: {summary['rows']} rows, {summary['ok']} ok, " + format_figures(
            {**summary, "rows_error": summary["errors"]}, summary["requests_per_s"]))
        logs.say(module.projection_text({"by_D": [summary["projected"]], "mode": summary["mode"], "model": summary["model"],
                                         "tokenizer": summary["projected"]["tokenizer"],
                                         "price_per_1m": _price_per_1m(cfg)}, summary))
    print_summary(summary)
    return 0


def _price_per_1m(cfg: Config) -> dict:
    from .teacher.projection import price_of

    (pin, pout), _ = price_of(cfg.teacher)
    return {"input": pin * 1e6, "output": pout * 1e6}


def _teach_import(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .teacher.importer import SOURCES, import_reasoning_teacher

    rest = list(args.overrides)[1:]
    source, files = (args.source[0], args.source[1:] + rest) if args.source else (None, rest)
    if source not in SOURCES:
        raise ConfigError(f"teach import: --from must be one of {', '.join(SOURCES)} (got {source!r})")
    if len(files) != 1 or not args.out:
        raise ConfigError("usage: ftcot teach import --from reasoning-teacher D_<key>.json --out DIR [--split FILE]")
    print_summary(import_reasoning_teacher(files[0], args.out, split_file=args.split))
    return 0


def call_run(module, args: argparse.Namespace, cfg: Config) -> int:
    from .preflight import preflight

    if args.plan:
        from .artifacts import is_complete, stage_dir
        from .stages import teach

        checks = preflight(cfg)
        teacher = "done: completions already in the run folder, no teacher call needed"
        if not is_complete(stage_dir(cfg, "teach")) and all(c["ok"] for c in checks):
            teacher = teach.project(cfg)
            logs.say(teach.projection_text(teacher))
        print(json.dumps({"config": cfg.name, "checks": checks, "stages": module.plan(cfg), "teacher": teacher},
                         indent=2))
        return 0
    preflight(cfg, strict=True)
    summary = module.run(cfg)
    print(summary["report"].get("table", ""), flush=True)
    print(json.dumps({"run_dir": cfg.run_dir, "report": summary["report"].get("report_md"),
                      "log": str(logs.log_file()) if logs.log_file() else None, "wall_s": summary["wall_s"]}))
    return 0


def call_report(module, args: argparse.Namespace, cfg: Config | None) -> int:
    rep = module.run_report(args.run_dir, cfg)
    print(rep["table"], flush=True)
    print_summary({k: rep[k] for k in ("report_md", "results", "plots") if k in rep} | {"rows": len(rep["rows"])})
    return 0


def sim_options(p: argparse.ArgumentParser) -> None:
    from .teacher import sim

    sim.add_arguments(p)


def call_sim(module, args: argparse.Namespace, cfg: None) -> int:
    return int(module.main(args) or 0)


@dataclass(frozen=True)
class Command:
    module: str
    help: str
    options: Callable[[argparse.ArgumentParser], None]
    call: Callable[[Any, argparse.Namespace, Any], int]
    config: str = "required"  # required | optional (report) | none (teacher-sim)
    # What Ctrl-C leaves, said as the command exits 130.
    interrupted: str = "interrupted; finished work is kept (training keeps its last checkpoint): re-run the same command to continue."


def serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detach", action="store_true",
                   help="return once the students are up and leave them running on the Ray cluster (RAY_ADDRESS)")


def call_serve(module, args: argparse.Namespace, cfg: Config) -> int:
    print_summary(module.run(cfg, detach=args.detach))
    return 0


def tune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted search of this config (its finished trials are kept, not re-run)")


def call_tune(module, args: argparse.Namespace, cfg: Config) -> int:
    from pathlib import Path

    summary = module.run(cfg, resume=args.resume)
    table = Path(summary["table"])
    if table.is_file():
        print(table.read_text(), flush=True)
    print_summary({k: v for k, v in summary.items() if k not in ("files", "study")}
                  | ({"study": summary["study"]["files"]} if summary.get("study") else {}))
    return 0


COMMANDS: dict[str, Command] = {
    "run": Command("ftcot_ray.stages.pipeline", "the whole pipeline: data, teach, curate, train, eval, report",
                   run_options, call_run),
    "data": Command("ftcot_ray.stages.data", "load a benchmark or generate a synthetic task: problems table + split",
                    data_options, call_data),
    "teach": Command("ftcot_ray.stages.teach", "zero-shot-CoT teacher completions over an OpenAI-compatible API (Ray Data fan-out, or the Batch API)",
                     teach_options, call_teach),
    "curate": Command("ftcot_ray.stages.curate", "grade rationales, keep correct ones, format training pairs",
                      stage_options("curate", "teach output folder (default: this config's)"), call_stage),
    "train": Command("ftcot_ray.stages.train", "fine-tune a student (Ray Train + DeepSpeed ZeRO), selected on validation",
                     stage_options("train", "curate stage folder (default: the run's curate output)"), call_stage),
    "eval": Command("ftcot_ray.stages.evaluate", "batched generation on a split, accuracy, baselines",
                    stage_options("eval", "problems.jsonl (or its folder); default: the curate stage's"), call_stage),
    "tune": Command("ftcot_ray.stages.tune", "Ray Tune over lr, D, steps, student on validation; registry of the best",
                    tune_options, call_tune),
    "serve": Command("ftcot_ray.stages.serve", "Ray Serve: students behind an OpenAI-compatible API (chat, completions, SSE)",
                     serve_options, call_serve,
                     # a second Ctrl-C during the shutdown: nothing to resume, say what is left
                     interrupted="interrupted; a local Ray started here stops with it (on a cluster, `serve status` "
                                 "shows whether the application is still up)"),
    "teacher-sim": Command("ftcot_ray.teacher.sim", "local OpenAI-compatible teacher: simulated, replay, fault injection",
                           sim_options, call_sim, config="none"),
    "report": Command("ftcot_ray.stages.report", "report.md + PNG plots for a run folder", report_options, call_report,
                      config="optional"),
}


# --------------------------------------------------------------------------- main


def _parser(name: str, cmd: Command) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"ftcot {name}", description=cmd.help)
    cmd.options(p)
    if cmd.config != "none":
        p.add_argument("--config", "-c", default=None,
                       help=f"preset name or YAML path (default: quickstart). Presets: {', '.join(preset_names())}")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-4")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray/DeepSpeed/transformers logs on the terminal too")
    return p


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ftcot",
        description="Fine-tune-CoT on Ray: a large teacher writes rationales, a small student learns to reason.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<12} {c.help}" for name, c in COMMANDS.items())
        + "\n\nRun `ftcot COMMAND --help` for a command's options.",
    )
    p.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND")
    return p


def _config(cmd: Command, args: argparse.Namespace) -> Config | None:
    if cmd.config == "none":
        return None
    if cmd.config == "optional" and not (args.config or args.overrides):
        return None
    overrides = [o for o in (args.overrides or []) if o != "import"] if cmd.module.endswith("teach") else args.overrides
    return load_config(args.config, list(overrides or []))


def main(argv: list[str] | None = None, prepare: Callable[[Config], Config] | None = None) -> int:
    """`prepare` (jobs/ftcot_job.py) may check or adjust the loaded config before the command runs."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    console = argv is None  # a real command line (not a test calling main([...]) in-process)
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}")
    cmd = COMMANDS[name]
    try:
        module = importlib.import_module(cmd.module)
    except ModuleNotFoundError as e:
        if e.name != cmd.module:
            raise
        print(f"ftcot {name}: not built yet in this version ({cmd.help}).", file=sys.stderr)
        return 2
    args = _parser(name, cmd).parse_args(rest)
    try:
        cfg = _config(cmd, args)
        cfg = prepare(cfg) if prepare is not None and cfg is not None else cfg
        from .artifacts import run_root

        logs.setup(run_root(cfg) if cfg else None, name, args.verbose)
        logs.console_run(console)
        return int(cmd.call(module, args, cfg) or 0)
    except FtcotError as e:
        print(f"ftcot {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ftcot {name}: {cmd.interrupted}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
