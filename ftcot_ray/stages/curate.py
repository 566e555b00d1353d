"""`ftcot curate`: grade the teacher's rationales, keep the correct ones, format training pairs.

Reads the teach folder's ``completions.jsonl`` (``--in`` overrides), keeps samples with
``sample_idx < curate.diversity``, and writes ``curated.jsonl``, ``problems.jsonl`` (with a val
split carved out of train), ``ft_cot_pairs.jsonl`` and ``vanilla_pairs.jsonl``. The work is a few
thousand rows of string handling, so it runs in-process: Ray would only add start-up time.
"""

from __future__ import annotations

from pathlib import Path

from .. import curation
from ..artifacts import begin, finish, is_complete, read_manifest, require, stage_dir, stage_key
from ..cli import add_stage_arguments, run_stage
from ..config import Config
from ..io import read_jsonl, write_jsonl
from ..tasks.custom import resolve_task

STAGE = "curate"
PROBLEM_COLUMNS = ["sample_index", "question", "answer", "split", "dataset"]
PAIR_COLUMNS = ["sample_index", "sample_idx", "split", "prompt", "completion"]
INPUT_COLUMNS = {"completions.jsonl": list(curation.REQUIRED_COLUMNS), "problems.jsonl": PROBLEM_COLUMNS}
OUTPUT_COLUMNS = {
    "curated.jsonl": list(curation.REQUIRED_COLUMNS) + ["prediction", "correct", "kept", "reject_reason"],
    "problems.jsonl": PROBLEM_COLUMNS,
    "ft_cot_pairs.jsonl": PAIR_COLUMNS,
    "vanilla_pairs.jsonl": PAIR_COLUMNS,
}


def load_problems(cfg: Config, teach_dir: Path, rows: list[dict], where: str) -> tuple[list[dict], str]:
    """The problems table: the teach folder's copy, else the data stage's, else rebuilt from completions."""
    candidates = [teach_dir / "problems.jsonl"]
    data_dir = stage_dir(cfg, "data")
    if is_complete(data_dir):
        candidates.append(data_dir / "problems.jsonl")
    for path in candidates:
        if path.is_file():
            problems = read_jsonl(path)
            curation.check_problems_match(problems, rows, where)
            return problems, str(path)
    # A teach folder made elsewhere (e.g. imported completions) without its data stage at hand.
    return curation.problems_from_completions(rows, cfg.data.dataset), "completions"


def run(cfg: Config, out: Path | None = None, inp: Path | None = None) -> dict:
    out = Path(out) if out else stage_dir(cfg, STAGE)
    if is_complete(out):
        return read_manifest(out)["summary"] | {"reused": True}
    inp = require(inp or stage_dir(cfg, "teach"), "teach")
    completions_path = Path(inp) / "completions.jsonl"
    if not completions_path.is_file():
        raise FileNotFoundError(f"{completions_path}: the teach output has no completions table")
    rows = read_jsonl(completions_path)
    if not rows:
        raise ValueError(f"{completions_path}: no completions (did teach run on an empty data set?)")
    where = str(completions_path)
    curation.check_columns(rows, where)
    c = cfg.curate
    d_max = curation.check_diversity(rows, c.diversity)
    task = resolve_task(cfg.data)

    problems, problems_from = load_problems(cfg, Path(inp), rows, where)
    problems = curation.with_val_split(problems, c.val_fraction, c.val_seed)
    curated = curation.curate_rows(rows, task, c.diversity, drop_truncated=c.drop_truncated, dedup=c.dedup)
    curated = curation.apply_splits(curated, problems)
    curation.check_some_kept(curated, where)

    family = cfg.student.family
    ft_cot = curation.ft_cot_pairs(curated, family)
    vanilla = curation.vanilla_pairs(problems, family)
    begin(out)
    write_jsonl(out / "curated.jsonl", curated)
    write_jsonl(out / "problems.jsonl", problems)
    write_jsonl(out / "ft_cot_pairs.jsonl", ft_cot)
    write_jsonl(out / "vanilla_pairs.jsonl", vanilla)
    summary = curation.curation_stats(curated, problems, len(ft_cot), len(vanilla), c.diversity) | {
        "samples_available": d_max,
        "family": family,
        "problems_from": problems_from,
        "teach_dir": str(inp),
        "out": str(out),
    }
    finish(out, cfg, STAGE, inputs=INPUT_COLUMNS, outputs=OUTPUT_COLUMNS, summary=summary, key=stage_key(cfg, STAGE))
    return summary


def add_arguments(parser) -> None:
    add_stage_arguments(parser, STAGE, "teach output folder (default: this config's)")


def main(args) -> int:
    return run_stage(run, args)
