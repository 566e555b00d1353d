"""Train stage: fine-tune a student on the curated pairs with Ray Train (TorchTrainer) + DeepSpeed ZeRO.

Reads: `ft_cot_pairs` (or `vanilla_pairs` with train.method=vanilla) and `problems` (its val
questions) from the curate folder. Writes: `student/` (a plain Hugging Face folder + the student
card), metrics.json (loss curves, the validation curve, the selected step).

Driver side (here): train the tokenizer on the pair texts (streamed), tokenize with completion-only
labels as a Ray Data map (student/data.py) into Ray Datasets held in the object store, start the
TorchTrainer with them (`datasets=`: every worker streams the examples, keeping only its share of
the next steps: `ExampleWindow`; nothing is pickled into the loop's config), copy the selected
student out of Ray Train's checkpoints. Worker side: student/loop.py. The same code runs on 2 CPU
workers (gloo) or N GPU workers (nccl).

Resume: Ray Train's storage (`<out>/ray_train`, or train.storage_path) and run name are derived
from the stage key and the worker layout, so re-running the same command after a kill, a Ctrl-C
or a lost node continues from the latest checkpoint instead of step 0.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

from ..artifacts import digest, open_stage
from ..config import Config
from ..dataplane import user_errors
from ..errors import ConfigError, DataError
from ..logs import say
from ..tables import has_table, iter_table, locate, read_dataset
from ..student.card import card_for, write_card
from ..tasks.custom import resolve_task

STAGE = "train"
PAIR_TABLES = {"ft_cot": "ft_cot_pairs", "vanilla": "vanilla_pairs", "step_by_step": "step_by_step_pairs"}


def run(cfg: Config, out: Path | None = None, inp: Path | None = None, fault: dict | None = None,
        callbacks: list | None = None) -> dict:
    """Train and export. `fault` ({"rank", "at_step", "marker"}) kills a worker once: for the resume test.
    `callbacks`: Ray Train RunConfig callbacks (Tune passes its TuneReportCallback)."""
    st = open_stage(cfg, STAGE, out, inp, keep=("ray_train",))
    if st.reused:
        return st.summary
    from ..ray_utils import init_ray

    t0 = time.perf_counter()
    init_ray(cfg)
    pairs = PAIR_TABLES[cfg.train.method]
    val_questions = pick_val_questions(cfg, st.input)
    tokenizer = make_tokenizer(cfg, st)
    check_model_fits_tokenizer(cfg, tokenizer)
    with user_errors():
        data = examples(cfg, st, tokenizer, pairs)
    rules = resolve_task(cfg.data)

    st.prepare()
    result = fit(cfg, st.out, st.key, tokenizer, data, val_questions, rules, fault, callbacks)
    metrics = collect_outputs(result, st.out, cfg)
    write_card(st.out / "student", card_for(cfg.student.family, cfg.train.method, cfg.data.dataset, rules,
                                            cfg.train.max_length))
    metrics |= {"truncated_count": data["truncated"], "dropped_no_target": data["dropped"],
                "train_examples": data["n_train"], "val_examples": data["n_val"],
                "val_questions": len(val_questions), "wall_s": round(time.perf_counter() - t0, 2),
                "method": cfg.train.method, "arch": cfg.student.arch, "size": cfg.student.size,
                "precision": cfg.train.precision, "batch_size": cfg.train.batch_size,
                "micro_batch_size": cfg.train.micro_batch(), "grad_accum": cfg.train.grad_accum()}
    st.write_json("metrics.json", metrics)
    sel = metrics["selection"]
    summary = {k: metrics[k] for k in ("steps", "tokens_per_s", "truncated_count", "wall_s", "num_workers",
                                       "zero_stage", "params", "method", "restarts", "resumed_from_step")}
    summary |= {"selected_step": sel["step"], "select": sel["select"], "val_accuracy": sel.get("val_accuracy"),
                "val_loss": sel.get("val_loss"),
                "final_train_loss": metrics["train_loss"][-1][1] if metrics["train_loss"] else None,
                "student": str(st.out / "student")}
    return st.finish(summary)


def pick_val_questions(cfg: Config, curate_dir: Path) -> list[dict]:
    """The val questions the student answers at each validation ({"prompt", "answer"}): the first
    `train.val_max_examples` by sample_index, streamed from the problems table."""
    from ..prompts import method_prompt

    cap = cfg.train.val_max_examples
    val: list[dict] = []
    for batch in iter_table(curate_dir, "problems", ("sample_index", "question", "answer", "split")):
        val += [p for p in batch if p["split"] == "val"]
        if cap and len(val) > 4 * cap:  # the smallest indices so far: memory stays a few caps, in any order
            val = sorted(val, key=lambda p: p["sample_index"])[:cap]
    val = sorted(val, key=lambda p: p["sample_index"])
    if not val and cfg.train.select == "val_accuracy":
        raise DataError(f"train.select=val_accuracy but the curate output has no val questions: "
                        "raise curate.val_fraction, or set train.select=last")
    return [{"prompt": method_prompt(cfg.train.method, str(p["question"]).strip(), cfg.student.family),
             "answer": str(p["answer"])}
            for p in (val[:cap] if cap else val)]


def make_tokenizer(cfg: Config, st):
    """The user's tokenizer, the pretrained student's, or a BPE trained on the pair tables of the run (streamed)."""
    from ..student.tokenizer import load_tokenizer, pair_texts, train_tokenizer

    s = cfg.student
    if s.tokenizer or s.pretrained:
        return load_tokenizer(s.tokenizer or s.pretrained)
    # The same vocabulary for every method of a run: trained on all pair tables of the curate folder.
    rows = (r for name in PAIR_TABLES.values() if has_table(st.input, name)
            for batch in iter_table(st.input, name, ("prompt", "completion")) for r in batch)
    return train_tokenizer(pair_texts(rows), s.vocab_size)


def examples(cfg: Config, st, tokenizer, pairs: str) -> dict:
    """The pair table tokenized as Ray Datasets in the object store (`train`, `val`: materialized, so a
    worker streams them without starting a task), the per-example `meta` the loss weights need, counts."""
    import numpy as np
    import ray

    from ..dataplane import collect_rows, map_rows, ordered
    from ..student.data import encode_batch

    path = locate(st.input, pairs)
    source = read_dataset(st.input, pairs)
    rows = Counter()
    for part in collect_rows(source.select_columns(["split"]), lambda b: dict(Counter(r["split"] for r in b)),
                             batch_size=65536):
        rows.update(part)
    if not rows.get("train"):
        raise DataError(
            f"no curated rows left to train on in {path} ({sum(rows.values())} rows, none with split 'train'): "
            "the teacher got too few answers right, or curate filtered them all; check the curate summary")
    t = cfg.train
    args = dict(tokenizer=ray.put(tokenizer), family=cfg.student.family, max_length=t.max_length,
                on_overlength=t.on_overlength, source=str(path))
    out: dict = {}
    for split in ("train", "val"):
        ds = ordered(map_rows(source, encode_batch, split=split, **args)).materialize()
        out[split], out[f"n_{split}"] = ds, ds.count()
        out[f"dropped_{split}"] = rows.get(split, 0) - out[f"n_{split}"]
    if not out["n_train"]:
        raise DataError(f"{path}: every training pair's prompt fills train.max_length={t.max_length}; nothing left to learn")
    out["truncated"] = sum(int(out[s].sum("truncated") or 0) for s in ("train", "val") if out[f"n_{s}"])
    out["dropped"] = out["dropped_train"] + out["dropped_val"]
    columns = [b for b in out["train"].select_columns(["label_tokens", "task"]).iter_batches(batch_size=65536,
                                                                                            batch_format="numpy")]
    out["meta"] = ray.put((np.concatenate([b["label_tokens"] for b in columns]).astype(np.int32),
                           np.concatenate([b["task"] for b in columns]).astype(np.int8)))
    return out


def check_model_fits_tokenizer(cfg: Config, tokenizer) -> None:
    """Fail on the driver, before any worker starts, when the tokenizer's ids overflow the model."""
    s = cfg.student
    if not s.pretrained:
        from ..student.model import model_config

        model_config(s, tokenizer, cfg.train.max_length)  # validates the size name
        return
    from transformers import AutoConfig

    from ..student.model import check_family

    config = AutoConfig.from_pretrained(s.pretrained)
    check_family(config, s)
    n_emb = getattr(config, "vocab_size", None)
    added = len(tokenizer) - (n_emb or 0)
    if n_emb is not None and len(tokenizer) > n_emb and (s.tokenizer is not None or added > 2):
        raise ConfigError(f"tokenizer/model mismatch: the tokenizer has {len(tokenizer)} tokens but "
                          f"{s.pretrained} embeds only {n_emb} (student.tokenizer={s.tokenizer!r})")


def checkpoint_storage(cfg: Config, out: Path) -> str:
    """train.storage_path, else `<train dir>/ray_train` (under the run's URI when the run folder is remote,
    so checkpoints survive a lost node)."""
    from ..artifacts import remote_of

    if cfg.train.storage_path:
        return cfg.train.storage_path
    remote = remote_of(cfg, out)
    return f"{remote}/ray_train" if remote else str((out / "ray_train").resolve())


def run_name(cfg: Config, key: str) -> str:
    """Ray Train's run name: the same for a re-run of the same stage on the same worker layout, so
    Ray Train restores its checkpoints (a DeepSpeed checkpoint only loads on the layout that wrote it)."""
    t = cfg.train
    return f"train-{key}-{digest([t.num_workers, t.zero_stage, t.offload, t.use_gpu], 6)}"


def fit(cfg: Config, out: Path, key: str, tokenizer, data: dict, val_questions, rules,
        fault: dict | None = None, callbacks: list | None = None):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..ray_utils import board_bar, init_ray, progress_board
    from ..student.loop import plan, train_loop

    init_ray(cfg)
    t = cfg.train
    storage = checkpoint_storage(cfg, out)
    name = run_name(cfg, key)
    resumed = latest_step(Path(storage) / name) if "://" not in storage else None
    if resumed:
        say(f"train: resuming from the checkpoint at step {resumed} ({Path(storage) / name})")
    total = plan(t, data["n_train"])["total"]
    board = progress_board()
    datasets = {"train": data["train"]} | ({"val": data["val"]} if data["n_val"] else {})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "tokenizer": tokenizer, "meta": data["meta"],
                           "val_questions": val_questions, "fault": fault, "progress": board,
                           "rules": {"name": rules.name, "kind": rules.kind, "choices": rules.choices or ""}},
        # Every worker streams the whole (ordered) table and keeps its share of each step: not split.
        datasets=datasets, dataset_config=DataConfig(datasets_to_split=[]),
        # use_gpu adds one GPU per worker; CPUs per worker matter for the data loader and CPU training.
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name, storage_path=storage, callbacks=callbacks or [],
            failure_config=FailureConfig(max_failures=t.max_failures),
            # Scored by improvement number: the best is kept (and Ray Train always keeps the latest).
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints, checkpoint_score_attribute="best_rank",
                                               checkpoint_score_order="max"),
        ),
    )
    bar = board_bar(board, "train", f"train {cfg.train.method} ({cfg.student.arch}-{cfg.student.size})", total)
    try:
        result = interruptible(trainer.fit)
    finally:
        bar.close()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    return result


def interruptible(fn):
    """Run `fn` in a thread so that Ctrl-C reaches us as KeyboardInterrupt (the CLI then says what was
    kept and exits 130). Called from the main thread, Ray Train installs its own SIGINT handler, which
    ends the process with exit code 1 and no word; from a thread (as under Tune) it does not."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return fn()
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # handed to the main thread below
            box["error"] = e

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in box:
        raise box["error"]
    return box["result"]


def latest_step(run_folder: Path) -> int | None:
    """The step of the checkpoint Ray Train will restore for this run (None: a fresh start).

    Read from Ray Train's own checkpoint-manager snapshot, not from the checkpoint folders: a folder can be
    on disk before the controller registered it (a kill in between), and Ray restores only what it registered.
    """
    try:
        snap = json.loads((run_folder / "checkpoint_manager_snapshot.json").read_text())
        return (snap.get("latest_checkpoint_result") or {}).get("metrics", {}).get("step")
    except (OSError, ValueError, AttributeError):
        return None


def collect_outputs(result, out: Path, cfg: Config) -> dict:
    """Copy the selected student out of its checkpoint; metrics from the final one; drop the scratch storage."""
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint: no student to export")
    ranked = [(c, m) for c, m in (result.best_checkpoints or []) if (m.get("best_rank") or -1) >= 0]
    if not ranked:
        raise RuntimeError("training finished without a selected checkpoint (no evaluation was reported)")
    best, best_metrics = max(ranked, key=lambda cm: cm[1]["best_rank"])
    with best.as_directory() as d:
        if not (Path(d) / "student").is_dir():
            raise RuntimeError(f"the selected checkpoint {best.path} holds no exported student")
        shutil.copytree(Path(d) / "student", out / "student", dirs_exist_ok=True)
    with result.checkpoint.as_directory() as d:
        metrics = json.loads((Path(d) / "train_metrics.json").read_text())
    chosen = metrics.get("best") or {}
    if chosen.get("step") != best_metrics.get("step"):
        raise RuntimeError(f"selected checkpoint step {best_metrics.get('step')} is not the best step "
                           f"{chosen.get('step')} the training recorded")
    metrics["selection"] = {"select": cfg.train.select, **chosen}
    metrics["val_curve"] = metrics.pop("val", [])
    if "://" not in checkpoint_storage(cfg, out):  # local scratch; on shared storage they stay for the record
        shutil.rmtree(out / "ray_train", ignore_errors=True)
    return metrics
