"""Fine-tune a torchvision model with explanation guidance in a loop of your own, with megl.GradCAM.

The data are megl's synthetic images (a shape to classify, a decoy colour patch in a corner that predicts the
class on most training images; 10% of the training images carry a mask of the shape). Cross-entropy alone can
learn the decoy; the GRADIA term pulls the Grad-CAM map onto the mask.

    python examples/finetune_torchvision.py                           # resnet18, 200 steps, a few minutes on a CPU
    python examples/finetune_torchvision.py --model mobilenet_v3_small --steps 600
    (torchvision's MobileNetV3 keeps BatchNorm statistics with momentum 0.01: after a few hundred steps from
    random weights its eval-mode predictions are still poor; use local weights or more steps)
    python examples/finetune_torchvision.py --model efficientnet_b0 --weights effnet_b0.pth   # local weights
    python examples/finetune_torchvision.py --steps 3                 # smoke test (CI)
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader

import megl
from megl.data import collate, synthetic
from megl.metrics import iou
from megl.models.torchvision_backbones import default_target_layer, load_backbone_weights


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18", help="a torchvision classification model name")
    ap.add_argument("--target-layer", help="dotted module path (default: the family's, see megl.models)")
    ap.add_argument("--weights", help="local state dict (.pth / .safetensors) of the same architecture")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lam", type=float, default=1.0, help="weight of the explanation loss (0: CE only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=600, help="synthetic training images")
    ap.add_argument("--n-val", type=int, default=200, help="synthetic validation images")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)

    splits = synthetic.make_splits(synthetic.SyntheticConfig(image_size=args.image_size, n_train=args.n_train,
                                                             n_val=args.n_val, n_test=0), expand_train_rationales=False)
    train = DataLoader(splits["train"], batch_size=args.batch_size, shuffle=True, collate_fn=collate, drop_last=True)
    num_classes = len(splits["train"].class_names)

    model = torchvision.models.get_model(args.model, weights=None, num_classes=num_classes)
    if args.weights:
        load_backbone_weights(model, args.weights)
    layer, reshape = default_target_layer(args.model)
    # images are in [0, 1]: GradCAM normalises them for the model, and I ⊙ Â stays in [0, 1]
    cam = megl.GradCAM(model, args.target_layer or layer, reshape, normalize="imagenet")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    # ---- the guided training loop: this is all megl adds to a plain one
    step, t0 = 0, time.time()
    model.train()
    while step < args.steps:
        for batch in train:
            out = cam(batch["image"], batch["label"])  # explain the true class
            loss = F.cross_entropy(out.logits, batch["label"])
            loss = loss + args.lam * megl.losses.gradia(out, batch["mask"], batch["has_mask"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0 or step == args.steps:
                print(f"step {step}: loss {loss.item():.4f} ({cam.mode} Grad-CAM at {cam.layer_path!r})")
            if step == args.steps:
                break

    # ---- evaluation: accuracy and mIoU of the map of the predicted class (no graph under no_grad)
    model.eval()
    correct, ious = 0, []
    with torch.no_grad():
        for batch in DataLoader(splits["val"], batch_size=100, collate_fn=collate):
            out = cam(batch["image"])
            correct += int((out.logits.argmax(1) == batch["label"]).sum())
            ious += iou(out.saliency, batch["mask"])[batch["has_mask"]].tolist()
    result = {"steps": step, "seconds": round(time.time() - t0, 1), "val_accuracy": correct / len(splits["val"]),
              "val_miou": sum(ious) / max(len(ious), 1), "mode": cam.mode}
    print(result)
    return result


if __name__ == "__main__":
    main()
