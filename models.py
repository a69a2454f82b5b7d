"""The model zoo: every torchvision classification model, vit_tiny for small images, and timm's models as timm/NAME.

``build_model(name, *, weights, num_classes, image_size)`` takes plain values, so the library (compact checkpoints)
and the scripts build models the same way. Mistakes raise ValueError with the reason; the scripts turn them into
one-line errors. timm (PyTorch Image Models) is optional: it is imported only when a timm/ model is asked for.
"""

import difflib
import os
from dataclasses import dataclass

import torch

import torchvision
from torch import nn

import utils


_VIT_TINY = dict(patch_size=4, num_layers=6, num_heads=4, hidden_dim=128, mlp_dim=512)


def vit_tiny(*, image_size, num_classes):
    """A small VisionTransformer for small images: patch 4, 6 layers, 4 heads, hidden 128, MLP 512."""
    return torchvision.models.VisionTransformer(image_size=image_size, num_classes=num_classes, **_VIT_TINY)


TIMM_PREFIX = "timm/"  # the prefix timm's own hub names use: timm/deit_small_patch16_224


def is_timm(name):
    """True for a timm model name, timm/NAME."""
    return isinstance(name, str) and name.startswith(TIMM_PREFIX)


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError("timm/ models are PyTorch Image Models: pip install timm") from None
    return timm


def _timm_name(name):
    """NAME of timm/NAME, after checking that timm knows it."""
    timm = _timm()
    arch = name[len(TIMM_PREFIX):]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(TIMM_PREFIX + c for c in close)}? " if close else ""
        raise ValueError(f"{name} is not a timm model; {hint}see timm.list_models()")
    return arch


def _timm_cfg(arch):
    return _timm().models.get_pretrained_cfg(arch)


def timm_patch_size(name):
    """The patch side of the timm model `name` (its patch_embed's), or None for a model without patches."""
    arch = _timm_name(name)
    with torch.device("meta"):  # the structure only: no memory, no initialisation
        model = _timm().create_model(arch, pretrained=False)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    return patch[0] if isinstance(patch, (tuple, list)) else patch


def model_names():
    """Every model name build_model accepts."""
    return sorted(torchvision.models.list_models(module=torchvision.models) + ["vit_tiny"])


def is_vit(name):
    """True for models whose position embedding fixes the input size (torchvision ViTs, vit_tiny, and the timm
    models whose configuration says so: they are built for the image size, `img_size`)."""
    if name == "vit_tiny":
        return True
    if is_timm(name):
        cfg = _timm_cfg(_timm_name(name))
        return bool(cfg is not None and cfg.fixed_input_size)
    builder = torchvision.models.get_model_builder(name)
    return builder.__module__ == torchvision.models.vision_transformer.__name__


def check_model_name(name):
    """Raise ValueError unless `name` is a torchvision classification model, vit_tiny or timm/NAME."""
    if is_timm(name):
        _timm_name(name)
        return
    names = model_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"{name} is not a classification model; {hint}see torchvision.models.list_models()")


def resolve_weights(name, weights):
    """The member of `name`'s torchvision weights enum that `weights` names; ValueError listing them if none.

    Accepts torchvision's spellings: "ResNet50_Weights.IMAGENET1K_V2", "IMAGENET1K_V2" and "DEFAULT". For a
    timm model, a TimmWeights (timm_weights).
    """
    check_model_name(name)
    if is_timm(name):
        return timm_weights(name, weights)
    if name == "vit_tiny":
        raise ValueError("vit_tiny has no pretrained weights")
    enum = torchvision.models.get_model_weights(name)
    choices = ", ".join(f"{enum.__name__}.{member.name}" for member in enum)
    prefix, _, member = weights.rpartition(".")
    if prefix and prefix != enum.__name__:
        other = getattr(torchvision.models, prefix, None)
        known = isinstance(other, type) and issubclass(other, torchvision.models.WeightsEnum)
        what = f"{prefix} holds another model's weights" if known else f"there is no weights enum {prefix}"
        raise ValueError(f"{what}; {name}'s weights are {choices} (or DEFAULT)")
    try:
        return enum[member]  # DEFAULT is an alias of the recommended member
    except KeyError:
        raise ValueError(f"{enum.__name__} has no weights {member}; {name}'s weights are {choices} (or DEFAULT)") \
            from None


@dataclass(frozen=True)
class TimmWeights:
    """timm's pretrained weights for a model: the name timm loads them by, a local file if given, their classes."""

    arch: str  # NAME or NAME.TAG
    file: str | None
    num_classes: int


def timm_weights(name, weights):
    """The pretrained weights `weights` names for timm/NAME: "DEFAULT" (timm's default tag), a tag of NAME
    (timm.list_pretrained), or a local weights file that timm loads and adapts as it would a download."""
    arch = _timm_name(name)
    base = arch.partition(".")[0]
    if os.path.isfile(weights):
        file = weights
    elif weights == "DEFAULT":
        file = None
    else:
        tags = [n.partition(".")[2] for n in _timm().list_pretrained(f"{base}.*")]
        if weights not in tags:
            choices = ", ".join(tags) if tags else "none"
            raise ValueError(f"{name} has no pretrained weights {weights} (nor is it a file); its tags are {choices} "
                             f"(or DEFAULT, or a local weights file)")
        arch = f"{base}.{weights}"
    cfg = _timm_cfg(arch)
    if cfg is None or not (file or cfg.has_weights):
        raise ValueError(f"timm has no pretrained weights for {name}; drop --weights (or pass a local weights file)")
    return TimmWeights(arch, file, cfg.num_classes)


def pretrained_classes(name, weights):
    """How many classes the pretrained `weights` of `name` classify."""
    resolved = resolve_weights(name, weights)
    return resolved.num_classes if is_timm(name) else len(resolved.meta["categories"])


def _build_timm(name, *, weights, num_classes, image_size):
    """timm.create_model for timm/NAME: img_size where the model takes one; weights through timm (pretrained=True),
    which resamples a ViT's position embedding to the image size and leaves a classifier of another class count
    newly initialised."""
    timm = _timm()
    arch = _timm_name(name)
    kwargs = {"num_classes": num_classes}
    if is_vit(name):
        kwargs["img_size"] = image_size
    if not weights:
        return timm.create_model(arch, pretrained=False, **kwargs)
    resolved = timm_weights(name, weights)
    overlay = {"file": resolved.file} if resolved.file else None
    model = timm.create_model(resolved.arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    if num_classes != resolved.num_classes:
        utils.log(f"Notice: {name}'s weights {weights} classify {resolved.num_classes} classes and the data "
                  f"{num_classes}: the classifier is newly initialised for {num_classes} classes, the rest pretrained")
    return model


def replace_classifier(model, *, old_classes, num_classes):
    """Replace each layer producing `old_classes` logits (the head, and an auxiliary head) by a newly initialised
    one producing `num_classes`, as fine-tuning pretrained weights on another data set needs; returns their names.

    Across torchvision's classification models the layers with as many outputs as their weights have categories
    are exactly the heads: a Linear (a 1x1 Conv2d in SqueezeNet).
    """
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.out_features == old_classes:
                new = nn.Linear(child.in_features, num_classes, bias=child.bias is not None)
            elif isinstance(child, nn.Conv2d) and child.out_channels == old_classes:
                new = nn.Conv2d(child.in_channels, num_classes, kernel_size=child.kernel_size, stride=child.stride,
                                padding=child.padding, bias=child.bias is not None)
            else:
                continue
            setattr(parent, child_name, new.to(child.weight.device, child.weight.dtype).train(child.training))
            replaced.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return replaced


def build_model(name, *, weights=None, num_classes, image_size):
    """The dense model `name` (with its pretrained `weights` if given); ViTs are built for `image_size`.

    timm/NAME is ``timm.create_model(NAME, pretrained=bool(weights), num_classes=..., img_size=image_size)``, the
    image size only where the model takes one (is_vit).

    Pretrained weights for another number of classes than `num_classes` keep everything but the classifier,
    which is replaced by a newly initialised one (with a notice naming it).
    """
    check_model_name(name)
    if is_timm(name):
        return _build_timm(name, weights=weights, num_classes=num_classes, image_size=image_size)
    if name == "vit_tiny":
        if weights:
            raise ValueError("vit_tiny has no pretrained weights")
        return vit_tiny(image_size=image_size, num_classes=num_classes)
    if not weights:
        kwargs = {"image_size": image_size} if is_vit(name) else {}  # pretrained ViT weights fix the size
        return torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
    member = resolve_weights(name, weights)
    old_classes = len(member.meta["categories"])
    model = torchvision.models.get_model(name, weights=member)
    if num_classes != old_classes:
        replaced = replace_classifier(model, old_classes=old_classes, num_classes=num_classes)
        utils.log(f"Notice: {type(member).__name__}.{member.name} classifies {old_classes} classes and the data "
                  f"{num_classes}: {', '.join(replaced)} newly initialised for {num_classes} classes, the rest "
                  f"pretrained")
    return model
