"""Train stage: fine-tune a student on the curated pairs with Ray Train (TorchTrainer) + DeepSpeed ZeRO.

Reads: `ft_cot_pairs` (or `vanilla_pairs` with train.method=vanilla) and `problems` (its val
questions) from the curate folder. Writes: `student/` (a plain Hugging Face folder + the student
card), metrics.json (loss curves, the validation curve, the selected step).

Driver side (here): tokenize with completion-only labels (student/data.py), start the
TorchTrainer, copy the selected student out of Ray Train's checkpoints. Worker side:
student/loop.py. The same code runs on 2 CPU workers (gloo) or N GPU workers (nccl).

Resume: Ray Train's storage (`<out>/ray_train`, or train.storage_path) and run name are derived
from the stage key and the worker layout, so re-running the same command after a kill, a Ctrl-C
or a lost node continues from the latest checkpoint instead of step 0.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..artifacts import digest, open_stage
from ..config import Config
from ..errors import ConfigError, DataError
from ..logs import say
from ..schemas import table_path
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
    t0 = time.perf_counter()
    pairs = PAIR_TABLES[cfg.train.method]
    from ..student.data import split_pairs

    train_rows, val_rows = split_pairs(st.read(pairs), table_path(st.input, pairs))
    val_questions = pick_val_questions(cfg, st.read("problems"))
    tokenizer = make_tokenizer(cfg, st)
    train_enc, val_enc = encode_splits(cfg, tokenizer, train_rows, val_rows, table_path(st.input, pairs))
    check_model_fits_tokenizer(cfg, tokenizer)
    rules = resolve_task(cfg.data)

    st.prepare()
    result = fit(cfg, st.out, st.key, tokenizer, train_enc.examples, val_enc.examples, val_questions, rules, fault,
                 callbacks)
    metrics = collect_outputs(result, st.out, cfg)
    write_card(st.out / "student", card_for(cfg.student.family, cfg.train.method, cfg.data.dataset, rules,
                                            cfg.train.max_length))
    metrics |= {"truncated_count": train_enc.stats.truncated_count + val_enc.stats.truncated_count,
                "dropped_no_target": train_enc.stats.dropped_no_target + val_enc.stats.dropped_no_target,
                "train_examples": len(train_enc.examples), "val_examples": len(val_enc.examples),
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


def pick_val_questions(cfg: Config, problems: list[dict]) -> list[dict]:
    """The val questions the student answers at each validation ({"prompt", "answer"}), capped."""
    from ..prompts import method_prompt

    val = sorted((p for p in problems if p["split"] == "val"), key=lambda p: p["sample_index"])
    if not val and cfg.train.select == "val_accuracy":
        raise DataError(f"train.select=val_accuracy but the curate output has no val questions: "
                        "raise curate.val_fraction, or set train.select=last")
    cap = cfg.train.val_max_examples
    return [{"prompt": method_prompt(cfg.train.method, str(p["question"]).strip(), cfg.student.family),
             "answer": str(p["answer"])}
            for p in (val[:cap] if cap else val)]


def make_tokenizer(cfg: Config, st):
    """The user's tokenizer, the pretrained student's, or a BPE trained on both pair files of the run."""
    from ..student.tokenizer import load_tokenizer, pair_texts, train_tokenizer

    s = cfg.student
    if s.tokenizer or s.pretrained:
        return load_tokenizer(s.tokenizer or s.pretrained)
    # The same vocabulary for every method of a run: trained on all pair tables of the curate folder.
    rows = [r for name in PAIR_TABLES.values() if table_path(st.input, name).is_file()
            for r in st.read(name, columns=("prompt", "completion"))]
    return train_tokenizer(pair_texts(rows), s.vocab_size)


def encode_splits(cfg: Config, tokenizer, train_rows, val_rows, path: Path):
    from ..student.data import encode_pairs

    args = dict(family=cfg.student.family, max_length=cfg.train.max_length, on_overlength=cfg.train.on_overlength,
                source=str(path))
    train = encode_pairs(train_rows, tokenizer, **args)
    if not train.examples:
        raise DataError(f"{path}: every training pair's prompt fills train.max_length={cfg.train.max_length}; "
                        "nothing left to learn")
    return train, encode_pairs(val_rows, tokenizer, **args)


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


def fit(cfg: Config, out: Path, key: str, tokenizer, train_examples, val_examples, val_questions, rules,
        fault: dict | None = None, callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
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
    total = plan(t, len(train_examples))["total"]
    board = progress_board()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "tokenizer": tokenizer, "train": train_examples,
                           "val": val_examples, "val_questions": val_questions, "fault": fault, "progress": board,
                           "rules": {"name": rules.name, "kind": rules.kind, "choices": rules.choices or ""}},
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
