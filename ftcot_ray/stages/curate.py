"""`ftcot curate`: grade the teacher's rationales, keep the correct ones, format training pairs.

Reads: `completions` (the teach folder, or `--in`), `problems` (the teach folder's copy, else the
data stage's). Keeps samples with ``sample_idx < curate.diversity``. Writes: `curated`, `problems`
(with a val split carved out of train), `ft_cot_pairs`, `vanilla_pairs`, `step_by_step_pairs`. The work is a few
thousand rows of string handling, so it runs on the driver: Ray would only add start-up time.
What it does lives in ftcot_ray/curation.py.
"""

from __future__ import annotations

from pathlib import Path

from .. import curation
from ..artifacts import is_complete, open_stage, stage_dir
from ..config import Config
from ..errors import DataError
from ..schemas import read_table, table_path
from ..tasks.custom import resolve_task

STAGE = "curate"
INPUTS = ("completions", "problems")
OUTPUTS = ("curated", "problems", "ft_cot_pairs", "vanilla_pairs", "step_by_step_pairs")


def load_problems(cfg: Config, teach_dir: Path, rows: list[dict], where: str) -> tuple[list[dict], str]:
    """The problems table: the teach folder's copy, else the data stage's, else rebuilt from completions."""
    candidates = [teach_dir]
    data_dir = stage_dir(cfg, "data")
    if is_complete(data_dir):
        candidates.append(data_dir)
    for folder in candidates:
        if table_path(folder, "problems").is_file():
            problems = read_table(folder, "problems")
            curation.check_problems_match(problems, rows, where)
            return problems, str(table_path(folder, "problems"))
    # A teach folder made elsewhere (e.g. imported completions) without its data stage at hand.
    return curation.problems_from_completions(rows, cfg.data.dataset), "completions"


def run(cfg: Config, out: Path | None = None, inp: Path | None = None) -> dict:
    st = open_stage(cfg, STAGE, out, inp)
    if st.reused:
        return st.summary
    rows = st.read("completions")
    where = str(table_path(st.input, "completions"))
    if not rows:
        raise DataError(f"{where}: no completions (did teach run on an empty data set?)")
    c = cfg.curate
    d_max = curation.check_diversity(rows, c.diversity)
    task = resolve_task(cfg.data)

    problems, problems_from = load_problems(cfg, st.input, rows, where)
    problems = curation.with_val_split(problems, c.val_fraction, c.val_seed)
    curated = curation.curate_rows(rows, task, c.diversity, drop_truncated=c.drop_truncated, dedup=c.dedup)
    curated = curation.apply_splits(curated, problems)
    curation.check_some_kept(curated, where)

    family = cfg.student.family
    ft_cot = curation.ft_cot_pairs(curated, family)
    vanilla = curation.vanilla_pairs(problems, family)
    step_by_step = curation.step_by_step_pairs(curated, family)
    st.write("curated", curated)
    st.write("problems", problems)
    st.write("ft_cot_pairs", ft_cot)
    st.write("vanilla_pairs", vanilla)
    st.write("step_by_step_pairs", step_by_step)
    summary = curation.curation_stats(curated, problems, len(ft_cot), len(vanilla), c.diversity,
                                      len(step_by_step)) | {
        "samples_available": d_max,
        "family": family,
        "problems_from": problems_from,
        "teach_dir": str(st.input),
        "out": str(st.out),
    }
    return st.finish(summary, OUTPUTS)
