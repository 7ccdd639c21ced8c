"""Tokenizers (the prompt template: models/conversation.py).

The embedded LLM uses a real byte-level BPE tokenizer trained offline with the `tokenizers` library on the
training rationales and the prompt text, wrapped as a `PreTrainedTokenizerFast` and saved in the run directory
(`<run>/tokenizer/`), so a run always reloads the exact vocabulary it was trained with.
A real LLM (Vicuna v1.5) uses its own tokenizer from its directory.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from transformers import PreTrainedTokenizerFast

from megl.config import EMBEDDED

from .conversation import prompt_parts

SPECIAL = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def train_tokenizer(texts: Iterable[str], class_names: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts` (the rationales) plus the prompt text for every class."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[SPECIAL[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    corpus = list(texts)
    for name in class_names:
        before, after = prompt_parts(name)
        corpus.append(before + after)
    tok.train_from_iterator(sorted(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # Llama / Vicuna ship without one
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def tokenizer_for(config, tokenizer=None, caller: str = "build_model"):
    """`tokenizer` if given, else the real LLM's own; an embedded LLM needs the run's trained one (passed in)."""
    if tokenizer is not None:
        return tokenizer
    if config.llm in EMBEDDED:
        raise ValueError(f"{caller}: llm={config.llm!r} needs the run's tokenizer (train_tokenizer(...) or "
                         "load_tokenizer('<run>/tokenizer'))")
    return load_tokenizer(config.llm)
