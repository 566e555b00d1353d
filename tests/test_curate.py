"""Curate: grading, reject reasons, D filtering, val carving, the paper's pair formats, the stage CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftcot_ray import curation
from ftcot_ray.artifacts import finish, read_manifest, stage_dir
from ftcot_ray.config import load_config
from ftcot_ray.io import write_jsonl
from ftcot_ray.tables import read_table
from ftcot_ray.tasks import get_task

from helpers_curate import curate_rows

REPO = Path(__file__).resolve().parents[1]
COIN = get_task("coin_flip_synth")


def completion(i: int, k: int, split: str, gold: str, rationale: str, step2: str | None,
               finish_reason: str = "stop", error: str | None = None) -> dict:
    """One row of the teach stage's completions table."""
    q = f"Question number {i}?"
    return {
        "sample_index": i, "sample_idx": k, "split": split, "question": q, "answer": gold,
        "reasoning_prompt": f"Q: {q}\nA: Let's think step by step.", "rationale": rationale,
        "answer_prompt": "...", "answer_completion": step2, "finish_reason": finish_reason,
        "prompt_tokens": 10, "completion_tokens": 20, "cost_usd": 0.0, "model": "sim", "temperature": 0.7,
        "error": error, "attempts": 1,
    }


def handcrafted() -> list[dict]:
    """Five train questions (0-4) and one test question (5), three samples each at most."""
    c = completion
    return [
        c(0, 0, "train", "yes", " Ann holds it, so it stays heads up.", " yes."),
        c(0, 1, "train", "yes", "ann holds it,  so it stays heads up. ", " Yes."),  # same text after normalising
        c(0, 2, "train", "yes", " Ann flips it.", " no."),
        c(1, 0, "train", "no", None, None, finish_reason=None, error="HTTP 500 after 5 attempts"),
        c(1, 1, "train", "no", " Bob flips it, so it is now tails", " no.", finish_reason="length"),
        c(1, 2, "train", "no", " Bob flips it, so it is now tails up.", " no."),
        c(2, 0, "train", "yes", " Hmm.", " I cannot tell."),
        c(2, 1, "train", "yes", " Tom flips it.", " no."),
        c(3, 0, "train", "no", " Sam flips it, so it is now tails up.", " no, it is tails up."),
        c(4, 0, "train", "yes", " Max holds it.", " yes."),
        c(4, 1, "train", "yes", " Max does not flip it.", " yes."),
        c(5, 0, "test", "no", " Eva flips it.", " no."),
        c(5, 1, "test", "no", " Eva holds it.", " yes."),
    ]


def problems_of(rows: list[dict]) -> list[dict]:
    return curation.problems_from_completions(rows, "coin_flip_synth")  # each question's sample 0


# --------------------------------------------------------------------------- grading and reject reasons


def test_hand_computed_counts_at_d2():
    curated = curate_rows(handcrafted(), COIN, diversity=2, drop_truncated=True, dedup=True)
    assert len(curated) == 11  # sample_idx 2 rows left out
    reason = {(r["sample_index"], r["sample_idx"]): r["reject_reason"] for r in curated}
    assert reason == {
        (0, 0): None, (0, 1): "duplicate",
        (1, 0): "api_error", (1, 1): "truncated",
        (2, 0): "no_answer", (2, 1): "wrong_answer",
        (3, 0): None,
        (4, 0): None, (4, 1): None,
        (5, 0): None, (5, 1): "wrong_answer",
    }
    assert all(r["kept"] == (r["reject_reason"] is None) for r in curated)
    by_key = {(r["sample_index"], r["sample_idx"]): r for r in curated}
    assert by_key[(0, 1)]["prediction"] == "yes" and by_key[(0, 1)]["correct"]  # graded, then a duplicate
    assert by_key[(1, 1)]["correct"]  # right but cut at max_tokens
    assert by_key[(1, 0)]["prediction"] is None and not by_key[(1, 0)]["correct"]

    # The stage's counters, from batches cut anywhere (a question split across two batches counts once).
    counts, questions = curation.add_counts([curation.batch_counts(curated[:3]), curation.batch_counts(curated[3:])])
    splits = {"train": 5, "test": 1}
    stats = curation.stats_from_counts(counts, questions, splits, {"ft_cot": 4}, diversity=2)
    assert stats["rejects"] == {"api_error": 1, "truncated": 1, "no_answer": 1, "wrong_answer": 2, "duplicate": 1}
    assert stats["kept_rows"] == 4 and stats["questions_with_kept"] == 3
    assert stats["train_questions"] == 5 and stats["mean_kept_per_question"] == 0.8
    # API errors are no answer of the teacher's: train 6/8, test 1/2, all 7/10.
    assert stats["teacher_accuracy"] == {"train": 0.75, "test": 0.5, "all": 0.7}


def test_diversity_reads_a_prefix_of_the_samples():
    d1 = curate_rows(handcrafted(), COIN, diversity=1)
    assert {r["sample_idx"] for r in d1} == {0} and len(d1) == 6
    d3 = curate_rows(handcrafted(), COIN, diversity=3, dedup=False)
    assert len(d3) == 13
    kept = {(r["sample_index"], r["sample_idx"]) for r in d3 if r["kept"]}
    # Without dedup the repeated rationale stays; (1, 2) only exists at D = 3.
    assert kept == {(0, 0), (0, 1), (1, 2), (3, 0), (4, 0), (4, 1), (5, 0)}


def test_truncated_rows_are_kept_when_asked_as_in_the_paper():
    curated = curate_rows(handcrafted(), COIN, diversity=2, drop_truncated=False)
    row = next(r for r in curated if (r["sample_index"], r["sample_idx"]) == (1, 1))
    assert row["kept"] and row["reject_reason"] is None


def test_diversity_above_the_samples_taken_is_an_error():
    assert curation.check_diversity(handcrafted(), 3) == 3
    with pytest.raises(ValueError, match="teacher.samples>=4"):
        curation.check_diversity(handcrafted(), 4)


def test_missing_column_names_file_line_and_column(tmp_path):
    rows = handcrafted()
    del rows[2]["answer_completion"]
    write_jsonl(tmp_path / "completions.jsonl", rows)
    with pytest.raises(ValueError, match=r"completions.jsonl:3: completions row lacks column\(s\) answer_completion"):
        read_table(tmp_path, "completions")


# --------------------------------------------------------------------------- validation split


def test_val_carving_is_seeded_disjoint_and_per_question():
    train = list(range(100))
    a_train, a_val = curation.carve_val(train, 0.1, 0)
    assert (a_train, a_val) == curation.carve_val(reversed(train), 0.1, 0)  # order of input irrelevant
    assert len(a_val) == 10 and not set(a_train) & set(a_val) and sorted(a_train + a_val) == train
    assert curation.carve_val(train, 0.1, 1)[1] != a_val
    assert curation.carve_val(train, 0.0, 0) == (train, [])
    assert len(curation.carve_val([3, 7], 0.1, 0)[1]) == 1  # a val split whenever one is asked for

    rows = handcrafted()
    index = curation.ProblemIndex.of(problems_of(rows)).with_val(0.4, 0)
    val = {i for i in range(6) if index.lookup(i)[0] == "val"}
    assert len(val) == 2 and val <= {0, 1, 2, 3, 4}
    assert index.lookup(5)[0] == "test" and index.counts() == {"train": 3, "val": 2, "test": 1}
    curated = curate_rows(rows, COIN, 3, problems=index)
    for r in curated:  # every sample of a question is on its question's side
        assert (r["split"] == "val") == (r["sample_index"] in val)


# --------------------------------------------------------------------------- pair formats


def test_pair_formats_are_the_papers_strings():
    rows = [completion(0, 0, "train", " no ", " \n\nAnn flips the coin, so it is now tails up.\n", " no.")]
    rows[0]["question"] = " A coin is heads up. Ann flips the coin. Is the coin still heads up? "
    q = "A coin is heads up. Ann flips the coin. Is the coin still heads up?"
    curated = curate_rows(rows, COIN, 1)
    problems = problems_of(rows)

    dec = curation.ft_cot_pairs(curated, "decoder")
    assert dec == [{"sample_index": 0, "sample_idx": 0, "split": "train", "prompt": f"{q} ###",
                    "completion": " Ann flips the coin, so it is now tails up. --> no"}]
    enc = curation.ft_cot_pairs(curated, "encoder-decoder")
    assert (enc[0]["prompt"], enc[0]["completion"]) == (q, "Ann flips the coin, so it is now tails up. --> no")

    van = curation.vanilla_pairs(problems, "decoder")
    assert van == [{"sample_index": 0, "sample_idx": 0, "split": "train", "prompt": f"{q} ###", "completion": " no"}]
    van_enc = curation.vanilla_pairs(problems, "encoder-decoder")
    assert (van_enc[0]["prompt"], van_enc[0]["completion"]) == (q, "no")


def test_pairs_use_gold_answer_and_only_kept_train_val_rows():
    rows = handcrafted()
    rows[8]["answer_completion"] = " NO."  # the teacher's own spelling: the pair still says the gold "no"
    problems = problems_of(rows)
    curated = curate_rows(rows, COIN, 2, dedup=True, problems=curation.ProblemIndex.of(problems).with_val(0.0, 0))
    pairs = curation.ft_cot_pairs(curated, "decoder")
    assert [(p["sample_index"], p["sample_idx"]) for p in pairs] == [(0, 0), (3, 0), (4, 0), (4, 1)]
    assert pairs[1]["completion"] == " Sam flips it, so it is now tails up. --> no"
    vanilla = curation.vanilla_pairs(problems, "decoder")
    assert [p["sample_index"] for p in vanilla] == [0, 1, 2, 3, 4]  # every train question, no test


def test_matches_the_authors_fine_tune_file_and_keeps_323_multiarith_rationales(shared_datasets):
    """The authors' MultiArith completions, shaped as our completions table, curated as in the paper."""
    rt = shared_datasets / "reasoning-teacher"
    raw = json.loads((rt / "teacher_completions_mmmaxyoung_test2/saved/completion_data/"
                      "B_text-davinci-002__C_zs_cot/D_multiarith.json").read_text())
    train = set(json.loads((rt / "data/split/multiarith__default.json").read_text())["train"])
    rows = [
        completion(s["sample_index"], s["completion_index"], "train" if s["sample_index"] in train else "test",
                   s["answer"], s["reasoning_completion"], s["completion"], s["reasoning_finish_reason"])
        | {"question": s["question"]}
        for samples in raw["data"].values() for s in samples
    ]
    curated = curate_rows(rows, get_task("multiarith"), 1, drop_truncated=False)
    pairs = curation.ft_cot_pairs(curated, "decoder")
    assert len(pairs) == 323  # the paper's count: 323 of the 420 training questions have a correct rationale

    # Their GPT-3 file writes "{q}\n\n###\n\n" -> " {rationale}\n\n-->\n\n{answer} END": same text, other separators.
    theirs = [json.loads(line) for line in (rt / "teacher_completions_mmmaxyoung_test2/saved/finetune_data/"
                                            "P_openai/F_zs_cot_multiarith.jsonl").read_text().splitlines() if line]
    ours: dict[str, set[str]] = {}  # MultiArith repeats a few questions, with different rationales
    for p in pairs:
        ours.setdefault(p["prompt"].removesuffix(" ###"), set()).add(p["completion"])
    assert len(theirs) >= 322
    for t in theirs:
        q = t["prompt"].removesuffix("\n\n###\n\n").strip()
        rationale, answer = t["completion"].removesuffix(" END").split("\n\n-->\n\n")
        assert f"{rationale} --> {answer}" in ours[q]


# --------------------------------------------------------------------------- nothing kept


def test_no_rows_kept_names_the_cause():
    rows = [completion(i, 0, "train", "yes", None, None, finish_reason=None, error="connection refused")
            for i in range(3)]
    curated = curate_rows(rows, COIN, 1)
    with pytest.raises(ValueError, match=r"no rationale kept of 3 training completions \(api_error=3\).*teacher endpoint"):
        curation.check_some_kept(curated, "completions.jsonl")
    wrong = curate_rows([completion(0, 0, "train", "yes", " x", " no.")], COIN, 1)
    with pytest.raises(ValueError, match="wrong_answer=1"):
        curation.check_some_kept(wrong, "completions.jsonl")


def test_problems_mismatch_is_an_error():
    rows = handcrafted()
    problems = problems_of(rows)
    problems[2] = problems[2] | {"question": "something else"}
    with pytest.raises(ValueError, match="sample_index 2: the completion's question differs"):
        curation.grade_batch(rows, COIN, 3, problems=curation.ProblemIndex.of(problems), where="completions.jsonl")
    with pytest.raises(ValueError, match="sample_index 5 has no problem"):
        curation.grade_batch(rows, COIN, 3, problems=curation.ProblemIndex.of(problems_of(rows)[:5]))


# --------------------------------------------------------------------------- the stage, via the CLI


def ftcot(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ftcot_ray", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def write_stage(cfg, stage: str, tables: dict[str, list[dict]]) -> Path:
    out = stage_dir(cfg, stage)
    for name, rows in tables.items():
        write_jsonl(out / name, rows)
    finish(out, cfg, stage, summary={"rows": sum(map(len, tables.values()))})
    return out


def test_curate_stage_cli_writes_outputs_and_reuses(tmp_path):
    overrides = [f"run_dir={tmp_path}", "curate.diversity=2", "curate.dedup=true", "curate.val_fraction=0.2"]
    cfg = load_config("quickstart", overrides)
    rows = handcrafted()
    # The data stage also holds a question (6) the teacher never saw: vanilla still trains on it.
    problems = problems_of(rows) + [{"sample_index": 6, "question": "Question number 6?", "answer": "no",
                                     "split": "train", "dataset": "coin_flip_synth"}]
    data_dir = write_stage(cfg, "data", {"problems.jsonl": problems})
    teach_dir = write_stage(cfg, "teach", {"completions.jsonl": rows})

    res = ftcot("curate", "--config", "quickstart", *overrides)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    out = stage_dir(cfg, "curate")
    assert summary["out"] == str(out) and summary["teach_dir"] == str(teach_dir)
    assert summary["problems_from"] == str(data_dir / "problems.jsonl")
    assert summary["rejects"] == {"api_error": 1, "truncated": 1, "no_answer": 1, "wrong_answer": 2, "duplicate": 1}

    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["stage"] == "curate" and manifest["summary"] == summary
    curated = read_table(out, "curated")
    carved = read_table(out, "problems")
    assert len(curated) == 11 and len(carved) == 7
    splits = {p["sample_index"]: p["split"] for p in carved}
    assert sorted(splits.values()).count("val") == 1 and splits[5] == "test"  # round(0.2 * 6) = 1
    assert all(r["split"] == splits[r["sample_index"]] for r in curated)
    ft = read_table(out, "ft_cot_pairs")
    assert len(ft) == summary["pairs"]["ft_cot"] == 4
    assert all(p["prompt"].endswith(" ###") and " --> " in p["completion"] for p in ft)
    vanilla = read_table(out, "vanilla_pairs")
    assert sorted(p["sample_index"] for p in vanilla) == [0, 1, 2, 3, 4, 6]

    again = ftcot("curate", "--config", "quickstart", *overrides)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1]) == summary | {"reused": True}


def test_curate_stage_cli_errors(tmp_path):
    overrides = [f"run_dir={tmp_path}"]
    res = ftcot("curate", "--config", "quickstart", *overrides)
    assert res.returncode == 2 and "run `ftcot teach`" in res.stderr  # no teach output yet

    cfg = load_config("quickstart", overrides)
    failed = [completion(i, 0, "train", "yes", None, None, finish_reason=None, error="connection refused")
              for i in range(4)]
    teach = write_stage(cfg, "teach", {"completions.jsonl": failed})
    out = tmp_path / "elsewhere"
    res = ftcot("curate", "--config", "quickstart", "--in", str(teach), "--out", str(out), *overrides)
    assert res.returncode == 2
    assert "api_error=4" in res.stderr and "teacher endpoint" in res.stderr
    assert not (out / "manifest.json").exists()
