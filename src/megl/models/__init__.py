"""MEGL models: classifier (ResNet18 / ViT-B/16 with Grad-CAM taps), frozen CLIP encoder, LLM + LoRA, SDTG."""
from .classifier import Classifier, ClassifierOutput, ResNet18Classifier, ViTClassifier, build_classifier
from .clip import CLIPVisionEncoder, build_open_clip, clip_tokenizer
from .conversation import IGNORE_INDEX, PromptBuilder, prompt_parts
from .llm import attention_implementation, build_llm
from .megl import MEGLModel, build_model
from .sdtg import SDTG, greedy_generate
from .tokenizer import load_tokenizer, train_tokenizer

__all__ = [
    "CLIPVisionEncoder", "Classifier", "ClassifierOutput", "IGNORE_INDEX", "MEGLModel", "PromptBuilder",
    "ResNet18Classifier", "SDTG", "ViTClassifier", "attention_implementation", "build_classifier", "build_llm",
    "build_model", "build_open_clip", "clip_tokenizer", "greedy_generate", "load_tokenizer", "prompt_parts",
    "train_tokenizer",
]
