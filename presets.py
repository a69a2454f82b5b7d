"""Image preprocessing for classification: a training preset with augmentation and an evaluation preset.

Both follow torchvision's classification references: random-resized crop, horizontal flip, an optional
auto-augment policy and random erasing for training; resize and center crop for evaluation; ImageNet
normalisation. `backend` picks where the work happens (PIL images, or uint8 tensors) and `use_v2` switches to
torchvision.transforms.v2.
"""
import torch
import torchvision.transforms
import torchvision.transforms.v2
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUTO_AUGMENT_POLICIES = ("ra", "ta_wide", "augmix", "imagenet", "cifar10", "svhn")
BACKENDS = ("pil", "tensor", "tv_tensor")


def _transforms_module(use_v2):
    return torchvision.transforms.v2 if use_v2 else torchvision.transforms


def _check_backend(backend, use_v2):
    backend = backend.lower()
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "tv_tensor" and not use_v2:
        raise ValueError("backend 'tv_tensor' needs the v2 transforms; add --use-v2 or pick --backend pil/tensor")
    return backend


def _pipeline(T, *, backend, use_v2, image_steps, tensor_steps=(), mean, std):
    """Compose `image_steps` (on the decoded image, whatever its backend), then float conversion, normalisation
    and `tensor_steps` (on the normalised float tensor)."""
    to_tensor = T.ToImage() if backend == "tv_tensor" else T.PILToTensor()
    # Tensor backends convert first so that every image step runs on tensors; PIL converts after them.
    steps = [to_tensor] if backend != "pil" else []
    steps += image_steps
    steps += [to_tensor] if backend == "pil" else []
    steps.append(T.ToDtype(torch.float32, scale=True) if use_v2 else T.ConvertImageDtype(torch.float32))
    steps.append(T.Normalize(mean=mean, std=std))
    steps += tensor_steps
    if use_v2:
        steps.append(T.ToPureTensor())
    return T.Compose(steps)


class ClassificationPresetTrain:
    """Training augmentation: random-resized crop, flip, optional auto-augment and random erasing."""

    def __init__(
        self,
        *,
        crop_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation=InterpolationMode.BILINEAR,
        crop_scale=(0.08, 1.0),
        hflip_prob=0.5,
        auto_augment_policy=None,
        ra_magnitude=9,
        augmix_severity=3,
        random_erase_prob=0.0,
        backend="pil",
        use_v2=False,
    ):
        T = _transforms_module(use_v2)
        steps = [T.RandomResizedCrop(crop_size, scale=crop_scale, interpolation=interpolation, antialias=True)]
        if hflip_prob > 0:
            steps.append(T.RandomHorizontalFlip(hflip_prob))
        if auto_augment_policy == "ra":
            steps.append(T.RandAugment(interpolation=interpolation, magnitude=ra_magnitude))
        elif auto_augment_policy == "ta_wide":
            steps.append(T.TrivialAugmentWide(interpolation=interpolation))
        elif auto_augment_policy == "augmix":
            steps.append(T.AugMix(interpolation=interpolation, severity=augmix_severity))
        elif auto_augment_policy is not None:
            policy = T.AutoAugmentPolicy(auto_augment_policy)
            steps.append(T.AutoAugment(policy=policy, interpolation=interpolation))
        # Random erasing works on the normalised tensor, as in the paper (Zhong et al., 2017).
        erase = [T.RandomErasing(p=random_erase_prob)] if random_erase_prob > 0 else []
        self.transforms = _pipeline(T, backend=_check_backend(backend, use_v2), use_v2=use_v2, image_steps=steps,
                                    tensor_steps=erase, mean=mean, std=std)

    def __call__(self, img):
        return self.transforms(img)


class ClassificationPresetEval:
    """Evaluation preprocessing: resize, center crop, normalise."""

    def __init__(
        self,
        *,
        crop_size,
        resize_size=256,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation=InterpolationMode.BILINEAR,
        backend="pil",
        use_v2=False,
    ):
        T = _transforms_module(use_v2)
        steps = [T.Resize(resize_size, interpolation=interpolation, antialias=True), T.CenterCrop(crop_size)]
        self.transforms = _pipeline(T, backend=_check_backend(backend, use_v2), use_v2=use_v2, image_steps=steps,
                                    mean=mean, std=std)

    def __call__(self, img):
        return self.transforms(img)
