"""train stage: fine-tune a student on the curated pairs with Ray Train (TorchTrainer) + DeepSpeed ZeRO.

Driver side (here): read the pair file, build or load the tokenizer, tokenize with completion-only
labels (plain functions in ftcot_ray.student.data), start the TorchTrainer, then copy the exported
student and the metrics out of the final Ray Train checkpoint. The same code runs on 2 CPU workers
(gloo) or N GPU workers (nccl); only `train.num_workers` / `train.use_gpu` change.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

from ..artifacts import begin, finish, is_complete, read_manifest, require, stage_dir, write_json
from ..cli import add_stage_arguments, run_stage
from ..config import Config
from ..io import read_jsonl

STAGE = "train"
PAIR_FILES = {"ft_cot": "ft_cot_pairs.jsonl", "vanilla": "vanilla_pairs.jsonl"}
INPUT_COLUMNS = {name: ["sample_index", "sample_idx", "split", "prompt", "completion"] for name in PAIR_FILES.values()}
OUTPUT_COLUMNS = {"student": ["model.safetensors", "config.json", "tokenizer.json", "generation_config.json"],
                  "metrics.json": ["train_loss", "val_loss", "tokens_per_s", "steps", "truncated_count", "wall_s",
                                   "num_workers", "zero_stage", "params"]}


def run(cfg: Config, out: Path | None = None, inp: Path | None = None, fault: dict | None = None) -> dict:
    """Train and export. `fault` ({"rank", "at_step", "marker"}) kills a worker once: for the resume test."""
    out = Path(out) if out else stage_dir(cfg, STAGE)
    if is_complete(out):
        return read_manifest(out)["summary"] | {"reused": True}
    inp = require(inp or stage_dir(cfg, "curate"), "curate")
    begin(out)
    t0 = time.perf_counter()

    train_rows, val_rows, pair_path = read_pairs(inp, cfg.train.method)
    tokenizer = make_tokenizer(cfg, inp)
    train_enc, val_enc = encode_splits(cfg, tokenizer, train_rows, val_rows, pair_path)
    check_model_fits_tokenizer(cfg, tokenizer)

    result = fit(cfg, out, tokenizer, train_enc.examples, val_enc.examples, fault)
    metrics = collect_outputs(result, out, cfg)
    metrics |= {"truncated_count": train_enc.stats.truncated_count + val_enc.stats.truncated_count,
                "dropped_no_target": train_enc.stats.dropped_no_target + val_enc.stats.dropped_no_target,
                "train_examples": len(train_enc.examples), "val_examples": len(val_enc.examples),
                "wall_s": round(time.perf_counter() - t0, 2), "method": cfg.train.method,
                "arch": cfg.student.arch, "size": cfg.student.size, "precision": cfg.train.precision}
    write_json(out / "metrics.json", metrics)
    summary = {k: metrics[k] for k in ("steps", "tokens_per_s", "truncated_count", "wall_s", "num_workers",
                                       "zero_stage", "params", "method", "restarts")}
    summary |= {"final_train_loss": metrics["train_loss"][-1][1] if metrics["train_loss"] else None,
                "final_val_loss": metrics["val_loss"][-1][1] if metrics["val_loss"] else None,
                "student": str(out / "student")}
    finish(out, cfg, STAGE, inputs={pair_path.name: INPUT_COLUMNS[pair_path.name]}, outputs=OUTPUT_COLUMNS,
           summary=summary)
    return summary


def read_pairs(inp: Path, method: str) -> tuple[list[dict], list[dict], Path]:
    from ..student.data import split_pairs

    path = Path(inp) / PAIR_FILES[method]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the curate output has no {PAIR_FILES[method]} (train.method={method})")
    train, val = split_pairs(read_jsonl(path), path)
    return train, val, path


def make_tokenizer(cfg: Config, inp: Path):
    """The user's tokenizer, the pretrained student's, or a BPE trained on both pair files of the run."""
    from ..student.tokenizer import load_tokenizer, pair_texts, train_tokenizer

    s = cfg.student
    if s.tokenizer or s.pretrained:
        return load_tokenizer(s.tokenizer or s.pretrained)
    rows = [r for name in PAIR_FILES.values() if (Path(inp) / name).is_file() for r in read_jsonl(Path(inp) / name)]
    return train_tokenizer(pair_texts(rows), s.vocab_size)


def encode_splits(cfg: Config, tokenizer, train_rows, val_rows, path: Path):
    from ..student.data import encode_pairs

    args = dict(family=cfg.student.family, max_length=cfg.train.max_length, on_overlength=cfg.train.on_overlength,
                source=str(path))
    train = encode_pairs(train_rows, tokenizer, **args)
    if not train.examples:
        raise ValueError(f"{path}: every training pair's prompt fills train.max_length={cfg.train.max_length}; "
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
        raise ValueError(f"tokenizer/model mismatch: the tokenizer has {len(tokenizer)} tokens but "
                         f"{s.pretrained} embeds only {n_emb} (student.tokenizer={s.tokenizer!r})")


def fit(cfg: Config, out: Path, tokenizer, train_examples, val_examples, fault: dict | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..ray_utils import init_ray
    from ..student.loop import train_loop

    init_ray(cfg)
    t = cfg.train
    storage = t.storage_path or str((out / "ray_train").resolve())
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "tokenizer": tokenizer, "train": train_examples,
                           "val": val_examples, "fault": fault},
        # use_gpu adds one GPU per worker; CPUs per worker matter for the data loader and CPU training.
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=RunConfig(
            # A unique name: reusing one would restore that run's checkpoints (DESIGN).
            name=f"train-{cfg.name}-{uuid.uuid4().hex[:8]}", storage_path=storage,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    return result


def collect_outputs(result, out: Path, cfg: Config) -> dict:
    """Copy the exported student out of the final checkpoint; drop Ray Train's storage unless kept."""
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint: no student to export")
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        if not (d / "student").is_dir():
            raise RuntimeError(f"the final checkpoint {result.checkpoint.path} holds no exported student")
        shutil.copytree(d / "student", out / "student", dirs_exist_ok=True)
        metrics = json.loads((d / "train_metrics.json").read_text())
    if not cfg.train.keep_checkpoints and not cfg.train.storage_path:
        shutil.rmtree(out / "ray_train", ignore_errors=True)
    return metrics


def add_arguments(parser) -> None:
    add_stage_arguments(parser, STAGE, "curate stage folder (default: the run's curate output)")


def main(args) -> int:
    return run_stage(run, args)
