"""Evaluation metrics (paper §4.2, EGL survey §2.2 / §5.1.5). Pure functions over tensors and lists.

classification  accuracy, macro precision / recall / F1
visual          IoU / mIoU and pixel precision / recall / F1 of thresholded saliency vs human masks
faithfulness    comprehensiveness and sufficiency of a saliency map (ERASER-style, images)
text            BLEU-4, METEOR, ROUGE-L, CIDEr, SPICE via pycocoevalcap (Java)
clipscore       CLIPScore with an open_clip model
"""
from .classification import classification_metrics, confusion_matrix
from .clipscore import clip_score, clip_scores, load_open_clip, preprocess_for_clip
from .faithfulness import DEFAULT_FRACTIONS, comprehensiveness_sufficiency, top_fraction_mask
from .text import caption_metrics, check_java, shared_meteor, spice_status
from .visual import VisualMetrics, iou, pixel_scores, visual_metrics

__all__ = [
    "DEFAULT_FRACTIONS", "VisualMetrics", "caption_metrics", "check_java", "classification_metrics", "clip_score",
    "clip_scores", "comprehensiveness_sufficiency", "confusion_matrix", "iou", "load_open_clip", "pixel_scores",
    "preprocess_for_clip", "shared_meteor", "spice_status", "top_fraction_mask", "visual_metrics",
]
