"""A small Vision Transformer (Dosovitskiy et al. 2021) whose block outputs are csn read points.

Patch embedding (a conv with kernel = stride = patch), learned position embeddings, pre-norm blocks
(x + MHSA(LN(x)), then x + MLP(LN(x)) with GELU), a final LayerNorm, mean pooling over tokens and a
linear head. Every block's output (`blocks.0`, `blocks.1`, ...) is a read point; consecutive blocks
form stages, like a ResNet's layer1..layer3. A unit is one hidden feature averaged over tokens
(SPEC "Units"), so a block output [N, T, D] has D units.

Block outputs are the residual stream, whose values are signed, unlike the post-ReLU block outputs
the CSI formula was written for: there mu_max + mu_rest can be 0 or negative and CSI leaves [0, 1]
(measured on Fashion-MNIST, 3 epochs: 55-77 % of block-output units), so read eta^2 at block outputs.
The post-GELU MLP hidden activations are modules too (`blocks.i.mlp.act`, mlp_ratio x D units each),
readable with `--layers 'blocks.*.mlp.act'`; GELU's small negative lobe still pushes some of their
CSIs out of [0, 1] early in training (up to 27 % of a block's units in the first 64 steps, at most 7 % from step 128 on).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from csn.errors import CsnError
from csn.models.base import CsnModel


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
    """fc1 -> GELU (module `act`, a read point candidate) -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(.)). Its output is the read point."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(CsnModel):
    """A plain ViT for small images; stages stage1..stageS of `depth // stages` blocks each.

    Defaults (vit-tiny): a 4x4 grid of patches (patch = image_size // 4: 7 for 28x28, so 16 tokens),
    dim 64, 4 heads, 6 blocks, MLP ratio 2, 3 stages of 2 blocks; about 0.2 M parameters. width
    scales the embedding dimension, rounded to a multiple of `heads` so every head has the same size.

    pool="mean" (default) classifies from the mean of the final tokens: the same reduction csn uses
    to read a token layer's units, so nothing the head sees escapes the unit definition, and no
    token is special under ablation (plain ViTs do as well with it, Beyer et al. 2022).
    pool="cls" prepends a learned class token and classifies from it (the original ViT), for comparison.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0, image_size: int = 28,
                 patch: int | None = None, dim: int = 64, depth: int = 6, heads: int = 4, mlp_ratio: float = 2.0,
                 stages: int = 3, pool: str = "mean") -> None:
        super().__init__()
        if patch is None:
            if image_size % 4:
                raise CsnError(f"vit-tiny cuts images into a 4x4 grid of patches, but the image side {image_size} is not "
                               "a multiple of 4; resize or crop the images to a multiple of 4 (e.g. 28 or 32).")
            patch = image_size // 4
        if patch < 1 or image_size % patch:
            raise CsnError(f"vit patch size {patch} does not divide the image side {image_size}; "
                           f"choose a patch size that divides {image_size}.")
        if depth % stages:
            raise CsnError(f"vit depth {depth} cannot be split into {stages} equal stages; choose a depth divisible by {stages}.")
        if pool not in ("mean", "cls"):
            raise CsnError(f"vit pool must be 'mean' or 'cls', got {pool!r}.")
        d = heads * max(1, round(dim * width / heads))
        self.dim, self.pool, self.image_size, self.patch = d, pool, image_size, patch
        self.num_patches = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, d, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + (pool == "cls"), d))
        self.blocks = nn.Sequential(*[Block(d, heads, max(1, round(d * mlp_ratio))) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)
        per = depth // stages
        self.csn_stages = {f"stage{s + 1}": [f"blocks.{b}" for b in range(s * per, (s + 1) * per)] for s in range(stages)}
        self._per_stage = per
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
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise CsnError(f"vit was built for {self.image_size}x{self.image_size} images but got "
                           f"{x.shape[-2]}x{x.shape[-1]}; build it with image_size={x.shape[-1]} or resize the inputs.")
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        return t + self.pos_embed

    def classify(self, h: Tensor) -> Tensor:
        """Final tokens [N, T, D] -> logits: LayerNorm, pool (mean over tokens or the class token), linear head."""
        h = self.norm(h)
        return self.head(h[:, 0] if self.pool == "cls" else h.mean(dim=1))

    def segments(self):
        segs = [("embed", self.embed)]
        for s, name in enumerate(self.csn_stages):
            segs.append((name, self.blocks[s * self._per_stage:(s + 1) * self._per_stage]))
        segs.append(("head", self.classify))
        return segs
