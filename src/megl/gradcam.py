"""`megl.GradCAM`: differentiable Grad-CAM for any `nn.Module`, in a training loop of your own.

    cam = megl.GradCAM(model, "layer4")                  # or the module itself, or "encoder.layers.-1.ln_1"
    out = cam(images)                                    # targets: class indices, default the predicted class
    loss = F.cross_entropy(out.logits, y) + megl.losses.gradia(out, mask, has_mask)

The map is Grad-CAM's (Selvaraju et al., 2017) as pytorch-grad-cam computes it -- ReLU of the gradient-weighted
sum of the target layer's channels, min-max normalised per sample at the layer's resolution, bilinearly upsampled
to the image -- through megl's fused op (`megl.ops.fused_saliency`), so it is differentiable with respect to the
model's parameters. Two ways to get d score / d activations:

- closed form: when nothing but global average pooling (and flatten / dropout) separates the target layer from a
  final `nn.Linear`, d logit_c / d A = W[c] / (h w) at every pixel: no backward pass and no double backward
  (`megl.ops.gap_linear_gradcam_gradients`);
- autograd: `torch.autograd.grad(..., create_graph=True)` for any other head (`megl.ops.autograd_gradcam_gradients`).

By default the first call detects which applies (from the autograd graph of that call and the head's input,
see `GradCAM._detect`) and logs the choice on the "megl.gradcam" logger; `closed_form=True/False` declares it
(True is checked on the first call and fails with the reason when it does not hold). `cam.mode` says which.

Hooks live only for the duration of a call (also when it raises); the model's train/eval mode is never changed;
under `torch.no_grad()` (or inference mode) the maps and logits carry no graph; under autocast the map is computed
in float32.
"""
from __future__ import annotations

import difflib
import logging
import math
import warnings
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from megl.ops import SaliencyOutput, autograd_gradcam_gradients, fused_saliency, gap_linear_gradcam_gradients

log = logging.getLogger("megl.gradcam")

Reshape = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------- reshape transforms
def vit_reshape(tokens: Tensor, height: Optional[int] = None, width: Optional[int] = None,
                prefix_tokens: int = 1) -> Tensor:
    """(B, prefix + h*w, C) tokens of a ViT -> (B, C, h, w): the class token (and any other `prefix_tokens`,
    e.g. timm's register tokens) dropped, the grid square unless `height`/`width` say otherwise. The same as
    pytorch-grad-cam's `vit_reshape_transform`, without having to pass the grid size."""
    if tokens.dim() != 3:
        raise ValueError(f"vit_reshape: expected (B, tokens, channels), got shape {tuple(tokens.shape)}; "
                         "use it on a layer that outputs tokens (e.g. a block's ln_1), or pass reshape=None")
    B, n, C = tokens.shape
    n -= prefix_tokens
    height, width = _grid(n, height, width, "vit_reshape", f"after dropping {prefix_tokens} prefix token(s)")
    return tokens[:, prefix_tokens:].reshape(B, height, width, C).permute(0, 3, 1, 2)


def swin_reshape(x: Tensor, height: Optional[int] = None, width: Optional[int] = None) -> Tensor:
    """Channels-last Swin features -> (B, C, h, w): (B, h, w, C) as torchvision's and timm's Swin return them, or
    (B, h*w, C) tokens (square grid unless `height`/`width` given). pytorch-grad-cam's `swinT_reshape_transform`."""
    if x.dim() == 4:
        return x.permute(0, 3, 1, 2)
    if x.dim() == 3:
        B, n, C = x.shape
        height, width = _grid(n, height, width, "swin_reshape", "")
        return x.reshape(B, height, width, C).permute(0, 3, 1, 2)
    raise ValueError(f"swin_reshape: expected (B, h, w, C) or (B, h*w, C), got shape {tuple(x.shape)}")


def _grid(n: int, height, width, who: str, note: str) -> tuple[int, int]:
    if height is None and width is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{who}: {n} tokens {note} do not form a square grid; pass height= and width= "
                             "(functools.partial) for a rectangular one")
        return side, side
    if height is None or width is None or height * width != n:
        raise ValueError(f"{who}: height={height} x width={width} does not match {n} tokens {note}")
    return height, width


RESHAPES: dict[str, Reshape] = {"vit": vit_reshape, "swin": swin_reshape}


# ----------------------------------------------------------------------------- target layer
def resolve_layer(model: nn.Module, target_layer: Union[str, nn.Module]) -> tuple[str, nn.Module]:
    """(dotted path, module) for a path such as "layer4", "features.-1", "encoder.layers[-1].ln_1" or a module.

    Integer parts index Sequential / ModuleList children (negative ones count from the end)."""
    root = _unwrap(model)
    if isinstance(target_layer, nn.Module):
        for name, module in root.named_modules():
            if module is target_layer:
                return name, module
        raise ValueError(f"GradCAM: target_layer {type(target_layer).__name__} is not a submodule of the model; "
                         "pass a module of this model (e.g. model.layer4) or its dotted path")
    if not isinstance(target_layer, str) or not target_layer:
        raise TypeError(f"GradCAM: target_layer must be a dotted module path (str) or an nn.Module, "
                        f"got {type(target_layer).__name__}")
    parts = target_layer.replace("[", ".").replace("]", "").split(".")
    module, names = root, []
    for part in parts:
        children = dict(module.named_children())
        if part in children:
            module, name = children[part], part
        elif part.lstrip("-").isdigit() and isinstance(module, (nn.Sequential, nn.ModuleList)) and \
                -len(module) <= int(part) < len(module):
            index = int(part) % len(module)
            name = list(children)[index]
            module = children[name]
        else:
            where = ".".join(names) or "the model"
            close = difflib.get_close_matches(part, list(children), n=3)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            raise ValueError(f"GradCAM: target_layer {target_layer!r}: {where} ({type(module).__name__}) has no "
                             f"submodule {part!r}; {hint}its children are: {', '.join(children) or 'none'}")
        names.append(name)
    return ".".join(names), module


def _unwrap(model: nn.Module) -> nn.Module:
    """The module behind torch.compile's OptimizedModule (hooks and paths refer to the original's submodules)."""
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------- output
@dataclass
class GradCAMOutput:
    """What `GradCAM.__call__` returns. Differentiable (when called with gradients enabled) w.r.t. the model's
    parameters: logits, saliency, masked, activations, gradients (autograd path) and l1 / kl."""

    logits: Tensor  # (B, classes)
    saliency: Tensor  # (B, H, W) Grad-CAM map, min-max normalised per sample, float32
    masked: Tensor  # (B, C, H, W) the image times the saliency, I ⊙ Â
    targets: Tensor  # (B,) the classes explained
    activations: Tensor  # (B, K, h, w) the target layer's output (after `reshape`), float32
    gradients: Tensor  # (B, K, h, w) d score_target / d activations, float32
    image: Tensor  # (B, C, H, W) the images as given (float32), which `masked` multiplies
    mode: str  # "closed-form" or "autograd"
    l1: Optional[Tensor] = None  # (B,) mean |Â − mask| per sample, when cam(...) was given mask=
    kl: Optional[Tensor] = None  # (B,) KL(Â ‖ prior) per unannotated sample, when cam(...) was given prior=
    backend: str = "auto"
    _given: tuple = field(default=(None, None, None), repr=False)

    @property
    def cam_size(self) -> tuple[int, int]:
        """(h, w) of the Grad-CAM layer."""
        return tuple(self.activations.shape[-2:])

    def terms(self, mask: Optional[Tensor] = None, has_mask: Optional[Tensor] = None,
              prior: Optional[Tensor] = None) -> SaliencyOutput:
        """The fused op's (saliency, masked, l1, kl) for these masks: those of the call when it was given the
        same tensors, else one more pass of the fused op over the stored activations and gradients."""
        if all(a is b for a, b in zip((mask, has_mask, prior), self._given)):  # identity: never compare values
            zeros = self.saliency.new_zeros(self.saliency.shape[0])
            return SaliencyOutput(self.saliency, self.masked, zeros if self.l1 is None else self.l1,
                                  zeros if self.kl is None else self.kl)
        return _fused(self.activations, self.gradients, self.image, mask, has_mask, prior, self.backend)


def _fused(A, G, image, mask, has_mask, prior, backend) -> SaliencyOutput:
    if mask is not None:
        mask = mask.to(device=A.device, dtype=torch.float32)
    if has_mask is not None:
        has_mask = has_mask.to(device=A.device).bool()
    if prior is not None:
        prior = prior.to(device=A.device, dtype=torch.float32)
    with _no_autocast(A.device):
        return fused_saliency(A, G, image, mask, has_mask, prior, backend=backend)


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else nullcontext()


# ----------------------------------------------------------------------------- GradCAM
# autograd nodes that only move, copy, cast or average values: a path of these from the head's input to the
# target layer (plus nn.Dropout / nn.Flatten / nn.Identity modules) means "global average pooling and nothing else"
# once the values also equal the spatial mean
_TRANSPARENT_NODES = (
    "ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward", "PermuteBackward", "TransposeBackward",
    "SqueezeBackward", "UnsqueezeBackward", "CloneBackward", "ToCopyBackward", "MeanBackward",
    "AdaptiveAvgPool2DBackward", "AvgPool2DBackward", "ExpandBackward", "AliasBackward", "AsStridedBackward",
)
_TRANSPARENT_MODULES = (nn.Dropout, nn.Flatten, nn.Identity)


class NotReachingLogits(ValueError):
    """The target layer's output does not reach the logits (or only through tokens the reshape drops)."""


@dataclass
class _Head:
    linear: nn.Linear
    dropouts: list  # nn.Dropout modules between the pooled features and the head, input side first


class GradCAM:
    """Differentiable Grad-CAM of `model` at `target_layer`.

    Args:
        model: any nn.Module returning the logits (B, classes) (or an object with `.logits`); also a
            `torch.compile`d one.
        target_layer: dotted path ("layer4", "features.-1", "encoder.layers.encoder_layer_11.ln_1") or the module.
        reshape: maps the layer's output to (B, C, h, w), as pytorch-grad-cam's `reshape_transform` (applied to
            the output and to its gradient): `megl.gradcam.vit_reshape` (class token dropped), `swin_reshape`
            (channels last), the strings "vit" / "swin", or any callable.
        normalize: None: `images` go to the model as they are (already normalised, or the model normalises
            inside); "imagenet" or a callable: `images` are in [0, 1] and are normalised before the model. The
            masked image I ⊙ Â is always formed from `images` as given.
        closed_form: None: detect on the first call; True: require the closed form (checked on the first call);
            False: always autograd.
        backend: the fused op's backend ("auto", "torch", "cpp", "cuda", "triton", "reference").
    """

    def __init__(self, model: nn.Module, target_layer: Union[str, nn.Module], reshape: Union[None, str, Reshape] = None,
                 *, normalize: Union[None, str, Callable[[Tensor], Tensor]] = None,
                 closed_form: Optional[bool] = None, backend: str = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradCAM: model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.layer_path, self.layer = resolve_layer(model, target_layer)
        if isinstance(reshape, str):
            if reshape not in RESHAPES:
                raise ValueError(f"GradCAM: unknown reshape {reshape!r}; use one of {', '.join(RESHAPES)} or a callable")
            reshape = RESHAPES[reshape]
        if reshape is not None and not callable(reshape):
            raise TypeError(f"GradCAM: reshape must be a callable (B, ...) -> (B, C, h, w), got {type(reshape).__name__}")
        self.reshape = reshape
        if isinstance(normalize, str):
            if normalize != "imagenet":
                raise ValueError(f"GradCAM: normalize={normalize!r}; use 'imagenet', a callable or None")
            from megl.data.transforms import normalize_imagenet

            normalize = normalize_imagenet
        self.normalize = normalize
        if closed_form not in (None, True, False):
            raise TypeError(f"GradCAM: closed_form must be None (detect), True or False, got {closed_form!r}")
        self.declared = closed_form
        self.backend = backend
        self._head: Optional[_Head] = None
        self.mode: Optional[str] = None  # "closed-form" or "autograd", decided by the first call
        self._checked = False  # the autograd path's reachability check ran
        # closed form in train mode: (weakref to raw, (B, K) dropout mask / (1 - p)) of the latest forward, so
        # that the gradients of another forward's output never read this one's mask (weak: raw keeps its graph)
        self._dropout_scale: Optional[tuple[weakref.ref, Tensor]] = None
        self._handles: list = []
        self.reason = ""  # why the mode was chosen (first call)

    def __repr__(self) -> str:
        mode = self.mode or "undetermined until the first call"
        reshape = getattr(self.reshape, "__name__", self.reshape)
        return f"GradCAM(target_layer={self.layer_path!r}, reshape={reshape}, mode={mode})"

    # ------------------------------------------------------------------ context manager / hygiene
    def __enter__(self) -> "GradCAM":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Remove any hook this object holds (none between calls; kept for pytorch-grad-cam's API)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ the call
    def __call__(self, images: Tensor, targets: Union[None, int, Sequence[int], Tensor] = None, *,
                 mask: Optional[Tensor] = None, has_mask: Optional[Tensor] = None,
                 prior: Optional[Tensor] = None) -> GradCAMOutput:
        """Logits and the differentiable Grad-CAM map of `targets` (default: the predicted classes).

        mask (B, H, W), has_mask (B,), prior (H, W): optional, to get the fused op's per-sample L1 to the mask
        and KL to the prior in `out.l1` / `out.kl` (the losses in megl.losses compute them when not given)."""
        self._check_images(images)
        param = next(_unwrap(self.model).parameters(), None)
        if param is not None and param.device != images.device:
            raise ValueError(f"GradCAM: images are on {images.device} but the model is on {param.device}; "
                             f"move them with images.to({str(param.device)!r})")
        keep_graph = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()  # else: no graph out
        ctx = torch.inference_mode(False) if torch.is_inference_mode_enabled() else nullcontext()
        with ctx:
            if torch.is_inference_mode_enabled() is False and images.is_inference():
                images = images.clone()  # an inference tensor cannot enter autograd
            logits, raw = self.forward(images, create_graph=keep_graph)
            targets = self._targets(targets, logits)
            A = self.activations(raw)
            with torch.set_grad_enabled(keep_graph or self.mode == "autograd"):
                G = self.gradients(logits, raw, targets, create_graph=keep_graph, spatial=tuple(A.shape[-2:]))
            if not keep_graph:
                logits, A, G = logits.detach(), A.detach(), G.detach()
            image = images.detach() if not keep_graph else images
            with torch.set_grad_enabled(keep_graph):
                sal = _fused(A, G, image.float(), mask, has_mask, prior, self.backend)
        return GradCAMOutput(logits, sal.saliency, sal.masked, targets, A, G, image.float(), self.mode,
                             sal.l1 if mask is not None else None, sal.kl if prior is not None else None,
                             self.backend, (mask, has_mask, prior))

    # ------------------------------------------------------------------ the stages (megl's classifiers use them)
    def forward(self, images: Tensor, create_graph: bool = True) -> tuple[Tensor, Tensor]:
        """(logits, the target layer's raw output) of one forward pass; the hook lives only for this call.

        The model gets a copy of the layer's output, so an in-place op after the layer (DenseNet's ReLU, a
        residual `+=`) cannot change the activations Grad-CAM reads. On the first call it also decides the mode."""
        first = self.mode is None
        grad = create_graph or first or self.mode == "autograd"
        store: dict = {}

        def hook(module, inputs, output):
            if not isinstance(output, Tensor):
                raise TypeError(f"GradCAM: target layer {self.layer_path!r} returns {type(output).__name__}, not a "
                                "tensor; choose a layer that outputs a feature map or tokens")
            store["raw"] = output
            copy = output.clone()
            store["copy_fn"] = copy.grad_fn  # before any in-place op of the model rebases it
            return copy

        probe = _HeadProbe(_unwrap(self.model)) if first and self.declared is not False else None
        self._handles.append(self.layer.register_forward_hook(hook))
        drop = {}
        if self.mode == "closed-form":
            for i, m in enumerate(self._head.dropouts):
                if m.training and m.p > 0:  # the mask this call draws enters d logit / d A
                    self._handles.append(m.register_forward_pre_hook(
                        lambda mod, inp, i=i: drop.__setitem__(("in", i), inp[0].detach().clone())))
                    self._handles.append(m.register_forward_hook(
                        lambda mod, inp, out, i=i: drop.__setitem__(("out", i), out.detach())))
        math_sdpa = grad and self.mode != "closed-form"
        try:
            if probe is not None:
                probe.attach()
            with torch.set_grad_enabled(grad), (_math_attention() if math_sdpa else nullcontext()):
                x = self.normalize(images) if self.normalize is not None else images
                # a torch.compile'd model runs eagerly once: the first call reads the autograd graph
                logits = (_unwrap(self.model) if first else self.model)(x)
        finally:
            self.release()
            if probe is not None:
                probe.detach()
        logits = _logits_of(logits)
        if "raw" not in store:
            raise RuntimeError(f"GradCAM: target layer {self.layer_path!r} did not run in the model's forward; "
                               "choose a layer the forward uses")
        raw = store["raw"]
        if first:
            self._first_call(logits, raw, store["copy_fn"], probe)
            if self.mode == "closed-form":
                for i, m in enumerate(self._head.dropouts):
                    if m.training and m.p > 0 and m in probe.dropout_in:
                        drop[("in", i)], drop[("out", i)] = probe.dropout_in[m], probe.dropout_out[m]
        scale = None
        for i in range(len(self._head.dropouts) if self.mode == "closed-form" else 0):
            if ("in", i) in drop:
                x_in, x_out = drop[("in", i)], drop[("out", i)]
                # where the input is 0 the mask cannot be read back; so is that channel (all zero), and its
                # Grad-CAM weight multiplies nothing: 1 there
                s = torch.where(x_in != 0, x_out / torch.where(x_in != 0, x_in, 1), 1).float()
                s = s.reshape(s.shape[0], -1)
                scale = s if scale is None else scale * s
        self._dropout_scale = None if scale is None else (weakref.ref(raw), scale)
        return logits, raw

    def dropout_scale(self, raw: Tensor) -> Optional[Tensor]:
        """The closed form's (B, K) dropout factor for `raw`, the layer output of the latest forward (None: no
        dropout was active). Keep it with that output when other forwards run before its gradients."""
        if self._dropout_scale is None:
            return None
        owner, scale = self._dropout_scale
        if owner() is not raw:
            raise RuntimeError(
                "GradCAM: in train mode the closed form needs the dropout mask of the forward that made this "
                "output, and another forward has run since; take cam.dropout_scale(raw) right after that forward "
                "and pass it to gradients(..., dropout_scale=...)")
        return scale

    def activations(self, raw: Tensor) -> Tensor:
        """The layer's output as (B, K, h, w) float32 (after `reshape`)."""
        A = self.reshape(raw) if self.reshape is not None else raw
        if A.dim() != 4:
            raise ValueError(f"GradCAM: target layer {self.layer_path!r} gives shape {tuple(A.shape)}, not (B, C, h, w); "
                             "pass reshape= (megl.gradcam.vit_reshape for ViT tokens, swin_reshape for channels-last "
                             "Swin features) or choose a convolutional layer")
        return A.float()

    def gradients(self, logits: Tensor, raw: Tensor, targets: Tensor, create_graph: bool = True,
                  spatial: Optional[tuple[int, int]] = None, dropout_scale: Union[None, Tensor, str] = "latest"
                  ) -> Tensor:
        """d logit_target / d activations, (B, K, h, w) float32; differentiable when `create_graph`.

        dropout_scale (closed form, train mode): "latest" reads the latest forward's (`raw` must be its output),
        or pass what `dropout_scale(raw)` gave right after the forward that made `raw`."""
        if self.mode == "closed-form":
            head = self._head
            if spatial is None:
                spatial = tuple(self.activations(raw).shape[-2:])
            G = gap_linear_gradcam_gradients(head.linear.weight, targets, spatial)
            scale = self.dropout_scale(raw) if isinstance(dropout_scale, str) else dropout_scale
            if scale is not None:
                G = G * scale[:, :, None, None]
            return G.float()
        try:
            g = autograd_gradcam_gradients(logits.float(), raw, targets, create_graph=create_graph)
        except RuntimeError as e:
            if "not have been used in the graph" in str(e) or "does not require grad" in str(e):
                raise NotReachingLogits(self._not_reaching("does not reach the logits")) from None
            raise
        G = (self.reshape(g) if self.reshape is not None else g).float()
        if not self._checked:
            self._check_reach(g, G)
        return G

    # ------------------------------------------------------------------ first call
    def _first_call(self, logits: Tensor, raw: Tensor, copy_fn, probe: Optional["_HeadProbe"]) -> None:
        if logits.dim() != 2:
            raise ValueError(f"GradCAM: the model returned shape {tuple(logits.shape)}; it must return logits "
                             "(B, classes)")
        if self.declared is False:
            self.mode, self.reason = "autograd", "declared (closed_form=False)"
        else:
            head, why = _detect(logits, self.activations(raw), copy_fn, probe)
            if head is not None:
                self.mode, self._head = "closed-form", head
                self.reason = f"global average pooling then {probe.name_of(head.linear)} (nn.Linear)"
            elif self.declared:
                raise ValueError(f"GradCAM: closed_form=True, but the closed form does not apply at "
                                 f"{self.layer_path!r}: {why}. Use closed_form=None (detect) or False (autograd)")
            else:
                self.mode, self.reason = "autograd", why
        self._checked = self.mode == "closed-form"  # the autograd path finishes its checks on its first gradient
        if self.mode == "autograd" and _unwrap(self.model) is not self.model:
            warnings.warn(
                f"megl.GradCAM at {self.layer_path!r}: autograd path on a torch.compile'd model; training on the map "
                "needs a double backward, which compiled (AOTAutograd) graphs do not support. Use a target layer "
                "where the closed form applies, compile only the network below the target layer, or train the "
                "uncompiled model (inference under torch.no_grad() works).", stacklevel=4)
        log.info("megl.GradCAM at %r: %s path (%s)", self.layer_path, self.mode, self.reason)

    def _check_reach(self, g: Tensor, G: Tensor) -> None:
        self._checked = True
        if bool((G == 0).all()) and not bool((g == 0).all()):
            raise NotReachingLogits(self._not_reaching(
                "reaches the logits only through tokens that the reshape drops (e.g. a ViT block's output, of "
                "which the head reads the class token alone)"))
        if bool((g == 0).all()):
            log.warning("megl.GradCAM at %r: the gradients are all zero (a zero-initialised head, as torchvision's "
                        "VisionTransformer has before training?); the maps are empty", self.layer_path)

    def _not_reaching(self, what: str) -> str:
        better = _suggest_layer(_unwrap(self.model), self.layer_path)
        return (f"GradCAM: the output of target layer {self.layer_path!r} {what}, so its Grad-CAM is empty. "
                f"Choose a layer the logits depend on{better}")

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _check_images(images) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"GradCAM: images must be a torch.Tensor (B, C, H, W), got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"GradCAM: images must be 4-D (B, C, H, W), got shape {tuple(images.shape)}; "
                             "add a batch dimension with images.unsqueeze(0)")
        if not images.is_floating_point():
            raise TypeError(f"GradCAM: images must be floating point, got {images.dtype}; "
                            "convert uint8 images with images.float() / 255")

    @staticmethod
    def _targets(targets, logits: Tensor) -> Tensor:
        B, n = logits.shape
        if targets is None:
            return logits.detach().argmax(1)
        if isinstance(targets, int):
            targets = torch.full((B,), targets, dtype=torch.long, device=logits.device)
        elif not isinstance(targets, Tensor):
            targets = torch.as_tensor(list(targets), dtype=torch.long, device=logits.device)
        if targets.dim() != 1 or targets.shape[0] != B or targets.is_floating_point() or targets.is_complex():
            raise ValueError(f"GradCAM: targets must be {B} class indices (a (B,) integer tensor, a list or an int), "
                             f"got {targets.dtype} of shape {tuple(targets.shape)}")
        targets = targets.to(device=logits.device, dtype=torch.long)
        if bool((targets < 0).any() | (targets >= n).any()):
            raise ValueError(f"GradCAM: targets must lie in [0, {n}) for a model with {n} classes, got "
                             f"{targets.min().item()}..{targets.max().item()}")
        return targets


class _HeadProbe:
    """First-call hooks on every nn.Linear and transparent module: who produced which tensor."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.made_by: dict[int, tuple[nn.Module, Tensor, Tensor]] = {}  # id(output) -> (module, input, output)
        self.inplace: dict[int, list[nn.Module]] = {}  # id(tensor) -> modules that returned their input
        self.before: dict[int, Tensor] = {}  # id(tensor) -> its value before an in-place dropout
        self.dropout_in: dict[nn.Module, Tensor] = {}  # nn.Dropout -> a copy of its input
        self.dropout_out: dict[nn.Module, Tensor] = {}
        self.handles: list = []

    def attach(self) -> None:
        for m in self.root.modules():
            if isinstance(m, (nn.Linear,) + _TRANSPARENT_MODULES):
                self.handles.append(m.register_forward_hook(self._record))
            if isinstance(m, nn.Dropout):
                self.handles.append(m.register_forward_pre_hook(self._record_before))

    def _record_before(self, module, inputs):
        if inputs and isinstance(inputs[0], Tensor):
            x = inputs[0].detach().clone()
            if module.inplace:
                self.before.setdefault(id(inputs[0]), x)
            self.dropout_in[module] = x  # this call's mask = output / input (closed form in train mode)

    def _record(self, module, inputs, output):
        if not (isinstance(output, Tensor) and inputs and isinstance(inputs[0], Tensor)):
            return
        if isinstance(module, nn.Dropout):
            self.dropout_out[module] = output.detach()
        if inputs[0] is output:  # in place (or nn.Identity): the producer of the tensor stays recorded
            self.inplace.setdefault(id(output), []).append(module)
        else:  # the tensors stay referenced here, so an id cannot be reused within the forward
            self.made_by[id(output)] = (module, inputs[0], output)

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def clear(self) -> None:
        self.made_by.clear()
        self.inplace.clear()
        self.before.clear()

    def name_of(self, module: nn.Module) -> str:
        return next((repr(n) for n, m in self.root.named_modules() if m is module), type(module).__name__)


def _detect(logits: Tensor, A: Tensor, copy_fn, probe: "_HeadProbe") -> tuple[Optional[_Head], str]:
    """The closed form applies when (1) the logits are the output of an nn.Linear, (2) its input comes from the
    target layer's output through dropout / flatten / identity modules and autograd nodes that only view, copy or
    average (checked on this call's graph), and (3) that input, before any dropout, equals the spatial mean of the
    (reshaped) activations."""
    try:
        return _detect_unchecked(logits, A, copy_fn, probe)
    finally:
        probe.clear()


def _detect_unchecked(logits, A, copy_fn, probe):
    entry = probe.made_by.get(id(logits))
    if entry is None or not isinstance(entry[0], nn.Linear):
        return None, "the logits are not the output of an nn.Linear"
    head, x, _ = entry
    dropouts, value, inplace_dropouts = [], x, 0
    while True:
        for m in probe.inplace.get(id(x), []):
            if isinstance(m, nn.Dropout):
                dropouts.insert(0, m)
                inplace_dropouts += int(m.training and m.p > 0)
                value = probe.before.get(id(x), value)
        entry = probe.made_by.get(id(x))
        if entry is None or not isinstance(entry[0], _TRANSPARENT_MODULES):
            break
        module, x, _ = entry
        value = x
        if isinstance(module, nn.Dropout):
            dropouts.insert(0, module)
    if any(type(m) is not nn.Dropout for m in dropouts):
        return None, "a dropout variant other than nn.Dropout sits before the head"
    path_ok, node = _only_pooling_between(x, copy_fn, inplace_dropouts)
    if not path_ok:
        return None, f"the head's input is computed from the target layer by more than pooling ({node})"
    pooled = A.detach().mean(dim=(2, 3))
    flat = value.detach().float().reshape(value.shape[0], -1)
    if flat.shape != pooled.shape:
        return None, f"the head reads {tuple(flat.shape)} features, not the {tuple(pooled.shape)} channel means"
    tol = 1e-3 if value.dtype == torch.float32 else 3e-2
    err = float((flat - pooled).abs().max())
    if err > tol * max(float(pooled.abs().max()), 1e-30):
        return None, "the head's input is not the global average of the target layer"
    return _Head(head, dropouts), ""


def _only_pooling_between(x: Tensor, target, dropout_nodes: int = 0) -> tuple[bool, str]:
    """Walk x's autograd graph back to the copy of the layer output the model consumed: every node on the way
    must be a view / copy / mean with a single differentiable input (plus the nodes of in-place nn.Dropout
    modules the probe saw)."""
    if x.grad_fn is None:
        return False, "no autograd graph on the first call"
    node = x.grad_fn
    for _ in range(64):
        if node is target:
            return True, ""
        name = type(node).__name__
        # an in-place dropout in train mode: NativeDropoutBackward, MulBackward by its mask, or CopySlices on a view
        if name.startswith(("NativeDropoutBackward", "MulBackward", "CopySlices")) and dropout_nodes > 0:
            dropout_nodes -= 1
        elif not name.startswith(_TRANSPARENT_NODES):
            return False, name
        nexts = [n for n, _ in node.next_functions if n is not None]
        if len(nexts) != 1:
            return False, f"{name} with {len(nexts)} inputs"
        node = nexts[0]
    return False, "a long chain of ops"


def _logits_of(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"GradCAM: the model returned {type(out).__name__}; it must return the logits tensor "
                    "(B, classes) or an object with .logits (wrap the model otherwise)")


def _suggest_layer(root: nn.Module, path: str) -> str:
    """A better layer to name in the error: the family default, or the input norm of the same block."""
    from megl.models.torchvision_backbones import default_target_layer

    try:
        layer, _ = default_target_layer(root)
    except (KeyError, ValueError):
        layer = None
    if layer is not None and layer != path:
        return f", e.g. {layer!r} (the default for this model family)"
    return " (for a transformer: the input norm of the last block, e.g. its ln_1 / norm1)"


def _math_attention():
    """Double backward through attention needs the math SDPA kernel (the fused ones have no second derivative)."""
    from megl.losses.rrr import _math_attention as math_attention

    return math_attention()


