"""`ftcot curate`: grade the teacher's rationales, keep the correct ones, format training pairs.

Reads: `completions` (the teach folder, or `--in`), `problems` (the teach folder's copy, else the
data stage's, else rebuilt from the completions). Keeps samples with ``sample_idx < curate.diversity``.
Writes: `curated`, `problems` (with a val split carved out of train), `ft_cot_pairs`, `vanilla_pairs`,
`step_by_step_pairs`, each as Parquet shards in question order.

The recipe, as Ray Data pipelines (the driver holds a 17-byte-a-question index and counters, never rows):

    problems  -> ProblemIndex (split, question hash), val carved       -> problems (+ val)
    completions (D prefix) -> grade + reject reasons (map_batches)     -> curated
    curated -> counters (and a check that it is in question order; else it is sorted once)
    curated -> ft_cot_pairs, step_by_step_pairs;  problems -> vanilla_pairs

What it does lives in ftcot_ray/curation.py (plain functions on rows, unit-tested without Ray).
"""

from __future__ import annotations

from pathlib import Path

from .. import curation
from ..artifacts import is_complete, open_stage, stage_dir
from ..config import Config
from ..dataplane import collect_rows, map_rows, ordered, user_errors
from ..errors import DataError
from ..tables import has_table, iter_table, locate, read_dataset, write_dataset
from ..tasks.custom import resolve_task

STAGE = "curate"
KEY = ("sample_index", "sample_idx")
OUTPUTS = ("curated", "problems", "ft_cot_pairs", "vanilla_pairs", "step_by_step_pairs")


def problems_folder(cfg: Config, teach_dir: Path) -> Path | None:
    """Where the problems table is: the teach folder's copy, else the data stage's (None: neither)."""
    for folder in (teach_dir, stage_dir(cfg, "data")):
        if has_table(folder, "problems") and (folder == teach_dir or is_complete(folder)):
            return folder
    return None


def problem_index(folder: Path | None, teach_dir: Path) -> curation.ProblemIndex:
    """Every question's split and text hash, streamed from the problems table (or, when there is none,
    from the completions' first samples: a teach folder made elsewhere, e.g. imported)."""
    if folder is not None:
        rows = (r for b in iter_table(folder, "problems", ("sample_index", "question", "split")) for r in b)
    else:
        rows = (r for b in iter_table(teach_dir, "completions", ("sample_index", "sample_idx", "question", "split"))
                for r in b if int(r["sample_idx"]) == 0)
    return curation.ProblemIndex.of(rows)


def run(cfg: Config, out: Path | None = None, inp: Path | None = None) -> dict:
    st = open_stage(cfg, STAGE, out, inp)
    if st.reused:
        return st.summary
    from ..ray_utils import init_ray

    init_ray(cfg)
    c, family = cfg.curate, cfg.student.family
    where = str(locate(st.input, "completions"))
    folder = problems_folder(cfg, st.input)
    index = problem_index(folder, st.input).with_val(c.val_fraction, c.val_seed)
    dataset = cfg.data.dataset
    with user_errors():
        d_max = check_diversity(st.input, c.diversity, where)
        counts, questions = write_curated(cfg, st, index, where)
        curation.check_kept(counts, where)
        curated = read_dataset(st.target(), "curated")
        write_problems(st, folder, index, dataset)
        for name, fn in (("ft_cot_pairs", curation.ft_cot_pairs), ("step_by_step_pairs", curation.step_by_step_pairs)):
            st.tables[name] = write_dataset(map_rows(curated, fn, family=family), st.target(), name)
        vanilla = map_rows(read_dataset(st.target(), "problems"), curation.vanilla_pairs, family=family)
        st.tables["vanilla_pairs"] = write_dataset(vanilla, st.target(), "vanilla_pairs")
    pairs = {"ft_cot": st.tables["ft_cot_pairs"]["rows"], "vanilla": st.tables["vanilla_pairs"]["rows"],
             "step_by_step": st.tables["step_by_step_pairs"]["rows"]}
    summary = curation.stats_from_counts(counts, questions, index.counts(), pairs, c.diversity) | {
        "samples_available": d_max,
        "family": family,
        "problems_from": str(locate(folder, "problems")) if folder is not None else "completions",
        "teach_dir": str(st.input),
        "out": str(st.out),
    }
    return st.finish(summary, OUTPUTS)


def check_diversity(teach_dir: Path, diversity: int, where: str) -> int:
    """D_max of the completions (one pass over one column); a D above it is an error."""
    from ray.data.aggregate import Count, Max

    ds = read_dataset(teach_dir, "completions", columns=("sample_idx",), ordered=False).select_columns(["sample_idx"])
    agg = ds.aggregate(Count(), Max("sample_idx"))
    if not agg["count()"]:
        raise DataError(f"{where}: no completions (did teach run on an empty data set?)")
    return curation.check_diversity([{"sample_idx": agg["max(sample_idx)"]}], diversity)


def write_curated(cfg: Config, st, index, where: str):
    """Grade the first D samples of every question; the curated table in question order, and its counters."""
    import ray

    c, task = cfg.curate, resolve_task(cfg.data)
    completions = read_dataset(st.input, "completions")
    keys = read_dataset(st.input, "completions", columns=KEY).select_columns(list(KEY))
    if not curation.in_question_order(collect_rows(keys, curation.key_order, batch_size=65536)):
        completions = ordered(completions.sort(list(KEY)))  # made elsewhere, not in question order: sorted once
    graded = map_rows(completions, curation.grade_batch, task=task, diversity=c.diversity, drop_truncated=c.drop_truncated,
                      problems=ray.put(index), where=where)
    if c.dedup:  # a question's samples must meet in one batch: grouped, then back in order
        graded = ordered(graded.groupby("sample_index").map_groups(_mark_duplicates, batch_format="pyarrow")
                         .sort(list(KEY)))
    st.tables["curated"] = write_dataset(graded, st.target(), "curated")
    return curation.add_counts(collect_rows(read_dataset(st.target(), "curated"), curation.batch_counts))


def _mark_duplicates(group):
    import pyarrow as pa

    rows = group.to_pylist()
    curation.mark_duplicates(rows)
    return pa.Table.from_pylist(rows)


def write_problems(st, folder: Path | None, index, dataset: str) -> None:
    """The problems table with the val split carved (from the problems source, or the completions)."""
    def with_split(rows: list[dict]) -> list[dict]:
        return [r | {"split": index.lookup(int(r["sample_index"]))[0] or r["split"]} for r in rows]

    if folder is not None:
        problems = read_dataset(folder, "problems")
    else:
        problems = map_rows(read_dataset(st.input, "completions"), curation.problems_from_completions, dataset=dataset)
    st.tables["problems"] = write_dataset(map_rows(problems, with_split), st.target(), "problems")
