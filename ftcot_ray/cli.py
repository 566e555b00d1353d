"""`ftcot` console script: one sub-command per stage.

Each command lives in its own module, which exposes ``add_arguments(parser)`` and
``main(args) -> int``; only the invoked module is imported, so ``ftcot --help`` is instant.
Stage commands share ``--config PRESET|FILE`` and dotted overrides (``train.lr=1e-4``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from .config import Config, ConfigError, load_config, preset_names

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("ftcot_ray.stages.pipeline", "the whole pipeline: data, teach, curate, train, eval, report"),
    "data": ("ftcot_ray.stages.data", "load a benchmark or generate a synthetic task: problems table + split"),
    "teach": ("ftcot_ray.stages.teach", "zero-shot-CoT teacher completions over an OpenAI-compatible API (Ray Data)"),
    "curate": ("ftcot_ray.stages.curate", "grade rationales, keep correct ones, format training pairs"),
    "train": ("ftcot_ray.stages.train", "fine-tune a student (Ray Train + DeepSpeed ZeRO)"),
    "eval": ("ftcot_ray.stages.evaluate", "batched generation on a split, accuracy, baselines"),
    "tune": ("ftcot_ray.stages.tune", "Ray Tune over lr, epochs, batch size, D, student"),
    "serve": ("ftcot_ray.stages.serve", "Ray Serve: students behind an OpenAI-compatible API"),
    "teacher-sim": ("ftcot_ray.teacher.sim", "local OpenAI-compatible teacher: simulated, replay, fault injection"),
    "report": ("ftcot_ray.stages.report", "report.md + PNG plots for a run folder"),
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", default=None,
        help=f"preset name or YAML path (default: quickstart). Presets: {', '.join(preset_names())}",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-4")


def add_stage_arguments(parser: argparse.ArgumentParser, stage: str, input_help: str) -> None:
    """--config, overrides, --out and --in: what every single-stage command takes."""
    add_config_arguments(parser)
    parser.add_argument("--out", help=f"output folder (default: <run_dir>/{stage}/<key>)")
    parser.add_argument("--in", dest="inp", help=input_help)


def run_stage(run, args: argparse.Namespace) -> int:
    """The whole `main` of a plain stage command: resolve the config, run, print the summary line."""
    print_summary(run(config_from_args(args), args.out, args.inp))
    return 0


def config_from_args(args: argparse.Namespace, extra: list[str] | None = None) -> Config:
    return load_config(args.config, list(args.overrides or []) + list(extra or []))


def print_summary(summary: dict) -> None:
    print(json.dumps(summary, default=str), flush=True)


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ftcot",
        description="Fine-tune-CoT on Ray: a large teacher writes rationales, a small student learns to reason.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<12} {desc}" for name, (_, desc) in COMMANDS.items())
        + "\n\nRun `ftcot COMMAND --help` for a command's options.",
    )
    p.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        top.error(f"unknown command {command!r}")
    module_name, desc = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"ftcot {command}: not built yet in this version ({desc}).", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"ftcot {command}", description=desc)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.main(args) or 0)
    except ConfigError as e:
        print(f"ftcot {command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ftcot {command}: interrupted; finished work is kept, re-run the same command to resume.", file=sys.stderr)
        return 130
    except Exception as e:  # a clear one-line error for the known user-facing failures
        from .artifacts import StageInputMissing
        from .io import InputFileError

        if isinstance(e, (StageInputMissing, InputFileError, FileNotFoundError, KeyError, ValueError)):
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"ftcot {command}: error: {msg}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
