"""One typed config for every stage, the CLI, jobs and Tune.

Grammar: a preset name (``quickstart``, ``replay/multiarith``) or a YAML path, then dotted
overrides ``section.key=value`` whose values are parsed as YAML scalars (``train.lr=1e-4``,
``teacher.samples=8``, ``pipeline.diversity=[1,4]``). Tune trial params go through the
same :func:`apply_overrides`. Unknown keys and wrong types fail with the key path.

Secrets never live here: the teacher's key is named by an environment variable
(``teacher.api_key_env``) and read at call time.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A config problem, with the offending key path or file in the message."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    dataset: str = "coin_flip_synth"
    # Raw benchmark folder (../shared/datasets/zero_shot_cot/dataset), a raw file, or a user JSONL/CSV.
    source: Optional[str] = None
    # Where GSM8K's train file lives (the zero_shot_cot folder ships only its test file).
    gsm8k_train: Optional[str] = None
    # Your own JSONL/CSV task (dataset "custom" or any unregistered name + data.source): how answers
    # are read and graded (see tasks/answers.py), and the letters of a multiple-choice task.
    answer_format: Optional[Literal["number_float", "number_exact", "choice", "yesno", "letters"]] = None
    choices: str = "ABCDE"
    # Synthetic tasks: sizes, difficulty (people flipping / words), seed.
    train_size: int = 1000
    test_size: int = 200
    difficulty: int = 4
    seed: int = 0


class Price(_Section):
    """USD per 1M tokens."""

    input: float = 0.0
    output: float = 0.0


class TeacherSimConfig(_Section):
    """The local OpenAI-compatible teacher (`ftcot teacher-sim`), started when teacher.base_url is unset."""

    mode: Literal["simulated", "replay"] = "simulated"
    replay_path: Optional[str] = None  # a completions table or the authors' D_*.json
    error_rate: float = Field(0.15, ge=0, le=1)  # wrong reasoning steps -> wrong answers
    latency_ms: float = Field(0.0, ge=0)
    seed: int = 0


class TeacherConfig(_Section):
    base_url: Optional[str] = None  # None: start teacher-sim on a free 127.0.0.1 port
    api: Literal["completions", "chat"] = "completions"
    model: str = "ftcot-sim-teacher"
    api_key_env: str = "OPENAI_API_KEY"  # the *name* of the variable, never the key
    samples: int = Field(1, ge=1)  # D_max
    temperature: float = Field(0.0, ge=0)
    top_p: float = 1.0
    max_tokens: int = Field(128, ge=1)  # rationale (paper: 128)
    answer_max_tokens: int = Field(32, ge=1)
    use_n: bool = False  # ask for all D samples in one request with `n` where the endpoint supports it
    concurrency: int = Field(64, ge=1)  # requests in flight per actor
    num_actors: int = Field(1, ge=1)
    actor_cpus: float = Field(0.25, ge=0)  # logical CPUs each fan-out actor claims (it mostly waits on I/O)
    seed_param: bool = True  # send the sample index as the OpenAI `seed` field (distinct, reproducible samples)
    rpm: Optional[int] = None  # whole-job requests/min
    tpm: Optional[int] = None  # whole-job tokens/min
    max_attempts: int = Field(5, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    budget_usd: Optional[float] = None
    prices: dict[str, Price] = Field(default_factory=dict)  # by model name
    cache_dir: Optional[str] = None  # default: <run_dir>/teacher_cache (a shared path on clusters)
    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["train", "test"])
    sim: TeacherSimConfig = Field(default_factory=TeacherSimConfig)


class CurateConfig(_Section):
    diversity: int = Field(1, ge=1)  # D: read samples with sample_idx < D
    dedup: bool = False
    val_fraction: float = Field(0.1, ge=0, lt=1)
    val_seed: int = 0
    drop_truncated: bool = True


class LoraConfig(_Section):
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Optional[list[str]] = None


class StudentConfig(_Section):
    # gpt2 / llama (decoder-only), t5 (encoder-decoder); `pretrained` overrides the build.
    arch: Literal["gpt2", "llama", "t5"] = "gpt2"
    size: str = "tiny"
    pretrained: Optional[str] = None  # local folder or hub id, on machines that have them
    tokenizer: Optional[str] = None  # default: the pretrained one, else trained locally
    vocab_size: int = 1000
    # From-scratch students only (pretrained ones keep theirs). 0 because on the quickstart's coin flips a
    # 0.9M-parameter GPT-2 reached 98 % after 600 steps without dropout and 68 % with GPT-2's default 0.1.
    dropout: float = Field(0.0, ge=0, lt=1)
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @property
    def family(self) -> Literal["decoder", "encoder-decoder"]:
        return "encoder-decoder" if self.arch == "t5" else "decoder"


class TrainConfig(_Section):
    method: Literal["ft_cot", "vanilla"] = "ft_cot"
    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(20, ge=1)
    max_steps: Optional[int] = None  # overrides epochs when set
    batch_size: int = Field(16, ge=1)  # per worker
    grad_accum: int = Field(1, ge=1)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_length: int = Field(512, ge=8)
    on_overlength: Literal["truncate", "refuse"] = "truncate"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = Field(2, ge=0, le=3)
    offload: bool = False
    grad_ckpt: bool = False
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = 1
    max_failures: int = 2
    eval_every_epoch: bool = True
    seed: int = 0
    # Runtime knobs of the train stage (they do not change what is learned).
    checkpoint_every_epochs: int = Field(1, ge=1)  # DeepSpeed checkpoint + ray.train.report cadence
    storage_path: Optional[str] = None  # Ray Train storage (a shared path/URI on clusters); default <out>/ray_train
    keep_checkpoints: bool = False  # keep the Ray Train checkpoints under <out>/ray_train after export
    log_every: Optional[int] = Field(None, ge=1)  # train-loss logging cadence in steps; default ~50 points per run
    grad_clip: float = Field(1.0, ge=0)  # 0 disables
    # DeepSpeed JIT-compiles a shared-memory all-reduce op on CPU (~40 s) that only its inference
    # all-reduce uses; training never needs it, so CPU runs skip it unless asked for.
    cpu_shm_comm: bool = False


class EvalEndpointConfig(_Section):
    """An OpenAI-compatible model to evaluate as a baseline (zero-shot / zero-shot-CoT / few-shot-CoT)."""

    base_url: str
    model: str
    api: Literal["completions", "chat"] = "completions"
    api_key_env: str = "OPENAI_API_KEY"  # the *name* of the variable, never the key
    concurrency: int = Field(16, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    max_attempts: int = Field(5, ge=1)


class EvalConfig(_Section):
    student: Optional[str] = None  # exported folder; default: the pipeline's trained one
    split: Literal["train", "val", "test"] = "test"
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(128, ge=1)
    num_replicas: int = Field(1, ge=1)
    samples: int = Field(1, ge=1)  # self-consistency k
    temperature: float = Field(0.0, ge=0)
    seed: int = 0
    # Baselines in the same harness: prompt `baseline_model` (an HF folder) or `endpoint` instead of
    # the trained student. None: evaluate the student (its method is train.method).
    baseline: Optional[Literal["zero_shot", "zero_shot_cot", "few_shot_cot"]] = None
    baseline_model: Optional[str] = None
    endpoint: Optional[EvalEndpointConfig] = None
    # A Fine-tune-CoT output without `-->` counts as wrong (DESIGN); false: the paper's last-candidate fallback.
    require_marker: bool = True
    cpus_per_replica: float = Field(1, gt=0)
    torch_threads: Optional[int] = Field(None, ge=1)  # per replica; default: cpus_per_replica


class TuneConfig(_Section):
    num_samples: int = 4
    max_concurrent_trials: int = 1
    metric: str = "val_accuracy"
    space: dict[str, Any] = Field(default_factory=dict)


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = 8000
    students: list[str] = Field(default_factory=list)


class ReportConfig(_Section):
    mlflow_uri: Optional[str] = None  # e.g. file:./mlruns; off when unset
    mlflow_experiment: str = "ftcot-ray"


class PipelineConfig(_Section):
    """What `ftcot run` trains and compares."""

    diversity: list[int] = Field(default_factory=lambda: [1])  # D values for Fine-tune-CoT
    vanilla: bool = True
    teacher_row: bool = True


class ResourcesConfig(_Section):
    address: Optional[str] = None  # Ray address; None: connect to RAY_ADDRESS or start a local Ray
    num_cpus: Optional[int] = None  # for a local Ray started here


class Config(_Section):
    name: str = "quickstart"
    run_dir: str = "runs/quickstart"
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @field_validator("run_dir")
    @classmethod
    def _run_dir_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("run_dir must not be empty")
        return v


# --------------------------------------------------------------------------- loading


def preset_names() -> list[str]:
    root = resources.files("ftcot_ray") / "configs"
    names = []
    for path in sorted(Path(str(root)).rglob("*.yaml")):
        name = str(path.relative_to(Path(str(root))).with_suffix(""))
        if not any(part.startswith("_") for part in name.split("/")):  # _base files are building blocks
            names.append(name)
    return names


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _source_dict(source: str | None) -> dict:
    """A preset name or a YAML path -> raw dict (with `base:` presets merged underneath)."""
    if source is None:
        source = "quickstart"
    path = Path(source)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        preset = Path(str(resources.files("ftcot_ray") / "configs")) / f"{source}.yaml"
        if not preset.exists():
            raise ConfigError(
                f"config {source!r} is neither a YAML file nor a preset; presets: {', '.join(preset_names())}"
            )
        path = preset
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    if base:
        raw = _deep_merge(_source_dict(base), raw)
    return raw


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, _, value = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict, overrides: dict[str, Any] | list[str] | None) -> dict:
    """Apply `a.b=c` strings, or a {"a.b": value} dict (Tune trial params), to a raw dict."""
    out = copy.deepcopy(raw)
    items: list[tuple[list[str], Any]]
    if overrides is None:
        items = []
    elif isinstance(overrides, dict):
        items = [([p for p in k.split(".") if p], v) for k, v in overrides.items()]
    else:
        items = [parse_override(o) for o in overrides]
    for parts, value in items:
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {'.'.join(parts)}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key")
        else:
            got = e.get("input")
            lines.append(f"  {loc}: {e['msg']} (got {got!r})")
    return "\n".join(lines)


def validate(raw: dict, origin: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, origin)) from None


def load_config(source: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    raw = apply_overrides(_source_dict(source), overrides)
    return validate(raw, origin=source or "quickstart")


def with_overrides(cfg: Config, overrides: list[str] | dict[str, Any]) -> Config:
    """A new Config with overrides applied (Tune trials, pipeline variants)."""
    return validate(apply_overrides(cfg.model_dump(mode="json"), overrides), origin=cfg.name)


def dump_config(cfg: Config, path: Path) -> None:
    """Write the resolved config (litgpt's hyperparameters.yaml). Holds no secret by construction."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
