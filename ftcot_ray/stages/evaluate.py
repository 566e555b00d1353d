"""Eval stage: generate for every problem of a split, read and grade the answers, write metrics.

    ftcot eval --config quickstart eval.student=<exported folder> eval.split=test

Where it runs: one Ray Data pipeline, streamed from the problems table to the predictions' Parquet
shards: the split's questions -> an actor pool of `eval.num_replicas` student replicas (each loads
the model once; a batch of questions is sorted by length and generated `eval.batch_size` at a time,
so little is padded) -> grading -> shards; the metrics are added up from per-batch counters. An
OpenAI-compatible endpoint (baselines) is asked by async actors instead, each with the project's
pooled endpoint client. What it does (prompts, answer rules, vote, metrics) lives in
ftcot_ray/evaluation.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from .. import evaluation as ev
from ..artifacts import is_done, open_stage, remote_of, require, stage_dir
from ..config import Config
from ..dataplane import collect_rows, map_rows, user_errors
from ..errors import DataError, InputMissing
from ..student.card import read_card
from ..tables import has_table, locate, read_dataset, write_dataset

STAGE = "eval"
OUTPUTS = ("predictions",)
ZERO_SHOT_COT_ANSWER_TOKENS = 32  # step 2 only has to say the answer (the teacher's answer_max_tokens)


# --------------------------------------------------------------------------- inputs


def resolve_method(cfg: Config, student: Optional[Path] = None) -> str:
    """A baseline's name, else the student's method: from its card (what it was trained as), else train.method."""
    if cfg.eval.baseline:
        return cfg.eval.baseline
    card = read_card(student) if student is not None else None
    return card.method if card else cfg.train.method


def problems_path(cfg: Config, inp: str | Path | None) -> Path:
    """`--in` (a problems table: its JSONL file, its folder of shards, or the folder holding it), else the
    curate stage's table."""
    if inp:
        p = locate(inp, "problems")
        if not has_table(p, "problems"):
            raise InputMissing(f"problems table {p} not found (--in takes a problems table or the folder holding it)")
        return p
    is_done(cfg, stage_dir(cfg, "curate"))  # fetched first when the run folder is remote
    return locate(require(stage_dir(cfg, "curate"), "curate"), "problems")


def split_questions(path: Path, split: str):
    """The split's questions as a Ray Dataset; an error naming the splits present when it has none."""
    columns = ("sample_index", "question", "answer", "split")
    counts: Counter = Counter()
    for part in collect_rows(read_dataset(path, "problems", columns).select_columns(["split"]),
                             lambda rows: dict(Counter(r["split"] for r in rows)), batch_size=65536):
        counts.update(part)
    if not counts.get(split):
        raise DataError(f"{path}: no problems in split {split!r} (splits present: {', '.join(sorted(counts))}); "
                        "set eval.split")
    return read_dataset(path, "problems", columns).filter(lambda r: r["split"] == split), counts[split]


def student_path(cfg: Config) -> Path:
    if cfg.eval.baseline:
        return Path(cfg.eval.baseline_model)
    if cfg.eval.student:
        path = Path(cfg.eval.student)
        if not (path / "config.json").is_file():
            raise InputMissing(f"eval.student={path}: no config.json there (a save_pretrained folder is expected)")
        return path
    is_done(cfg, stage_dir(cfg, "train"))
    return require(stage_dir(cfg, "train"), "train") / "student"


# --------------------------------------------------------------------------- Ray Data: student replicas


class StudentPredictor:
    """One student replica (an actor of the pool): loads the model once, generates batch after batch."""

    def __init__(self, path: str, method: str, max_new_tokens: int, batch_size: int, samples: int,
                 temperature: float, seed: int, torch_threads: int, exemplars: Optional[str],
                 rationales: bool = False):
        from .. import storage
        from ..student.generate import load_student

        if storage.is_uri(path):  # a remote run folder: each replica fetches the student to its own node
            import tempfile

            path = str(storage.download(path, Path(tempfile.mkdtemp(prefix="ftcot-student-"))))
        self.student = load_student(path, torch_threads=torch_threads)
        self.method, self.exemplars, self.rationales = method, exemplars, rationales
        self.gen = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, num_samples=samples,
                        temperature=temperature)
        self.seed = seed

    def __call__(self, batch: dict) -> dict:
        questions = [str(q) for q in batch["question"]]
        indices = [int(i) for i in batch["sample_index"]]
        t0 = time.perf_counter()
        outputs, tokens = generate_for_method(self.student, self.method, questions, self.exemplars,
                                              seeds=[self.seed + i for i in indices], **self.gen)
        seconds = time.perf_counter() - t0
        out = {
            "sample_index": indices,
            "question": questions,
            "answer": [str(a) for a in batch["answer"]],
            "outputs": outputs,
            "output_tokens": tokens,
            "error": [None] * len(indices),
            "gen_seconds": [seconds / len(indices)] * len(indices),
        }
        if self.rationales and self.method == "step_by_step":  # on request, outside the timed answer
            out["rationale"] = step_by_step_rationales(self.student, questions, self.gen["max_new_tokens"],
                                                       self.gen["batch_size"])
        return out


def generate_for_method(student, method: str, questions: list[str], exemplars: Optional[str], *,
                        max_new_tokens: int, batch_size: int, num_samples: int, temperature: float,
                        seeds: list[int]) -> tuple[list[list[str]], list[list[int]]]:
    """k outputs (and their token counts) per question, with the method's prompt(s)."""
    from ..student.generate import generate

    prompts = [ev.first_prompt(method, q, student.family, exemplars) for q in questions]
    gens = generate(student, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    num_samples=num_samples, temperature=temperature, seeds=seeds)
    stop = ev.is_prompted(method)
    outputs = [[ev.cut_at_stop(g.text) if stop else g.text for g in gs] for gs in gens]
    tokens = [[g.n_tokens for g in gs] for gs in gens]
    if method == "zero_shot_cot":  # step 2, greedy, for every sampled rationale
        flat = [(q, r) for q, rs in zip(questions, outputs) for r in rs]
        step2 = generate(student, [ev.zero_shot_cot_answer_prompt(q, r) for q, r in flat],
                         max_new_tokens=ZERO_SHOT_COT_ANSWER_TOKENS, batch_size=batch_size)
        answers = iter(ev.cut_at_stop(g[0].text) for g in step2)
        outputs = [[ev.zero_shot_cot_output(r, next(answers)) for r in rs] for rs in outputs]
    return outputs, tokens


def step_by_step_rationales(student, questions: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """A step-by-step student's rationale for each question, from its rationale task (greedy)."""
    from ..prompts import task_prompt
    from ..student.generate import generate

    prompts = [task_prompt("rationale", q.strip(), student.family) for q in questions]
    return [g[0].text for g in generate(student, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)]


def student_outputs(cfg: Config, path: Path, method: str, questions, exemplars: Optional[str]):
    """The pipeline's generation step over the Ray Data actor pool of student replicas (lazy)."""
    import ray

    e = cfg.eval
    # Up to 8 generation batches per Ray Data batch: `generate` sorts them by length (little padding).
    return questions.map_batches(
        StudentPredictor,
        fn_constructor_kwargs=dict(
            path=remote_of(cfg, path) or str(path.resolve()), method=method, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
            samples=e.samples, temperature=e.temperature, seed=e.seed,
            torch_threads=e.torch_threads or max(1, int(e.cpus_per_replica)), exemplars=exemplars,
            rationales=e.rationales,
        ),
        batch_size=8 * e.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=e.num_replicas),  # each replica loads the model once
        num_cpus=e.cpus_per_replica,
    )


# --------------------------------------------------------------------------- OpenAI-compatible endpoint


class EndpointPredictor:
    """One async worker asking `eval.endpoint` for its batches (the project's pooled endpoint client, one
    retry policy, chat vs completions in one place: ftcot_ray/endpoint.py). The key comes as a `Secret`,
    read from the driver's environment when the stage starts: never logged or written."""

    def __init__(self, eval_cfg: dict, method: str, exemplars: Optional[str], secret):
        from ..config import EvalConfig

        self.e = EvalConfig.model_validate(eval_cfg)
        self.method, self.exemplars, self.secret = method, exemplars, secret
        self.client = None

    async def __call__(self, batch: dict):
        from ..endpoint import Endpoint

        if self.client is None:  # on the worker's event loop
            self.client = Endpoint.from_config(self.e.endpoint, self.secret)
        rows = [{"sample_index": int(i), "question": str(q), "answer": str(a)}
                for i, q, a in zip(batch["sample_index"], batch["question"], batch["answer"])]
        out = await asyncio.gather(*(self.one(r) for r in rows))
        yield {k: [r[k] for r in out] for k in ("sample_index", "question", "answer", "outputs", "output_tokens",
                                                   "error")}

    async def ask(self, prompt: str, n: int, temperature: float, max_tokens: int) -> tuple[list[str], int]:
        stop = list(ev.PROMPT_STOPS) if self.e.endpoint.api == "completions" else None
        r = await self.client.complete(prompt, n=n, temperature=temperature, max_tokens=max_tokens, stop=stop)
        return [ev.cut_at_stop(text) for text, _ in r.choices], r.completion_tokens

    async def one(self, p: dict) -> dict:
        from ..endpoint import CallError

        e, method = self.e, self.method
        try:
            prompt = ev.first_prompt(method, p["question"], "decoder", self.exemplars)
            outs, used = await self.ask(prompt, e.samples, e.temperature, e.max_new_tokens)
            if method == "zero_shot_cot":
                step2 = await asyncio.gather(*(self.ask(ev.zero_shot_cot_answer_prompt(p["question"], r), 1, 0.0,
                                                        ZERO_SHOT_COT_ANSWER_TOKENS) for r in outs))
                outs = [ev.zero_shot_cot_output(r, a[0][0]) for r, a in zip(outs, step2)]
            per = used // max(1, len(outs))
            return p | {"outputs": outs, "output_tokens": [per] * len(outs), "error": None}
        except CallError as exc:  # a failed request is a graded-wrong row with its error, never a lost question
            return p | {"outputs": [""] * e.samples, "output_tokens": [], "error": str(exc)[:500]}  # already redacted


def endpoint_outputs(cfg: Config, method: str, questions, exemplars: Optional[str]):
    """The pipeline's generation step against `eval.endpoint` (lazy): async workers, `concurrency` in flight."""
    import ray

    from ..endpoint import Secret

    e = cfg.eval
    per_batch = max(1, e.endpoint.concurrency)
    secret = Secret(os.environ.get(e.endpoint.api_key_env) or "EMPTY")  # the driver's environment, as for the teacher
    return questions.map_batches(
        EndpointPredictor, fn_constructor_kwargs={"eval_cfg": e.model_dump(mode="json"), "method": method,
                                                  "exemplars": exemplars, "secret": secret},
        batch_size=per_batch, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=4, max_concurrent_calls_per_actor=4),
        num_cpus=0.25)


# --------------------------------------------------------------------------- the stage


def _labels(cfg: Config, method: str, student: Optional[Path]) -> dict:
    """What the report needs to place this evaluation in its table and plots."""
    e = cfg.eval
    labels = {"method": method, "dataset": cfg.data.dataset, "split": e.split, "diversity": None}
    if method in ("ft_cot", "step_by_step"):
        labels["diversity"] = cfg.curate.diversity
    if e.endpoint:
        labels["student"] = e.endpoint.model
    elif e.baseline or e.student:
        labels["student"] = str(student)
    else:
        labels["student"] = cfg.student.pretrained or f"{cfg.student.arch}-{cfg.student.size}"
    return labels


def _student_facts(path: Path) -> dict:
    """params / model type from the folder's config + safetensors header, without loading the model here."""
    facts: dict = {}
    try:
        facts["model_type"] = json.loads((path / "config.json").read_text()).get("model_type")
        from safetensors import safe_open

        n = 0
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                for k in st.keys():
                    n += _prod(st.get_slice(k).get_shape())
        facts["params"] = n or None
    except (OSError, ValueError):
        pass
    return facts


def _selection(student: Optional[Path]) -> dict:
    """Which checkpoint training chose for this student, and its validation figures (for the report)."""
    path = student.parent / "metrics.json" if student is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        sel = json.loads(path.read_text()).get("selection") or {}
    except (OSError, ValueError):
        return {}
    return {"selected_step": sel.get("step"), "val_accuracy": sel.get("val_accuracy"), "select": sel.get("select")}


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def evaluate_to(cfg: Config, src: Path, method: str, student: Optional[Path], out: Path) -> tuple[dict, dict]:
    """Generate + grade the split's problems of `src`, predictions written as shards in `out`; returns
    (the predictions table's manifest entry, metrics). The plain entry point for the pipeline and Tune."""
    from ..ray_utils import init_ray
    from ..tasks.custom import resolve_task

    init_ray(cfg)
    task = resolve_task(cfg.data)
    exemplars = ev.render_exemplars(ev.few_shot_exemplars(cfg.data.dataset)) if method == "few_shot_cot" else None
    t0 = time.perf_counter()
    with user_errors():
        questions, n = split_questions(src, cfg.eval.split)
        outputs = (endpoint_outputs(cfg, method, questions, exemplars) if cfg.eval.endpoint
                   else student_outputs(cfg, student, method, questions, exemplars))
        graded = map_rows(outputs, ev.grade_batch, task=task, method=method, require_marker=cfg.eval.require_marker)
        entry = write_dataset(graded, out, "predictions", expected_rows=n)
        parts = collect_rows(read_dataset(out, "predictions"), ev.batch_metrics, k=cfg.eval.samples)
    wall = time.perf_counter() - t0
    metrics = ev.metrics_from_parts(parts, k=cfg.eval.samples)
    gen_seconds = sum(p["gen_seconds"] for p in parts)
    metrics |= {
        "examples_per_s": metrics["n"] / wall if wall else None,  # wall time incl. actor start-up and model load
        "wall_s": round(wall, 3),
        "temperature": cfg.eval.temperature,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "num_replicas": cfg.eval.num_replicas,
        "errors": sum(p["errors"] for p in parts),
    }
    if gen_seconds and not cfg.eval.endpoint:  # generation only (summed over replicas): the steady-state figure
        metrics["examples_per_s_generation"] = metrics["n"] / (gen_seconds / cfg.eval.num_replicas)
    return entry, metrics


def run(cfg: Config, out: Path | None = None, inp: Path | None = None) -> dict:
    st = open_stage(cfg, STAGE, out, inp, needs=None)
    if st.reused:
        return st.summary
    src = problems_path(cfg, inp)
    student = None if cfg.eval.endpoint else student_path(cfg)
    method = resolve_method(cfg, student)
    st.tables["predictions"], metrics = evaluate_to(cfg, src, method, student, st.target())
    metrics = _labels(cfg, method, student) | (_student_facts(student) if student else {}) | metrics
    metrics |= _selection(student)
    metrics["problems"] = str(src)
    st.write_json("metrics.json", metrics)
    summary = {k: metrics.get(k) for k in ("method", "dataset", "split", "diversity", "student", "accuracy", "n",
                                            "correct", "well_formed", "k", "accuracy_at_1", "accuracy_at_k",
                                            "examples_per_s") if metrics.get(k) is not None}
    return st.finish(summary | {"out": str(st.out)}, OUTPUTS)
