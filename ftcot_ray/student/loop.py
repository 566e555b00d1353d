"""The per-worker train function Ray Train runs on every rank (CPU/gloo here, GPU/nccl on a cluster).

Each rank builds the same seeded student, wraps it with `deepspeed.initialize` (a torch AdamW and
a transformers LR schedule, ZeRO stage from the config), trains on its DistributedSampler shard,
measures validation loss each epoch, and saves a DeepSpeed checkpoint that it hands to
`ray.train.report`. On a restart (FailureConfig) the last checkpoint is loaded, and training
continues from the next epoch. The last report also carries the exported HF folder (`student/`)
and `train_metrics.json`, so the driver gets the result from Ray Train's storage, not from a
worker's disk.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..config import Config
from .data import IGNORE, batch_tokens, collate
from .ds_config import ds_config
from .export import gathered_state_dict, save_student
from .model import apply_lora, build_model, count_params

CKPT_TAG = "state"


def plan_steps(n_train: int, world: int, batch_size: int, grad_accum: int, epochs: int, max_steps: int | None):
    """(optimizer steps per epoch, total steps, epochs to run) — the same on every rank."""
    micro_per_epoch = math.ceil(math.ceil(n_train / world) / batch_size)
    per_epoch = max(1, math.ceil(micro_per_epoch / grad_accum))
    total = max_steps or epochs * per_epoch
    return per_epoch, total, math.ceil(total / per_epoch)


def train_loop(config: dict) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch
    from transformers import get_scheduler

    cfg = Config.model_validate(config["cfg"])
    t, s = cfg.train, cfg.student
    tok, family = config["tokenizer"], s.family
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = build_model(s, tok, t.max_length)
    base_config, n_params = model.config, count_params(model)
    if t.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if s.lora.enabled:
        model = apply_lora(model, s.lora, s.arch)
        if t.grad_ckpt:
            model.enable_input_require_grads()

    train_loader, train_sampler = _loader(config["train"], tok.pad_token_id, family, t.batch_size, rank, world, t.seed, True)
    val_loader = None
    if config["val"] and t.eval_every_epoch:
        val_loader, _ = _loader(config["val"], tok.pad_token_id, family, t.batch_size, rank, world, t.seed, False)
    per_epoch, total, epochs = plan_steps(len(config["train"]), world, t.batch_size, t.grad_accum, t.epochs, t.max_steps)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay)
    scheduler = get_scheduler(t.lr_schedule if t.lr_schedule != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=int(t.warmup_ratio * total), num_training_steps=total)
    skip_cpu_shm_op(t.use_gpu or t.cpu_shm_comm)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config(t, world))
    state = _resume(engine)
    log_every = t.log_every or max(1, total // 50)
    fault = config.get("fault") or {}

    progress = _progress(rank, total, engine.global_steps)
    for epoch in range(state["epoch"], epochs):
        train_sampler.set_epoch(epoch)
        engine.train()
        t0 = time.perf_counter()
        for batch in train_loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            before = engine.global_steps
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            state["tokens"] += batch_tokens(batch, family)
            if engine.global_steps == before:  # still accumulating
                continue
            step = engine.global_steps
            progress.update(1)
            if step % log_every == 0 or step == 1:
                state["train_loss"].append([step, _mean_over_ranks(loss.detach().float(), world)])
            _maybe_fail(fault, rank, step)
            if step >= total:
                break
        state["train_s"] += time.perf_counter() - t0
        state["epoch"] = epoch + 1
        if val_loader is not None:
            state["val_loss"].append([epoch + 1, validation_loss(engine, val_loader, family, device)])
        final = state["epoch"] >= epochs or engine.global_steps >= total
        if final or state["epoch"] % t.checkpoint_every_epochs == 0:
            _checkpoint_and_report(engine, state, rank, final, tok, base_config, cfg, n_params, total)
        if final:
            break
    else:  # resumed from the final checkpoint: nothing left to train, report the export again
        if state["epoch"] >= epochs:
            _checkpoint_and_report(engine, state, rank, True, tok, base_config, cfg, n_params, total)
    progress.close()


def skip_cpu_shm_op(wanted: bool) -> None:
    """Skip the JIT compile (~40 s on first use) of DeepSpeed's CPU shared-memory all-reduce op.

    DeepSpeed builds it whenever `deepspeed.ops.__compatible_ops__` marks it compatible, but only
    `inference_all_reduce` uses it; training all-reduces through torch.distributed (gloo). Marking it
    incompatible is the switch DeepSpeed's own probe uses, and the dict is cached for that purpose.
    """
    if wanted:
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _loader(examples, pad_id, family, batch_size, rank, world, seed, shuffle):
    sampler = DistributedSampler(examples, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
    loader = DataLoader(examples, batch_size=batch_size, sampler=sampler,
                        collate_fn=lambda b: collate(b, pad_id, family))
    return loader, sampler


def _resume(engine) -> dict:
    import ray.train

    state = {"epoch": 0, "train_loss": [], "val_loss": [], "tokens": 0, "train_s": 0.0, "restarts": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return state
    with ckpt.as_directory() as d:
        _, client = engine.load_checkpoint(d, tag=CKPT_TAG)
    state.update(client["ftcot_state"])
    state["restarts"] += 1
    return state


def validation_loss(engine, loader, family: str, device) -> float:
    """Token-weighted mean loss on the completion tokens of the val split, over all ranks."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            total += torch.tensor(loss_sum(engine, batch, family), dtype=torch.float64)
    engine.train()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return float(total[0] / max(total[1], 1.0))


def loss_sum(model, batch: dict, family: str) -> tuple[float, float]:
    """(summed cross-entropy, label-token count) for one batch; -100 labels are ignored."""
    labels = batch["labels"]
    if family == "encoder-decoder":
        logits = model(**batch).logits
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    return float(loss.detach()), float((labels != IGNORE).sum())


def _mean_over_ranks(x: torch.Tensor, world: int) -> float:
    x = x.detach().to(torch.float32).cpu().clone()
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(x)
        x /= world
    return float(x)


def per_rank_params(module: torch.nn.Module) -> int:
    """Parameters this rank holds: its ZeRO-3 partition (`ds_tensor`), else the full model."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())


def _checkpoint_and_report(engine, state, rank, final, tok, base_config, cfg: Config, n_params, total) -> None:
    import ray.train

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    tokens = _sum_over_ranks(state["tokens"])
    metrics = {
        "epoch": state["epoch"], "step": engine.global_steps, "total_steps": total,
        "train_loss": state["train_loss"][-1][1] if state["train_loss"] else None,
        "val_loss": state["val_loss"][-1][1] if state["val_loss"] else None,
        "tokens_per_s": tokens / state["train_s"] if state["train_s"] else None, "final": final,
    }
    with tempfile.TemporaryDirectory(prefix="ftcot-ckpt-") as d:
        engine.save_checkpoint(d, tag=CKPT_TAG, client_state={"ftcot_state": state})
        if final:
            sd = gathered_state_dict(engine.module, cfg.train.zero_stage, rank)
            if rank == 0:
                save_student(sd, base_config, tok, Path(d) / "student", cfg.student.lora, cfg.student.arch)
                summary = dict(state, tokens=tokens, tokens_per_s=metrics["tokens_per_s"], steps=engine.global_steps,
                               params=n_params, params_per_rank=per_rank_params(engine.module), num_workers=world,
                               zero_stage=cfg.train.zero_stage)
                (Path(d) / "train_metrics.json").write_text(json.dumps(summary))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _sum_over_ranks(n: int) -> int:
    x = torch.tensor([float(n)], dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(x)
    return int(x.item())


def _maybe_fail(fault: dict, rank: int, step: int) -> None:
    """Fault injection for the resume test: SIGKILL this worker once (a marker file makes it once)."""
    if not fault or rank != fault.get("rank", 0) or step != fault.get("at_step"):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(f"killed rank {rank} at step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)


class _NoProgress:
    def update(self, n): ...

    def close(self): ...


def _progress(rank: int, total: int, done: int):
    if rank != 0:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="train steps", mininterval=5.0)
