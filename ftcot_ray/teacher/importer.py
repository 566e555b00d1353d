"""`ftcot teach import --from reasoning-teacher D_<key>.json --out DIR`: the authors' released
text-davinci-002 completions as our completions table, so real rationales flow through curate,
train and eval.

The output is a complete teach-stage folder (completions.jsonl, plus problems.jsonl and split.json
in the data stage's shape, config.yaml, manifest.json), so `ftcot curate --in DIR` takes it.
Extra completions of a question (completion_index 1..) become sample_idx 1... The files record
no token usage or cost: those columns are null (unknown), not zero. The answer prompt is kept
byte-for-byte as the authors sent it (MultiArith's ends in " Therefore, the answer (arabic numerals) is").
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..artifacts import begin, finish, write_json
from ..config import Config, load_config
from ..errors import InputMissing
from ..io import InputFileError, read_json
from ..tables import write_table
from ..tasks.splits import paper_split

SOURCES = ("reasoning-teacher",)


def dataset_key(path: Path) -> str:
    """`D_multiarith.json` -> `multiarith`."""
    stem = path.stem
    return stem[2:] if stem.startswith("D_") else stem


def read_authors_file(path: Path) -> tuple[dict, dict[int, list[dict]]]:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
        raise InputFileError(f"{path}: expected the reasoning-teacher format {{'metadata': ..., 'data': {{index: [...]}}}}")
    samples: dict[int, list[dict]] = {}
    need = ("sample_index", "question", "answer", "prompt", "completion", "reasoning_prompt", "reasoning_completion")
    for key, items in data["data"].items():
        for j, c in enumerate(items):
            missing = [f for f in need if f not in c]
            if missing:
                raise InputFileError(f"{path}: data[{key!r}][{j}]: missing field(s) {', '.join(missing)}")
        samples[int(key)] = items
    return data.get("metadata") or {}, samples


def completion_rows(metadata: dict, samples: dict[int, list[dict]], split_of: dict[int, str]) -> list[dict]:
    params = metadata.get("parameters") or {}
    model = metadata.get("base_model")
    temperature = params.get("reasoning_temperature", params.get("temperature"))
    rows = []
    for idx in sorted(samples):
        for c in samples[idx]:
            rows.append({
                "sample_index": int(c["sample_index"]),
                "sample_idx": int(c.get("completion_index", 0)),
                "split": split_of[int(c["sample_index"])],
                "question": c["question"],
                "answer": str(c["answer"]),
                "reasoning_prompt": c["reasoning_prompt"],
                "rationale": c["reasoning_completion"],
                "answer_prompt": c["prompt"],
                "answer_completion": c["completion"],
                "finish_reason": c.get("reasoning_finish_reason"),
                "prompt_tokens": None,  # not recorded in the released files
                "completion_tokens": None,
                "cost_usd": None,
                "model": model,
                "temperature": temperature,
                "error": None,
                "attempts": None,
            })
    rows.sort(key=lambda r: (r["sample_index"], r["sample_idx"]))
    return rows


def import_reasoning_teacher(path: str | Path, out: str | Path, split_file: Optional[str | Path] = None,
                             cfg: Optional[Config] = None) -> dict:
    """Write a finished teach-stage folder at `out` from one of the authors' D_*.json files."""
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise InputMissing(f"no such file: {path}")
    metadata, samples = read_authors_file(path)
    n = max(samples) + 1 if samples else 0
    split = read_json(split_file) if split_file else paper_split(n)
    if not isinstance(split, dict) or not {"train", "test"} <= set(split):
        raise InputFileError(f"{split_file}: expected {{'train': [...], 'test': [...]}}")
    split_of = {int(i): name for name in ("train", "test") for i in split[name]}
    unknown = sorted(set(samples) - set(split_of))
    if unknown:
        where = split_file or f"the paper's 70/30 split of {n}"
        raise InputFileError(f"{path}: sample_index {unknown[:5]} not in {where}")
    rows = completion_rows(metadata, samples, split_of)
    key = dataset_key(path)
    cfg = cfg or load_config(None, {"name": f"import-{key}", "run_dir": str(out.parent), "data.dataset": key,
                                    "teacher.base_url": "https://api.openai.com/v1", "teacher.api": "completions",
                                    "teacher.model": str(metadata.get("base_model") or "unknown"),
                                    "teacher.temperature": float(rows[0]["temperature"] or 0.0) if rows else 0.0,
                                    "teacher.samples": max((r["sample_idx"] for r in rows), default=0) + 1,
                                    "pipeline.diversity": [1]})
    begin(out)
    problems = [{"sample_index": i, "question": samples[i][0]["question"], "answer": str(samples[i][0]["answer"]),
                 "split": split_of[i], "dataset": key} for i in sorted(samples)]
    tables = {"completions": write_table(out, "completions", rows), "problems": write_table(out, "problems", problems)}
    write_json(out / "split.json", {k: sorted(int(i) for i in split[k] if int(i) in samples) for k in ("train", "test")})
    summary = {
        "source": "reasoning-teacher", "file": str(path), "dataset": key, "model": metadata.get("base_model"),
        "questions": len(samples), "rows": len(rows), "extra_samples": len(rows) - len(samples),
        "train_questions": sum(1 for p in problems if p["split"] == "train"),
        "test_questions": sum(1 for p in problems if p["split"] == "test"),
        "split": str(split_file) if split_file else "paper 70/30 seed 0", "errors": 0,
        "truncated": sum(1 for r in rows if r["finish_reason"] == "length"),
    }
    finish(out, cfg, "teach", summary=summary, key=f"import-{key}", tables=tables)
    return summary
