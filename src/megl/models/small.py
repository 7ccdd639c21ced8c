"""The two small DecoyMNIST backbones, built from layers that contextual decomposition (CDEP) has rules for.

- `MLPClassifier` (`--backbone mlp`): Ross et al.'s RRR network, a ReLU MLP on the raw pixels in [0, 1], or in
  [−1, 1] with `input_range="signed"` (784 → 50 → 30 → 10 at 28 px: `hidden_layers=(50, 30)` of
  MultilayerPerceptron in github.com/dtak/rrr). It has no spatial layer, so Grad-CAM (GRADIA, HAICS, RES, MEGL's
  saliency) raises GradCAMUnsupported.
- `SmallCNNClassifier` (`--backbone cnn`): the net of CDEP's DecoyMNIST code (github.com/laura-rieger/
  deep-explanation-penalization, mnist/model.py): conv 5×5×20 → ReLU → max-pool 2 → conv 5×5×50 → ReLU →
  max-pool 2 → fc 256 → ReLU → fc classes, inputs standardised with MNIST's mean and std as there.
  Grad-CAM taps the second conv's ReLU output *before* its pool (`gradcam_layer="conv2"`): 8×8 at 28 px, twice
  the pooled map's resolution; each cell still sees 14×14 px, so cells over the digit also see a corner swatch.
  `gradcam_layer="conv1"` taps the first conv's ReLU (24×24, 5×5 px receptive field), where a swatch can only
  show up in its own corner (docs/decoy_mnist.md measures both).

Both read the (B, 3, H, W) batch as grey (the channel mean; MNIST's three channels are equal) unless
`in_channels=3`, and expose `cd_network()` so that megl.losses.cdep propagates through them.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn

from megl.config import MLP_INPUTS
from megl.ops import autograd_gradcam_gradients

from .classifier import Classifier, ClassifierOutput

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # CDEP's transforms.Normalize((0.1307,), (0.3081,))


class GradCAMUnsupported(TypeError):
    """The backbone has no convolutional layer to take Grad-CAM at."""


def _channels(image01: Tensor, in_channels: int) -> Tensor:
    if in_channels == 1:
        return image01.mean(dim=1, keepdim=True)
    if image01.shape[1] != in_channels:
        raise ValueError(f"expected {in_channels}-channel images, got {tuple(image01.shape)}")
    return image01


class MLPClassifier(Classifier):
    has_gradcam = False

    def __init__(self, num_classes: int, image_size: int, hidden: tuple[int, ...] = (50, 30), in_channels: int = 1,
                 input_range: str = "unit"):
        super().__init__()
        if input_range not in MLP_INPUTS:
            raise ValueError(f"mlp_input must be one of {', '.join(MLP_INPUTS)}, got {input_range!r}")
        self.in_channels = in_channels
        # "unit": pixels in [0, 1] (RRR's); "signed": in [-1, 1] (CDEP's scaling). The choice matters to CD only,
        # which decomposes relative to a zero input: with "unit" a blank corner is 0 and contributes nothing.
        self.signed = input_range == "signed"
        dims = (in_channels * image_size * image_size, *hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(dims[-1], num_classes)
        self.grid = (1, 1)
        self.feature_dim = dims[-1]

    def prepare(self, image01: Tensor) -> Tensor:
        x = _channels(image01, self.in_channels)
        return 2.0 * x - 1.0 if self.signed else x

    def forward(self, image01: Tensor) -> ClassifierOutput:
        h = self.body(self.prepare(image01))
        return ClassifierOutput(self.fc(h), h[:, :, None, None], h[:, None, :])

    def gradcam_gradients(self, out: ClassifierOutput, target: Tensor, create_graph: bool = True) -> Tensor:
        raise GradCAMUnsupported(
            "Grad-CAM needs a convolutional backbone: the mlp has no spatial layer. GRADIA, HAICS, RES-G/L and MEGL "
            "run on --backbone cnn or resnet18; plain CE, RRR and CDEP run on the mlp")

    def cd_network(self) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
        return nn.Sequential(self.body, self.fc), self.prepare

    @property
    def head(self) -> nn.Linear:
        return self.fc


class SmallCNNClassifier(Classifier):
    TAPS = {"conv2": 5, "conv1": 2}  # Grad-CAM layer -> how many `features` modules run before it (ReLU outputs)

    def __init__(self, num_classes: int, image_size: int, in_channels: int = 1, gradcam_layer: str = "conv2"):
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"the cnn backbone needs image_size >= 16 (two 5x5 convs and pools), got {image_size}")
        if gradcam_layer not in self.TAPS:
            raise ValueError(f"cnn_gradcam_layer must be one of {', '.join(self.TAPS)}, got {gradcam_layer!r}")
        self.in_channels = in_channels
        self.net = nn.Sequential(OrderedDict(
            features=nn.Sequential(nn.Conv2d(in_channels, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Conv2d(20, 50, 5), nn.ReLU()),
            head=nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(50 * side * side, 256), nn.ReLU(),
                               nn.Linear(256, num_classes)),
        ))
        self.tap = self.TAPS[gradcam_layer]
        g2 = (image_size - 4) // 2 - 4
        g = g2 if gradcam_layer == "conv2" else image_size - 4
        self.grid = (g, g)
        # Z_I for SDTG: always the second conv's grid (64 tokens at 28 px; conv1's 576 would swamp the LLM)
        self.feature_grid = (g2, g2)
        self.feature_dim = 50

    def prepare(self, image01: Tensor) -> Tensor:
        return (_channels(image01, self.in_channels) - MNIST_MEAN) / MNIST_STD

    def _from_tap(self, a: Tensor) -> ClassifierOutput:
        z = self.net.features[self.tap:](a)
        return ClassifierOutput(self.net.head(z), a, z.flatten(2).transpose(1, 2))

    def forward(self, image01: Tensor) -> ClassifierOutput:
        return self._from_tap(self.net.features[:self.tap](self.prepare(image01)))

    def gradcam_gradients(self, out: ClassifierOutput, target: Tensor, create_graph: bool = True) -> Tensor:
        return autograd_gradcam_gradients(out.logits, out.activations, target, create_graph=create_graph)

    def explain_forward(self, image01: Tensor) -> ClassifierOutput:
        """Grad-CAM needs only the graph above the tapped layer: the layers below run without autograd."""
        with torch.no_grad():
            a = self.net.features[:self.tap](self.prepare(image01))
        with torch.enable_grad():
            return self._from_tap(a.requires_grad_(True))

    def cd_network(self) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
        return self.net, self.prepare

    @property
    def head(self) -> nn.Module:
        return self.net.head
