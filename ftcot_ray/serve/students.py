"""Which students a server hosts, under which model ids, and how each one is prompted and read.

`serve.students` empty: the run's own students, one per pipeline variant (Fine-tune-CoT at each
D, vanilla) whose train stage is finished, as `<dataset>-ft_cot-d<D>` / `<dataset>-vanilla`; the
unfinished ones are listed as missing. Otherwise `serve.students` maps model ids to folders:
an exported student folder (with its student card), `registry:<dataset>` (the best student the
tune stage registered at `<run_dir>/best/<dataset>`), or a mapping with the format of a plain
Hugging Face folder that has no card: `{path, family, method, dataset}` (and `answer_format` /
`choices` for your own task). A folder without a card and without that format is refused: the
prompt suffix and the answer rule are never guessed from the architecture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import Config, DataConfig, ServedStudentFormat
from ..errors import ConfigError, InputMissing, StageInputMissing
from ..student.card import FORMAT, StudentCard, card_for, read_card

REGISTRY = "registry:"


@dataclass(frozen=True)
class Served:
    id: str
    folder: str  # absolute: replicas may run elsewhere (a cluster's shared storage)
    card: StudentCard
    card_source: str  # "card" (ftcot_student.json) | "serve.students" (the format given in the config)


def resolve(cfg: Config) -> tuple[list[Served], list[dict]]:
    """(students to serve, missing ones as {"id", "folder", "why"})."""
    if cfg.serve.students:
        return [resolve_one(cfg, mid, value) for mid, value in cfg.serve.students.items()], []
    return run_students(cfg)


def run_students(cfg: Config) -> tuple[list[Served], list[dict]]:
    """The run's trained students (pipeline variants), by readable id; unfinished ones as missing."""
    from ..artifacts import stage_dir, verify
    from ..stages.pipeline import variants

    served, missing = [], []
    for _, c in variants(cfg):
        mid = run_model_id(c)
        train_dir = stage_dir(c, "train")
        problem = verify(train_dir)
        if problem:
            missing.append({"id": mid, "folder": str(train_dir / "student"), "why": f"train stage {problem}"})
            continue
        served.append(from_folder(mid, train_dir / "student", None, f"the train stage at {train_dir}"))
    if not served:
        lines = "; ".join(f"{m['id']} ({m['folder']}: {m['why']})" for m in missing)
        raise StageInputMissing(
            f"no trained student to serve in {cfg.run_dir}: {lines}. Train them first (`ftcot run --config "
            f"{cfg.name}` or `ftcot train`), or name folders: serve.students='{{my-model: path/to/student}}'")
    return served, missing


def run_model_id(c: Config) -> str:
    if c.train.method == "vanilla":
        return f"{c.data.dataset}-vanilla"
    return f"{c.data.dataset}-{c.train.method}-d{c.curate.diversity}"


def resolve_one(cfg: Config, mid: str, value: str | ServedStudentFormat) -> Served:
    where = f"serve.students.{mid}"
    fmt = value if isinstance(value, ServedStudentFormat) else None
    path = fmt.path if fmt else value
    if path.startswith(REGISTRY):
        dataset = path[len(REGISTRY):].strip()
        folder = Path(cfg.run_dir) / "best" / dataset
        if not folder.is_dir():
            raise StageInputMissing(f"{where}={path}: no student registered for {dataset!r} at {folder} "
                                    f"(`ftcot tune` registers the best one there)")
        return from_folder(mid, folder, fmt, where)
    return from_folder(mid, Path(path), fmt, where)


def from_folder(mid: str, folder: Path, fmt: Optional[ServedStudentFormat], where: str) -> Served:
    folder = folder.expanduser().resolve()
    if not folder.is_dir():
        raise InputMissing(f"{where}: folder {folder} does not exist")
    config = folder / "config.json"
    if not config.is_file():
        raise InputMissing(f"{where}: {folder} has no config.json (expected a save_pretrained student folder)")
    card = read_card(folder)
    if card is not None:
        if card.format != FORMAT:
            raise ConfigError(f"{where}: {folder}/ftcot_student.json is format {card.format!r}; this version "
                              f"reads {FORMAT!r}")
        if fmt is not None:
            _check_agrees(card, fmt, where)
        _check_family(card.family, folder, where)
        return Served(mid, str(folder), card, "card")
    if fmt is None or not (fmt.family and fmt.method and fmt.dataset):
        raise ConfigError(
            f"{where}: {folder} has no student card (ftcot_student.json), so its prompt format and answer rule "
            f"are unknown; say how it was trained: {where}={{path: {folder}, family: decoder|encoder-decoder, "
            f"method: ft_cot|vanilla, dataset: <task, e.g. multiarith>}}")
    _check_family(fmt.family, folder, where)
    return Served(mid, str(folder), explicit_card(fmt, folder, where), "serve.students")


def explicit_card(fmt: ServedStudentFormat, folder: Path, where: str) -> StudentCard:
    from ..tasks.custom import resolve_task

    data = DataConfig(dataset=fmt.dataset, answer_format=fmt.answer_format, choices=fmt.choices or "ABCDE")
    try:
        rules = resolve_task(data)
    except ConfigError as e:
        raise ConfigError(f"{where}.dataset: {e}") from None
    max_length = fmt.max_length or positions(folder) or 512
    return card_for(fmt.family, fmt.method, fmt.dataset, rules, max_length)


def _check_agrees(card: StudentCard, fmt: ServedStudentFormat, where: str) -> None:
    said = {"family": fmt.family, "method": fmt.method, "dataset": fmt.dataset}
    wrong = [f"{k}={v!r} (the card says {getattr(card, k)!r})" for k, v in said.items()
             if v is not None and v != getattr(card, k)]
    if wrong:
        raise ConfigError(f"{where}: the folder's student card disagrees with the format given: {', '.join(wrong)}; "
                          "drop those keys (the card is what training wrote)")


def _check_family(family: str, folder: Path, where: str) -> None:
    actual = "encoder-decoder" if model_config(folder).get("is_encoder_decoder") else "decoder"
    if family != actual:
        raise ConfigError(f"{where}: {folder} is an {actual} model but its format says family={family!r}")


def model_config(folder: Path | str) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def positions(folder: Path | str) -> Optional[int]:
    """A decoder-only model's position table (prompt + completion cannot exceed it); None: no hard limit."""
    c = model_config(folder)
    if c.get("is_encoder_decoder"):
        return None
    return c.get("n_positions") or c.get("max_position_embeddings")
