"""PyTorch Image Models' (timm's) module types, for the library's layer choices; timm itself is never imported here.

A model can hold timm modules only once timm is imported, so each lookup reads ``sys.modules``: without timm the
tuples are empty and the torchvision paths are unchanged. Models are recognised by what their modules are (their
classes), never by the names the modules have in the model.
"""

import sys

# (module, class) pairs; a class missing from the installed timm is left out.
_ATTENTION = (("timm.layers.attention", "Attention"), ("timm.layers.attention", "AttentionRope"),
              ("timm.models.eva", "EvaAttention"), ("timm.models.swin_transformer", "WindowAttention"))
_BLOCKS = (("timm.models.vision_transformer", "Block"), ("timm.models.vision_transformer", "ResPostBlock"),
           ("timm.models.vision_transformer", "ParallelScalingBlock"), ("timm.models.eva", "EvaBlock"),
           ("timm.models.swin_transformer", "SwinTransformerBlock"))
_GATED_MLPS = (("timm.layers.mlp", "GluMlp"), ("timm.layers.mlp", "SwiGLU"), ("timm.layers.mlp", "SwiGLUPacked"),
               ("timm.layers.mlp", "GatedMlp"))


def _types(table):
    found = []
    for module_name, class_name in table:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def attention_types():
    """timm's attention modules whose projections (qkv, proj, ...) are ordinary nn.Linear children."""
    return _types(_ATTENTION)


def plain_attention_type():
    """timm's plain ``Attention`` (ViT, DeiT), whose core ``timm_attention.CoreAttention`` can run, or None."""
    return getattr(sys.modules.get("timm.layers.attention"), "Attention", None)


def block_types():
    """timm's transformer blocks (attention and MLP with their norms), for skip_first_transformer_sparsity."""
    return _types(_BLOCKS)


def mlp_type():
    """timm's ``Mlp`` (fc1, act, drop1, norm, fc2, drop2 computed in that order), or None without timm."""
    return getattr(sys.modules.get("timm.layers.mlp"), "Mlp", None)


def gated_mlp_types():
    """timm's gated MLPs (GluMlp, SwiGLU, ...): a product of two projections, not one elementwise activation."""
    return _types(_GATED_MLPS)


def plain_block_type():
    """timm's ViT ``Block`` (norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2, pre-norm), or None."""
    return getattr(sys.modules.get("timm.models.vision_transformer"), "Block", None)


def layer_norm_type():
    """timm's ``LayerNorm`` (nn.LayerNorm computed by F.layer_norm, or its fast_norm twin), or None without timm."""
    return getattr(sys.modules.get("timm.layers.norm"), "LayerNorm", None)


def patch_embed_type():
    """timm's ``PatchEmbed`` (its ``proj`` an nn.Conv2d of kernel = stride = the patch size), or None."""
    return getattr(sys.modules.get("timm.layers.patch_embed"), "PatchEmbed", None)
