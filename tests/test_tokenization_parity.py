"""Training, validation, eval and serving tokenize a prompt the same way, for tokenizers that add
special tokens the way pretrained families do (Llama-style BOS first, T5-style </s> last)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ftcot_ray.student.data import IGNORE, encode_pairs, prompt_ids
from ftcot_ray.student.export import save_student
from ftcot_ray.student.generate import encode_prompts, load_student
from ftcot_ray.student.model import build_model
from ftcot_ray.config import StudentConfig

from helpers_train import coin_pairs

SPECIALS = ["<pad>", "<s>", "</s>"]


def family_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A BPE trained here whose post-processor adds BOS (llama) or appends EOS (t5), as those families do."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    cot, van = coin_pairs(40, "decoder")
    texts = [r[k] for r in cot + van for k in ("prompt", "completion")]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    template = "<s> $A" if style == "llama" else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", bos), ("</s>", eos)])
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_llama_style_bos_is_kept_in_training_and_generation(tmp_path):
    tok = family_tokenizer("llama")
    row = coin_pairs(1, "decoder")[0][0]
    ids = prompt_ids(tok, row["prompt"], "decoder")
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    ex = encode_pairs([row], tok, "decoder", 256).examples[0]
    n = len(ids)
    assert ex["input_ids"][:n] == ids and ex["labels"][:n] == [IGNORE] * n  # the prompt the model is trained on
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["input_ids"].count(tok.bos_token_id) == 1

    s = StudentConfig(arch="llama", size="tiny")
    model = build_model(s, tok, 256)
    folder = save_student(model.state_dict(), model.config, tok, tmp_path / "llama", None, "llama")
    student = load_student(folder)
    assert encode_prompts(student, [row["prompt"]]) == [ids]  # what generation feeds the model


def test_t5_style_eos_ends_the_encoder_input_in_training_and_generation(tmp_path):
    tok = family_tokenizer("t5")
    row = coin_pairs(1, "encoder-decoder")[0][0]
    ids = prompt_ids(tok, row["prompt"], "encoder-decoder")
    assert ids[-1] == tok.eos_token_id  # T5 was pretrained with </s> after every encoder input
    ex = encode_pairs([row], tok, "encoder-decoder", 256).examples[0]
    assert ex["input_ids"] == ids and ex["labels"][-1] == tok.eos_token_id

    s = StudentConfig(arch="t5", size="tiny")
    model = build_model(s, tok, 256)
    folder = save_student(model.state_dict(), model.config, tok, tmp_path / "t5", None, "t5")
    assert encode_prompts(load_student(folder), [row["prompt"]]) == [ids]


@pytest.mark.parametrize("style", ["llama", "t5"])
def test_a_decoder_prompt_never_ends_in_eos(style):
    tok = family_tokenizer(style)
    ids = prompt_ids(tok, "A coin is heads up. ###", "decoder")
    assert ids[-1] != tok.eos_token_id  # the completion continues the prompt
