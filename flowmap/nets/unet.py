r"""A small U-Net :math:`\phi(x, s, t)` for images ``(B, C, H, W)``, at 8×8 up to 32×32 and beyond."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flowmap.nets.embedding import ConditionEmbedding, TwoTimeEmbedding

__all__ = ["UNet"]


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4) or 1, ch)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cond_dim: int, dropout: float) -> None:
        super().__init__()
        self.n1, self.c1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * cout)
        self.n2, self.c2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.c2.weight)
        nn.init.zeros_(self.c2.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        h = self.c1(torch.nn.functional.silu(self.n1(x)))
        scale, shift = self.film(c)[:, :, None, None].chunk(2, dim=1)
        h = self.n2(h) * (1 + scale) + shift
        h = self.c2(self.drop(torch.nn.functional.silu(h)))
        return self.skip(x) + h


class _Attention(nn.Module):
    """Self-attention over pixels through ``F.scaled_dot_product_attention`` (not
    ``nn.MultiheadAttention``, whose inference fast path has no forward-mode AD for the JVPs)."""

    def __init__(self, ch: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads if ch % heads == 0 else 1
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        b, ch, h, w = x.shape
        q, k, v = (
            self.qkv(self.norm(x)).reshape(b, 3, self.heads, ch // self.heads, h * w).unbind(1)
        )
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        )
        return x + self.proj(out.transpose(-1, -2).reshape(b, ch, h, w))


class UNet(nn.Module):
    r"""U-Net with FiLM conditioning on the two-time embedding of :math:`(s, t - s)`.

    Args:
        image_size: side of the (square) input; must be divisible by ``2**(len(channel_mult) - 1)``.
        in_channels: image channels.
        channels: base width; level ``i`` has ``channels * channel_mult[i]``.
        channel_mult: width multiplier per resolution level.
        num_res_blocks: residual blocks per level.
        attention_resolutions: resolutions (sides) at which self-attention is applied.
        dropout: dropout inside residual blocks.
        time_dim: sinusoidal feature size of each time.
        num_classes: class-conditional with this many classes (``None``: unconditional); the net
            then takes labels ``y`` (-1: the null class of label dropout).
        guidance_input: the guidance scale ``w`` is an input (a flow map serving a range of
            scales); without it a guided map's scale is fixed at training.
        channels_last: keep the convolutions' weights and activations channels-last (NHWC), the
            layout GPU tensor cores run convolutions in; the output is returned contiguous.
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        time_dim: int = 64,
        num_classes: int | None = None,
        guidance_input: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        factor = 2 ** (len(channel_mult) - 1)
        if image_size < factor or image_size % factor:
            raise ValueError(
                f"UNet with {len(channel_mult)} levels needs an image size divisible by {factor}, "
                f"got {image_size}; change channel_mult or resize the images."
            )
        self.image_size, self.in_channels = image_size, in_channels
        self.time = TwoTimeEmbedding(time_dim, hidden=4 * channels)
        cond = self.time.out_dim
        self.condition = ConditionEmbedding(cond, num_classes, guidance_input)
        self.inp = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch, res = [channels], channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = nn.ModuleList([_ResBlock(ch, channels * mult, cond, dropout)])
                ch = channels * mult
                if res in attention_resolutions:
                    layers.append(_Attention(ch))
                self.down.append(layers)
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList(
            [_ResBlock(ch, ch, cond, dropout), _Attention(ch), _ResBlock(ch, ch, cond, dropout)]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                layers = nn.ModuleList(
                    [_ResBlock(ch + skips.pop(), channels * mult, cond, dropout)]
                )
                ch = channels * mult
                if res in attention_resolutions:
                    layers.append(_Attention(ch))
                self.up.append(layers)
            if level > 0:
                self.up.append(
                    nn.ModuleList(
                        [
                            nn.Upsample(scale_factor=2, mode="nearest"),
                            nn.Conv2d(ch, ch, 3, padding=1),
                        ]
                    )
                )
                res *= 2
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @staticmethod
    def _run(layers: nn.ModuleList, h: Tensor, c: Tensor) -> Tensor:
        for layer in layers:
            h = layer(h, c) if isinstance(layer, _ResBlock | _Attention) else layer(h)
        return h

    def forward(
        self, x: Tensor, s: Tensor, t: Tensor, y: Tensor | None = None, w: Tensor | None = None
    ) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-1] != self.image_size:
            raise ValueError(
                f"UNet was built for images (B, {self.in_channels}, {self.image_size}, "
                f"{self.image_size}) but got {tuple(x.shape)}; set image_size/in_channels to match."
            )
        c = (self.time(s, t) + self.condition("UNet", y, w)).to(x.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.inp(x)
        hs = [h]
        for layers in self.down:
            h = self._run(layers, h, c)
            hs.append(h)
        h = self._run(self.mid, h, c)
        for layers in self.up:
            if isinstance(layers[0], _ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(layers, h, c)
        return self.out(h).contiguous()
