"""Supermask: learned tile masks for Linear and Conv2d layers.

Each prunable layer gets one score per tile of its weight. A target sparsity turns the scores into a
binary tile mask (the lowest-scoring tiles are pruned), the forward uses `weight * mask`, and the
backward passes the mask's gradient straight through to the scores.

    model = torchvision.models.vit_b_16()
    apply_supermask(model, linear_sparsity=0.9, linear_sp_tilesize=32, skip_last_layer_sparsity=True,
                    attention_sparsity=0.9, attention_sp_tilesize=32)
    ...train...
    sparsify_offline(model)  # plain torchvision model again, with pruned tiles set to zero
"""

import math
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_layers
from attention import ProjectedAttention, unsupported_attention_reason


##### Mask primitives #####


def check_sparsity(sparsity, name="sparsity"):
    """Raise ValueError unless 0 <= sparsity < 1."""
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}")


def check_tile_size(tile_size, name="tile_size"):
    """Raise ValueError unless tile_size is an integer >= 1."""
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {tile_size!r}")


def tile_grid_shape(weight_shape, tile_size):
    """Shape of the score tensor: one entry per tile along every dimension of the weight."""
    return tuple(math.ceil(d / tile_size) for d in weight_shape)


def max_sparsity(num_tiles):
    """The largest sparsity a layer with `num_tiles` tiles can reach: one tile always stays."""
    return 1.0 - 1.0 / num_tiles


def num_pruned_tiles(num_tiles, sparsity):
    """How many of `num_tiles` tiles the mask prunes at `sparsity` (the original's percentile rule)."""
    return round(sparsity * (num_tiles - 1))


def tile_mask(scores, num_pruned):
    """Binary tile mask with the straight-through estimator: the value is {0, 1}, the gradient is identity.

    The threshold is the k-th smallest score, k = 1 + num_pruned (see num_pruned_tiles); tiles scoring below
    it are pruned and ties are kept, exactly as the original SuperBlock. `num_pruned` may be an int or a
    0-dim integer tensor: a tensor lets the sparsity change without a host sync or a recompilation.
    """
    # gather, not indexing: indexing with a tensor reads its value on the host (a sync, and inductor fails on
    # it where the layer's forward is compiled on its own).
    index = torch.as_tensor(num_pruned, device=scores.device).reshape(1)
    threshold = scores.detach().flatten().sort().values.gather(0, index)
    hard = (scores.detach() >= threshold).to(scores.dtype)
    # hard + (s - s.detach()) has the value of `hard` exactly and passes the gradient to `scores`.
    return hard + (scores - scores.detach())


def tiled(weight, tile_size):
    """`weight` zero-padded to whole tiles, viewed as (T0, t, T1, t, ...): reduce over dims 1, 3, ... per tile."""
    grid = tile_grid_shape(weight.shape, tile_size)
    padded = weight.new_zeros([n * tile_size for n in grid])
    padded[tuple(slice(0, d) for d in weight.shape)] = weight
    return padded.reshape([x for n in grid for x in (n, tile_size)])


def within_tile_dims(weight):
    """The dimensions of tiled(weight, t) that run inside a tile."""
    return tuple(range(1, 2 * weight.dim(), 2))


def tile_norms(weight, tile_size):
    """L2 norm of every tile of `weight` (zero-padded at the edges): shape tile_grid_shape(weight.shape, tile_size)."""
    return tiled(weight, tile_size).square().sum(dim=within_tile_dims(weight)).sqrt()


def sparsity_schedule(schedule, step, total_steps):
    """Fraction of the target sparsity to apply at `step` of a ramp lasting `total_steps` (1 after it).

    "constant" applies the target at once, "linear" rises evenly and "cubic" follows Zhu and Gupta (2017),
    1 - (1 - step / total_steps) ** 3: fast at first, gentle near the target.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown sparsity schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if schedule == "constant" or total_steps <= 0 or step >= total_steps:
        return 1.0
    progress = max(step, 0) / total_steps
    return progress if schedule == "linear" else 1.0 - (1.0 - progress) ** 3


SCHEDULES = ("constant", "linear", "cubic")
SCORE_INITS = ("kaiming", "magnitude")


def expand_tiles(tiles, weight_shape, tile_size):
    """Repeat every tile entry tile_size times along each dimension and crop to the weight's shape."""
    if tile_size == 1:
        return tiles
    grid = tiles.shape
    # (T0, T1, ...) -> (T0, 1, T1, 1, ...) -> (T0, t, T1, t, ...) -> (T0*t, T1*t, ...)
    view_shape, expand_shape = [], []
    for n in grid:
        view_shape += [n, 1]
        expand_shape += [n, tile_size]
    full = tiles.reshape(view_shape).expand(expand_shape).reshape([n * tile_size for n in grid])
    return full[tuple(slice(0, d) for d in weight_shape)]


##### Supermask layers #####


class _SupermaskMixin:
    """Scores, sparsity, tile size and the cached eval-mode weight shared by the Supermask layers."""

    def _init_supermask(self, sparsity, tile_size):
        check_sparsity(sparsity)
        check_tile_size(tile_size)
        grid = tile_grid_shape(self.weight.shape, tile_size)
        num_tiles = math.prod(grid)
        if sparsity > max_sparsity(num_tiles):
            warnings.warn(
                f"sparsity {sparsity} is above the maximum {max_sparsity(num_tiles):.4f} of a layer with weight "
                f"{tuple(self.weight.shape)} and tile size {tile_size} ({num_tiles} tiles); lowering it to the maximum"
            )
            sparsity = max_sparsity(num_tiles)
        self.tile_size = tile_size
        self.target_sparsity = float(sparsity)
        # Scores stay float32 whatever the weight's dtype (see _apply): in bfloat16 neighbouring scores round
        # to ties, and the mask would change with the dtype.
        self.scores = nn.Parameter(torch.empty(grid, device=self.weight.device, dtype=torch.float32))
        self.init_scores("kaiming")
        # The pruned-tile count lives in an integer buffer (untouched by .to(dtype)) so that a sparsity
        # ramp changes it in place: no host sync, no recompilation. Not saved: it follows the sparsity.
        self.register_buffer("num_pruned", torch.zeros((), dtype=torch.long, device=self.weight.device),
                             persistent=False)
        self.sparsity = sparsity
        self._cached_weight = None
        self._cache_key = None

    def _apply(self, fn, recurse=True):
        scores = self.scores.data
        super()._apply(fn, recurse)
        if self.scores.dtype != torch.float32:  # .to(dtype) / .half(): move the float32 scores, keep their values
            self.scores.data = scores.to(self.scores.device)
        return self

    @property
    def sparsity(self):
        """The sparsity the mask applies now (the target, unless a ramp lowered it)."""
        return self._sparsity

    @sparsity.setter
    def sparsity(self, value):
        check_sparsity(value)
        self._sparsity = min(float(value), max_sparsity(self.scores.numel()))
        self.num_pruned.fill_(num_pruned_tiles(self.scores.numel(), self._sparsity))

    @torch.no_grad()
    def init_scores(self, score_init):
        """Random scores ("kaiming", as the original) or the L2 norm of each weight tile ("magnitude")."""
        if score_init == "kaiming":
            nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))
        elif score_init == "magnitude":
            self.scores.copy_(tile_norms(self.weight.float(), self.tile_size))
        else:
            raise ValueError(f"score_init must be one of {', '.join(SCORE_INITS)}, got {score_init!r}")

    def get_mask(self):
        """The {0, 1} mask of the weight's shape and dtype (differentiable with respect to the scores)."""
        tiles = tile_mask(self.scores, self.num_pruned)
        return expand_tiles(tiles, self.weight.shape, self.tile_size).to(self.weight.dtype)

    def masked_weight(self):
        """weight * mask; cached while neither the weight nor the scores change and no gradient is needed."""
        needs_grad = torch.is_grad_enabled() and (self.scores.requires_grad or self.weight.requires_grad)
        if self.training or needs_grad or torch.compiler.is_compiling():
            return self.weight * self.get_mask()
        # Tensor versions bump on every in-place change (optimizer step, load_state_dict, copy_),
        # data_ptr changes when a parameter is replaced or moved, so the cache cannot go stale.
        key = (
            self.weight.data_ptr(), self.weight._version, self.weight.dtype,
            self.scores.data_ptr(), self.scores._version, self.sparsity, self.tile_size,
        )
        if key != self._cache_key:
            with torch.no_grad():
                self._cached_weight = self.weight * self.get_mask()
            self._cache_key = key
        return self._cached_weight

    def extra_repr(self):
        return f"{super().extra_repr()}, sparsity={self.sparsity}, tile_size={self.tile_size}"


class SupermaskLinear(_SupermaskMixin, nn.Linear):
    """nn.Linear whose weight is multiplied by a learned tile mask."""

    def __init__(self, in_features, out_features, bias=True, *, sparsity, tile_size=1, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_supermask(sparsity, tile_size)

    @classmethod
    def from_linear(cls, linear, *, sparsity, tile_size=1, device=None, score_init="kaiming"):
        """A SupermaskLinear with the weight, bias and mode (train/eval) of `linear` (on its device and dtype unless
        `device`)."""
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            sparsity=sparsity, tile_size=tile_size,
            device=device or linear.weight.device, dtype=linear.weight.dtype,
        )
        _copy_parameters(linear, layer)
        layer.init_scores(score_init)
        return layer.train(linear.training)

    def to_linear(self):
        """The frozen plain nn.Linear computing what this layer computes in eval mode."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        _copy_frozen_parameters(self, linear)
        return linear

    def forward(self, input):
        return F.linear(input, self.masked_weight(), self.bias)


class SupermaskConv2d(_SupermaskMixin, nn.Conv2d):
    """nn.Conv2d whose weight is multiplied by a learned tile mask (tiles span all four weight dimensions)."""

    def __init__(self, in_channels, out_channels, kernel_size, *, sparsity, tile_size=1, **conv_kwargs):
        super().__init__(in_channels, out_channels, kernel_size, **conv_kwargs)
        self._init_supermask(sparsity, tile_size)

    @classmethod
    def from_conv(cls, conv, *, sparsity, tile_size=1, device=None, score_init="kaiming"):
        """A SupermaskConv2d with the weight, bias, geometry and mode (train/eval) of `conv`."""
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, sparsity=sparsity, tile_size=tile_size,
            **_conv_settings(conv), device=device or conv.weight.device, dtype=conv.weight.dtype,
        )
        _copy_parameters(conv, layer)
        layer.init_scores(score_init)
        return layer.train(conv.training)

    def to_conv(self):
        """The frozen plain nn.Conv2d computing what this layer computes in eval mode."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, **_conv_settings(self),
            device=self.weight.device, dtype=self.weight.dtype,
        )
        _copy_frozen_parameters(self, conv)
        return conv

    def forward(self, input):
        return self._conv_forward(input, self.masked_weight(), self.bias)


SUPERMASK_LAYERS = (SupermaskLinear, SupermaskConv2d)


def _conv_settings(conv):
    return dict(
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
        bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )


@torch.no_grad()
def _copy_parameters(source, target):
    target.weight.copy_(source.weight)
    if source.bias is not None:
        target.bias.copy_(source.bias)
    target.weight.requires_grad_(source.weight.requires_grad)


@torch.no_grad()
def _copy_frozen_parameters(supermask_layer, plain_layer):
    plain_layer.weight.copy_(supermask_layer.weight * supermask_layer.get_mask())
    if supermask_layer.bias is not None:
        plain_layer.bias.copy_(supermask_layer.bias)


##### Choosing the layers #####


def _attention_out_projections(model):
    """Names of the out_proj Linears that nn.MultiheadAttention reads functionally (a mask there would be dead)."""
    return {
        f"{name}.out_proj" if name else "out_proj"
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
    }


def _is_prunable(module):
    return isinstance(module, (nn.Linear, nn.Conv2d))


def attention_projections(model):
    """Names of the Linears that project into and out of attention inside attention modules that call them as
    modules (timm's Attention: qkv and proj), found by the attention module's type (timm_layers.attention_types)."""
    types = timm_layers.attention_types()
    if not types:
        return set()
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, types):
            prefix = f"{name}." if name else ""
            names.update(prefix + n for n, m in module.named_modules() if isinstance(m, nn.Linear))
    return names


def find_classifier(model):
    """Name of the Linear producing the logits: the one a timm model's get_classifier() returns, else the last
    Linear registered in the model (heads.head, fc, classifier[-1])."""
    if callable(getattr(model, "get_classifier", None)):
        head = model.get_classifier()
        name = next((n for n, m in model.named_modules() if m is head and isinstance(m, nn.Linear)), None)
        if name:
            return name
    dead = _attention_out_projections(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in dead]
    return names[-1] if names else None


def find_first_transformer_block(model):
    """Name of the first encoder block of a torchvision VisionTransformer or of a timm transformer (blocks.0), or None."""
    from torchvision.models.vision_transformer import EncoderBlock

    types = (EncoderBlock,) + timm_layers.block_types()
    return next((n for n, m in model.named_modules() if isinstance(m, types)), None)


def _is_inside(name, prefix):
    return prefix is not None and (name == prefix or name.startswith(prefix + "."))


@dataclass(frozen=True)
class _LayerChoice:
    sparsity: float
    tile_size: int
    kind: str  # "linear", "conv1x1", "conv" or "attention": the keyword family that chose the settings


# Why a skip keyword left a layer dense, as the sparsity report shows it (with the scripts' flag for the keyword).
SKIPPED_CLASSIFIER = "classifier, skipped by skip_last_layer_sparsity (--skip-last-layer-sparsity)"
SKIPPED_FIRST_BLOCK = ("first transformer block, skipped by skip_first_transformer_sparsity "
                       "(--skip-first-transformer-sparsity)")


def _choose(module, name, *, settings, skipped, dead, projections, classifier, first_block, filter_fn):
    """The sparsity and tile size for one layer, or None (and the reason recorded in `skipped`).

    `settings` maps each keyword family ("linear", "conv1x1", "conv", "attention") to the _LayerChoice its keywords
    ask for; `projections` names the attention projections that are Linears of their own (timm's qkv and proj).
    """
    if name in dead:
        skipped[name] = "nn.MultiheadAttention reads this weight functionally: mask it with attention_sparsity"
        return None
    if name == classifier:
        skipped[name] = SKIPPED_CLASSIFIER
        return None
    if _is_inside(name, first_block):
        skipped[name] = SKIPPED_FIRST_BLOCK
        return None
    if filter_fn is not None and not filter_fn(module, name):
        skipped[name] = "excluded by filter_fn"
        return None
    if name in projections:
        choice = settings["attention"]
    elif isinstance(module, nn.Linear):
        choice = settings["linear"]
    elif module.kernel_size == (1, 1) and settings["conv1x1"].sparsity > 0:
        choice = settings["conv1x1"]
    else:
        choice = settings["conv"]
    if choice.sparsity == 0:
        skipped[name] = f"{choice.kind}_sparsity is 0"
        return None
    return choice


def apply_supermask(
    model,
    linear_sparsity=0.0,
    linear_sp_tilesize=1,
    conv1x1_sparsity=0.0,
    conv1x1_sp_tilesize=1,
    conv_sparsity=0.0,
    conv_sp_tilesize=1,
    skip_last_layer_sparsity=False,
    skip_first_transformer_sparsity=False,
    device=None,
    verbose=False,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    attention_sparsity=0.0,
    attention_sp_tilesize=1,
    score_init="kaiming",
):
    """Replace the model's Linear and Conv2d layers by Supermask layers in place and return the model.

    Args:
        model: any nn.Module; layers may be direct children.
        linear_sparsity, linear_sp_tilesize: target sparsity and tile size of nn.Linear layers other than attention
            projections (0 leaves them dense).
        conv1x1_sparsity, conv1x1_sp_tilesize: the same for 1x1 convolutions; when 0 they fall under conv_sparsity.
        conv_sparsity, conv_sp_tilesize: the same for all other nn.Conv2d layers.
        skip_last_layer_sparsity: keep the classifier (the last Linear) dense.
        skip_first_transformer_sparsity: keep the first encoder block of a torchvision ViT (a timm transformer's
            first block) dense.
        device: where the new layers live; None keeps each layer's device (and its dtype in any case).
        verbose: print the sparsity report.
        filter_fn: optional `filter_fn(module, fqn) -> bool`; layers for which it is False stay dense.
        attention_sparsity, attention_sp_tilesize: target sparsity and tile size of the q/k/v input projection
            and the output projection of every nn.MultiheadAttention, which is replaced by a
            ProjectedAttention with Supermask projections (0 leaves attention dense, as the original did); also
            the Linear projections of timm's attention modules (qkv and proj, ``attention_projections``).
        score_init: "kaiming" (random scores, as the original) or "magnitude" (each tile's L2 norm, so the
            first mask keeps the largest tiles: the natural start from pretrained dense weights).

    Raises ValueError for a model that already has Supermask layers (change their `sparsity`, or
    sparsify_offline it first).

    Example:
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> apply_supermask(model, conv1x1_sparsity=0.5, conv1x1_sp_tilesize=8, linear_sparsity=0.9)
    """
    for value, arg in [(linear_sparsity, "linear_sparsity"), (conv1x1_sparsity, "conv1x1_sparsity"),
                       (conv_sparsity, "conv_sparsity"), (attention_sparsity, "attention_sparsity")]:
        check_sparsity(value, arg)
    for value, arg in [(linear_sp_tilesize, "linear_sp_tilesize"), (conv1x1_sp_tilesize, "conv1x1_sp_tilesize"),
                       (conv_sp_tilesize, "conv_sp_tilesize"), (attention_sp_tilesize, "attention_sp_tilesize")]:
        check_tile_size(value, arg)

    if score_init not in SCORE_INITS:
        raise ValueError(f"score_init must be one of {', '.join(SCORE_INITS)}, got {score_init!r}")
    masked = next((name for name, m in model.named_modules() if isinstance(m, SUPERMASK_LAYERS)), None)
    if masked is not None:
        # A second call would skip the existing layers and so silently keep their first settings.
        raise ValueError(f"the model already has Supermask layers (e.g. {masked or 'the model itself'}); to change "
                         f"their sparsity set layer.sparsity on each of supermask_layers(model), or call "
                         f"sparsify_offline(model) first to freeze the masks and apply_supermask again")
    skipped, kinds = {}, {}
    first_block = find_first_transformer_block(model) if skip_first_transformer_sparsity else None
    _mask_attention(model, sparsity=attention_sparsity, tile_size=attention_sp_tilesize, device=device,
                    score_init=score_init, skipped=skipped, kinds=kinds, first_block=first_block, filter_fn=filter_fn)
    context = dict(
        settings={"linear": _LayerChoice(linear_sparsity, linear_sp_tilesize, "linear"),
                  "conv1x1": _LayerChoice(conv1x1_sparsity, conv1x1_sp_tilesize, "conv1x1"),
                  "conv": _LayerChoice(conv_sparsity, conv_sp_tilesize, "conv"),
                  "attention": _LayerChoice(attention_sparsity, attention_sp_tilesize, "attention")},
        skipped=skipped,
        dead=_attention_out_projections(model),
        projections=attention_projections(model),
        classifier=find_classifier(model) if skip_last_layer_sparsity else None,
        first_block=first_block,
        filter_fn=filter_fn,
    )
    replacements = {}
    for name, module in model.named_modules():
        if not _is_prunable(module) or isinstance(module, SUPERMASK_LAYERS):
            continue
        choice = _choose(module, name, **context)
        if choice is None:
            continue
        kinds[name] = (choice.kind, choice.sparsity)
        if isinstance(module, nn.Linear):
            replacements[name] = SupermaskLinear.from_linear(
                module, sparsity=choice.sparsity, tile_size=choice.tile_size, device=device, score_init=score_init)
        else:
            replacements[name] = SupermaskConv2d.from_conv(
                module, sparsity=choice.sparsity, tile_size=choice.tile_size, device=device, score_init=score_init)
    for name, layer in replacements.items():
        if name == "":
            raise ValueError("apply_supermask needs a model that contains the layers to mask, not a layer itself; "
                             "wrap it (nn.Sequential(layer)) or call SupermaskLinear.from_linear / "
                             "SupermaskConv2d.from_conv")
        model.set_submodule(name, layer)
    _remember(model, skipped=skipped, kinds=kinds)
    if verbose:  # output the caller asked for (the original's flag), not a warning
        print(sparsity_report(model))
    return model


def _mask_attention(model, *, sparsity, tile_size, device, score_init, skipped, kinds, first_block, filter_fn):
    """Replace each nn.MultiheadAttention by a ProjectedAttention with Supermask projections."""
    replacements = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.MultiheadAttention):
            continue
        reason = unsupported_attention_reason(module)
        if sparsity == 0:
            skipped[name] = "attention_sparsity is 0"
        elif _is_inside(name, first_block):
            skipped[name] = SKIPPED_FIRST_BLOCK
        elif filter_fn is not None and not filter_fn(module, name):
            skipped[name] = "excluded by filter_fn"
        elif reason is not None:
            skipped[name] = reason
        else:
            replacements[name] = ProjectedAttention.from_attention(
                module, lambda linear: SupermaskLinear.from_linear(
                    linear, sparsity=sparsity, tile_size=tile_size, device=device, score_init=score_init))
    for name, layer in replacements.items():
        if name == "":
            raise ValueError("apply_supermask needs a model that contains the nn.MultiheadAttention, not the "
                             "attention module itself")
        model.set_submodule(name, layer)
        kinds[f"{name}.in_proj"] = kinds[f"{name}.out_proj"] = ("attention", sparsity)


##### What apply_supermask chose, kept beside the model #####


@dataclass
class _Choices:
    skipped: dict  # layer name -> why it stayed dense, for sparsity_report and load_supermask_state_dict
    kinds: dict  # layer name -> (kind, sparsity) it got before any lowering, for unprunable_kinds


# Keyed by the model and dropped with it: the model's attributes, state_dict and pickling stay untouched.
_CHOICES = weakref.WeakKeyDictionary()


def _remember(model, *, skipped, kinds):
    # Reasons accumulate over calls (apply, sparsify_offline, apply again); kinds are the latest call's.
    earlier = _CHOICES.get(model)
    _CHOICES[model] = _Choices({**(earlier.skipped if earlier else {}), **skipped}, kinds)


def skipped_layers(model):
    """{layer name: why apply_supermask left it dense} for `model` ({} if apply_supermask never ran on it)."""
    choices = _CHOICES.get(model)
    return dict(choices.skipped) if choices else {}


def layer_kinds(model):
    """{layer name: (kind, sparsity)} of the layers apply_supermask last masked on `model` ({} if none).

    kind is "linear", "conv1x1", "conv" or "attention" (attention names both `<name>.in_proj` and
    `<name>.out_proj`); sparsity is the target the keywords asked for, before a layer lowered it to its maximum.
    """
    choices = _CHOICES.get(model)
    return dict(choices.kinds) if choices else {}


##### Model-wide operations #####


def supermask_layers(model):
    """The model's Supermask layers."""
    return [m for m in model.modules() if isinstance(m, SUPERMASK_LAYERS)]


def mean_sparsity(model):
    """The sparsity the model's masks apply now, averaged over their weights (0 without masks)."""
    layers = supermask_layers(model)
    total = sum(layer.weight.numel() for layer in layers)
    return sum(layer.sparsity * layer.weight.numel() for layer in layers) / total if total else 0.0


def unprunable_kinds(model):
    """The kinds of layer whose every Supermask layer prunes no tile at its target: too few tiles for the sparsity.

    Returns {kind: (tile size, sparsity, largest tile size that would prune a tile in one of them, or None)},
    kind being "linear", "conv1x1", "conv" or "attention" as apply_supermask chose it; empty when all is well.
    """
    by_kind = {}
    for name, (kind, sparsity) in layer_kinds(model).items():
        layer = model.get_submodule(name)
        if isinstance(layer, SUPERMASK_LAYERS):
            by_kind.setdefault(kind, []).append((layer, sparsity))
    result = {}
    for kind, layers in by_kind.items():
        if any(num_pruned_tiles(layer.scores.numel(), layer.target_sparsity) > 0 for layer, _ in layers):
            continue
        tile_size, sparsity = layers[0][0].tile_size, layers[0][1]
        shapes = {tuple(layer.weight.shape) for layer, _ in layers}
        result[kind] = (tile_size, sparsity, _largest_pruning_tile_size(shapes, sparsity, below=tile_size))
    return result


def _largest_pruning_tile_size(shapes, sparsity, *, below):
    """The largest tile size under `below` at which one of the weight shapes prunes a tile, or None."""
    for tile_size in range(below - 1, 0, -1):
        for shape in shapes:
            num_tiles = math.prod(tile_grid_shape(shape, tile_size))
            if num_pruned_tiles(num_tiles, min(sparsity, max_sparsity(num_tiles))) > 0:
                return tile_size
    return None


def set_sparsity_fraction(model, fraction):
    """Set every Supermask layer to `fraction` of its target sparsity (a sparsity ramp's step); no host sync."""
    for layer in supermask_layers(model):
        layer.sparsity = layer.target_sparsity * fraction


def sparsify_offline(model):
    """Freeze every Supermask layer into a plain Linear/Conv2d with weight * mask, in place; returns the model."""
    frozen = {}
    for name, module in model.named_modules():
        if any(_is_inside(name, done) for done in frozen):
            continue
        if isinstance(module, ProjectedAttention) and isinstance(module.in_proj, SupermaskLinear):
            frozen[name] = module.to_attention(_frozen_weight(module.in_proj), _frozen_weight(module.out_proj))
        elif isinstance(module, SupermaskLinear):
            frozen[name] = module.to_linear()
        elif isinstance(module, SupermaskConv2d):
            frozen[name] = module.to_conv()
    for name, layer in frozen.items():
        if name == "":
            raise ValueError("sparsify_offline needs a model that contains Supermask layers, not a Supermask layer itself; "
                             "call layer.to_linear() / layer.to_conv() instead")
        # A new module starts in training mode: keep the mode of the layer it replaces.
        model.set_submodule(name, layer.train(model.get_submodule(name).training))
    return model


@torch.no_grad()
def _frozen_weight(layer):
    return layer.weight * layer.get_mask() if isinstance(layer, SUPERMASK_LAYERS) else layer.weight


##### Loading checkpoints #####


def _strip_prefix(state_dict, prefix):
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


@torch.no_grad()
def load_supermask_state_dict(model, state_dict):
    """Load a checkpoint of this project or of the original SuperBlock into a model prepared by apply_supermask.

    The original's `shift`/`scale` are folded into the weight (weight * scale + shift), scores that the
    original kept on attention out_proj layers (never applied) are dropped with a notice, and a `module.`
    (DDP) or `_orig_mod.` (torch.compile) prefix is stripped. Scores missing from a dense checkpoint keep
    their initial values. Raises ValueError naming the layer when an entry does not fit the model.
    Returns the names of the Supermask layers whose scores were not in the checkpoint.
    """
    state_dict = _strip_prefix(_strip_prefix(dict(state_dict), "module."), "_orig_mod.")
    modules = dict(model.named_modules())
    # The checkpoint's out_proj scores are dead where it holds a plain nn.MultiheadAttention (in_proj_weight).
    dead = {k[: -len("in_proj_weight")] + "out_proj" for k in state_dict if k.endswith("in_proj_weight")}
    for name, module in modules.items():
        if isinstance(module, ProjectedAttention):
            for old, new in [("in_proj_weight", "in_proj.weight"), ("in_proj_bias", "in_proj.bias")]:
                if f"{name}.{old}" in state_dict:
                    state_dict[f"{name}.{new}"] = state_dict.pop(f"{name}.{old}")

    for shift_key in [k for k in state_dict if k.endswith(".shift")]:
        prefix = shift_key[: -len("shift")]
        shift = state_dict.pop(shift_key)
        scale = state_dict.pop(prefix + "scale", torch.ones(()))
        if prefix + "weight" in state_dict:
            state_dict[prefix + "weight"] = state_dict[prefix + "weight"] * scale + shift

    dropped = []
    for key in [k for k in state_dict if k.endswith(".scores")]:
        layer_name = key[: -len(".scores")]
        module = modules.get(layer_name)
        if layer_name in dead:
            dropped.append(layer_name)
            del state_dict[key]
        elif isinstance(module, SUPERMASK_LAYERS):
            _check_score_shape(layer_name, module, state_dict[key])
        elif module is not None:
            skipped = skipped_layers(model)
            reason = skipped.get(layer_name) or skipped.get(layer_name.rpartition(".")[0]) or "not a Supermask layer"
            raise ValueError(f"the checkpoint has a mask for layer {layer_name}, but this model leaves it dense "
                             f"({reason}): use the sparsity and skip flags the checkpoint was trained with")
    if dropped:
        warnings.warn(f"Dropped the scores of {len(dropped)} attention out_proj layer(s): the original SuperBlock "
                      f"kept them but never applied them, so the model it trained had these layers dense.",
                      stacklevel=2)

    expected = model.state_dict()
    for name, found in state_dict.items():
        if name not in expected:
            raise ValueError(f"the checkpoint has entry {name}, which this model lacks: was it written for "
                             f"another model, or with other sparsity flags?")
        if found.shape != expected[name].shape:
            # A ViT's position embedding has one entry per patch: its length is set by the image size.
            cause = ("another image size" if name.endswith("pos_embedding")
                     else "another model or num_classes")
            raise ValueError(f"checkpoint entry {name} has shape {tuple(found.shape)} but the model expects "
                             f"{tuple(expected[name].shape)}: was it written for {cause}?")
    missing = [k for k in expected if k not in state_dict]
    missing_scores = [k[: -len(".scores")] for k in missing if k.endswith(".scores")]
    others = [k for k in missing if not k.endswith(".scores")]
    if others:
        raise ValueError(f"the checkpoint lacks {len(others)} entries of this model, e.g. {others[0]}: "
                         f"was it written for another model?")
    model.load_state_dict(state_dict, strict=False)
    return missing_scores


def _check_score_shape(name, layer, scores):
    expected = tuple(layer.scores.shape)
    if tuple(scores.shape) == expected:
        return
    fitting = [t for t in range(1, max(layer.weight.shape) + 1)
               if tile_grid_shape(layer.weight.shape, t) == tuple(scores.shape)]
    hint = (f"tile size {fitting[0]} would fit" if fitting
            else "no tile size fits this weight; was it written for another model?")
    raise ValueError(f"scores of layer {name} have shape {tuple(scores.shape)}, but tile size {layer.tile_size} "
                     f"gives {expected} for weight {tuple(layer.weight.shape)}: {hint}")


##### Reporting #####


@dataclass
class LayerSparsity:
    """One prunable layer: its shape, tiling and how much of it is pruned (or why it stays dense)."""

    name: str
    kind: str
    weight_shape: tuple
    tile_size: Optional[int]
    target_sparsity: Optional[float]  # None: not masked, so no target
    actual_sparsity: float
    numel: int
    note: str = ""  # what the layer is now: masked, frozen, block-sparse, or dense and why
    pruned: bool = True  # False for weights that are zero without having been pruned (a zero-initialised head)


@dataclass
class SparsityReport:
    """Per-layer sparsity of a model and its totals; str() renders a table."""

    rows: list = field(default_factory=list)

    @property
    def total_params(self):
        return sum(r.numel for r in self.rows)

    @property
    def pruned_params(self):
        return sum(round(r.numel * r.actual_sparsity) for r in self.rows if r.pruned)

    @property
    def overall_sparsity(self):
        return self.pruned_params / max(self.total_params, 1)

    def __str__(self):
        header = ("layer", "type", "weight", "tile", "target", "actual", "note")
        lines = [header] + [
            (r.name, r.kind, "x".join(map(str, r.weight_shape)), str(r.tile_size or "-"),
             "-" if r.target_sparsity is None else f"{r.target_sparsity:.3f}", f"{r.actual_sparsity:.3f}", r.note)
            for r in self.rows
        ]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
        text = ["  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths)) + "  " + line[-1] for line in lines]
        masked = sum(1 for r in self.rows if r.tile_size is not None)
        text.append(f"{masked} of {len(self.rows)} prunable layers masked; {self.pruned_params:,} of "
                    f"{self.total_params:,} prunable weights pruned ({100 * self.overall_sparsity:.1f}%)")
        return "\n".join(line.rstrip() for line in text)


@torch.no_grad()
def sparsity_report(model):
    """One row per Linear/Conv2d of the model: what it is now (masked, frozen, block-sparse, dense and why) and its
    actual sparsity; masked layers also show their target."""
    # No block-sparse layer can exist unless blocksparse (which imports this module) was imported.
    blocksparse = sys.modules.get("blocksparse")
    skipped = skipped_layers(model)
    dead = _attention_out_projections(model)
    original_names = {}
    if blocksparse is not None:  # a fused MLP's two layers go by the names of the Linears they replaced
        original_names = {id(layer): fqn for fqn, layer in blocksparse.block_sparse_layers(model).items()}
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            # Its q/k/v projection is a bare parameter, not a module: report it as a layer of its own.
            weight = module.in_proj_weight if module._qkv_same_embed_dim else module.q_proj_weight
            rows.append(_plain_row(f"{name}.in_proj_weight", "MultiheadAttention", weight, skipped.get(name)))
        if blocksparse is not None and isinstance(module, (blocksparse.BlockSparseLinear,
                                                           blocksparse.Int8BlockSparseLinear)):
            rows.append(LayerSparsity(original_names.get(id(module), name), type(module).__name__,
                                      (module.out_features, module.in_features),
                                      module.blocksize, None, module.sparsity,
                                      module.out_features * module.in_features,
                                      f"block-sparse, kernel={blocksparse.kernel_label(module)}"))
            continue
        if not _is_prunable(module):
            continue
        kind = type(module).__name__
        if isinstance(module, SUPERMASK_LAYERS):
            actual = 1.0 - module.get_mask().float().mean().item()
            rows.append(LayerSparsity(name, kind, tuple(module.weight.shape), module.tile_size,
                                      module.sparsity, actual, module.weight.numel(), "masked"))
            continue
        why = skipped.get(name) or ("nn.MultiheadAttention reads this weight functionally" if name in dead else None)
        rows.append(_plain_row(name, kind, module.weight, why))
    return SparsityReport(rows)


def _plain_row(name, kind, weight, why_dense):
    """The row of a plain weight: frozen if some of it is zero (masks frozen in), else dense and why."""
    actual = (weight == 0).float().mean().item()
    if actual == 1.0:  # say why it was left unmasked too: the zeros are not what made it dense
        zeros = "all weights zero, not pruned (e.g. a zero-initialised classifier)"
        note, pruned = (f"dense: {why_dense}; {zeros}" if why_dense else zeros), False
    elif actual > 0.0:
        note, pruned = "frozen: plain weights, masked tiles at zero", True
    else:
        note, pruned = f"dense: {why_dense}" if why_dense else "dense", True
    return LayerSparsity(name, kind, tuple(weight.shape), None, None, actual, weight.numel(), note, pruned)
