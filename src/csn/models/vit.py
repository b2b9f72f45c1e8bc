"""A small Vision Transformer (Dosovitskiy et al. 2021) whose MLP hidden units are csn read points.

Patch embedding (a conv with kernel = stride = patch), learned position embeddings, pre-norm blocks
(x + MHSA(LN(x)), then x + MLP(LN(x)) with a ReLU MLP, as in the original Transformer), a final
LayerNorm, mean pooling over tokens and a linear head.

Read points (`csn_stages`): every block's post-ReLU MLP hidden units (`blocks.i.mlp.act`, mlp_ratio x D
units each), consecutive blocks grouped into stages like a ResNet's layer1..layer3. A unit is one
hidden feature averaged over tokens (SPEC "Units"). Why there and not at the block outputs: the block
outputs are the residual stream, whose values are signed, while CSI was written for non-negative
(post-ReLU) activations. Measured on Fashion-MNIST (3 epochs, the GELU variant of this model): at the
block outputs 55-77 % of units had CSI outside [0, 1] at every checkpoint, stage means were set by
single units (CSI from -766 to 1,030) and the regularizer's gradient was 10^3-10^8 times the
cross-entropy's; post-GELU hidden units were still 10-27 % out of range early; with the ReLU MLP (same
accuracy) 0 % are out of range at every checkpoint. The block outputs stay readable with
`--layers 'blocks.*'`; CSI is unbounded there, so read eta^2 (offset- and scale-free) at them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from csn.core.schema import Float, Int, Schema
from csn.errors import CsnError
from csn.models.base import CsnModel
from csn.models.registry import register_model

GRID = 4
"""vit-tiny cuts every image into a GRID x GRID grid of patches (16 tokens)."""


class Attention(nn.Module):
    """Multi-head self-attention over [N, T, D] tokens (one qkv projection, softmax(QK^T/sqrt(d)) V, out projection)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise CsnError(f"attention width {dim} is not divisible by {heads} heads; choose a width that is.")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        att = torch.softmax((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """fc1 -> ReLU (module `act`: the read point, non-negative like a ResNet's block outputs) -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(.))."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _patch_size(image_size: int | Sequence[int], patch: int | Sequence[int] | None) -> tuple[tuple[int, int], tuple[int, int]]:
    """((H, W), (patch_h, patch_w)): by default a GRID x GRID grid of patches."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    if patch is None:
        if h % GRID or w % GRID:
            raise CsnError(f"vit-tiny cuts images into a {GRID}x{GRID} grid of patches, but the image size {h}x{w} is not "
                           f"a multiple of {GRID} on each side; resize or crop the images (e.g. to 28x28 or 32x32).")
        return (h, w), (h // GRID, w // GRID)
    ph, pw = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
    if ph < 1 or pw < 1 or h % ph or w % pw:
        raise CsnError(f"vit patch size {ph}x{pw} does not divide the image size {h}x{w}; "
                       f"choose a patch size that divides it.")
    return (h, w), (ph, pw)


class ViTShape(Schema):
    """A ViT's architecture besides the dataset's sizes and the width (the defaults are vit-tiny's)."""

    patch: Int | tuple[Int, Int] | None = Field(None, description="Patch size (an int, or (height, width)); default: "
                                                 f"a {GRID}x{GRID} grid of patches.")
    dim: Int = Field(64, ge=1, description="Embedding dimension at width 1 (rounded to a multiple of heads).")
    depth: Int = Field(6, ge=1, description="Transformer blocks.")
    heads: Int = Field(4, ge=1, description="Attention heads.")
    mlp_ratio: Float = Field(2.0, gt=0, description="MLP hidden units per embedding dimension.")
    stages: Int = Field(3, ge=1, description="Stages the blocks are grouped into (depth must divide by it).")
    pool: str = Field("mean", description="'mean' (mean of the final tokens) or 'cls' (a class token).")


class ViT(CsnModel):
    """A plain ViT for small images; stages stage1..stageS of `depth // stages` blocks each.

    Defaults (vit-tiny): a 4x4 grid of patches (7x7 patches for 28x28 images, so 16 tokens), dim 64,
    4 heads, 6 blocks, MLP ratio 2, 3 stages of 2 blocks; about 0.2 M parameters. width scales the
    embedding dimension, rounded to a multiple of `heads` so every head has the same size.
    image_size: an int (square) or (H, W). The rest of the architecture is a ViTShape (or its keys as keyword
    arguments: patch, dim, depth, heads, mlp_ratio, stages, pool).

    pool="mean" (default) classifies from the mean of the final tokens: the same reduction csn uses
    to read a token layer's units, so no token is special under ablation (plain ViTs do as well with
    it, Beyer et al. 2022). pool="cls" prepends a learned class token and classifies from it (the
    original ViT), for comparison.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0,
                 image_size: int | Sequence[int] = 28, shape: ViTShape | None = None, **options: Any) -> None:
        super().__init__()
        if shape is not None and options:
            raise TypeError("pass either a ViTShape or keyword options (patch=, dim=, ...), not both")
        shape = shape if shape is not None else ViTShape.parse(options, what="vit option")
        patch, dim, depth, heads, stages, pool = shape.patch, shape.dim, shape.depth, shape.heads, shape.stages, shape.pool
        (h, w), (ph, pw) = _patch_size(image_size, patch)
        if depth % stages:
            raise CsnError(f"vit depth {depth} cannot be split into {stages} equal stages; choose a depth divisible by {stages}.")
        if pool not in ("mean", "cls"):
            raise CsnError(f"vit pool must be 'mean' or 'cls', got {pool!r}.")
        d = heads * max(1, round(dim * width / heads))
        self.dim, self.pool, self.image_hw, self.patch = d, pool, (h, w), (ph, pw)
        self.num_patches = (h // ph) * (w // pw)
        self.patch_embed = nn.Conv2d(in_channels, d, (ph, pw), stride=(ph, pw))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + (pool == "cls"), d))
        self.blocks = nn.Sequential(*[Block(d, heads, max(1, round(d * shape.mlp_ratio))) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)
        per = depth // stages
        self._stage_blocks = [(f"stage{s + 1}", range(s * per, (s + 1) * per)) for s in range(stages)]
        self.csn_stages = {name: [f"blocks.{b}.mlp.act" for b in blocks] for name, blocks in self._stage_blocks}
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier-uniform linear weights, zero biases, embeddings N(0, 0.02) (Beyer et al. 2022, "Better plain
        ViT baselines"). With csn's SGD this reached 0.82 test accuracy on Fashion-MNIST after one epoch where
        timm's std-0.02 linear init reached 0.76 (same lr 0.1); the patch conv keeps PyTorch's default init."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def embed(self, x: Tensor) -> Tensor:
        """Images [N, C, H, W] -> tokens [N, T, D] (class token first when pool='cls'), position embedding added."""
        if tuple(x.shape[-2:]) != self.image_hw:
            h, w = self.image_hw
            raise CsnError(f"vit was built for {h}x{w} images but got {x.shape[-2]}x{x.shape[-1]}; build it with "
                           f"image_size=({x.shape[-2]}, {x.shape[-1]}) or resize the inputs.")
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        return t + self.pos_embed

    def classify(self, h: Tensor) -> Tensor:
        """Final tokens [N, T, D] -> logits: LayerNorm, pool (mean over tokens or the class token), linear head."""
        h = self.norm(h)
        return self.head(h[:, 0] if self.pool == "cls" else h.mean(dim=1))

    def segments(self):
        """embed, stage1..stageS (their blocks), head; the names do not depend on csn_stages, which a run's
        `layers` may replace."""
        segs = [("embed", self.embed)]
        segs += [(name, self.blocks[blocks.start:blocks.stop]) for name, blocks in self._stage_blocks]
        return segs + [("head", self.classify)]


@register_model("vit-tiny")
def vit_tiny(num_classes: int = 10, in_channels: int = 1, width: float = 1.0, image_size: int | Sequence[int] = 28,
             **options: Any) -> ViT:
    """A small Vision Transformer (4x4 patches, dim 64, 6 blocks in 3 stages), read at its MLP hidden units."""
    return ViT(num_classes, in_channels, width, image_size, **options)
