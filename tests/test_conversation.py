"""megl.models.conversation: the one template and PromptBuilder behind MEGL's SDTG and the LLM classifiers."""
from __future__ import annotations

import torch

from megl.models import conversation as conv
from megl.models import train_tokenizer


def _tok():
    return train_tokenizer(["a red circle", "a blue square with corners"], ["red", "blue"], 300)


def test_prompt_parts_frame_the_question_in_the_vicuna_template():
    before, after = conv.prompt_parts("red")
    assert before == conv.SYSTEM + " USER: "
    assert after == "\nWhy is this image classified as red? Explain the visual evidence. ASSISTANT:"
    assert conv.prompt_parts(question=conv.CLASS_QUESTION)[1] == f"\n{conv.CLASS_QUESTION} ASSISTANT:"


def test_training_and_prompt_batches_pad_on_opposite_sides():
    tok = _tok()
    embed = torch.nn.Embedding(len(tok), 8)
    builder = conv.PromptBuilder(tok, conv.CLASS_QUESTION)  # names no class: class_names may be None
    V = torch.randn(2, 3, 8)
    answers = ["red", "a blue square with corners"]
    inputs, mask, labels = builder.training_batch(embed, V, None, answers)
    n = mask.sum(1)
    assert n[0] < n[1] and mask[0, :int(n[0])].all() and not mask[0, int(n[0]):].any()  # right-padded
    for b, text in enumerate(answers):
        kept = labels[b][labels[b] != conv.IGNORE_INDEX].tolist()
        assert kept == builder.ids(" " + text) + [tok.eos_token_id]
    head, _ = builder._pieces("")
    torch.testing.assert_close(inputs[0, len(head):len(head) + 3], V[0])  # the visual tokens follow the head
    p_inputs, p_mask, positions = builder.prompt_batch(embed, V, None)
    assert p_mask.all()  # same prompt length for every sample: nothing to pad
    assert positions[0].tolist() == list(range(p_inputs.shape[1]))
    # different class names give different lengths: left padding, positions start at each prompt's first token
    named = conv.PromptBuilder(tok)
    _, m2, pos2 = named.prompt_batch(embed, V, ["red", "a blue square with corners"])
    short = int(m2[0].sum())
    assert not m2[0, :m2.shape[1] - short].any() and m2[0, m2.shape[1] - short:].all()
    assert pos2[0, -short:].tolist() == list(range(short))
