"""LLM-based comparison classifiers of the paper's Table 2 / 3: LLaVA and LLaVA-Fine-tune-CoT.

Both are LLaVA-1.5-style models (Liu et al. 2023/2024): the frozen CLIP vision tower's patch tokens go through a
two-layer GELU MLP projector (LLaVA-1.5's `mlp2x_gelu`) into the LLM (Vicuna v1.5 + LoRA, or the tiny Llama),
with the Vicuna v1 template of models/conversation.py (the PromptBuilder of MEGL's SDTG, with a question that
names no class) and the loss on the answer tokens only. Image classification is asked as a visual question
(paper §4.3):

* "llava":  the answer is the class name; the prediction is the generated text matched to the class vocabulary.
* "ft-cot": Fine-tune-CoT (Ho et al. 2023, "Large Language Models Are Reasoning Teachers"): the answer is a
  rationale followed by the class, in Fine-tune-CoT's completion format "{rationale} --> {answer}"; the class is
  read after the last "-->" and the rationale before it (scored with the text metrics, paper Table 3).

The models reuse megl.models' CLIP, LLM (+LoRA) and tokenizer builders and the greedy decoder. They share
MEGLModel's run interface (config, class_names, loss / forward, parameter_groups, checkpoint_state_dict,
load_checkpoint_state_dict, clip / clip_tokenizer, generate_rationales) and add `predict(image01)`.
There is no Grad-CAM here: no visual explanation, so no mIoU (the paper's Table 2 shows "-").
"""
from __future__ import annotations

import difflib
import re
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .checkpoint import checkpoint_state, load_checkpoint_state
from .clip import CLIPVisionEncoder, clip_tokenizer
from .conversation import CLASS_QUESTION, COT_QUESTION, PromptBuilder
from .llm import attach_llm_parts, build_vision_and_llm, causal_lm_loss
from .sdtg import greedy_generate
from .tokenizer import tokenizer_for

QUESTIONS = {"llava": CLASS_QUESTION, "ft-cot": COT_QUESTION}  # neither names the class
MODES = tuple(QUESTIONS)
COT_SEP = "-->"  # Fine-tune-CoT: "{rationale} --> {answer}"


def answer_text(mode: str, class_name: str, rationale: str = "") -> str:
    if mode == "llava":
        return class_name
    rationale = rationale.strip()
    if not rationale:
        raise ValueError("ft-cot: every training sample needs a rationale (batch['rationale'])")
    return f"{rationale} {COT_SEP} {class_name}"


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def match_class(text: str, class_names: Sequence[str]) -> int:
    """The class a free-text answer names: exact match (case / punctuation-insensitive), else the longest class
    name found in it as whole words (the earliest on ties), else the closest name by difflib (ratio ≥ 0.6),
    else -1 (an answer naming no class, counted as wrong)."""
    t = _norm(text)
    names = [_norm(c) for c in class_names]
    if t in names:
        return names.index(t)
    found = []
    for i, n in enumerate(names):
        m = re.search(rf"(?<![a-z0-9]){re.escape(n)}(?![a-z0-9])", t) if n else None
        if m:
            found.append((-len(n), m.start(), i))
    if found:
        return min(found)[2]
    close = difflib.get_close_matches(t, names, n=1, cutoff=0.6)
    return names.index(close[0]) if close else -1


def parse_answer(mode: str, text: str) -> tuple[str, str]:
    """(answer part, rationale part) of a generated text."""
    if mode == "ft-cot":
        if COT_SEP in text:
            rationale, _, answer = text.rpartition(COT_SEP)
            return answer.strip(), rationale.rstrip(" -").strip()
        return text.strip(), text.strip()
    return text.strip(), ""


class LLMPrediction(NamedTuple):
    class_ids: Tensor  # (B,) int64, -1 where the answer names no class
    answers: list[str]  # the generated texts
    rationales: list[str]  # ft-cot: the part before "-->" ("" for llava)


class LLMClassifier(nn.Module):
    def __init__(self, config, class_names: Sequence[str], clip_encoder: CLIPVisionEncoder, llm: nn.Module, tokenizer,
                 clip_tok=None, mode: str = "llava"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"LLMClassifier: mode must be one of {MODES}, got {mode!r}")
        attach_llm_parts(self, config, class_names, clip_encoder, llm, tokenizer, clip_tok)
        self.mode = mode
        d = llm.get_input_embeddings().weight.shape[1]
        self.projector = nn.Sequential(nn.Linear(clip_encoder.width, d), nn.GELU(), nn.Linear(d, d))
        self.prompts = PromptBuilder(tokenizer, QUESTIONS[mode])
        # llava answers a class name: generation needs no more tokens than the longest one (+ </s>)
        self.answer_budget = max(len(self.prompts.ids(" " + c)) for c in self.class_names) + 1

    # ------------------------------------------------------------------ helpers
    @property
    def clip(self) -> nn.Module:
        return self.clip_encoder.clip

    @property
    def device(self) -> torch.device:
        return self.projector[0].weight.device

    def visual_tokens(self, image01: Tensor) -> Tensor:
        """CLIP patch tokens (frozen) -> projector: (B, gh*gw, D_llm)."""
        with torch.no_grad():
            Z = self.clip_encoder(image01)
        Z = Z.flatten(2).transpose(1, 2).to(self.projector[0].weight.dtype)
        return self.projector(Z)

    # ------------------------------------------------------------------ training
    def answers_for(self, class_ids: Tensor, rationales: Optional[Sequence[str]] = None) -> list[str]:
        if self.mode == "ft-cot" and rationales is None:
            raise ValueError("ft-cot: the batch needs 'rationale' texts")
        return [answer_text(self.mode, self.class_names[int(c)], rationales[i] if rationales else "")
                for i, c in enumerate(class_ids)]

    def answer_loss(self, image01: Tensor, class_ids: Tensor, rationales: Optional[Sequence[str]] = None) -> Tensor:
        """Mean NLL of the answer tokens (and </s>) given the image: LLaVA's fine-tuning objective."""
        V = self.visual_tokens(image01)
        embed = self.llm.get_input_embeddings()
        inputs, mask, labels = self.prompts.training_batch(embed, V, None, self.answers_for(class_ids, rationales))
        return causal_lm_loss(self.llm, inputs, mask, labels)

    def loss(self, batch: dict, prior: Optional[Tensor] = None, lambdas: Optional[dict] = None,
             method: Optional[str] = None) -> dict[str, Tensor]:
        if method is not None and method != self.mode:
            raise ValueError(f"this LLMClassifier was built for {self.mode!r}, not {method!r}")
        text = self.answer_loss(batch["image"], batch["label"], batch.get("rationale"))
        return {"total": text, "text": text.detach()}

    def forward(self, batch: dict, prior: Optional[Tensor] = None, lambdas: Optional[dict] = None,
                method: Optional[str] = None) -> dict[str, Tensor]:
        return self.loss(batch, prior, lambdas, method)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(self, image01: Tensor, max_new_tokens: Optional[int] = None) -> list[str]:
        V = self.visual_tokens(image01)
        embed = self.llm.get_input_embeddings()
        inputs, mask, positions = self.prompts.prompt_batch(embed, V, None)
        n = max_new_tokens or (self.answer_budget if self.mode == "llava" else self.config.max_new_tokens)
        ids = greedy_generate(self.llm, embed, inputs, mask, positions, n, self.prompts.eos)
        return [self.tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids]

    @torch.no_grad()
    def predict(self, image01: Tensor, max_new_tokens: Optional[int] = None) -> LLMPrediction:
        texts = self.generate(image01, max_new_tokens)
        answers, rationales = zip(*(parse_answer(self.mode, t) for t in texts)) if texts else ((), ())
        ids = torch.tensor([match_class(a, self.class_names) for a in answers], dtype=torch.long)
        return LLMPrediction(ids, list(texts), list(rationales))

    def class_scores(self, image01: Tensor, max_new_tokens: Optional[int] = None) -> Tensor:
        """(B, num_classes) one-hot "logits" of the predicted classes (all zeros for an answer naming no class),
        for code that takes an argmax; use `predict` for the texts."""
        pred = self.predict(image01, max_new_tokens).class_ids
        out = torch.zeros(len(pred), len(self.class_names))
        ok = pred >= 0
        out[ok.nonzero(as_tuple=True)[0], pred[ok]] = 1.0
        return out

    @torch.no_grad()
    def generate_rationales(self, image01: Tensor, class_ids: Optional[Tensor] = None,
                            max_new_tokens: Optional[int] = None) -> list[str]:
        """ft-cot: the generated rationales (the model picks its own class; `class_ids` is ignored)."""
        if self.mode != "ft-cot":
            raise ValueError("generate_rationales: only the ft-cot model writes rationales "
                             "(llava answers a class name)")
        return self.predict(image01, max_new_tokens).rationales

    # ------------------------------------------------------------------ parameters and checkpoints
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        assert not any(p.requires_grad for p in self.clip_encoder.parameters()), "CLIP must stay frozen"
        return {
            "projector": [p for p in self.projector.parameters() if p.requires_grad],
            "lora": [p for p in self.llm.parameters() if p.requires_grad],
        }

    def checkpoint_state_dict(self) -> dict[str, Tensor]:
        """What a run stores (megl.models.checkpoint): trainable tensors, buffers, frozen weights no file holds."""
        return checkpoint_state(self, self.config)

    def load_checkpoint_state_dict(self, state: dict[str, Tensor]) -> None:
        load_checkpoint_state(self, state, f"{self.mode} model")


def build_llm_classifier(config, class_names: Sequence[str], tokenizer=None, device="cpu",
                         mode: Optional[str] = None, standins: Optional[dict] = None) -> LLMClassifier:
    """Build the LLaVA ("llava") or Fine-tune-CoT ("ft-cot") classifier from a `Config` (mode: config.method).
    `standins`: the pretrained tiny CLIP / LLM weights (megl.models.standins), needed for "tiny"."""
    device = torch.device(device)
    tokenizer = tokenizer_for(config, tokenizer, "build_llm_classifier")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        encoder, llm = build_vision_and_llm(config, tokenizer, device, standins or {})
        model = LLMClassifier(config, class_names, encoder, llm, tokenizer, clip_tokenizer(config),
                              mode or config.method)
    if device.type == "cuda":
        model.clip_encoder.to(torch.bfloat16)
    return model.to(device)


# ----------------------------------------------------------------------------- registry entries
def _method_loss(mode: str):
    def loss(model, batch, prior=None, config=None) -> dict[str, Tensor]:
        if not isinstance(model, LLMClassifier) or model.mode != mode:
            raise TypeError(
                f"method {mode!r} trains an LLMClassifier built by megl.models.llm_classifier.build_llm_classifier "
                f"(megl.methods.get_method({mode!r}).resolve('build_model')), got {type(model).__name__}"
                + (f" in mode {model.mode!r}" if isinstance(model, LLMClassifier) else "")
            )
        return model.loss(batch, prior)

    loss.__name__ = loss.__qualname__ = f"{mode.replace('-', '_')}_loss"
    loss.__doc__ = f"The {mode} objective: NLL of the answer tokens (registry signature; the model does the work)."
    return loss


llava_loss = _method_loss("llava")
ft_cot_loss = _method_loss("ft-cot")


__all__ = ["LLMClassifier", "LLMPrediction", "answer_text", "build_llm_classifier", "ft_cot_loss", "llava_loss",
           "match_class", "parse_answer"]
