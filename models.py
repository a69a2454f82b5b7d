"""The model zoo: every torchvision classification model, plus vit_tiny for small images.

``build_model(name, *, weights, num_classes, image_size)`` takes plain values, so the library (compact checkpoints)
and the scripts build models the same way. Mistakes raise ValueError with the reason; the scripts turn them into
one-line errors.
"""

import difflib

import torchvision
from torch import nn

import utils


_VIT_TINY = dict(patch_size=4, num_layers=6, num_heads=4, hidden_dim=128, mlp_dim=512)


def vit_tiny(*, image_size, num_classes):
    """A small VisionTransformer for small images: patch 4, 6 layers, 4 heads, hidden 128, MLP 512."""
    return torchvision.models.VisionTransformer(image_size=image_size, num_classes=num_classes, **_VIT_TINY)


def model_names():
    """Every model name build_model accepts."""
    return sorted(torchvision.models.list_models(module=torchvision.models) + ["vit_tiny"])


def is_vit(name):
    """True for models whose position embedding fixes the input size (torchvision ViTs and vit_tiny)."""
    if name == "vit_tiny":
        return True
    builder = torchvision.models.get_model_builder(name)
    return builder.__module__ == torchvision.models.vision_transformer.__name__


def check_model_name(name):
    """Raise ValueError unless `name` is a torchvision classification model or vit_tiny."""
    names = model_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"{name} is not a classification model; {hint}see torchvision.models.list_models()")


def resolve_weights(name, weights):
    """The member of `name`'s torchvision weights enum that `weights` names; ValueError listing them if none.

    Accepts torchvision's spellings: "ResNet50_Weights.IMAGENET1K_V2", "IMAGENET1K_V2" and "DEFAULT".
    """
    check_model_name(name)
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
    """The dense model `name` (with torchvision's pretrained `weights` if given); ViTs are built for `image_size`.

    Pretrained weights for another number of classes than `num_classes` keep everything but the classifier,
    which is replaced by a newly initialised one (with a notice naming it).
    """
    check_model_name(name)
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
