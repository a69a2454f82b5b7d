"""The model zoo: every torchvision classification model, plus vit_tiny for small images.

``build_model(name, *, weights, num_classes, image_size)`` takes plain values, so the library (compact checkpoints)
and the scripts build models the same way. Mistakes raise ValueError with the reason; the scripts turn them into
one-line errors.
"""

import difflib

import torchvision


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


def build_model(name, *, weights=None, num_classes, image_size):
    """The dense model `name` (with torchvision's pretrained `weights` if given); ViTs are built for `image_size`."""
    check_model_name(name)
    if name == "vit_tiny":
        if weights:
            raise ValueError("vit_tiny has no pretrained weights")
        return vit_tiny(image_size=image_size, num_classes=num_classes)
    kwargs = {"num_classes": num_classes}
    if is_vit(name) and not weights:
        # Pretrained ViT weights fix the image size themselves.
        kwargs["image_size"] = image_size
    try:
        return torchvision.models.get_model(name, weights=weights, **kwargs)
    except (KeyError, ValueError) as e:  # torchvision's errors for unknown weight names and mismatched heads
        raise ValueError(f"pretrained weights {weights!r} do not fit {name}: {str(e).strip(chr(39))}") from None
