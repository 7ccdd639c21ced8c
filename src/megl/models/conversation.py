"""The LLM's conversation template and the batches built from it (in the spirit of LLaVA's conversation.py).

Vicuna v1 / LLaVA-1.5: "{system} USER: <image>\\n{question} ASSISTANT: {answer}</s>". The visual tokens take the
place of <image>. Training labels are IGNORE_INDEX everywhere except the answer tokens and the closing </s>.
Questions: MEGL's SDTG asks why the image is its class (the question names it; the answer is the rationale), or,
with `rationale_prompt=image`, for the evidence without naming the class;
the LLaVA baseline asks for the class name, Fine-tune-CoT for the evidence and then the class (no class in
the prompt).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
RATIONALE_QUESTION = "Why is this image classified as {label}? Explain the visual evidence."
IMAGE_RATIONALE_QUESTION = "What is the class of this image? Explain the visual evidence."
# config.rationale_prompt -> SDTG's question: with "image" the class is not in the prompt (the paper's T = LLM(V))
RATIONALE_QUESTIONS = {"label": RATIONALE_QUESTION, "image": IMAGE_RATIONALE_QUESTION}
CLASS_QUESTION = "What is shown in this image? Answer with the class name."
COT_QUESTION = "What is shown in this image? Explain the visual evidence, then answer with the class name."
IGNORE_INDEX = -100  # label of the tokens the loss skips (Hugging Face's cross-entropy default)


def prompt_parts(class_name: str = "", question: str = RATIONALE_QUESTION) -> tuple[str, str]:
    """(text before the visual tokens, text after them up to the answer); `{label}` in the question = class_name."""
    return f"{SYSTEM} USER: ", f"\n{question.format(label=class_name)} ASSISTANT:"


class PromptBuilder:
    """Token ids of the template pieces (cached per class) and batch assembly around the visual tokens V (B, T, D).
    `class_names` may be None where the question names no class."""

    def __init__(self, tokenizer, question: str = RATIONALE_QUESTION):
        self.tok = tokenizer
        self.question = question
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._pieces = lru_cache(maxsize=4096)(self._pieces_uncached)

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _pieces_uncached(self, class_name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        before, after = prompt_parts(class_name, self.question)
        head = ([self.bos] if self.bos is not None else []) + self.ids(before)
        return tuple(head), tuple(self.ids(after))

    def _sequences(self, embed: nn.Module, V: Tensor, class_names: Optional[Sequence[str]],
                   answers: Optional[Sequence[str]] = None) -> tuple[list[Tensor], list[list[int]]]:
        """Per sample: the embedded [head, V, tail (, answer </s>)] and, with answers, its labels."""
        seqs, labels = [], []
        for b in range(V.shape[0]):
            head, tail = self._pieces(class_names[b] if class_names is not None else "")
            text = tail
            if answers is not None:
                answer = self.ids(" " + answers[b].strip()) + [self.eos]
                text = tail + tuple(answer)
                labels.append([IGNORE_INDEX] * (len(head) + V.shape[1] + len(tail)) + answer)
            seqs.append(torch.cat([self._embed(embed, head, V.device), V[b].to(embed.weight.dtype),
                                   self._embed(embed, text, V.device)]))
        return seqs, labels

    def _embed(self, embed: nn.Module, ids: Sequence[int], device) -> Tensor:
        return embed(torch.tensor(list(ids), dtype=torch.long, device=device))

    def _pad(self, embed: nn.Module, seqs: list[Tensor], left: bool) -> tuple[Tensor, Tensor]:
        """Stack sequences of different lengths: (inputs_embeds (B, L, D), attention_mask (B, L))."""
        L = max(s.shape[0] for s in seqs)
        device = seqs[0].device
        pad = embed(torch.tensor([self.pad], device=device))[0]
        fill = [pad.expand(L - s.shape[0], -1) for s in seqs]
        inputs = torch.stack([torch.cat([f, s] if left else [s, f]) for s, f in zip(seqs, fill)])
        ones = [[1] * s.shape[0] for s in seqs]
        mask = torch.tensor([[0] * (L - len(o)) + o if left else o + [0] * (L - len(o)) for o in ones], device=device)
        return inputs, mask

    def training_batch(self, embed: nn.Module, V: Tensor, class_names: Optional[Sequence[str]],
                       answers: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """-> inputs_embeds (B, L, D), attention_mask (B, L), labels (B, L); right-padded."""
        seqs, labels = self._sequences(embed, V, class_names, answers)
        inputs, mask = self._pad(embed, seqs, left=False)
        L = inputs.shape[1]
        return inputs, mask, torch.tensor([x + [IGNORE_INDEX] * (L - len(x)) for x in labels], device=V.device)

    def prompt_batch(self, embed: nn.Module, V: Tensor,
                     class_names: Optional[Sequence[str]]) -> tuple[Tensor, Tensor, Tensor]:
        """-> inputs_embeds (B, L, D), attention_mask (B, L), position_ids (B, L); left-padded for generation."""
        inputs, mask = self._pad(embed, self._sequences(embed, V, class_names)[0], left=True)
        return inputs, mask, (mask.cumsum(1) - 1).clamp_min(0)
