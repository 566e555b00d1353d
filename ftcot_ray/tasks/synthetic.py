"""Synthetic tasks for the offline quickstart: generated questions and a simulated zero-shot-CoT teacher.

``coin_flip_synth`` (yes/no) and ``last_letters_synth`` (letters) follow Kojima et al.'s symbolic
tasks, with the number of people / words set by ``data.difficulty``. Questions are generated from
``data.seed`` alone, so every machine builds the same data set.

Where we differ from the paper's coin flip: the classic wording "X does not flip the coin." is
longer than "X flips the coin.", so the prompt's length gives the answer away and a vanilla student
scores 100 % by counting tokens (ftcot_ray/ARCHITECTURE.md, facts). Here the two sentence kinds are
"X flips the coin." / "X holds the coin." (same number of words, five-letter verbs, single BPE
tokens), so every prompt of one difficulty has the same token length.

The simulated teacher (``teacher_sim``) writes the step-by-step rationale a zero-shot-CoT LLM would:
one sentence per person/word that tracks the state, each drawn from several phrasings (so samples at
temperature > 0 differ: "diverse reasoning" is meaningful), and with probability ``error_rate`` one
wrong step that carries through to a wrong final answer. Its last sentence states the answer, which
``teacher_answer`` reads back as the step-2 answer ("Therefore, the answer is" -> " yes.").
The simulator also understands the classic wordings, so it can stand in for the teacher on the real
coin flip / last letters benchmarks.
"""

from __future__ import annotations

import math
import random
import re
from typing import Callable

from ..errors import ConfigError
from .registry import register
from .base import Task

# Short common names; a byte-level BPE of ~1,000 tokens trained on the task text keeps each one a
# single token (tests/test_synthetic.py checks it), which the student needs to copy names reliably.
COIN_NAMES = (
    "Ann", "Bob", "Tom", "Sam", "Max", "Eva", "Ben", "Amy", "Dan", "Joe", "Kim", "Leo",
    "Mia", "Ned", "Zoe", "Tim", "Ray", "Liz", "Jay", "Ted", "Kay", "Ivy", "Roy", "Meg",
)
# Words for last-letter concatenation: common first names with varied last letters.
LETTER_WORDS = (
    "Whitney", "Erika", "Benito", "Lucky", "Mireya", "Caleb", "Chase", "Eleazar", "Chanel", "Oscar",
    "Maria", "David", "Elena", "Jorge", "Hugo", "Ivan", "Sofia", "Lucas", "Nadia", "Pablo",
    "Grace", "Henry", "Irene", "Jacob", "Karen", "Laura", "Marco", "Nancy", "Oliver", "Peter",
    "Rachel", "Simon", "Tanya", "Victor", "Wendy", "Yusuf", "Zelda", "Aaron", "Bianca", "Carlos",
    "Derek", "Fatima", "Gavin", "Helen", "Isaac", "Julia", "Kevin", "Megan", "Naomi", "Ronald",
)

HEADS, TAILS = "heads up", "tails up"
COIN_QUESTION_HEAD = "A coin is heads up."
COIN_QUESTION_TAIL = 'Is the coin still heads up? Note that "flip" here means "reverse".'
FLIP, HOLD = "flips", "holds"
LETTERS_QUESTION = 'Take the last letters of each words in "{words}" and concatenate them.'

# One step of the teacher's coin rationale, per action; `{s}` is the state after the step.
# Every phrasing of a step has the same token length, with the name, the action and the state at the
# same offsets: the k-th step of the rationale then lines up with the k-th sentence of the question
# (also of fixed length), which is what lets a ~1M-parameter student learn to read the right
# sentence and copy the right name. The free word ("so" / "and" / "now") keeps samples at
# temperature > 0 distinct. (An earlier version with free-form phrasings of different lengths
# trained to 94 % at D=1 but to chance at D=4 with the same steps: the student could not align them.)
COIN_STEPS = {
    FLIP: (
        "{name} flips it, so it is {s}.",
        "{name} flips it, and it is {s}.",
        "{name} flips it, now it is {s}.",
    ),
    HOLD: (
        "{name} holds it, so it is {s}.",
        "{name} holds it, and it is {s}.",
        "{name} holds it, now it is {s}.",
    ),
}
COIN_OPENINGS = ("The coin starts heads up.", "The coin begins heads up.")
COIN_FINALS = (
    "So the coin is {s}, so the answer is {yn}.",
    "Now the coin is {s}, so the answer is {yn}.",
    "Thus the coin is {s}, so the answer is {yn}.",
)
LETTER_STEPS = (
    'The last letter of "{w}" is "{c}".',
    '"{w}" ends with "{c}".',
    'The word "{w}" ends in "{c}".',
)
LETTER_FINALS = (
    'So the final answer is "{ans}".',
    'Putting them together gives "{ans}".',
    'Together, the answer is "{ans}".',
)

# The synthetic wording and Kojima et al.'s classic one ("does not flip").
_COIN_Q_RE = re.compile(
    r"A coin is heads up\.((?:\s+[^.?]+? (?:flips|holds|does not flip) the coin\.)+)\s+Is the coin still heads up\?.*",
    re.S,
)
_COIN_STEP_RE = re.compile(r"\s*([^.?]+?) (flips|holds|does not flip) the coin\.")
_LETTERS_Q_RE = re.compile(r'Take the last letters? of (?:each|the) words? in "([^"]+)" and concatenate them\.?', re.S)
_FINAL_YESNO_RE = re.compile(r"answer is (yes|no)\b")
_STATE_RE = re.compile(r"(heads|tails) up")
_QUOTED_RE = re.compile(r'"([^"]*)"')


# --------------------------------------------------------------------------- generation


def _draw_coin(rng: random.Random, difficulty: int) -> tuple[str, str]:
    names = rng.sample(COIN_NAMES, difficulty)
    actions = [rng.choice((FLIP, HOLD)) for _ in names]
    steps = " ".join(f"{n} {a} the coin." for n, a in zip(names, actions))
    answer = "yes" if actions.count(FLIP) % 2 == 0 else "no"
    return f"{COIN_QUESTION_HEAD} {steps} {COIN_QUESTION_TAIL}", answer


def _draw_letters(rng: random.Random, difficulty: int) -> tuple[str, str]:
    words = rng.sample(LETTER_WORDS, difficulty)
    return LETTERS_QUESTION.format(words=" ".join(words)), "".join(w[-1] for w in words)


def _generate(name: str, pool: tuple[str, ...], per_slot: int, draw: Callable, data_cfg) -> list[dict]:
    """train_size + test_size distinct questions from data.seed; list position = sample_index."""
    d, n = int(data_cfg.difficulty), int(data_cfg.train_size) + int(data_cfg.test_size)
    if not 1 <= d <= len(pool):
        raise ConfigError(f"{name}: data.difficulty={d} must be between 1 and {len(pool)}")
    # Distinct questions there are at this difficulty (ordered distinct names x per-slot choices).
    capacity = math.perm(len(pool), d) * per_slot**d
    if n > capacity // 2:  # rejection sampling stays fast below half the space
        raise ConfigError(
            f"{name}: data.train_size + data.test_size = {n} questions asked, but difficulty {d} has only "
            f"{capacity} distinct questions; lower the sizes or raise data.difficulty"
        )
    # A string seed hashes stably across processes (unlike hash()), so the data set is reproducible.
    rng = random.Random(f"{name}/{data_cfg.seed}")
    seen: set[str] = set()
    records: list[dict] = []
    while len(records) < n:
        question, answer = draw(rng, d)
        if question in seen:  # no duplicates at all, hence none between train and test
            continue
        seen.add(question)
        records.append({"sample_index": len(records), "question": question, "answer": answer})
    return records


def load_coin_flip(source, data_cfg) -> list[dict]:
    """`source` is ignored: synthetic tasks are generated, not read."""
    return _generate("coin_flip_synth", COIN_NAMES, 2, _draw_coin, data_cfg)


def load_last_letters(source, data_cfg) -> list[dict]:
    return _generate("last_letters_synth", LETTER_WORDS, 1, _draw_letters, data_cfg)


def split_first_n(records: list[dict], data_cfg) -> dict[str, list[int]]:
    """The first data.train_size records are train, the rest test (questions are i.i.d. draws)."""
    n_train = int(data_cfg.train_size)
    indices = sorted(int(r["sample_index"]) for r in records)
    return {"train": indices[:n_train], "test": indices[n_train:]}


# --------------------------------------------------------------------------- simulated teacher


def parse_coin_question(question: str) -> list[tuple[str, bool]]:
    """[(name, flips?)] of a coin question (synthetic or classic wording); ValueError otherwise."""
    m = _COIN_Q_RE.fullmatch(question.strip())
    if not m:
        raise ValueError(f"not a coin flip question: {question[:80]!r}")
    return [(name.strip(), verb == FLIP) for name, verb in _COIN_STEP_RE.findall(m.group(1))]


def parse_letters_question(question: str) -> list[str]:
    m = _LETTERS_Q_RE.fullmatch(question.strip())
    if not m or not m.group(1).split():
        raise ValueError(f"not a last-letter concatenation question: {question[:80]!r}")
    return m.group(1).split()


def coin_teacher_sim(question: str, rng: random.Random, error_rate: float) -> tuple[str, str]:
    """A step-by-step rationale tracking the coin person by person, and its final answer."""
    people = parse_coin_question(question)
    wrong_step = rng.randrange(len(people)) if rng.random() < error_rate else -1
    heads = True
    sentences = [rng.choice(COIN_OPENINGS)]
    for i, (name, flips) in enumerate(people):
        said_flip = flips
        if i == wrong_step:
            # One mistake, as an LLM makes it: either the action is misread (a flip taken for a hold or
            # the reverse) or the right action is misapplied (the state written down does not change
            # on a flip / changes on a hold). Either way the parity, hence the answer, is wrong.
            misread = rng.random() < 0.5
            said_flip = not flips if misread else flips
            heads = heads if flips else not heads
        else:
            heads = not heads if flips else heads
        template = rng.choice(COIN_STEPS[FLIP if said_flip else HOLD])
        sentences.append(template.format(name=name, s=HEADS if heads else TAILS))
    answer = "yes" if heads else "no"
    sentences.append(rng.choice(COIN_FINALS).format(s=HEADS if heads else TAILS, yn=answer))
    return " ".join(sentences), answer


def letters_teacher_sim(question: str, rng: random.Random, error_rate: float) -> tuple[str, str]:
    """One sentence per word naming its last letter, then the concatenation."""
    words = parse_letters_question(question)
    wrong_step = rng.randrange(len(words)) if rng.random() < error_rate else -1
    letters = []
    for i, word in enumerate(words):
        letter = word[-1]
        if i == wrong_step:
            # A slip: the letter before the last, or any other letter when that happens to be equal.
            letter = word[-2].lower() if len(word) > 1 else letter
            if letter == word[-1]:
                letter = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != word[-1]])
        letters.append(letter)
    steps = [rng.choice(LETTER_STEPS).format(w=w, c=c) for w, c in zip(words, letters)]
    answer = "".join(letters)
    return " ".join(steps + [rng.choice(LETTER_FINALS).format(ans=answer)]), answer


def _last_sentence(rationale: str) -> str:
    parts = [p for p in re.split(r"(?<=[.!?])\s+", rationale.strip()) if p]
    return parts[-1] if parts else ""


def coin_teacher_answer(question: str, rationale: str) -> str:
    """Step 2 (after "Therefore, the answer is"): read the final sentence; fall back to the last state said.

    ValueError for a question of another task (the teacher server tries each synthetic task in turn).
    """
    parse_coin_question(question)
    final = _last_sentence(rationale)
    m = _FINAL_YESNO_RE.search(final)
    if m:
        return f" {m.group(1)}."
    states = _STATE_RE.findall(rationale)  # e.g. a rationale cut at max_tokens: answer from where it got to
    if states:
        return " yes." if states[-1] == "heads" else " no."
    return " unknown."


def letters_teacher_answer(question: str, rationale: str) -> str:
    """Step 2: the quoted concatenation of the final sentence, else the letters stated so far.

    ValueError for a question of another task.
    """
    parse_letters_question(question)
    final = _last_sentence(rationale)
    quoted = _QUOTED_RE.findall(final)
    if "answer" in final or "together" in final.lower():
        if quoted:
            return f" {quoted[-1]}."
    # A cut rationale: each step quotes (word, letter); the letters are every second quote.
    letters = [q for q in _QUOTED_RE.findall(rationale)[1::2] if len(q) == 1]
    return f" {''.join(letters)}." if letters else " unknown."


# --------------------------------------------------------------------------- registry

COIN_FLIP_SYNTH = register(Task(
    "coin_flip_synth", "yesno", synthetic=True, load=load_coin_flip, split=split_first_n,
    teacher_sim=coin_teacher_sim, teacher_answer=coin_teacher_answer,
    note="synthetic coin flip; data.difficulty = people; flips/holds sentences of equal token length"))
LAST_LETTERS_SYNTH = register(Task(
    "last_letters_synth", "letters", synthetic=True, load=load_last_letters, split=split_first_n,
    teacher_sim=letters_teacher_sim, teacher_answer=letters_teacher_answer,
    note="synthetic last-letter concatenation; data.difficulty = words"))
SYNTHETIC_TASKS = (COIN_FLIP_SYNTH, LAST_LETTERS_SYNTH)


def synthetic_text_corpus(task_name: str, data_cfg, error_rate: float = 0.0, seed: int = 0) -> list[str]:
    """Every question of the data set and one simulated rationale each: text to train a tokenizer on."""
    task = {t.name: t for t in SYNTHETIC_TASKS}.get(task_name)
    if task is None:
        raise KeyError(f"{task_name!r} is not a synthetic task; synthetic: {', '.join(t.name for t in SYNTHETIC_TASKS)}")
    rng = random.Random(seed)
    texts = []
    for rec in task.load(None, data_cfg):
        rationale, _ = task.teacher_sim(rec["question"], rng, error_rate)
        texts += [rec["question"], rationale]
    return texts
