"""Synthetic tasks: generation, the equal-length trap, single-token names, the simulated teacher."""

from __future__ import annotations

import random

import pytest
from tokenizers import ByteLevelBPETokenizer

from ftcot_ray.config import DataConfig
from ftcot_ray.tasks import get_task
from ftcot_ray.tasks.synthetic import COIN_NAMES, synthetic_text_corpus

COIN, LETTERS = "coin_flip_synth", "last_letters_synth"
TASKS = (COIN, LETTERS)


def data_cfg(name: str, **kw) -> DataConfig:
    return DataConfig(**({"dataset": name, "train_size": 300, "test_size": 60, "difficulty": 6, "seed": 0} | kw))


def bpe_on_task_text(name: str, difficulties=(4, 6), vocab_size: int = 1000) -> ByteLevelBPETokenizer:
    """A byte-level BPE trained on the task text (questions + rationales), as the student's is."""
    texts = []
    for d in difficulties:
        texts += synthetic_text_corpus(name, data_cfg(name, difficulty=d))
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, show_progress=False)
    return tok


@pytest.fixture(scope="module")
def coin_bpe() -> ByteLevelBPETokenizer:
    return bpe_on_task_text(COIN)


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name", TASKS)
def test_generation_is_deterministic_by_seed(name):
    task = get_task(name)
    a = task.load(None, data_cfg(name))
    assert a == task.load(None, data_cfg(name))
    other = task.load(None, data_cfg(name, seed=1))
    assert [r["question"] for r in a] != [r["question"] for r in other]


@pytest.mark.parametrize("name", TASKS)
def test_sizes_split_and_no_overlap(name):
    task, cfg = get_task(name), data_cfg(name, train_size=250, test_size=50)
    records = task.load(None, cfg)
    assert len(records) == 300
    assert [r["sample_index"] for r in records] == list(range(300))
    split = task.split(records, cfg)
    assert split == {"train": list(range(250)), "test": list(range(250, 300))}
    train_q = {records[i]["question"] for i in split["train"]}
    test_q = {records[i]["question"] for i in split["test"]}
    assert len(train_q) == 250 and len(test_q) == 50 and not train_q & test_q


def test_coin_answers_are_parity_and_roughly_balanced():
    records = get_task(COIN).load(None, data_cfg(COIN, train_size=400, test_size=0))
    for r in records[:50]:
        flips = r["question"].count(" flips the coin.")
        assert r["answer"] == ("yes" if flips % 2 == 0 else "no")
        assert flips + r["question"].count(" holds the coin.") == 6
    share_yes = sum(r["answer"] == "yes" for r in records) / len(records)
    assert 0.4 < share_yes < 0.6  # a vanilla student cannot beat chance by guessing the majority


def test_letters_answer_is_last_letters():
    records = get_task(LETTERS).load(None, data_cfg(LETTERS, difficulty=4, train_size=20, test_size=0))
    for r in records:
        words = r["question"].split('"')[1].split()
        assert len(words) == 4
        assert r["answer"] == "".join(w[-1] for w in words)


def test_too_many_questions_for_the_difficulty_is_a_clear_error():
    # 24 names x 2 actions = 48 distinct one-person questions.
    with pytest.raises(ValueError, match="difficulty 1 has only 48 distinct questions"):
        get_task(COIN).load(None, data_cfg(COIN, difficulty=1, train_size=100, test_size=10))
    with pytest.raises(ValueError, match="data.difficulty=99"):
        get_task(COIN).load(None, data_cfg(COIN, difficulty=99))


# --------------------------------------------------------------------------- the length trap and names


def test_names_are_single_tokens(coin_bpe):
    split_names = [n for n in COIN_NAMES if len(coin_bpe.encode(" " + n).ids) != 1]
    assert not split_names, f"names split by a 1,000-token BPE: {split_names}"


@pytest.mark.parametrize("difficulty", [4, 6])
def test_all_prompts_of_a_difficulty_have_equal_token_length(coin_bpe, difficulty):
    records = get_task(COIN).load(None, data_cfg(COIN, difficulty=difficulty))
    lengths = {len(coin_bpe.encode(r["question"] + " ###").ids) for r in records}
    assert len(lengths) == 1, f"prompt length leaks the answer: lengths {sorted(lengths)}"
    # And the length really is independent of the answer (the classic wording fails this).
    classic = [r["question"].replace(" holds the coin.", " does not flip the coin.") for r in records]
    assert len({len(coin_bpe.encode(q).ids) for q in classic}) > 1


def test_rationales_stay_short_for_a_tiny_student(coin_bpe):
    task = get_task(COIN)
    rng = random.Random(0)
    for r in task.load(None, data_cfg(COIN, difficulty=6))[:100]:
        rationale, _ = task.teacher_sim(r["question"], rng, 0.15)
        assert len(coin_bpe.encode(" " + rationale).ids) < 120  # ~12 tokens a person at 6 people


# --------------------------------------------------------------------------- simulated teacher


@pytest.mark.parametrize("name", TASKS)
def test_teacher_is_right_at_error_rate_0_and_answer_reads_back(name):
    task = get_task(name)
    rng = random.Random(0)
    for r in task.load(None, data_cfg(name, train_size=200, test_size=0)):
        rationale, answer = task.teacher_sim(r["question"], rng, 0.0)
        assert answer == r["answer"]
        step2 = task.teacher_answer(r["question"], rationale)
        assert task.extract_answer(step2) == r["answer"]  # graded the way curate grades it
        assert task.is_correct(task.extract_answer(step2), r["answer"])


@pytest.mark.parametrize("name", TASKS)
def test_teacher_is_wrong_at_error_rate_1_and_consistent(name):
    task = get_task(name)
    rng = random.Random(1)
    records = task.load(None, data_cfg(name, train_size=200, test_size=0))
    wrong = 0
    for r in records:
        rationale, answer = task.teacher_sim(r["question"], rng, 1.0)
        wrong += answer != r["answer"]
        # Step 2 repeats what the (wrong) rationale concluded, like a real teacher.
        assert task.extract_answer(task.teacher_answer(r["question"], rationale)) == answer
    assert wrong / len(records) > 0.9


def test_error_rate_sets_the_share_of_wrong_answers():
    task = get_task(COIN)
    rng = random.Random(2)
    records = task.load(None, data_cfg(COIN, train_size=1000, test_size=0))
    wrong = sum(task.teacher_sim(r["question"], rng, 0.2)[1] != r["answer"] for r in records)
    assert 0.15 < wrong / len(records) < 0.25


@pytest.mark.parametrize("name", TASKS)
def test_wording_varies_across_seeds_and_repeats_with_the_same_seed(name):
    task = get_task(name)
    q = task.load(None, data_cfg(name))[0]["question"]
    texts = {task.teacher_sim(q, random.Random(s), 0.0)[0] for s in range(10)}
    assert len(texts) >= 5  # diverse reasoning: samples differ
    assert task.teacher_sim(q, random.Random(3), 0.0) == task.teacher_sim(q, random.Random(3), 0.0)


def test_coin_rationale_tracks_each_person_and_ends_with_the_answer():
    task = get_task(COIN)
    q = 'A coin is heads up. Ann flips the coin. Bob holds the coin. Is the coin still heads up? Note that "flip" here means "reverse".'
    rationale, answer = task.teacher_sim(q, random.Random(0), 0.0)
    assert answer == "no"
    assert rationale.index("Ann") < rationale.index("Bob")
    last = rationale.rsplit(". ", 1)[-1]
    assert "answer is no" in last and "tails up" in last
    assert task.teacher_answer(q, rationale) == " no."


def test_teacher_understands_the_classic_benchmark_wording():
    q = ('A coin is heads up. Whitney flips the coin. Erika does not flip the coin. Tj does not flip the coin. '
         'Benito flips the coin. Is the coin still heads up? Note that "flip" here means "reverse".')
    assert get_task(COIN).teacher_sim(q, random.Random(0), 0.0)[1] == "yes"
    q2 = 'Take the last letters of each words in "Whitney Erika Tj Benito" and concatenate them.'
    rationale, answer = get_task(LETTERS).teacher_sim(q2, random.Random(0), 0.0)
    assert answer == "yajo" and get_task(LETTERS).teacher_answer(q2, rationale) == " yajo."


COIN_Q = 'A coin is heads up. Ann flips the coin. Bob holds the coin. Is the coin still heads up? Note that "flip" here means "reverse".'
LETTERS_Q = 'Take the last letters of each words in "Whitney Erika Tj" and concatenate them.'


def test_teacher_answer_falls_back_on_a_cut_rationale():
    cut_coin = "The coin starts heads up. Ann flips it, so the coin turns tails up. Bob"
    assert get_task(COIN).teacher_answer(COIN_Q, cut_coin) == " no."
    cut_letters = 'The last letter of "Whitney" is "y". "Erika" ends with "a". "Tj" ends'
    assert get_task(LETTERS).teacher_answer(LETTERS_Q, cut_letters) == " ya."


def test_teacher_answer_rejects_foreign_questions():
    # The teacher server asks each synthetic task in turn and takes the first that does not raise.
    with pytest.raises(ValueError, match="not a coin flip question"):
        get_task(COIN).teacher_answer(LETTERS_Q, 'So the final answer is "yaj".')
    with pytest.raises(ValueError, match="not a last-letter"):
        get_task(LETTERS).teacher_answer(COIN_Q, "So the answer is no, the coin is tails up.")


@pytest.mark.parametrize(
    "name, foreign",
    [
        (COIN, 'Take the last letters of each words in "Ann Bob" and concatenate them.'),
        (COIN, "If there are 3 cars and 2 more arrive, how many cars are there?"),
        (LETTERS, "A coin is heads up. Ann flips the coin. Is the coin still heads up?"),
        (LETTERS, "What is 2 + 2?"),
    ],
)
def test_teacher_sim_rejects_foreign_questions(name, foreign):
    with pytest.raises(ValueError, match="not a"):
        get_task(name).teacher_sim(foreign, random.Random(0), 0.0)


def test_corpus_helper_names_unknown_tasks():
    with pytest.raises(KeyError, match="not a synthetic task"):
        synthetic_text_corpus("gsm8k", data_cfg(COIN))
