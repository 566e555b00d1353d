"""Eval stage: generate for every problem of a split, read and grade the answers, write metrics.

    ftcot eval --config quickstart eval.student=<exported folder> eval.split=test

Where it runs: Ray Data, an actor pool of `eval.num_replicas` student replicas (each loads the
model once) over batches of `eval.batch_size` problems; problems are sorted by length first so a
batch pads little. An OpenAI-compatible endpoint (baselines) is asked with a bounded-concurrency
AsyncOpenAI loop instead (DESIGN: the fastest shape for HTTP fan-out on few cores).
What it does (prompts, answer rules, vote, metrics) lives in ftcot_ray/evaluation.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Optional

from .. import evaluation as ev
from ..artifacts import is_done, open_stage, remote_of, require, stage_dir
from ..config import Config
from ..errors import DataError, InputMissing
from ..schemas import read_table, table_path
from ..student.card import read_card

STAGE = "eval"
INPUTS = ("problems",)
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
    """`--in` (a problems file or a folder holding problems.jsonl), else the curate stage's table."""
    if inp:
        p = table_path(inp, "problems")
        if not p.is_file():
            raise InputMissing(f"problems table {p} not found (--in takes a problems.jsonl or its folder)")
        return p
    is_done(cfg, stage_dir(cfg, "curate"))  # fetched first when the run folder is remote
    return table_path(require(stage_dir(cfg, "curate"), "curate"), "problems")


def load_problems(path: Path, split: str) -> list[dict]:
    rows = read_table(path, "problems", columns=("sample_index", "question", "answer", "split"))
    chosen = [r for r in rows if r["split"] == split]
    if not chosen:
        splits = sorted({r["split"] for r in rows})
        raise DataError(f"{path}: no problems in split {split!r} (splits present: {', '.join(splits)}); "
                        "set eval.split")
    return chosen


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
            "outputs": outputs,
            "output_tokens": tokens,
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


def ray_generate(cfg: Config, path: Path, method: str, problems: list[dict], exemplars: Optional[str]) -> tuple[list[dict], float]:
    """Generation over the Ray Data actor pool; rows {sample_index, outputs, output_tokens} and summed gen seconds."""
    import ray

    from ..ray_utils import init_ray

    init_ray(cfg)
    e = cfg.eval
    # Sort by length so each batch holds similar prompts: little padding, similar stop times.
    items = sorted(({"sample_index": p["sample_index"], "question": p["question"]} for p in problems),
                   key=lambda r: len(r["question"]))
    # One block per batch: Ray Data's default (up to 200 tiny blocks) only adds scheduling overhead here.
    blocks = max(1, -(-len(items) // e.batch_size))
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        StudentPredictor,
        fn_constructor_kwargs=dict(
            path=remote_of(cfg, path) or str(path.resolve()), method=method, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
            samples=e.samples, temperature=e.temperature, seed=e.seed,
            torch_threads=e.torch_threads or max(1, int(e.cpus_per_replica)), exemplars=exemplars,
            rationales=e.rationales,
        ),
        batch_size=e.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=e.num_replicas),  # each replica loads the model once
        num_cpus=e.cpus_per_replica,
    )
    rows = ds.take_all()
    gen_seconds = sum(float(r["gen_seconds"]) for r in rows)
    return [
        {"sample_index": int(r["sample_index"]), "outputs": [str(o) for o in r["outputs"]],
         "output_tokens": [int(t) for t in r["output_tokens"]]} | ({"rationale": str(r["rationale"])} if "rationale" in r else {})
        for r in rows
    ], gen_seconds


# --------------------------------------------------------------------------- OpenAI-compatible endpoint


async def _endpoint_outputs(cfg: Config, method: str, problems: list[dict], exemplars: Optional[str]) -> list[dict]:
    """Every problem asked of `eval.endpoint` through the shared endpoint component (one pooled
    client, one retry policy, chat vs completions in one place: ftcot_ray/endpoint.py)."""
    from ..endpoint import CallError, Endpoint, Secret

    e, ep = cfg.eval, cfg.eval.endpoint
    # The key is read from the environment at call time and never logged or written.
    client = Endpoint.from_config(ep, Secret(os.environ.get(ep.api_key_env) or "EMPTY"))
    stop = list(ev.PROMPT_STOPS) if ep.api == "completions" else None

    async def ask(prompt: str, n: int, temperature: float, max_tokens: int) -> tuple[list[str], int]:
        r = await client.complete(prompt, n=n, temperature=temperature, max_tokens=max_tokens, stop=stop)
        return [ev.cut_at_stop(text) for text, _ in r.choices], r.completion_tokens

    async def one(p: dict) -> dict:
        try:
            prompt = ev.first_prompt(method, p["question"], "decoder", exemplars)
            outs, used = await ask(prompt, e.samples, e.temperature, e.max_new_tokens)
            if method == "zero_shot_cot":
                step2 = await asyncio.gather(*(ask(ev.zero_shot_cot_answer_prompt(p["question"], r), 1, 0.0,
                                                   ZERO_SHOT_COT_ANSWER_TOKENS) for r in outs))
                outs = [ev.zero_shot_cot_output(r, a[0][0]) for r, a in zip(outs, step2)]
            per = used // max(1, len(outs))
            return {"sample_index": p["sample_index"], "outputs": outs, "output_tokens": [per] * len(outs),
                    "error": None}
        except CallError as exc:  # a failed request is a graded-wrong row with its error, never a lost question
            return {"sample_index": p["sample_index"], "outputs": [""] * e.samples, "output_tokens": [],
                    "error": str(exc)[:500]}  # already redacted of the key

    try:
        from tqdm.asyncio import tqdm_asyncio

        return await tqdm_asyncio.gather(*(one(p) for p in problems), desc=f"eval {ep.model}", mininterval=2)
    finally:
        await client.close()


def endpoint_generate(cfg: Config, method: str, problems: list[dict], exemplars: Optional[str]) -> list[dict]:
    from ..endpoint import run_sync

    return run_sync(lambda: _endpoint_outputs(cfg, method, problems, exemplars))


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


def evaluate_problems(cfg: Config, problems: list[dict], method: str, student: Optional[Path]) -> tuple[list[dict], dict]:
    """Generate + grade; returns (predictions, metrics). Plain entry point for the pipeline and Tune."""
    from ..tasks.custom import resolve_task

    task = resolve_task(cfg.data)
    exemplars = ev.render_exemplars(ev.few_shot_exemplars(cfg.data.dataset)) if method == "few_shot_cot" else None
    t0 = time.perf_counter()
    if cfg.eval.endpoint:
        gen_rows, gen_seconds = endpoint_generate(cfg, method, problems, exemplars), None
    else:
        gen_rows, gen_seconds = ray_generate(cfg, student, method, problems, exemplars)
    wall = time.perf_counter() - t0
    by_index = {r["sample_index"]: r for r in gen_rows}
    rows = [p | by_index[p["sample_index"]] for p in problems]
    predictions = ev.grade_rows(task, rows, method, cfg.eval.require_marker)
    metrics = ev.compute_metrics(predictions, k=cfg.eval.samples)
    n = len(predictions)
    metrics |= {
        "examples_per_s": n / wall if wall else None,  # wall time incl. actor start-up and model load
        "wall_s": round(wall, 3),
        "temperature": cfg.eval.temperature,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "num_replicas": cfg.eval.num_replicas,
        "errors": sum(p.get("error") is not None for p in predictions),
    }
    if gen_seconds:  # generation only (summed over replicas): the steady-state figure
        metrics["examples_per_s_generation"] = n / (gen_seconds / cfg.eval.num_replicas)
    return predictions, metrics


def run(cfg: Config, out: Path | None = None, inp: Path | None = None) -> dict:
    st = open_stage(cfg, STAGE, out, inp, needs=None)
    if st.reused:
        return st.summary
    src = problems_path(cfg, inp)
    problems = load_problems(src, cfg.eval.split)
    student = None if cfg.eval.endpoint else student_path(cfg)
    method = resolve_method(cfg, student)
    predictions, metrics = evaluate_problems(cfg, problems, method, student)
    metrics = _labels(cfg, method, student) | (_student_facts(student) if student else {}) | metrics
    metrics |= _selection(student)
    metrics["problems"] = str(src)
    st.write("predictions", predictions)
    st.write_json("metrics.json", metrics)
    summary = {k: metrics.get(k) for k in ("method", "dataset", "split", "diversity", "student", "accuracy", "n",
                                            "correct", "well_formed", "k", "accuracy_at_1", "accuracy_at_k",
                                            "examples_per_s") if metrics.get(k) is not None}
    return st.finish(summary | {"out": str(st.out)}, OUTPUTS)
