"""Curation of a list of completions, composed from the production functions as the curate stage composes
them over Ray Data batches (grade with reject reasons, mark duplicates, question order)."""

from __future__ import annotations

from ftcot_ray import curation


def curate_rows(rows: list[dict], task, diversity: int, drop_truncated: bool = True, dedup: bool = False,
                problems: curation.ProblemIndex | None = None) -> list[dict]:
    out = curation.grade_batch(rows, task, diversity, drop_truncated, problems)
    if dedup:
        curation.mark_duplicates(out)
    return sorted(out, key=lambda r: (int(r["sample_index"]), int(r["sample_idx"])))
