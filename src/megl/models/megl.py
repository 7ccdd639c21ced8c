"""`MEGLModel`: classifier f + frozen CLIP + LLM with LoRA + SDTG projections (paper Fig. 2)."""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from megl.ops import SaliencyOutput, fused_saliency

from .checkpoint import checkpoint_state, load_checkpoint_state
from .classifier import Classifier, ClassifierOutput, build_classifier
from .clip import CLIPVisionEncoder, clip_tokenizer
from .conversation import RATIONALE_QUESTIONS, PromptBuilder
from .llm import attach_llm_parts, build_vision_and_llm, causal_lm_loss
from .sdtg import SDTG, greedy_generate
from .tokenizer import tokenizer_for


class MEGLModel(nn.Module):
    def __init__(self, config, class_names: Sequence[str], classifier: Classifier, clip_encoder: CLIPVisionEncoder,
                 llm: nn.Module, tokenizer, clip_tok=None):
        super().__init__()
        attach_llm_parts(self, config, class_names, clip_encoder, llm, tokenizer, clip_tok)
        self.classifier = classifier
        llm_dim = llm.get_input_embeddings().weight.shape[1]
        self.sdtg = SDTG(classifier.feature_dim, clip_encoder.width, llm_dim, image_tokens=config.sdtg_image_tokens,
                         grid=config.sdtg_grid)
        self.prompts = PromptBuilder(tokenizer, RATIONALE_QUESTIONS[config.rationale_prompt])
        # Which paths carry L_text's gradient into the classifier (tests switch one off at a time):
        # through V_I = W_I·Z_I, and through the saliency Â inside CLIP(I ⊙ Â).
        self.text_through_features = True
        self.text_through_saliency = True

    @property
    def clip(self) -> nn.Module:
        """The open_clip model (frozen), e.g. for CLIPScore with `self.clip_tokenizer`."""
        return self.clip_encoder.clip

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    # ------------------------------------------------------------------ saliency
    def gradcam(self, out: ClassifierOutput, image01: Tensor, target: Tensor, mask: Optional[Tensor] = None,
                has_mask: Optional[Tensor] = None, prior: Optional[Tensor] = None,
                create_graph: bool = True) -> SaliencyOutput:
        """Fused saliency (Â, I ⊙ Â, per-sample L1 to the mask, KL to the prior) for `target` of one forward."""
        from megl.losses.common import training_gradients

        # a training loss (create_graph) explains config.saliency_target; inspection: classic Grad-CAM of the logit
        target_score = getattr(self.config, "saliency_target", "logit") if create_graph else "logit"
        grads = training_gradients(self.classifier, out, target, target_score, create_graph)
        return fused_saliency(out.activations, grads, image01, mask, has_mask, prior,
                              backend=self.config.saliency_backend)

    def _inference_gradcam(self, image01: Tensor, target: Optional[Tensor]) -> tuple[ClassifierOutput, Tensor,
                                                                                       SaliencyOutput]:
        """(classifier output, target, saliency) with autograd only where the Grad-CAM gradients need it."""
        out = self.classifier.explain_forward(image01)
        target = out.logits.argmax(1) if target is None else target.to(out.logits.device)
        with torch.set_grad_enabled(out.activations.requires_grad):  # autograd Grad-CAM (ViT), not closed form
            grads = self.classifier.gradcam_gradients(out, target, create_graph=False)
        with torch.no_grad():
            sal = fused_saliency(out.activations, grads, image01, backend=self.config.saliency_backend)
        return out, target, sal

    def explain(self, image01: Tensor, target: Optional[Tensor] = None) -> tuple[Tensor, SaliencyOutput]:
        """Inference: (logits, saliency for `target`, default the predicted class); no graph is kept."""
        out, _, sal = self._inference_gradcam(image01, target)
        return out.logits.detach(), sal

    def saliency(self, image01: Tensor, target: Optional[Tensor] = None) -> SaliencyOutput:
        return self.explain(image01, target)[1]

    # ------------------------------------------------------------------ SDTG
    def visual_tokens(self, out: ClassifierOutput, masked_image: Tensor) -> Tensor:
        Z_I = out.features if self.text_through_features else out.features.detach()
        masked = masked_image if self.text_through_saliency else masked_image.detach()
        return self.sdtg(Z_I, self._token_grid(out), self.clip_encoder(masked))

    def _token_grid(self, out: ClassifierOutput) -> tuple[int, int]:
        """Z_I's grid: the Grad-CAM layer's, unless the classifier takes its tokens elsewhere (feature_grid)."""
        return getattr(self.classifier, "feature_grid", None) or tuple(out.activations.shape[-2:])

    def text_loss(self, out: ClassifierOutput, masked_image: Tensor, class_ids: Tensor,
                  rationales: Sequence[str]) -> Tensor:
        """L_text: mean NLL of the rationale tokens given V = V_I + V_A and a prompt naming `class_ids`."""
        V = self.visual_tokens(out, masked_image)
        embed = self.llm.get_input_embeddings()
        names = [self.class_names[int(c)] for c in class_ids]
        inputs, mask, labels = self.prompts.training_batch(embed, V, names, rationales)
        return causal_lm_loss(self.llm, inputs, mask, labels)

    @torch.no_grad()
    def generate_rationales(self, image01: Tensor, class_ids: Optional[Tensor] = None,
                            max_new_tokens: Optional[int] = None) -> list[str]:
        """Greedy rationales for `class_ids` (default: the predicted classes)."""
        out, target, sal = self._inference_gradcam(image01, class_ids)
        V = self.sdtg(out.features.detach(), self._token_grid(out), self.clip_encoder(sal.masked))
        embed = self.llm.get_input_embeddings()
        names = [self.class_names[int(c)] for c in target]
        inputs, mask, positions = self.prompts.prompt_batch(embed, V, names)
        ids = greedy_generate(self.llm, embed, inputs, mask, positions,
                              max_new_tokens or self.config.max_new_tokens, self.prompts.eos)
        return [self.tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids]

    # ------------------------------------------------------------------ training objective
    def loss(self, batch: dict, prior: Optional[Tensor], lambdas: Optional[dict] = None,
             method: Optional[str] = None) -> dict[str, Tensor]:
        """Loss terms of `method` (default config.method) via megl.losses; `lambdas` overrides config fields
        such as {"lambda_text": 0.0}."""
        from megl.methods import get_method

        config = self.config
        if lambdas:
            config = copy.copy(config)
            for k, v in lambdas.items():
                if not hasattr(config, k):
                    raise ValueError(f"loss: unknown config field {k!r} in lambdas")
                setattr(config, k, v)
        return get_method(method or config.method)(self, batch, prior, config)

    def forward(self, batch: dict, prior: Optional[Tensor] = None, lambdas: Optional[dict] = None,
                method: Optional[str] = None) -> dict[str, Tensor]:
        # forward() = loss(), so DistributedDataParallel sees the whole objective in its forward.
        return self.loss(batch, prior, lambdas, method)

    # ------------------------------------------------------------------ parameters and checkpoints
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {
            "classifier": [p for p in self.classifier.parameters() if p.requires_grad],
            "projector": [p for p in self.sdtg.parameters() if p.requires_grad],
            "lora": [p for p in self.llm.parameters() if p.requires_grad],
        }
        assert not any(p.requires_grad for p in self.clip_encoder.parameters()), "CLIP must stay frozen"
        return groups

    def checkpoint_state_dict(self) -> dict[str, Tensor]:
        """What a run stores (megl.models.checkpoint): trainable tensors, buffers, frozen weights no file holds."""
        return checkpoint_state(self, self.config)

    def load_checkpoint_state_dict(self, state: dict[str, Tensor]) -> None:
        load_checkpoint_state(self, state)


def build_model(config, class_names: Sequence[str], tokenizer=None, device="cpu",
                standins: Optional[dict] = None) -> MEGLModel:
    """Build the whole model from a `Config`. `tokenizer`: the run's trained tokenizer for an embedded LLM (see
    megl.models.tokenizer.train_tokenizer); a real LLM brings its own from its directory. `standins`:
    {"clip": state, "llm": state, "W_A": state} of the pretrained tiny stand-ins (megl.models.standins.for_run),
    needed for "tiny"; "W_A" initialises SDTG's W_A with the projector the LLM stand-in was pretrained with."""
    device = torch.device(device)
    standins = standins or {}
    tokenizer = tokenizer_for(config, tokenizer, "build_model")
    with torch.random.fork_rng(devices=[]):  # random-initialised parts are a function of the seed alone
        torch.manual_seed(config.seed)
        classifier = build_classifier(config, len(class_names))
        encoder, llm = build_vision_and_llm(config, tokenizer, device, standins)
        model = MEGLModel(config, class_names, classifier, encoder, llm, tokenizer, clip_tokenizer(config))
        if "W_A" in standins:  # the projector the LLM stand-in was pretrained to read CLIP with (LLaVA stage 1)
            model.sdtg.W_A.load_state_dict(standins["W_A"])
        from megl.methods import get_method

        setup = get_method(config.method).resolve("setup")  # e.g. RES-L adds its learnable imputation
        if setup is not None:
            setup(model, config)
    if device.type == "cuda":
        model.clip_encoder.to(torch.bfloat16)
    return model.to(device)
