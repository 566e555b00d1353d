"""Stage keys follow the config's own declarations, field by field.

A property test walks EVERY field of every section: changed to another valid value, a field declared
to change a stage's result changes that stage's key (and the keys downstream of it), and a field
declared `runtime` changes no key at all. Plus: what a path points at (a data file's content, an
input folder given with --in) is part of the key, not only the path.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from ftcot_ray.artifacts import STAGES, finish, stage_dir, stage_key
from ftcot_ray.config import SECTION_STAGE, Config, field_stages, load_config, with_overrides
from ftcot_ray.io import write_jsonl

DOWNSTREAM = {"data": ["data", "teach", "curate", "train", "eval"], "teach": ["teach", "curate", "train", "eval"],
              "curate": ["curate", "train", "eval"], "train": ["train", "eval"], "eval": ["eval"]}

# Values that are valid where the generic rule below would not be (cross-field rules, known names).
SPECIAL = {
    "data.dataset": "last_letters_synth",
    "train.batch_size": 64,
    "train.num_workers": 4,  # the global batch (32) must stay a multiple of workers x micro-batch
    "train.micro_batch_size": 4,
    "train.zero_stage": 3,
    "curate.val_fraction": 0.2,
    "eval.endpoint": {"base_url": "http://127.0.0.1:1/v1", "model": "m"},
    "student.size": "small",
    "teacher.model": "other-model",
}
# Fields that can only change together with another field of the same kind (result/runtime, same stage).
CO_SET = {
    "eval.baseline": {"eval.baseline_model": "/models/base"},
    "eval.baseline_model": {"eval.baseline": "zero_shot"},
    "eval.endpoint": {"eval.baseline": "zero_shot"},
    "train.precision": {"train.use_gpu": True},  # fp16 needs a GPU (use_gpu is runtime)
    "serve.min_replicas": {"serve.max_replicas": 16},  # runtime; keeps min <= max
    "teacher.model": {"teacher.prices": {"other-model": {"input": 1.0, "output": 1.0}}},  # runtime
}


def base_config(tmp_path: Path) -> Config:
    """The quickstart, set so that almost every field can move alone (temperature > 0, prices known...)."""
    replay = tmp_path / "replay.jsonl"
    replay.write_text("")
    return load_config("quickstart", {
        "run_dir": str(tmp_path / "run"), "eval.temperature": 0.7, "teacher.sim.replay_path": str(replay),
        "teacher.prices": {"ftcot-sim-teacher": {"input": 1.0, "output": 2.0}},
    })


def leaf_fields(model: BaseModel, prefix: str = ""):
    """(dotted path, owning model class, field name, value) for every field, nested sections included."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        path = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from leaf_fields(value, path + ".")
        else:
            yield path, type(model), name, info, value


def other_value(path: str, info, value, tmp_path: Path):
    if path in SPECIAL:
        return SPECIAL[path]
    if path == "data.source":
        f = tmp_path / "my_task.jsonl"
        write_jsonl(f, [{"question": "q?", "answer": "1"}])
        return str(f)
    ann = info.annotation
    args = typing.get_args(ann)
    optional = typing.get_origin(ann) in (typing.Union, getattr(__import__("types"), "UnionType", None))
    literal = next((a for a in (ann, *(args if optional else ())) if typing.get_origin(a) is typing.Literal), None)
    if literal is not None:
        return next(x for x in typing.get_args(literal) if x != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 if value > 0 else 0.1
    if isinstance(value, str):
        return value + "X"
    if isinstance(value, list):
        return value[:-1] if len(value) > 1 else ["train"] if path == "teacher.splits" else ["x"]
    if isinstance(value, dict):
        return {} if value else {"train.lr": "choice([0.001])"}
    if value is None:  # Optional fields
        inner = [a for a in args if a is not type(None)][0] if args else str
        if inner is int:
            return 3
        if inner is float:
            return 1.0
        if typing.get_origin(inner) is list:
            return ["c_attn"]
        return "/some/path" if "path" in path or path.endswith(("pretrained", "tokenizer", "student", "dir")) else "x"
    raise AssertionError(f"{path}: no rule to change a {type(value).__name__}; add it to SPECIAL")


def keys(cfg: Config) -> dict[str, str]:
    return {s: stage_key(cfg, s) for s in STAGES}


def every_field(tmp_path_factory=None):
    cfg = load_config("quickstart")
    for section in Config.model_fields:
        value = getattr(cfg, section)
        if isinstance(value, BaseModel):
            for path, model, name, info, v in leaf_fields(value, section + "."):
                yield pytest.param(path, model, name, section, id=path)
        else:
            yield pytest.param(section, Config, section, None, id=section)


@pytest.mark.parametrize("path,model,name,section", list(every_field()))
def test_a_field_changes_exactly_the_keys_it_declares(path, model, name, section, tmp_path):
    base = base_config(tmp_path)
    info = model.model_fields[name]
    current = base
    for part in path.split("."):
        current = getattr(current, part)
    new = other_value(path, info, current, tmp_path)
    changed_cfg = with_overrides(base, {path: new, **CO_SET.get(path, {})})
    assert getattr(changed_cfg, section or path) != getattr(base, section or path), f"{path} did not change"
    owner = SECTION_STAGE.get(section) if section else None
    declared = field_stages(model, name, owner)
    expected = sorted({s for stage in declared for s in DOWNSTREAM[stage]})
    before, after = keys(base), keys(changed_cfg)
    moved = sorted(s for s in STAGES if before[s] != after[s])
    assert moved == expected, f"{path}: declared {declared or 'runtime'}, so keys {expected} should move; moved {moved}"


def test_the_declarations_cover_what_issue_9_measured():
    t = load_config("quickstart")
    assert field_stages(type(t.train), "num_workers", "train") == []  # the batch is global
    assert field_stages(type(t.train), "grad_ckpt", "train") == []  # memory only
    assert field_stages(type(t.teacher), "seed_param", "teach") == ["teach"]  # changes the sampled answers
    assert field_stages(type(t.eval), "batch_size", "eval") == []  # sampling is seeded per question
    assert field_stages(type(t.student), "arch", "train") == ["train", "curate"]  # curate formats by family


def test_a_data_file_edited_in_place_is_read_again(tmp_path):
    f = tmp_path / "mine.jsonl"
    write_jsonl(f, [{"question": "1+1?", "answer": "2"}])
    cfg = load_config("quickstart", {"run_dir": str(tmp_path), "data.dataset": "mine", "data.source": str(f),
                                     "data.answer_format": "number_exact"})
    before = stage_key(cfg, "data")
    write_jsonl(f, [{"question": "1+1?", "answer": "3"}])  # same path, new content
    assert stage_key(cfg, "data") != before


def test_an_explicit_input_folder_is_part_of_the_key(tmp_path):
    cfg = load_config("quickstart", {"run_dir": str(tmp_path / "run")})
    folders = []
    for name, answer in (("A", "yes"), ("B", "no")):
        out = tmp_path / name
        write_jsonl(out / "completions.jsonl", [{"answer": answer}])
        finish(out, cfg, "teach")
        folders.append(out)
    a, b = (stage_dir(cfg, "curate", inp) for inp in folders)
    assert a != b  # `curate --in A` and `--in B` never share an output
    assert a == stage_dir(cfg, "curate", folders[0])  # and the same input is the same key
    assert stage_dir(cfg, "curate") not in (a, b)
