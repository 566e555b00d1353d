"""Every prompt and training-format string, in one place (the paper's exact formats)."""

from __future__ import annotations

# Zero-shot-CoT (Kojima et al.), as the teacher is asked in Fine-tune-CoT.
REASONING_TRIGGER = "Let's think step by step."
ANSWER_TRIGGER = "Therefore, the answer is"

# Student formats (Fine-tune-CoT, section 3): prompt/completion separators.
PROMPT_SEP = " ###"
ANSWER_SEP = " --> "
FT_COT_MARKER = "-->"
FEW_SHOT_MARKER = "The answer is"


def reasoning_prompt(question: str) -> str:
    """Teacher step 1: `Q: {question}\\nA: Let's think step by step.`"""
    return f"Q: {question}\nA: {REASONING_TRIGGER}"


def answer_prompt(question: str, rationale: str) -> str:
    """Teacher step 2: `{step-1 prompt}{rationale}\\nTherefore, the answer is`."""
    return f"{reasoning_prompt(question)}{rationale}\n{ANSWER_TRIGGER}"


def chat_messages(question: str, rationale: str | None = None) -> list[dict]:
    """The same two steps as a natural two-turn chat that keeps the paper's wording.

    Turn 1 asks `Q: ...` and primes the reasoning with an assistant prefix the model continues;
    chat APIs cannot continue a prefix, so the trigger is asked for in the user turn and the
    rationale is the whole assistant reply. Turn 2 asks for the answer with the paper's trigger.
    """
    msgs = [{"role": "user", "content": f"Q: {question}\nA: {REASONING_TRIGGER}"}]
    if rationale is not None:
        msgs += [
            {"role": "assistant", "content": rationale.strip()},
            {"role": "user", "content": ANSWER_TRIGGER},
        ]
    return msgs


def student_prompt(question: str, family: str) -> str:
    """Decoder-only: `{q} ###`; encoder-decoder: `{q}`."""
    return question if family == "encoder-decoder" else f"{question}{PROMPT_SEP}"


def ft_cot_completion(rationale: str, answer: str, family: str) -> str:
    """Decoder-only: ` {rationale} --> {answer}` (+EOS added by the tokenizer step); enc-dec: `{rationale} --> {answer}`."""
    body = f"{rationale.strip()}{ANSWER_SEP}{answer}"
    return body if family == "encoder-decoder" else f" {body}"


def vanilla_completion(answer: str, family: str) -> str:
    """Vanilla fine-tuning baseline: ` {answer}` (decoder) / `{answer}` (enc-dec)."""
    return str(answer) if family == "encoder-decoder" else f" {answer}"


# Distilling step-by-step (Hsieh et al., 2023): one student learns two tasks on the same curated data,
# told apart by a prefix on the input: the label task (question -> answer, the one run at inference)
# and the rationale task (question -> the teacher's rationale), losses weighted by train.rationale_weight.
TASK_PREFIXES = {"label": "[label] ", "rationale": "[rationale] "}


def task_prompt(task: str, question: str, family: str) -> str:
    """`[label] {q} ###` / `[rationale] {q} ###` (decoder-only), without ` ###` for encoder-decoders."""
    return student_prompt(f"{TASK_PREFIXES[task]}{question}", family)


def rationale_completion(rationale: str, family: str) -> str:
    """The rationale task's target: ` {rationale}` (decoder) / `{rationale}` (enc-dec)."""
    body = rationale.strip()
    return body if family == "encoder-decoder" else f" {body}"


def method_prompt(method: str, question: str, family: str) -> str:
    """The prompt a trained student of `method` answers from (step-by-step students: the label task)."""
    if method == "step_by_step":
        return task_prompt("label", question, family)
    return student_prompt(question, family)


def zero_shot_prompt(question: str) -> str:
    """Zero-shot baseline (Kojima et al.'s answer-only prompt)."""
    return f"Q: {question}\nA: {ANSWER_TRIGGER}"


def few_shot_cot_prompt(exemplars: str, question: str) -> str:
    """Few-shot-CoT: the paper's exemplar block, then `Q: {question}\\nA:`."""
    return f"{exemplars}Q: {question}\nA:"
