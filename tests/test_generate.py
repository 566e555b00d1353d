"""Batched generation (left padding, prompt stripping, EOS) equals one-at-a-time generation."""

from __future__ import annotations

import pytest

from ftcot_ray.prompts import student_prompt
from ftcot_ray.student.generate import generate, generate_one, load_student

from helpers_eval import build_student, coin_questions

MAX_NEW = 24


@pytest.fixture(scope="module", params=["decoder", "encoder-decoder"])
def student(request, tmp_path_factory):
    # A large init scale gives varied garbage; the EOS boost makes some rows stop early.
    folder = build_student(tmp_path_factory.mktemp(request.param) / "student", request.param,
                           eos_boost=2.0, init_scale=20.0)
    return load_student(folder)


def _prompts(student, n=24):
    return [student_prompt(q["question"], student.family) for q in coin_questions(n, seed=1)]


def test_family_and_padding_side(student):
    expected = "encoder-decoder" if student.model.config.is_encoder_decoder else "decoder"
    assert student.family == expected
    assert student.tokenizer.padding_side == ("left" if expected == "decoder" else "right")


def test_batched_greedy_equals_one_at_a_time(student):
    prompts = _prompts(student)
    lengths = {len(student.tokenizer(p)["input_ids"]) for p in prompts}
    assert len(lengths) > 3, "prompts must differ in length so batches really pad"
    batched = generate(student, prompts, max_new_tokens=MAX_NEW, batch_size=8)
    single = [generate_one(student, p, max_new_tokens=MAX_NEW) for p in prompts]
    assert [b[0].text for b in batched] == [s.text for s in single]
    assert [b[0].n_tokens for b in batched] == [s.n_tokens for s in single]
    counts = [s.n_tokens for s in single]
    # Both kinds of rows are present: stopped at EOS early, and ran to the token limit.
    assert any(c < MAX_NEW for c in counts) and any(c == MAX_NEW for c in counts)
    assert len({s.text for s in single}) > len(prompts) // 2  # not one degenerate output


def test_output_excludes_prompt_and_special_tokens(student):
    prompts = _prompts(student, 8)
    for gens, prompt in zip(generate(student, prompts, max_new_tokens=MAX_NEW, batch_size=4), prompts):
        g = gens[0]
        assert 0 <= g.n_tokens <= MAX_NEW
        assert "<pad>" not in g.text and "<eos>" not in g.text
        assert not g.text.startswith(prompt)


def test_sampling_k_samples_seeded(student):
    prompts = _prompts(student, 4)
    a = generate(student, prompts, max_new_tokens=8, batch_size=4, num_samples=3, temperature=2.0, seed=7)
    b = generate(student, prompts, max_new_tokens=8, batch_size=4, num_samples=3, temperature=2.0, seed=7)
    assert all(len(g) == 3 for g in a)
    assert [[x.text for x in g] for g in a] == [[x.text for x in g] for g in b]
    assert any(len({x.text for x in g}) > 1 for g in a)  # sampling really varies


def test_greedy_with_several_samples_is_refused(student):
    with pytest.raises(ValueError, match="temperature"):
        generate(student, ["x"], num_samples=2, temperature=0.0)


def test_prompt_too_long_for_positions_is_a_clear_error(tmp_path):
    st = load_student(build_student(tmp_path / "s", "decoder"))
    long_prompt = "Ann flips the coin. " * 200
    with pytest.raises(ValueError, match="positions"):
        generate(st, [long_prompt], max_new_tokens=16)


def test_missing_student_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_student(tmp_path / "nope")
