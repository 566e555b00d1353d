"""One typed config for every stage, the CLI, jobs and Tune.

Grammar: a preset name (``quickstart``, ``replay/multiarith``) or a YAML path, then dotted
overrides ``section.key=value`` whose values are parsed as YAML scalars (``train.lr=1e-4``,
``teacher.samples=8``, ``pipeline.diversity=[1,4]``). Tune trial params go through the
same :func:`apply_overrides`. Unknown keys, wrong types and impossible combinations fail when
the config loads, with the key path.

Every field declares whether it changes a stage's result. By default a field of a section
changes the result of that section's stage (``SECTION_STAGE``); ``runtime(...)`` marks a setting
that only changes how or where the work runs (concurrency, workers, memory), and ``affects=``
names further stages a field changes. Stage keys are derived from these declarations
(``artifacts.stage_key``), and a property test walks every field to hold them to it.

Secrets never live here: the teacher's key is named by an environment variable
(``teacher.api_key_env``) and read at call time.
"""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

__all__ = ["Config", "ConfigError", "load_config", "with_overrides", "dump_config", "apply_overrides"]

# The stage whose result a section's fields change. Sections not listed (tune, serve, report,
# pipeline, resources) orchestrate stages and never change one stage's result.
SECTION_STAGE = {"data": "data", "teacher": "teach", "curate": "curate", "student": "train", "train": "train",
                 "eval": "eval"}


def runtime(*args: Any, **kwargs: Any) -> Any:
    """A Field that changes how or where a stage runs, never what it produces: it re-keys nothing."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {}, runtime=True)
    return Field(*args, json_schema_extra=extra, **kwargs)


def result(*args: Any, affects: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """A Field that changes its section's stage and, with `affects`, further stages too."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {}, affects=list(affects))
    return Field(*args, json_schema_extra=extra, **kwargs)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def looks_like_secret(text: str) -> bool:
    """A value that is probably a pasted API key rather than the name of a variable."""
    t = text.strip()
    if t.lower().startswith(("sk-", "sk_", "hf_", "key-", "bearer ")):
        return True
    mixed = re.search(r"[a-z]", t) and re.search(r"[A-Z]", t) and re.search(r"\d", t)
    return len(t) >= 24 and bool(mixed)


def _check_env_name(value: str, key: str) -> str:
    # The message never repeats the value: it may be the key itself, pasted by mistake.
    if looks_like_secret(value):
        raise ValueError(f"{key} must be the NAME of an environment variable (e.g. OPENAI_API_KEY), and the "
                         "value given looks like a key itself; it was not echoed or stored anywhere")
    if not ENV_NAME_RE.match(value):
        raise ValueError(f"{key} must be the name of an environment variable (letters, digits, _), e.g. OPENAI_API_KEY")
    return value


class DataConfig(_Section):
    dataset: str = "coin_flip_synth"
    # Raw benchmark folder (../shared/datasets/zero_shot_cot/dataset), a raw file, or a user JSONL/CSV.
    # The data key covers the content of the file(s) it names, not only the path.
    source: Optional[str] = None
    # Where GSM8K's train file lives (the zero_shot_cot folder ships only its test file).
    gsm8k_train: Optional[str] = None
    # Your own JSONL/CSV task (dataset "custom" or any unregistered name + data.source): how answers
    # are read and graded (see tasks/answers.py), and the letters of a multiple-choice task.
    answer_format: Optional[Literal["number_float", "number_exact", "choice", "yesno", "letters"]] = None
    choices: str = "ABCDE"
    # Synthetic tasks: sizes, difficulty (people flipping / words), seed.
    train_size: int = Field(1000, ge=1)
    test_size: int = Field(200, ge=0)
    difficulty: int = Field(4, ge=1)
    seed: int = 0


class Price(_Section):
    """USD per 1M tokens. The Batch API bills at its own rate: by default half the synchronous one (OpenAI's)."""

    input: float = Field(0.0, ge=0)
    output: float = Field(0.0, ge=0)
    batch_input: Optional[float] = Field(None, ge=0)
    batch_output: Optional[float] = Field(None, ge=0)

    def per_token(self, mode: str = "sync") -> tuple[float, float]:
        """(input, output) USD per token for `teacher.mode`."""
        if mode == "batch":
            i = self.batch_input if self.batch_input is not None else self.input / 2
            o = self.batch_output if self.batch_output is not None else self.output / 2
            return i / 1e6, o / 1e6
        return self.input / 1e6, self.output / 1e6


class TeacherSimConfig(_Section):
    """The local OpenAI-compatible teacher (`ftcot teacher-sim`), started when teacher.base_url is unset.

    The one declaration of the sim's settings: `ftcot teacher-sim`'s flags are generated from these
    fields (teacher/sim/server.py), and the fields that change its answers (the non-runtime ones)
    make its cache identity. Faults and delays are runtime: a retried fault leaves no trace.
    """

    mode: Literal["simulated", "replay"] = Field("simulated", description="simulated (synthetic tasks) or replay")
    replay_path: Optional[str] = Field(None, description="replay: the authors' D_*.json or a completions.jsonl")
    error_rate: float = Field(0.15, ge=0, le=1, description="simulated: share of rationales with a wrong step")
    seed: int = Field(0, description="seeds the simulated rationales (with the request's seed = sample index)")
    latency_ms: float = runtime(0.0, ge=0, description="fixed latency of every answer")
    rate_429: float = runtime(0.0, ge=0, le=1, description="share of requests answered 429 with Retry-After")
    retry_after_s: float = runtime(1.0, ge=0, description="the Retry-After of a simulated 429")
    rate_500: float = runtime(0.0, ge=0, le=1, description="share of requests answered 500")
    rate_timeout: float = runtime(0.0, ge=0, le=1, description="share of requests that hang for hang_s")
    hang_s: float = runtime(30.0, ge=0, description="how long a 'timeout' fault hangs (longer than the client's timeout)")
    rate_malformed: float = runtime(0.0, ge=0, le=1, description="share of requests answered with a broken 200 body")
    fail_429_at: Optional[int] = runtime(None, ge=1, description="answer the N-th completion request with a 429")
    require_key_env: Optional[str] = runtime(None, description="check each request's bearer key against $NAME")
    batch_delay_s: float = runtime(1.0, ge=0, description="Batch API: seconds a batch runs (its lines finish evenly over it)")
    batch_expire_s: Optional[float] = runtime(
        None, gt=0, description="Batch API: a batch still running this long after creation expires")
    batch_line_error_rate: float = runtime(0.0, ge=0, le=1, description="Batch API: share of lines that fail (500)")


class EndpointConfig(_Section):
    """An OpenAI-compatible endpoint: where, which model and API, and how hard to ask.

    `eval.endpoint` (a model evaluated as a baseline) is one; the teacher is one too, with more fields
    (TeacherConfig below), and both are called by the same component (ftcot_ray/endpoint.py).
    """

    KEY_PATH: ClassVar[str] = "eval.endpoint"

    base_url: str
    model: str
    api: Literal["completions", "chat"] = "completions"
    # How we ask (the answers do not depend on these).
    api_key_env: str = runtime("OPENAI_API_KEY")  # the *name* of the variable, never the key
    concurrency: int = runtime(16, ge=1)  # requests in flight, whole job
    timeout_s: float = runtime(60.0, gt=0)
    max_attempts: int = runtime(5, ge=1)
    backoff_base_s: float = runtime(0.5, ge=0)
    backoff_max_s: float = runtime(30.0, ge=0)

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        return _check_env_name(v, f"{cls.KEY_PATH}.api_key_env")


class TeacherConfig(EndpointConfig):
    KEY_PATH: ClassVar[str] = "teacher"

    base_url: Optional[str] = None  # None: start teacher-sim on a free 127.0.0.1 port
    model: str = "ftcot-sim-teacher"
    samples: int = Field(1, ge=1)  # D_max
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(128, ge=1)  # rationale (paper: 128)
    answer_max_tokens: int = Field(32, ge=1)
    use_n: bool = False  # ask for all D samples in one request with `n` where the endpoint supports it
    seed_param: bool = True  # send the sample index as the OpenAI `seed` field (distinct, reproducible samples)
    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["train", "test"])
    sim: TeacherSimConfig = Field(default_factory=TeacherSimConfig)
    # How fast, how and how safely we ask (the answers do not depend on these).
    concurrency: int = runtime(64, ge=1)  # requests in flight, whole job (split evenly over the actors)
    # sync: requests as the fan-out goes; batch: the OpenAI Batch API (upload, poll, download; its
    # price). Batch answers land in the same content-addressed cache as synchronous ones.
    mode: Literal["sync", "batch"] = runtime("sync")
    # The fan-out's Ray Data actor pool: at most this many async workers (default: sized to the CPUs Ray has
    # and teacher.concurrency), each claiming actor_cpus logical CPUs (it mostly waits on I/O).
    num_actors: Optional[int] = runtime(None, ge=1)
    actor_cpus: float = runtime(0.25, ge=0)
    # Questions per Ray Data batch handed to a worker (granularity of progress and output, not of speed: each
    # worker holds as many batches at once as it takes to keep its share of teacher.concurrency in flight).
    batch_size: int = runtime(64, ge=1)
    # Answers are stored in blocks of this many (one object each), or sooner after cache_flush_s seconds;
    # until then each lives in its worker's journal on local disk (teacher/answers.py).
    cache_block_rows: int = runtime(512, ge=1)
    cache_flush_s: float = runtime(30.0, gt=0)
    rpm: Optional[int] = runtime(None, ge=1)  # whole-job requests/min
    tpm: Optional[int] = runtime(None, ge=1)  # whole-job tokens/min
    # A stopped-by-budget stage re-opens when the budget is raised (stages/teach.py), so no re-key.
    budget_usd: Optional[float] = runtime(None, ge=0)
    prices: dict[str, Price] = runtime(default_factory=dict)  # by model name (accounting only)
    cache_dir: Optional[str] = runtime(None)  # default: <run_dir>/teacher_cache (a shared path on clusters)
    # The cost projection (`ftcot teach --dry-run`, `ftcot run --plan`): a paid pilot of this many
    # questions (answered for real and cached), and a local tokenizer for exact prompt-token counts
    # (a tokenizer.json or a folder holding one; "sim" = teacher-sim's word count; None: sim for the
    # sim, else an estimate that says it is one).
    pilot: Optional[int] = runtime(None, ge=1)
    tokenizer: Optional[str] = runtime(None)
    batch_poll_s: float = runtime(30.0, gt=0)  # mode=batch: seconds between status polls
    batch_window: str = runtime("24h")  # mode=batch: the Batch API's completion_window
    batch_max_lines: int = runtime(50_000, ge=1)  # mode=batch: lines per batch (the API's limit)


class CurateConfig(_Section):
    diversity: int = Field(1, ge=1)  # D: read samples with sample_idx < D
    dedup: bool = False
    val_fraction: float = Field(0.1, ge=0, lt=1)
    val_seed: int = 0
    drop_truncated: bool = True


class LoraConfig(_Section):
    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Optional[list[str]] = None


class StudentConfig(_Section):
    # gpt2 / llama (decoder-only), t5 (encoder-decoder); `pretrained` overrides the build.
    # The family decides how curate formats the pairs, so the architecture re-keys curate too.
    arch: Literal["gpt2", "llama", "t5"] = result("gpt2", affects=("curate",))
    size: str = "tiny"
    pretrained: Optional[str] = None  # local folder or hub id, on machines that have them
    tokenizer: Optional[str] = None  # default: the pretrained one, else trained locally
    vocab_size: int = Field(1000, ge=16)
    # From-scratch students only (pretrained ones keep theirs). 0 because on the quickstart's coin flips a
    # 0.9M-parameter GPT-2 reached 98 % after 600 steps without dropout and 68 % with GPT-2's default 0.1.
    dropout: float = Field(0.0, ge=0, lt=1)
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @property
    def family(self) -> Literal["decoder", "encoder-decoder"]:
        return "encoder-decoder" if self.arch == "t5" else "decoder"


class TrainConfig(_Section):
    # ft_cot: `{q} ###` -> ` {rationale} --> {answer}` (the paper); vanilla: -> ` {answer}`;
    # step_by_step (Hsieh et al. 2023, beyond the paper): the label and rationale tasks, weighted by
    # rationale_weight; at inference only the label task runs.
    method: Literal["ft_cot", "vanilla", "step_by_step"] = "ft_cot"
    rationale_weight: float = Field(1.0, ge=0)  # lambda of distilling step-by-step
    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(20, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)  # overrides epochs when set
    # GLOBAL batch: examples per optimizer step, whatever the number of workers. So one config is one
    # experiment on 2 CPU workers or 8 GPUs, and the worker count is a runtime setting (the loss is a
    # mean over the step's label tokens, all-reduced, so how the batch is split does not change it).
    batch_size: int = Field(16, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_length: int = Field(512, ge=8)
    on_overlength: Literal["truncate", "refuse"] = "truncate"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float = Field(1.0, ge=0)  # 0 disables
    seed: int = 0
    # Checkpoint selection on the validation split carved out by curate: every `eval_every_steps`
    # steps (and at the last) the student generates greedily for up to `val_max_examples` val
    # questions (the paper's answer rule), and the checkpoint best by `select` is exported.
    select: Literal["val_accuracy", "val_loss", "last"] = "val_accuracy"
    eval_every_steps: Optional[int] = Field(None, ge=1)  # default: about 10 evaluations per run
    val_max_examples: Optional[int] = Field(200, ge=1)  # None: the whole val split
    val_max_new_tokens: int = Field(160, ge=1)
    # Where and how the steps run: none of these change what is learned.
    num_workers: int = runtime(2, ge=1)
    micro_batch_size: Optional[int] = runtime(None, ge=1)  # per worker per forward; default: batch_size / num_workers
    zero_stage: int = runtime(2, ge=0, le=3)
    offload: bool = runtime(False)
    grad_ckpt: bool = runtime(False)
    use_gpu: bool = runtime(False)
    cpus_per_worker: float = runtime(1, gt=0)
    max_failures: int = runtime(2, ge=0)
    checkpoint_every_steps: Optional[int] = runtime(None, ge=1)  # default: at every validation
    storage_path: Optional[str] = runtime(None)  # Ray Train storage (a shared path/URI on clusters); default <out>/ray_train
    keep_checkpoints: int = runtime(2, ge=1)  # Ray Train checkpoints kept (the best and the latest always are)
    # Examples a worker holds at once: it streams the tokenized table and keeps those of the next steps that
    # fit (student/data.py, ExampleWindow); a smaller window streams the table more often.
    window_examples: int = runtime(65536, ge=1)
    log_every: Optional[int] = runtime(None, ge=1)  # train-loss logging cadence in steps; default ~50 points per run
    # DeepSpeed JIT-compiles a shared-memory all-reduce op on CPU (~40 s) that only its inference
    # all-reduce uses; training never needs it, so CPU runs skip it unless asked for.
    cpu_shm_comm: bool = runtime(False)

    def grad_accum(self) -> int:
        """Micro-batches per worker per step (derived: batch_size = workers x micro x accum)."""
        return self.batch_size // (self.num_workers * self.micro_batch())

    def micro_batch(self) -> int:
        return self.micro_batch_size or max(1, self.batch_size // self.num_workers)


class EvalConfig(_Section):
    student: Optional[str] = None  # exported folder; default: the pipeline's trained one
    split: Literal["train", "val", "test"] = "test"
    max_new_tokens: int = Field(128, ge=1)
    samples: int = Field(1, ge=1)  # self-consistency k
    temperature: float = Field(0.0, ge=0)
    seed: int = 0
    # Baselines in the same harness: prompt `baseline_model` (an HF folder) or `endpoint` instead of
    # the trained student. None: evaluate the student (its method is train.method).
    baseline: Optional[Literal["zero_shot", "zero_shot_cot", "few_shot_cot"]] = None
    baseline_model: Optional[str] = None
    endpoint: Optional[EndpointConfig] = None
    # Step-by-step students answer with the label task; true: also write each rationale (rationale task).
    rationales: bool = False
    # A Fine-tune-CoT output without `-->` counts as wrong (we differ from the paper here); false: the paper's last-candidate fallback.
    require_marker: bool = True
    # Batched greedy output equals one-at-a-time output, and sampled outputs are seeded per question
    # (student/generate.py), so none of these change a prediction.
    batch_size: int = runtime(32, ge=1)
    num_replicas: int = runtime(1, ge=1)
    cpus_per_replica: float = runtime(1, gt=0)
    torch_threads: Optional[int] = runtime(None, ge=1)  # per replica; default: cpus_per_replica


class TuneConfig(_Section):
    """`ftcot tune`: a search over the config's own dotted keys, judged on VALIDATION accuracy.

    An orchestration section: no field here changes a stage's key (a trial re-keys only the stages
    its overridden keys change). The search folder `<run_dir>/tune/<key>/` is keyed by the
    non-runtime fields below and the base config's stage keys, so `ftcot tune --resume` finds it.
    """

    # {dotted key: distribution} in the grammar of ftcot_ray/tune/space.py: choice([..]), grid([..]),
    # uniform(lo, hi), loguniform(lo, hi), randint(lo, hi) (both ends included). Only keys that change
    # curate or train may be searched: a trial never asks the teacher and never sees the test split.
    space: dict[str, Any] = Field(default_factory=dict)
    search: Literal["random", "grid", "optuna"] = "random"  # grid: every discrete value crossed
    scheduler: Literal["fifo", "asha"] = "fifo"  # asha: stop poor trials early on val accuracy vs step
    # random/optuna: trials drawn (default 4); grid: passes over the whole grid (default 1).
    num_samples: Optional[int] = Field(None, ge=1)
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"  # maximised / minimised
    seed: int = 0  # the searcher's (random draws, Optuna's TPE)
    grace_steps: Optional[int] = Field(None, ge=1)  # asha: steps before a trial may be stopped; default its first validation
    reduction_factor: int = Field(2, ge=2)  # asha: keep the top 1/reduction_factor at each rung
    # The diversity study: also evaluate EVERY finished trial on the test split and report mean +- std
    # test accuracy per value of this config key (e.g. curate.diversity). Unset: only the registry's
    # chosen student is ever evaluated on test.
    study_by: Optional[str] = None
    # How the search runs (not what it finds): trials at once (default: as many as the cluster's CPUs
    # hold at train.num_workers x train.cpus_per_worker each), retries of a failed trial, and the
    # memory the trial function itself reserves (it only waits on its TorchTrainer: 0 CPUs).
    max_concurrent_trials: Optional[int] = runtime(None, ge=1)
    max_failures: int = runtime(1, ge=0)
    trial_memory_mb: int = runtime(256, ge=1)

    @field_validator("space", mode="before")
    @classmethod
    def _flatten(cls, v: Any) -> Any:
        """`ftcot tune tune.space.train.lr='loguniform(1e-4, 3e-3)'` nests by the dots: flatten it back."""
        if not isinstance(v, dict):
            return v
        out: dict[str, Any] = {}
        for key, value in v.items():
            if isinstance(value, dict):
                out |= {f"{key}.{k}": x for k, x in cls._flatten(value).items()}
            else:
                out[str(key)] = value
        return out

    @field_validator("space")
    @classmethod
    def _grammar(cls, v: dict[str, Any]) -> dict[str, Any]:
        from .tune.space import parse_space

        parse_space(v)  # a SpaceError (a ValueError) names the key
        for key in v:
            problem = cls.untunable(key)
            if problem:
                raise ValueError(f"{key}: {problem}")
        return v

    def samples(self) -> int:
        return self.num_samples or (1 if self.search == "grid" else 4)

    TUNABLE_STAGES: ClassVar[frozenset] = frozenset({"curate", "train"})

    @staticmethod
    def key_field(key: str) -> tuple[Any, str] | str:
        """(owning section class, field name) of a dotted config key, or why there is none."""
        parts = key.split(".")
        model: Any = Config
        for i, part in enumerate(parts):
            fields = getattr(model, "model_fields", None)
            if fields is None or part not in fields:
                where = ".".join(parts[:i]) or "the config"
                known = "; known: " + ", ".join(fields) if fields else ""
                return f"unknown config key (no {part!r} in {where}{known})"
            ann = fields[part].annotation
            inner = [a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)]
            if i == len(parts) - 1:
                return "names a section; search one of its keys" if inner else (model, part)
            if not inner:
                return f"{'.'.join(parts[:i + 1])} is a value, not a section"
            model = inner[0]
        return "empty key"

    @classmethod
    def stages_of(cls, key: str) -> set[str]:
        """The stages whose result the dotted `key` changes (empty for an unknown key)."""
        found = cls.key_field(key)
        if isinstance(found, str):
            return set()
        return set(field_stages(found[0], found[1], SECTION_STAGE.get(key.split(".")[0])))

    @classmethod
    def untunable(cls, key: str) -> Optional[str]:
        """Why `key` cannot be searched (None: it can): unknown, a section, or a field that changes no
        trial's result or a stage a trial must not redo (data and teach: no teacher request; eval: test)."""
        found = cls.key_field(key)
        if isinstance(found, str):
            return found
        stages = cls.stages_of(key)
        if not stages:
            return ("changes no trial's result (a runtime or orchestration setting): set it in the config, "
                    "not in tune.space")
        if stages - cls.TUNABLE_STAGES:
            return (f"changes the {'/'.join(sorted(stages - cls.TUNABLE_STAGES))} stage; trials only re-run curate and "
                    "train (the teacher is asked once, before the search, and test is for the chosen student)")
        return None


class ServedStudentFormat(_Section):
    """`serve.students.<id>` as a mapping: a folder, and how its student was trained when the folder
    has no student card (a plain Hugging Face model). With a card, any field given must agree with it."""

    path: str = runtime()
    family: Optional[Literal["decoder", "encoder-decoder"]] = runtime(None)  # prompt `{q} ###` | `{q}`
    method: Optional[Literal["ft_cot", "vanilla"]] = runtime(None)  # answer after `-->` | first candidate
    dataset: Optional[str] = runtime(None)  # whose answer rules read the answer (e.g. multiarith)
    answer_format: Optional[Literal["number_float", "number_exact", "choice", "yesno", "letters"]] = runtime(None)
    choices: Optional[str] = runtime(None)  # letters of a `choice` task (default ABCDE)
    max_length: Optional[int] = runtime(None, ge=1)  # longest input it was trained on; default: its positions


SERVE_MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


def _at_least(section: str, other: str, why: str = ""):
    """A field validator: the field must be >= the (earlier declared) field `other` of the same section."""
    def check(cls, v, info):
        low = info.data.get(other)
        if low is not None and v < low:
            raise ValueError(f"must be >= {section}.{other}={low}{why}")
        return v
    return classmethod(check)


class ServeConfig(_Section):
    """`ftcot serve`: Ray Serve hosting students behind an OpenAI-compatible API. Nothing here changes
    a stage's result (every field is runtime)."""

    host: str = runtime("127.0.0.1")  # 0.0.0.0 to listen beyond this machine
    port: int = runtime(8000, ge=1, le=65535)
    # {model id: folder}; a folder may be `registry:<dataset>` (<run_dir>/best/<dataset>, written by
    # tune) or a mapping with the format of a card-less folder. Empty: the run's trained students.
    students: dict[str, str | ServedStudentFormat] = runtime(default_factory=dict)
    app_name: str = runtime("ftcot")
    route_prefix: str = runtime("/")
    api_key_env: Optional[str] = runtime(None)  # the NAME of the variable holding the bearer key; None: no auth
    # Requests: the default and the ceilings a request may ask for.
    max_tokens: int = runtime(256, ge=1)  # when a request does not say (capped by the student's context)
    max_n: int = runtime(16, ge=1)  # choices per request (self-consistency)
    max_body_bytes: int = runtime(1_000_000, ge=1024)
    # Dynamic batching (serve/batcher.py): rows (choices) per forward pass, and how long an idle replica waits
    # for a burst to fill its next batch.
    max_batch_size: int = runtime(32, ge=1)
    batch_wait_timeout_s: float = runtime(0.01, ge=0)
    # Student replicas: resources, concurrency, queue (beyond it: 503 + Retry-After), autoscaling.
    cpus_per_replica: float = runtime(1.0, ge=0)
    gpus_per_replica: float = runtime(0.0, ge=0)
    torch_threads: Optional[int] = runtime(None, ge=1)  # per replica; default: cpus_per_replica (at least 1)
    max_ongoing_requests: int = runtime(64, ge=1, validate_default=True)
    max_queued_requests: int = runtime(256, ge=-1)  # -1: unbounded (then overload waits instead of 503)
    retry_after_s: int = runtime(1, ge=1)
    min_replicas: int = runtime(1, ge=0)
    max_replicas: int = runtime(1, ge=1, validate_default=True)  # > min_replicas turns autoscaling on
    target_ongoing_requests: float = runtime(16.0, gt=0)
    upscale_delay_s: float = runtime(10.0, ge=0)
    downscale_delay_s: float = runtime(60.0, ge=0)
    look_back_period_s: float = runtime(30.0, gt=0)
    # How often replicas and handles report load to the autoscaler; None: Serve's default (10 s).
    metrics_interval_s: Optional[float] = runtime(None, gt=0)
    # The HTTP ingress (parsing, auth, tokenizing, SSE): light, so few CPUs and many requests at once.
    ingress_cpus: float = runtime(0.25, ge=0)
    ingress_replicas: int = runtime(1, ge=1)
    ingress_max_ongoing_requests: int = runtime(2048, ge=1)

    @field_validator("students")
    @classmethod
    def _model_ids(cls, v: dict) -> dict:
        for key, value in v.items():
            if not SERVE_MODEL_ID_RE.match(str(key)):
                raise ValueError(f"model id {key!r}: use letters, digits and . _ : / - (at most 128, starting "
                                 "with a letter or digit)")
            if isinstance(value, str) and not value.strip():
                raise ValueError(f"serve.students.{key}: empty folder")
            if isinstance(value, str) and value.startswith("registry:") and not value[len("registry:"):].strip():
                raise ValueError(f"serve.students.{key}: `registry:` needs a dataset name (registry:multiarith)")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _serve_key_env(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else _check_env_name(v, "serve.api_key_env")

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with / (e.g. / or /students)")
        return v

    _replicas = field_validator("max_replicas")(_at_least("serve", "min_replicas"))
    _room_for_a_batch = field_validator("max_ongoing_requests")(
        _at_least("serve", "max_batch_size", ", or a replica never fills a batch"))


class ReportConfig(_Section):
    mlflow_uri: Optional[str] = None  # e.g. file:./mlruns; off when unset
    mlflow_experiment: str = "ftcot-ray"


class PipelineConfig(_Section):
    """What `ftcot run` trains and compares."""

    diversity: list[int] = Field(default_factory=lambda: [1])  # D values (Fine-tune-CoT, step-by-step)
    # The methods compared on the same curated data: ft_cot and step_by_step at each D, vanilla once.
    methods: list[Literal["ft_cot", "step_by_step", "vanilla"]] = Field(default_factory=lambda: ["ft_cot", "vanilla"])
    teacher_row: bool = True

    @field_validator("diversity")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(d < 1 for d in v):
            raise ValueError(f"every D must be >= 1, got {v}")
        return v


class ResourcesConfig(_Section):
    address: Optional[str] = None  # Ray address; None: connect to RAY_ADDRESS or start a local Ray
    num_cpus: Optional[int] = Field(None, ge=1)  # for a local Ray started here


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

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "Config":
        problems = cross_field_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def cross_field_problems(c: Config) -> list[str]:
    """Combinations each field allows alone but that cannot run together, each naming its keys."""
    out = []
    t, e = c.train, c.eval
    if e.samples > 1 and e.temperature <= 0:
        out.append(f"eval.samples={e.samples} (self-consistency) needs eval.temperature > 0 (e.g. 0.7)")
    if e.baseline and not (e.baseline_model or e.endpoint):
        out.append(f"eval.baseline={e.baseline} needs eval.baseline_model (an HF folder) or eval.endpoint")
    if e.baseline and e.baseline_model and e.endpoint:
        out.append("set only one of eval.baseline_model and eval.endpoint")
    if not e.baseline and (e.baseline_model or e.endpoint):
        out.append("eval.baseline_model / eval.endpoint are only used with eval.baseline (zero_shot, ...)")
    if t.offload and t.zero_stage == 0:
        out.append("train.offload=true needs train.zero_stage >= 1 (ZeRO-Offload moves partitioned optimizer state)")
    if t.precision == "fp16" and not t.use_gpu:
        out.append("train.precision=fp16 needs train.use_gpu=true (use bf16 or fp32 on CPU)")
    if t.select != "last" and c.curate.val_fraction <= 0:
        out.append(f"train.select={t.select} needs a validation split: curate.val_fraction > 0 (or train.select=last)")
    per_step = t.num_workers * t.micro_batch()
    if t.batch_size % per_step:
        out.append(f"train.batch_size={t.batch_size} (global) must be a multiple of train.num_workers={t.num_workers} "
                   f"x train.micro_batch_size={t.micro_batch()}")
    too_big = [d for d in c.pipeline.diversity if d > c.teacher.samples]
    if too_big:
        out.append(f"pipeline.diversity {too_big} exceeds teacher.samples={c.teacher.samples} (D_max): "
                   "raise teacher.samples or drop those D values")
    if c.curate.diversity > c.teacher.samples:
        out.append(f"curate.diversity={c.curate.diversity} exceeds teacher.samples={c.teacher.samples} (D_max)")
    if not c.pipeline.methods or (not c.pipeline.diversity and set(c.pipeline.methods) != {"vanilla"}):
        out.append("pipeline.methods / pipeline.diversity leave nothing to train (methods need a D, except vanilla)")
    tc = c.teacher
    if tc.budget_usd is not None and tc.model not in tc.prices:
        out.append(f"teacher.budget_usd is set but teacher.prices has no entry for model {tc.model!r}: "
                   f"add teacher.prices.{tc.model}.input / .output (USD per 1M tokens)")
    if tc.sim.mode == "replay" and tc.base_url is None and not tc.sim.replay_path:
        out.append("teacher.sim.mode=replay needs teacher.sim.replay_path (a completions table or D_*.json)")
    return out


# --------------------------------------------------------------------------- field declarations


def field_stages(model: type[BaseModel], name: str, owner: Optional[str]) -> list[str]:
    """The stages whose result the field `name` of `model` (in a section owned by `owner`) changes."""
    extra = model.model_fields[name].json_schema_extra or {}
    if extra.get("runtime") or owner is None:
        return []
    return [owner, *extra.get("affects", [])]


def result_material(section: BaseModel, owner: Optional[str], stage: str) -> dict:
    """The values of a section's fields that change `stage`'s result (nested sections recursed)."""
    out = {}
    for name in type(section).model_fields:
        if stage not in field_stages(type(section), name, owner):
            continue
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            out[name] = result_material(value, owner, stage)
        else:
            out[name] = value.model_dump(mode="json") if hasattr(value, "model_dump") else copy.deepcopy(value)
    return out


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
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _resolve_source(source: str) -> Path:
    path = Path(source)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    preset = Path(str(resources.files("ftcot_ray") / "configs")) / f"{source}.yaml"
    if not preset.exists():
        raise ConfigError(f"config {source!r} is neither a YAML file nor a preset; presets: {', '.join(preset_names())}")
    return preset


def _source_dict(source: str | None, chain: tuple[Path, ...] = ()) -> dict:
    """A preset name or a YAML path -> raw dict (with `base:` presets merged underneath)."""
    path = _resolve_source(source or "quickstart").resolve()
    if path in chain:
        names = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"{chain[-1]}: `base:` makes a cycle ({names})")
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: `base:` must be a preset name or a YAML path, got {base!r}")
    if base:
        raw = _deep_merge(_source_dict(base, (*chain, path)), raw)
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
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {'.'.join(parts)}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key")
        elif not loc:  # a cross-field rule: its message names the keys
            lines.extend(f"  {m}" for m in msg.split("; "))
        elif loc.endswith("api_key_env"):  # never echo: the value may be a pasted key
            lines.append(f"  {msg}")
        else:
            lines.append(f"  {loc}: {msg} (got {e.get('input')!r})")
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
