"""The search-space grammar: `tune.space` maps the config's own dotted keys to a distribution.

    tune:
      space:
        train.lr: loguniform(1e-4, 3e-3)       # log-uniform float in [lo, hi)
        train.warmup_ratio: uniform(0.0, 0.1)  # uniform float in [lo, hi)
        train.max_steps: randint(200, 600)     # integer in [lo, hi], BOTH ends included
        curate.diversity: choice([1, 2, 4])    # one of the values, sampled
        student.size: grid([tiny, small])      # every value, crossed with the other grids

A small parser, never `eval`: the call's name picks the distribution and its arguments are read as a
YAML flow sequence (so `[tiny, small]` are strings, `[1, 2]` integers), numbers also in the `1e-4`
form YAML 1.1 leaves as text. Pure: no Ray, no config import (config.py validates with it), so a
mistake is reported with its key when the config loads, before any trial.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import yaml

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
CALL_RE = re.compile(r"^\s*([A-Za-z_]+)\s*\((.*)\)\s*$", re.S)
NUMBER_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
USAGE = "choice([a, b, ...]), grid([a, b, ...]), uniform(lo, hi), loguniform(lo, hi) or randint(lo, hi)"


class SpaceError(ValueError):
    """A malformed `tune.space` entry; the message names its key."""


@dataclass(frozen=True)
class Dist:
    """One parsed distribution: `values` for choice/grid, `lo`/`hi` for the others."""

    kind: str
    values: tuple = ()
    lo: float = 0.0
    hi: float = 0.0

    @property
    def discrete(self) -> bool:
        return self.kind in ("choice", "grid", "randint")

    def support(self, limit: int = 1000) -> list | None:
        """Every value it can take (None for a continuous one, or past `limit` integers)."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        if self.kind == "randint" and self.hi - self.lo < limit:
            return list(range(int(self.lo), int(self.hi) + 1))
        return None

    def probes(self) -> list:
        """Values that stand for the whole distribution when checking a config: all of a discrete
        one, the two ends of a continuous one."""
        return self.support() or [self.lo, self.hi]

    def text(self) -> str:
        if self.kind in ("choice", "grid"):
            return f"{self.kind}([{', '.join(map(str, self.values))}])"
        return f"{self.kind}({self.lo:g}, {self.hi:g})"


def number(x: Any) -> Any:
    """`1e-4` (text to PyYAML) -> 0.0001, `3` -> 3; anything else unchanged."""
    if isinstance(x, str) and NUMBER_RE.match(x.strip()):
        s = x.strip()
        return float(s) if any(c in s for c in ".eE") else int(s)
    return x


def parse(key: str, value: Any) -> Dist:
    """One `tune.space` entry -> Dist, or a SpaceError that names `key` and says what is accepted."""
    if not isinstance(value, str):
        raise SpaceError(f"{key}: {value!r} is not a distribution; write {USAGE} "
                         f"(a fixed value belongs in the config itself, not in tune.space)")
    m = CALL_RE.match(value)
    if not m:
        raise SpaceError(f"{key}: cannot read {value!r}; write {USAGE}")
    kind, inner = m.group(1), m.group(2)
    if kind not in KINDS:
        raise SpaceError(f"{key}: unknown distribution {kind!r} in {value!r}; known: {', '.join(KINDS)}")
    try:
        args = yaml.safe_load(f"[{inner}]")
    except yaml.YAMLError:
        raise SpaceError(f"{key}: cannot read the arguments of {value!r}; write {USAGE}") from None
    if kind in ("choice", "grid"):
        values = args[0] if len(args) == 1 and isinstance(args[0], list) else args
        values = [number(v) for v in values]
        if not values:
            raise SpaceError(f"{key}: {kind}() needs at least one value, got {value!r}")
        if any(isinstance(v, (list, dict)) for v in values):
            raise SpaceError(f"{key}: {kind}() takes plain values (numbers, words), got {value!r}")
        return Dist(kind, values=tuple(values))
    nums = [number(a) for a in args]
    if len(nums) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in nums):
        raise SpaceError(f"{key}: {kind}() takes two numbers (lo, hi), got {value!r}")
    lo, hi = nums
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise SpaceError(f"{key}: {kind}() bounds must be finite, got {value!r}")
    if kind == "randint":
        if not (isinstance(lo, int) and isinstance(hi, int)):
            raise SpaceError(f"{key}: randint() takes two integers, got {value!r}")
        if lo > hi:
            raise SpaceError(f"{key}: randint({lo}, {hi}) is empty: lo must be <= hi (both included)")
        return Dist(kind, lo=lo, hi=hi)
    if lo >= hi:
        raise SpaceError(f"{key}: {kind}({lo}, {hi}) needs lo < hi")
    if kind == "loguniform" and lo <= 0:
        raise SpaceError(f"{key}: loguniform({lo}, {hi}) needs lo > 0")
    return Dist(kind, lo=float(lo), hi=float(hi))


def parse_space(space: dict[str, Any]) -> dict[str, Dist]:
    """Every entry parsed; the first malformed one raises, naming its key."""
    return {key: parse(key, value) for key, value in space.items()}


def check_search(space: dict[str, Dist], search: str) -> None:
    """What each search algorithm can draw from (a SpaceError naming the key otherwise)."""
    for key, d in space.items():
        if search == "grid" and not d.discrete:
            raise SpaceError(f"{key}: tune.search=grid crosses discrete values only; {d.text()} is continuous "
                             "(use choice([...]) or grid([...]), or tune.search=random|optuna)")
        if search == "optuna" and d.kind == "grid":
            raise SpaceError(f"{key}: tune.search=optuna samples, it does not cross grids; write "
                             f"choice([{', '.join(map(str, d.values))}]) (or use tune.search=grid)")


def grid_size(space: dict[str, Dist], search: str) -> int:
    """Configurations one pass of the grid holds (1 when nothing is crossed)."""
    n = 1
    for d in space.values():
        if d.kind == "grid" or (search == "grid" and d.discrete):
            n *= len(d.support(limit=10**9) or [])
    return n
