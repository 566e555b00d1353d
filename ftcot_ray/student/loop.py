"""The per-worker train function Ray Train runs on every rank (CPU/gloo here, GPU/nccl on a cluster).

Each rank builds the same seeded student and wraps it with `deepspeed.initialize` (a torch AdamW,
a transformers LR schedule, the ZeRO stage of the config). Step `s` trains on global batch `s` of
one seeded stream (`data.global_batch`); a rank takes its stride of it, micro-batch by
micro-batch, and the loss is normalised by the global batch's label tokens, so the objective does
not depend on the number of workers. Every `train.eval_every_steps` steps (and at the last)
validation measures the val loss and the val ACCURACY (greedy generation, the paper's answer
rule); the checkpoint best by `train.select` carries an exported student. Each checkpoint goes to
`ray.train.report`, scored so that Ray Train keeps the best and the latest.

Why validation runs inside the loop rather than in Ray Train's ValidationConfig (alpha in 2.60):
that runs asynchronously in a separate task, so its figures arrive after the report that Tune's
ASHA needs them in, it needs an exported model in every checkpoint, and on a 2-core machine it
competes with training for the same cores.

Resume: the latest checkpoint (a DeepSpeed checkpoint with the loop's state) restores weights,
optimizer, scheduler, the step and the curves; the batch stream continues at the next step, so a
resumed run computes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import torch

from ..config import Config
from .card import AnswerRules
from .data import TASKS, ExampleWindow, batch_tokens, collate, row_weights, steps_per_epoch, token_losses
from .ds_config import ds_config
from .export import gathered_state_dict, save_student
from .model import apply_lora, build_model, count_params

CKPT_TAG = "state"


def plan(t, n_train: int) -> dict:
    """Steps and cadences, the same on every rank and in the driver."""
    per_epoch = steps_per_epoch(n_train, t.batch_size)
    total = t.max_steps or t.epochs * per_epoch
    every = t.eval_every_steps or max(1, total // 10)
    return {"per_epoch": per_epoch, "total": total, "eval_every": every,
            "ckpt_every": t.checkpoint_every_steps or every, "log_every": t.log_every or max(1, total // 50)}


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

    label_tokens, tasks = ray.get(config["meta"])  # two small columns of every example (5 bytes each)
    p = plan(t, len(label_tokens))
    total = p["total"]
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=t.lr, weight_decay=t.weight_decay)
    scheduler = get_scheduler(t.lr_schedule if t.lr_schedule != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=int(t.warmup_ratio * total), num_training_steps=total)
    skip_cpu_shm_op(t.use_gpu or t.cpu_shm_comm)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config(t, world))
    state = _resume(engine)
    accum = t.grad_accum()
    shard = ray.train.get_dataset_shard("train")
    train = ExampleWindow(lambda: shard.iter_batches(batch_size=4096, batch_format="numpy"), label_tokens, tasks,
                          batch_size=t.batch_size, seed=t.seed, rank=rank, world=world, accum=accum,
                          max_rows=t.window_examples)
    validator = Validator(config, cfg, tok, rank, world, device)
    progress, fault = config.get("progress"), config.get("fault") or {}
    report = Reporter(engine, cfg, tok, base_config, n_params, rank, total)
    if state["step"] >= total:  # resumed from the final checkpoint: nothing left to train
        report(state, evaluated=False, final=True)
        return

    lam = t.rationale_weight if t.method == "step_by_step" else None
    for step in range(state["step"], total):
        indices, mbs = train.micro_batches(step)  # may stream the next window of examples (not timed)
        t0 = time.perf_counter()
        weights = row_weights(train, indices, lam)  # see data.py: token means over the GLOBAL batch
        parts = torch.zeros(1 + len(TASKS), dtype=torch.float64)  # objective, then each task's weighted part
        engine.train()
        for mb in mbs:
            batch = {k: v.to(device) for k, v in collate(mb, tok.pad_token_id, family).items()}
            sums, _ = token_losses(engine, batch, family)
            w = torch.tensor([weights[ex["index"]] for ex in mb], dtype=sums.dtype, device=sums.device)
            loss = (sums * w).sum()
            # DeepSpeed divides by the accumulation steps and averages over ranks: undone by world x accum.
            engine.backward(loss * (world * accum))
            engine.step()
            parts[0] += float(loss.detach())
            for k, ex in enumerate(mb):
                parts[1 + ex["task"]] += float((sums[k] * w[k]).detach())
            state["tokens"] += batch_tokens(batch, family)
        state["train_s"] += time.perf_counter() - t0
        done = state["step"] = step + 1
        if done % p["log_every"] == 0 or done == 1 or done == total:
            reduced = _all_reduce(parts)
            state["train_loss"].append([done, float(reduced[0])])
            if lam is not None:  # both losses of distilling step-by-step, each a token mean
                state.setdefault("task_losses", []).append([done, float(reduced[1]), float(reduced[2]) / lam if lam else 0.0])
        if progress is not None and rank == 0 and (done % 5 == 0 or done == total):
            progress.update.remote("train", done, total, loss=state["train_loss"][-1][1])
        _maybe_fail(fault, rank, done)
        evaluated = done % p["eval_every"] == 0 or done == total
        if evaluated:
            state["val"].append({"step": done, **validator(engine)})
            if progress is not None and rank == 0:
                progress.update.remote("train", done, total, val_accuracy=state["val"][-1].get("val_accuracy"))
        if evaluated or done % p["ckpt_every"] == 0:
            report(state, evaluated=evaluated, final=done == total)


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


def _resume(engine) -> dict:
    import ray.train

    state = {"step": 0, "train_loss": [], "val": [], "best": None, "improvements": 0, "tokens": 0,
             "train_s": 0.0, "restarts": 0, "resumed_from_step": None}
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return state
    with ckpt.as_directory() as d:
        _, client = engine.load_checkpoint(d, tag=CKPT_TAG)
    state.update(client["ftcot_state"])
    state["restarts"] += 1
    state["resumed_from_step"] = state["step"]
    return state


# --------------------------------------------------------------------------- validation


class Validator:
    """Val loss (token-weighted, all ranks) and val accuracy (greedy generation, the task's answer rule)."""

    def __init__(self, config: dict, cfg: Config, tok, rank: int, world: int, device):
        self.cfg, self.tok, self.rank, self.world, self.device = cfg, tok, rank, world, device
        self.family = cfg.student.family
        self.val = _shard("val")  # streamed at each validation (None: no val pairs)
        self.questions = config["val_questions"]  # [{"prompt", "answer"}]
        self.rules = AnswerRules(**config["rules"])
        self.zero3 = cfg.train.zero_stage == 3

    def __call__(self, engine) -> dict:
        engine.eval()
        try:
            with torch.no_grad():
                out = self._loss(engine)
                if self.questions:
                    out |= self._accuracy(engine)
        finally:
            engine.train()
        return out

    def _mine(self):
        """This rank's val examples, a micro-batch at a time, streamed: its stride of the table's rows
        (ZeRO-3 gathers parameters collectively in every forward: all ranks then take every row)."""
        size, chunk, pos = self.cfg.train.micro_batch(), [], 0
        for b in self.val.iter_batches(batch_size=4096, batch_format="numpy"):
            for j in range(len(b["label_tokens"])):
                if self.zero3 or pos % self.world == self.rank:
                    chunk.append({"input_ids": b["input_ids"][j].tolist(), "labels": b["labels"][j].tolist(),
                                  "task": int(b["task"][j])})
                    if len(chunk) == size:
                        yield chunk
                        chunk = []
                pos += 1
        if chunk:
            yield chunk

    def _loss(self, engine) -> dict:
        """Token-mean val loss per task; the objective's val loss (step-by-step: label + lambda x rationale)."""
        if self.val is None:
            return {}
        totals = torch.zeros(2 * len(TASKS), dtype=torch.float64)  # per task: summed loss, tokens
        for chunk in self._mine():
            batch = {k: v.to(self.device) for k, v in collate(chunk, self.tok.pad_token_id, self.family).items()}
            sums, counts = token_losses(engine, batch, self.family)
            for ex, loss, n in zip(chunk, sums.tolist(), counts.tolist()):
                totals[2 * ex["task"]] += loss
                totals[2 * ex["task"] + 1] += n
        if not self.zero3:
            totals = _all_reduce(totals)
        means = [float(totals[2 * t] / totals[2 * t + 1]) if totals[2 * t + 1] else None for t in range(len(TASKS))]
        if self.cfg.train.method != "step_by_step":
            return {"val_loss": means[0]}
        lam = self.cfg.train.rationale_weight
        return {"val_loss": (means[0] or 0.0) + lam * (means[1] or 0.0), "val_label_loss": means[0],
                "val_rationale_loss": means[1]}

    def _accuracy(self, engine) -> dict:
        from ..evaluation import read_prediction
        from ..tasks.answers import is_correct
        from .generate import Student, generate

        # Under ZeRO-3 every rank must run the same forward passes (parameters are gathered
        # collectively), so all ranks generate all questions; otherwise each takes its stride.
        mine = self.questions if self.zero3 else self.questions[self.rank::self.world]
        student = Student(model=engine.module, tokenizer=self.tok, family=self.family, path="(training)")
        padding_side = self.tok.padding_side
        self.tok.padding_side = "left" if self.family == "decoder" else "right"
        try:
            gens = generate(student, [q["prompt"] for q in mine], max_new_tokens=self.cfg.train.val_max_new_tokens,
                            batch_size=64, synced=self.zero3 and self.world > 1) if mine else []
        finally:
            self.tok.padding_side = padding_side
        correct = well_formed = 0
        for q, g in zip(mine, gens):
            pred, ok = read_prediction(self.rules, g[0].text, self.cfg.train.method, require_marker=True)
            correct += is_correct(self.rules, pred, q["answer"])
            well_formed += ok
        counts = torch.tensor([correct, well_formed, len(mine)], dtype=torch.float64)
        if not self.zero3:
            counts = _all_reduce(counts)
        return {"val_accuracy": float(counts[0] / counts[2]), "val_well_formed": float(counts[1] / counts[2]),
                "val_n": int(counts[2])}


def improves(select: str, new: dict, best: dict | None) -> bool:
    """Is the evaluation `new` better than the best so far, by `train.select`?

    val_accuracy: higher accuracy, ties to the lower val loss (then the earlier step); val_loss:
    lower loss; last: always (the newest evaluation wins).
    """
    if best is None or select == "last":
        return True
    loss_new, loss_best = new.get("val_loss", float("inf")), best.get("val_loss", float("inf"))
    if select == "val_loss":
        return loss_new < loss_best
    acc_new, acc_best = new.get("val_accuracy", -1.0), best.get("val_accuracy", -1.0)
    return acc_new > acc_best or (acc_new == acc_best and loss_new < loss_best)


# --------------------------------------------------------------------------- checkpoints


class Reporter:
    """Checkpoint (DeepSpeed state + the loop's state), export the student when it is the new best,
    and hand both to `ray.train.report` with a score (`best_rank`) Ray Train keeps the best by."""

    def __init__(self, engine, cfg: Config, tok, base_config, n_params: int, rank: int, total: int):
        self.engine, self.cfg, self.tok, self.base_config = engine, cfg, tok, base_config
        self.n_params, self.rank, self.total = n_params, rank, total

    def __call__(self, state: dict, evaluated: bool, final: bool) -> None:
        import ray.train

        best_now = evaluated and improves(self.cfg.train.select, state["val"][-1], state["best"])
        if best_now:
            state["best"] = dict(state["val"][-1])
            state["improvements"] += 1
        tokens = _sum_over_ranks(torch.tensor([float(state["tokens"])], dtype=torch.float64))
        last_val = state["val"][-1] if state["val"] else {}
        metrics = {"step": state["step"], "total_steps": self.total, "final": final,
                   "train_loss": state["train_loss"][-1][1] if state["train_loss"] else None,
                   "val_loss": last_val.get("val_loss"), "val_accuracy": last_val.get("val_accuracy"),
                   "best_step": (state["best"] or {}).get("step"),
                   "best_rank": state["improvements"] if best_now else -1,
                   "tokens_per_s": tokens / state["train_s"] if state["train_s"] else None}
        with tempfile.TemporaryDirectory(prefix="ftcot-ckpt-") as d:
            self.engine.save_checkpoint(d, tag=CKPT_TAG, client_state={"ftcot_state": state})
            if best_now:
                sd = gathered_state_dict(self.engine.module, self.cfg.train.zero_stage, self.rank)
                if self.rank == 0:
                    save_student(sd, self.base_config, self.tok, Path(d) / "student", self.cfg.student.lora,
                                 self.cfg.student.arch)
            if self.rank == 0:  # what a re-run reads to say where it resumes
                (Path(d) / "ftcot_state.json").write_text(json.dumps({"step": state["step"]}))
            if final and self.rank == 0:
                world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
                summary = dict(state, tokens=tokens, tokens_per_s=metrics["tokens_per_s"], steps=state["step"],
                               params=self.n_params, params_per_rank=per_rank_params(self.engine.module),
                               num_workers=world, zero_stage=self.cfg.train.zero_stage)
                (Path(d) / "train_metrics.json").write_text(json.dumps(summary))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _shard(name: str):
    """The worker's iterator over a dataset given to the trainer (None when it was not given)."""
    import ray.train

    try:
        return ray.train.get_dataset_shard(name)
    except (KeyError, ValueError):
        return None


def per_rank_params(module: torch.nn.Module) -> int:
    """Parameters this rank holds: its ZeRO-3 partition (`ds_tensor`), else the full model."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (on the GPU under NCCL, which reduces only CUDA tensors)."""
    x = x.detach().to(torch.float64).cpu().clone()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        if torch.distributed.get_backend() == "nccl":
            y = x.cuda()
            torch.distributed.all_reduce(y)
            return y.cpu()
        torch.distributed.all_reduce(x)
    return x


def _sum_over_ranks(x: torch.Tensor) -> float:
    return float(_all_reduce(x).sum())


def _maybe_fail(fault: dict, rank: int, step: int) -> None:
    """Fault injection for the resume test: SIGKILL this worker once (a marker file makes it once)."""
    if not fault or rank != fault.get("rank", 0) or step != fault.get("at_step"):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(f"killed rank {rank} at step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)
