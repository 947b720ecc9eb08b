r"""A Diffusion Transformer :math:`\phi(x, s, t)` (Peebles & Xie) for images ``(B, C, H, W)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowmap.nets.embedding import ConditionEmbedding, TwoTimeEmbedding

__all__ = ["DiT"]

#: the DiT paper's sizes: width, depth, heads
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


def _sincos(width: int, grid: int) -> Tensor:
    r"""Fixed 2D position features ``(grid², width)``: half the width for the row, half for the
    column, each :math:`[\sin(\omega_k p), \cos(\omega_k p)]` with :math:`\omega_k = 10^{-4k/(w/4)}`."""
    omega = 1.0 / 10_000.0 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def one(p: Tensor) -> Tensor:
        arg = p.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)

    return torch.cat([one(rows), one(cols)], dim=1).float()


def _modulate(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return h * (1 + scale) + shift


def _zero(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class _Block(nn.Module):
    """Pre-norm attention and MLP, each modulated (shift, scale) and gated by adaLN-Zero."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
        )
        for layer in (self.qkv, self.proj, self.mlp[0], self.mlp[2]):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.ada = nn.Sequential(nn.SiLU(), _zero(nn.Linear(width, 6 * width)))

    def attend(self, h: Tensor) -> Tensor:
        """Multi-head self-attention through ``F.scaled_dot_product_attention`` (not
        ``nn.MultiheadAttention``, whose inference fast path has no forward-mode AD)."""
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        h = h + gate1 * self.attend(_modulate(self.norm1(h), shift1, scale1))
        return h + gate2 * self.mlp(_modulate(self.norm2(h), shift2, scale2))


class DiT(nn.Module):
    r"""Diffusion Transformer on patches, conditioned by adaLN-Zero on
    :math:`c = f(s) + g(t - s) - g(0) + e(y, w)` (:class:`~flowmap.nets.TwoTimeEmbedding` plus the
    label and scale embedding).

    The image is cut into :math:`(H/p)^2` patches of :math:`p \times p` pixels, each a token of
    ``width`` features plus a fixed 2D sin-cos position; every block computes
    :math:`h \mathrel{+}= \gamma_1 \odot \mathrm{Attn}(\mathrm{LN}(h)(1 + a_1) + b_1)` and
    :math:`h \mathrel{+}= \gamma_2 \odot \mathrm{MLP}(\mathrm{LN}(h)(1 + a_2) + b_2)` with
    :math:`(a, b, \gamma)` linear in :math:`\mathrm{SiLU}(c)` and zero at initialisation; the
    last layer is zero too, so a fresh DiT is :math:`\phi \equiv 0`.

    Args:
        image_size: side of the (square) input.
        in_channels: image channels.
        patch_size: side :math:`p` of a patch; must divide ``image_size``.
        size: the DiT paper's ``"S"``, ``"B"``, ``"L"`` or ``"XL"``: its width, depth and heads,
            each unless given (not ``None``) below.
        width: hidden width.
        depth: number of blocks.
        heads: attention heads.
        mlp_ratio: hidden width of each block's MLP over ``width``.
        time_dim: sinusoidal feature size of each time.
        time_scale: the highest frequency of the sinusoidal time features (rad per unit time).
        num_classes: class-conditional with this many classes (``None``: unconditional); the net
            then takes labels ``y`` (-1: the null class of label dropout).
        guidance_input: the guidance scale ``w`` is an input (a flow map serving a range of
            scales); without it a guided map's scale is fixed at training.
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        patch_size: int = 2,
        size: str = "S",
        width: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        time_dim: int = 64,
        time_scale: float = 10.0,
        num_classes: int | None = None,
        guidance_input: bool = False,
    ) -> None:
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"Unknown DiT size {size!r}; choose one of {', '.join(SIZES)}.")
        width, depth, heads = (
            given if given is not None else default
            for given, default in zip((width, depth, heads), SIZES[size])
        )
        if patch_size < 1 or image_size % patch_size:
            fits = [p for p in range(1, 9) if image_size % p == 0]
            raise ValueError(
                f"DiT patch_size {patch_size} does not divide image_size {image_size}; set "
                f"patch_size to one of {fits} (or resize the images)."
            )
        if min(width, depth, heads) < 1 or width % heads or width % 4:
            raise ValueError(
                f"DiT needs depth >= 1 and a width divisible by heads and by 4, got width={width}, "
                f"depth={depth}, heads={heads}; change width or heads."
            )
        self.image_size, self.in_channels, self.patch_size = image_size, in_channels, patch_size
        self.time = TwoTimeEmbedding(time_dim, hidden=width, scale=time_scale)
        self.condition = ConditionEmbedding(width, num_classes, guidance_input)
        self.patch = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        nn.init.xavier_uniform_(self.patch.weight.view(width, -1))
        nn.init.zeros_(self.patch.bias)
        self.register_buffer("pos", _sincos(width, image_size // patch_size), persistent=False)
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), _zero(nn.Linear(width, 2 * width)))
        self.out = _zero(nn.Linear(width, patch_size * patch_size * in_channels))

    def forward(
        self, x: Tensor, s: Tensor, t: Tensor, y: Tensor | None = None, w: Tensor | None = None
    ) -> Tensor:
        side, p, ch = self.image_size, self.patch_size, self.in_channels
        if x.ndim != 4 or x.shape[1] != ch or tuple(x.shape[2:]) != (side, side):
            raise ValueError(
                f"DiT was built for images (B, {ch}, {side}, {side}) but got "
                f"{tuple(x.shape)}; set image_size/in_channels to match."
            )
        c = (self.time(s, t) + self.condition("DiT", y, w)).to(x.dtype)
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada(c)[:, None].chunk(2, dim=-1)
        h = self.out(_modulate(self.norm(h), shift, scale))  # (B, N, p·p·C)
        g = side // p
        h = h.view(x.shape[0], g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(x.shape[0], ch, side, side)
