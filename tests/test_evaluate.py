"""Evaluation: answer reading and grading by hand-computed examples, the self-consistency vote,
the teacher row, the paper's few-shot exemplars, and the eval stage for real (Ray Data student
replicas; an OpenAI-compatible HTTP server on 127.0.0.1 for the endpoint baselines)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ftcot_ray import evaluation as ev
from ftcot_ray.artifacts import finish, is_complete, read_manifest
from ftcot_ray.config import ConfigError, load_config, with_overrides
from ftcot_ray.io import read_jsonl, write_jsonl
from ftcot_ray.tables import read_table
from ftcot_ray.tasks import get_task

from helpers_eval import build_student, coin_questions

COIN = get_task("coin_flip")
MULTIARITH = get_task("multiarith")
ADDSUB = get_task("addsub")


# --------------------------------------------------------------------------- answer rules


def _rows(outputs_and_gold):
    return [{"sample_index": i, "question": f"q{i}", "answer": gold, "outputs": [out]}
            for i, (out, gold) in enumerate(outputs_and_gold)]


def test_ft_cot_grading_equals_hand_computed_accuracy():
    rows = _rows([
        (" Ann flips. So no --> no", "no"),  # right
        (" Ann flips. --> yes", "no"),  # wrong answer after the marker
        (" yes then no --> yes no", "yes"),  # first candidate after the marker: right
        (" Ann flips, so the coin is no", "no"),  # no marker: not well-formed, counted wrong
        (" --> maybe", "yes"),  # marker but no candidate: not well-formed
        (" no --> No.", "no"),  # yes/no read lower-cased: right
    ])
    preds = ev.grade_batch(rows, COIN, "ft_cot")
    assert [p["correct"] for p in preds] == [True, False, True, False, False, True]
    assert [p["well_formed"] for p in preds] == [True, True, True, False, False, True]
    assert [p["prediction"] for p in preds] == ["no", "yes", "yes", None, None, "no"]
    m = ev.compute_metrics(preds)
    assert (m["n"], m["correct"], m["accuracy"], m["well_formed"]) == (6, 3, 0.5, 4 / 6)
    # The paper's rule (last candidate when the marker is missing) turns row 3 right.
    paper = ev.grade_batch(rows, COIN, "ft_cot", require_marker=False)
    assert [p["correct"] for p in paper] == [True, False, True, True, False, True]


def test_vanilla_reads_the_first_candidate_and_numbers_are_exact_for_multiarith():
    rows = _rows([(" 39", "39"), (" 39.0", "39"), (" 1,200 apples", "1200"), (" none", "5"), (" 7 or 8", "8")])
    preds = ev.grade_batch(rows, MULTIARITH, "vanilla")
    assert [p["correct"] for p in preds] == [True, False, True, False, False]
    assert [p["well_formed"] for p in preds] == [True, True, True, False, True]
    m = ev.compute_metrics(preds)
    assert m["accuracy"] == pytest.approx(2 / 5)


def test_few_shot_cot_marker_and_fallback():
    rows = _rows([
        ("3 + 4 = 7. The answer is 7.", "7"),
        ("3 + 4 = 7, then 8", "8"),  # marker missing: the paper's last candidate (8) -> right, not well-formed
        ("The answer is 6.0", "6"),  # AddSub compares floats
    ])
    preds = ev.grade_batch(rows, ADDSUB, "few_shot_cot")
    assert [p["correct"] for p in preds] == [True, True, True]
    assert [p["well_formed"] for p in preds] == [True, False, True]


def test_zero_shot_cot_reads_the_step_two_answer():
    out = ev.zero_shot_cot_output(" Therefore, the answer is yes, I guess. Ann flips.", " no.")
    pred, ok = ev.read_prediction(COIN, out, "zero_shot_cot")
    assert (pred, ok) == ("no", True)


def test_cut_at_stop_drops_the_next_question():
    assert ev.cut_at_stop(" so 5. The answer is 5.\nQ: Tom has 3 apples") == " so 5. The answer is 5."


# --------------------------------------------------------------------------- self-consistency


@pytest.mark.parametrize("answers, voted", [
    (["yes", "no", "no"], "no"),  # majority
    (["yes", "no", "no", "yes"], "yes"),  # tie: the earliest sample's answer
    (["no", "yes", "yes", "no"], "no"),
    ([None, None, "no"], "no"),  # None does not vote
    ([None, "no", "yes"], "no"),  # tie among voters: the earliest voter
    ([None, None], None),  # all None: None
])
def test_majority_vote(answers, voted):
    assert ev.majority_vote(answers) == voted


def test_vote_counts_equal_numbers_once_for_float_tasks():
    assert ev.majority_vote(["7", "6", "6.0"], ADDSUB) == "6"
    assert ev.majority_vote(["7", "6", "6.0"], MULTIARITH) == "7"  # exact strings: three different answers


def test_self_consistency_accuracy_at_1_and_at_k():
    rows = [
        {"sample_index": 0, "answer": "yes", "outputs": [" --> no", " --> yes", " --> yes"], "output_tokens": [3, 3, 3]},
        {"sample_index": 1, "answer": "no", "outputs": [" --> no", " --> yes", " --> yes"], "output_tokens": [3, 3, 3]},
        {"sample_index": 2, "answer": "no", "outputs": [" --> no", " junk", " --> no"], "output_tokens": [3, 1, 3]},
        {"sample_index": 3, "answer": "yes", "outputs": [" junk", " --> yes", " --> no"], "output_tokens": [1, 3, 3]},
    ]
    preds = ev.grade_batch(rows, COIN, "ft_cot")
    assert [p["prediction"] for p in preds] == ["yes", "yes", "no", "yes"]  # row 3: tie -> earliest voter (yes)
    assert [p["correct_at_1"] for p in preds] == [False, True, True, False]
    m = ev.compute_metrics(preds, k=3)
    assert m["accuracy_at_1"] == 0.5 and m["accuracy_at_k"] == 0.75 and m["accuracy"] == 0.75 and m["k"] == 3
    assert m["mean_output_tokens"] == pytest.approx((3 + 3 + 3 + 1) / 4)  # first sample's length


# --------------------------------------------------------------------------- teacher row, exemplars


def test_teacher_metrics_from_curated_table(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", "data.dataset=coin_flip"])
    rows = []
    for i, (split, idx, correct, err) in enumerate([
        ("test", 0, True, None), ("test", 1, False, None), ("test", 0, False, None), ("test", 0, False, "timeout"),
        ("train", 0, True, None), ("val", 0, False, None), ("test", 0, True, None),
    ]):
        rows.append({"sample_index": i, "sample_idx": idx, "split": split, "correct": correct, "error": err,
                     "prediction": None if err else "yes", "model": "davinci", "completion_tokens": 10})
    write_jsonl(tmp_path / "curated.jsonl", rows)
    finish(tmp_path, cfg, "curate")
    m = ev.teacher_metrics(tmp_path, "test")
    # test rows at sample_idx 0: correct, wrong, error (wrong), correct -> 2 / 4
    assert (m["n"], m["correct"], m["accuracy"], m["errors"]) == (4, 2, 0.5, 1)
    assert m["method"] == "teacher" and m["dataset"] == "coin_flip" and m["student"] == "davinci"
    with pytest.raises(ValueError, match="no teacher completions"):
        ev.teacher_metrics(tmp_path, "nosuchsplit")


def test_shipped_exemplars_render_the_authors_prompts_exactly(shared_datasets):
    theirs = json.loads((shared_datasets / "reasoning-teacher/data/few_shot_cot_prompts.json").read_text())
    for key, v in theirs.items():
        block = ev.render_exemplars(ev.few_shot_exemplars(key))
        assert block == v["prompt"] + "\n", key  # the authors append "\nQ: {q}\nA:" to their prompt
        assert ev.first_prompt("few_shot_cot", "Why?", exemplars=block) == v["prompt"] + "\nQ: Why?\nA:"


def test_exemplar_aliases_and_unknown_dataset():
    assert ev.few_shot_exemplars("coin_flip_synth") == ev.few_shot_exemplars("coin_flip")
    with pytest.raises(KeyError, match="tracking_shuffled_objects"):
        ev.few_shot_exemplars("tracking_shuffled_objects")


# --------------------------------------------------------------------------- the stage, for real


N_PROBLEMS = 24


def _problems_file(folder: Path) -> Path:
    rows = [q | {"split": "test" if i < N_PROBLEMS else "train", "dataset": "coin_flip"}
            for i, q in enumerate(coin_questions(N_PROBLEMS + 4, seed=3))]
    write_jsonl(folder / "problems.jsonl", rows)
    return folder / "problems.jsonl"


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    return build_student(tmp_path_factory.mktemp("ev") / "student", "decoder", eos_boost=2.0, init_scale=20.0)


def _cfg(tmp_path, *extra):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", "data.dataset=coin_flip", "eval.batch_size=8",
                              "eval.max_new_tokens=16", *extra])


def test_eval_stage_ray_data_matches_per_example_generation(ray_session, tmp_path, tiny_student):
    from ftcot_ray.stages import evaluate
    from ftcot_ray.student.generate import generate_one, load_student

    src = _problems_file(tmp_path)
    cfg = _cfg(tmp_path, f"eval.student={tiny_student}")
    out = tmp_path / "eval"
    summary = evaluate.run(cfg, out, src)
    assert is_complete(out)
    preds = read_table(out, "predictions")
    assert sorted(p["sample_index"] for p in preds) == list(range(N_PROBLEMS))  # test split only, none lost
    student = load_student(tiny_student)
    problems = {r["sample_index"]: r for r in read_jsonl(src)}
    for p in preds:
        ref = generate_one(student, problems[p["sample_index"]]["question"] + " ###", max_new_tokens=16)
        assert p["output"] == ref.text and p["output_tokens"] == ref.n_tokens
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "n", "correct", "well_formed", "mean_output_tokens", "examples_per_s", "method",
                "diversity", "student", "params", "dataset", "split"):
        assert key in metrics, key
    assert metrics["method"] == "ft_cot" and metrics["n"] == N_PROBLEMS and metrics["split"] == "test"
    assert metrics["params"] == load_student(tiny_student).n_params
    assert metrics["accuracy"] == sum(p["correct"] for p in preds) / N_PROBLEMS
    assert summary["n"] == N_PROBLEMS
    again = evaluate.run(cfg, out, src)  # finished: no work
    assert again["reused"] is True and read_manifest(out)["stage"] == "eval"


def test_eval_stage_self_consistency(ray_session, tmp_path):
    from ftcot_ray.stages import evaluate

    src = _problems_file(tmp_path)
    # Its card says vanilla: the card, not train.method, decides how its answers are read.
    vanilla = build_student(tmp_path / "vanilla", "decoder", eos_boost=2.0, init_scale=20.0, method="vanilla")
    cfg = _cfg(tmp_path, f"eval.student={vanilla}", "eval.samples=3", "eval.temperature=1.0", "eval.num_replicas=2")
    evaluate.run(cfg, tmp_path / "sc", src)
    # Sampling is seeded per question: other batch sizes and replica counts give the same samples
    # (so they are runtime settings that rightly leave the eval key alone).
    other = with_overrides(cfg, {"eval.batch_size": 3, "eval.num_replicas": 1})
    evaluate.run(other, tmp_path / "sc2", src)
    samples = lambda d: {p["sample_index"]: p["samples"] for p in read_table(d, "predictions")}  # noqa: E731
    assert samples(tmp_path / "sc") == samples(tmp_path / "sc2")
    m = json.loads((tmp_path / "sc" / "metrics.json").read_text())
    assert m["k"] == 3 and "accuracy_at_1" in m and m["accuracy_at_k"] == m["accuracy"]
    assert m["method"] == "vanilla" and m["diversity"] is None
    preds = read_table(tmp_path / "sc", "predictions")
    assert all(len(p["samples"]) == 3 for p in preds)
    assert all(p["prediction"] == ev.majority_vote(p["sample_predictions"], COIN) for p in preds)


def test_config_errors_are_clear(ray_session, tmp_path, tiny_student):
    from ftcot_ray.stages import evaluate

    with pytest.raises(ConfigError, match="temperature"):
        evaluate.run(_cfg(tmp_path, "eval.samples=4"), tmp_path / "x", _problems_file(tmp_path))
    with pytest.raises(ConfigError, match="baseline_model"):
        evaluate.run(_cfg(tmp_path, "eval.baseline=zero_shot"), tmp_path / "x", _problems_file(tmp_path))
    with pytest.raises(ValueError, match="split 'val'"):
        evaluate.run(_cfg(tmp_path, f"eval.student={tiny_student}", "eval.split=val"), tmp_path / "x",
                     _problems_file(tmp_path))


def test_cli_missing_student_is_one_line_exit_2(tmp_path):
    src = _problems_file(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "ftcot_ray", "eval", "--in", str(src), "--out", str(tmp_path / "o"),
         f"run_dir={tmp_path}", "data.dataset=coin_flip", f"eval.student={tmp_path / 'missing'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "config.json" in r.stderr and str(tmp_path / "missing") in r.stderr


# --------------------------------------------------------------------------- endpoint baselines


class _Completions(BaseHTTPRequestHandler):
    """A tiny OpenAI-compatible /v1/completions: answers right for even-numbered people counts."""

    gold: dict = {}
    seen_auth: list = []

    def log_message(self, *a):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen_auth.append(self.headers.get("Authorization"))
        prompt = body["prompt"] if isinstance(body["prompt"], str) else body["prompt"][0]
        question = prompt.rsplit("Q: ", 1)[1].split("\nA:", 1)[0]
        gold = self.gold[question]
        if prompt.endswith("Therefore, the answer is"):  # zero-shot-CoT step 2 (and zero-shot)
            text = f" {gold}."
        elif prompt.endswith("Let's think step by step."):  # zero-shot-CoT step 1
            text = " Let me count the flips.\nQ: a made-up next question"
        else:  # few-shot-CoT: right only when the question mentions Ann
            ans = gold if "Ann" in question else ("no" if gold == "yes" else "yes")
            text = f" Counting flips. The answer is {ans}.\nQ: another"
        n = body.get("n") or 1
        payload = {
            "id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
            "choices": [{"text": text, "index": i, "finish_reason": "stop", "logprobs": None} for i in range(n)],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5 * n, "total_tokens": 10 + 5 * n},
        }
        raw = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture
def completions_server(port):
    server = ThreadingHTTPServer(("127.0.0.1", port), _Completions)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}/v1"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("method", ["zero_shot_cot", "few_shot_cot", "zero_shot"])
def test_endpoint_baselines(ray_session, tmp_path, completions_server, method, monkeypatch):
    from ftcot_ray.stages import evaluate

    src = _problems_file(tmp_path)
    test_rows = [r for r in read_jsonl(src) if r["split"] == "test"]
    _Completions.gold = {r["question"]: r["answer"] for r in read_jsonl(src)}
    _Completions.seen_auth = []
    monkeypatch.setenv("FTCOT_EVAL_TEST_KEY", "sk-test-secret-42")
    endpoint = f"{{base_url: '{completions_server}', model: tiny-api, api_key_env: FTCOT_EVAL_TEST_KEY}}"
    cfg = _cfg(tmp_path, f"eval.baseline={method}", f"eval.endpoint={endpoint}")
    out = tmp_path / method
    evaluate.run(cfg, out, src)
    m = json.loads((out / "metrics.json").read_text())
    expected = 1.0
    if method == "few_shot_cot":
        expected = sum("Ann" in r["question"] for r in test_rows) / len(test_rows)
    assert m["method"] == method and m["student"] == "tiny-api" and m["n"] == N_PROBLEMS
    assert m["accuracy"] == pytest.approx(expected) and m["well_formed"] == 1.0 and m["errors"] == 0
    preds = read_table(out, "predictions")
    assert all("\nQ:" not in p["output"] for p in preds)  # stopped before the model's next question
    assert set(_Completions.seen_auth) == {"Bearer sk-test-secret-42"}
    for f in out.rglob("*"):  # the key reached the server but no artifact
        assert f.is_dir() or b"sk-test-secret-42" not in f.read_bytes()


def test_endpoint_down_gives_error_rows_not_lost_questions(ray_session, tmp_path, port):
    from ftcot_ray.stages import evaluate

    src = _problems_file(tmp_path)
    endpoint = f"{{base_url: 'http://127.0.0.1:{port}/v1', model: m, max_attempts: 1, timeout_s: 5}}"
    cfg = _cfg(tmp_path, "eval.baseline=zero_shot", f"eval.endpoint={endpoint}")
    evaluate.run(cfg, tmp_path / "down", src)
    preds = read_table(tmp_path / "down", "predictions")
    assert len(preds) == N_PROBLEMS and all(p["error"] and not p["correct"] for p in preds)
    assert "connection error" in preds[0]["error"] and f"127.0.0.1:{port}" in preds[0]["error"]


def test_prompted_student_zero_shot_cot_runs_two_steps(tiny_student):
    from ftcot_ray.stages.evaluate import generate_for_method
    from ftcot_ray.student.generate import load_student

    student = load_student(tiny_student)
    questions = [q["question"] for q in coin_questions(5, seed=4)]
    outs, toks = generate_for_method(student, "zero_shot_cot", questions, None, max_new_tokens=12, batch_size=4,
                                     num_samples=1, temperature=0.0, seeds=list(range(5)))
    assert len(outs) == 5 and all(len(o) == 1 for o in outs)
    for (out,), (n,) in zip(outs, toks):
        rationale, answer = out.rsplit("\nTherefore, the answer is", 1)
        assert "\nQ:" not in rationale and 0 <= n <= 12
