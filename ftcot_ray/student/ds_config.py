"""The DeepSpeed config dict for a TrainConfig (the same dict on 2 CPU workers or N GPUs)."""

from __future__ import annotations

from ..config import TrainConfig


def ds_config(train: TrainConfig, world_size: int) -> dict:
    zero: dict = {"stage": train.zero_stage}
    if train.offload:  # (offload with stage 0 is refused when the config loads)
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
        if train.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if train.zero_stage == 3:
        # Small students: keep every parameter partitioned rather than persisting small ones on all ranks,
        # so the per-rank memory figure is the real ZeRO-3 partition.
        zero["stage3_param_persistence_threshold"] = 0
    cfg = {
        # train.batch_size is global; the config's rules make it workers x micro-batch x accumulation.
        "train_micro_batch_size_per_gpu": train.micro_batch(),
        "gradient_accumulation_steps": train.batch_size // (world_size * train.micro_batch()),
        "train_batch_size": train.batch_size,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "initial_scale_power": 12},
        # We pass a torch AdamW: DeepSpeed's fused/CPU Adam would JIT-compile (~55 s on CPU) for no gain here.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # progress goes through Ray Train reports, not DeepSpeed's stdout
        "wall_clock_breakdown": False,
    }
    if train.grad_clip > 0:
        cfg["gradient_clipping"] = train.grad_clip
    return cfg
