r"""Latent codecs: the flow runs on scaled latents :math:`z`, pictures and FID on pixels :math:`x`.

A codec encodes :math:`x` into the moments of a posterior, draws (or takes the mean of) a raw
latent :math:`u`, and scales it per channel: :math:`z = (u - \mathrm{shift})\cdot\mathrm{scale}`;
``decode`` inverts the affine and runs the decoder. Codecs are frozen: no gradients, eval mode.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flowmap.io import file_sha256

__all__ = ["LatentCodec", "IdentityCodec", "codec_identity"]


def _per_channel(value: float | Sequence[float], name: str) -> Tensor:
    v = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if v.numel() == 0 or not torch.isfinite(v).all():
        raise ValueError(f"The codec's {name} must be finite numbers, got {value!r}.")
    return v


class LatentCodec(nn.Module, ABC):
    r"""Encoder :math:`x \mapsto (\mu, \sigma)` of raw latents, decoder :math:`u \mapsto x`, and the
    per-channel affine :math:`z = (u - \mathrm{shift})\cdot\mathrm{scale}` (one number or one per
    latent channel) that brings the latents to about unit scale.

    Subclasses implement :meth:`moments`, :meth:`decode_raw` and :meth:`latent_shape`.
    """

    def __init__(
        self, scale: float | Sequence[float] = 1.0, shift: float | Sequence[float] = 0.0
    ) -> None:
        super().__init__()
        scale_t, shift_t = _per_channel(scale, "scale"), _per_channel(shift, "shift")
        if (scale_t == 0).any():
            raise ValueError(f"The codec's scale must be nonzero, got {scale!r}.")
        self.register_buffer("scale", scale_t, persistent=False)
        self.register_buffer("shift", shift_t, persistent=False)
        self.requires_grad_(False).train(False)

    def train(self, mode: bool = True) -> LatentCodec:
        """Always eval mode: a codec never trains here."""
        return super().train(False)

    # ---------------------------------------------------------------- what subclasses define
    @abstractmethod
    def moments(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Posterior mean and standard deviation of the raw latents of pixels ``x`` (``None``: a
        deterministic encoder)."""

    @abstractmethod
    def decode_raw(self, u: Tensor) -> Tensor:
        """Pixels from raw (unscaled) latents ``u``."""

    @abstractmethod
    def latent_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of one latent for pixels of ``data_shape`` (a codec that cannot take that
        shape says so in one sentence)."""

    # ---------------------------------------------------------------- the affine and its use
    def _affine(self, v: Tensor, like: Tensor) -> Tensor:
        if v.numel() == 1:
            return v.to(like).reshape(())
        if like.ndim < 2 or like.shape[1] != v.numel():
            raise ValueError(
                f"The codec's per-channel affine has {v.numel()} channels but the latents have "
                f"shape {list(like.shape)}; give one scale and shift per latent channel."
            )
        return v.to(like).reshape(1, -1, *([1] * (like.ndim - 2)))

    def normalise(self, u: Tensor) -> Tensor:
        r""":math:`z = (u - \mathrm{shift})\cdot\mathrm{scale}`."""
        return (u - self._affine(self.shift, u)) * self._affine(self.scale, u)

    def denormalise(self, z: Tensor) -> Tensor:
        r""":math:`u = z / \mathrm{scale} + \mathrm{shift}`."""
        return z / self._affine(self.scale, z) + self._affine(self.shift, z)

    def normalised_moments(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        r"""The posterior in latent space: :math:`((\mu - \mathrm{shift})\,\mathrm{scale},\
        \sigma\,|\mathrm{scale}|)`."""
        mean, std = self.moments(x)
        z_std = None if std is None else std * self._affine(self.scale, std).abs()
        return self.normalise(mean), z_std

    @torch.no_grad()
    def encode(
        self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""Scaled latents :math:`z = (\mu + \sigma\epsilon - \mathrm{shift})\cdot\mathrm{scale}`
        of pixels ``x`` (``sample=False``: the posterior mean, :math:`\epsilon = 0`)."""
        mean, std = self.moments(x)
        if sample and std is not None:
            noise = torch.randn(
                mean.shape, generator=generator, device=mean.device, dtype=mean.dtype
            )
            mean = mean + std * noise
        return self.normalise(mean)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        r"""Pixels of scaled latents: :math:`x = D(z / \mathrm{scale} + \mathrm{shift})`."""
        return self.decode_raw(self.denormalise(z))

    # ---------------------------------------------------------------- identity
    weight_files: tuple[str, ...] = ()

    def identity_facts(self) -> dict[str, Any]:
        """What defines this codec besides its weight files (class, affine, settings)."""
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "scale": self.scale.tolist(),
            "shift": self.shift.tolist(),
        }


def codec_identity(codec: LatentCodec) -> str:
    """The SHA-256 that names a codec: its facts with the contents of its weight files."""
    hashes = sorted(file_sha256(f) for f in codec.weight_files)
    blob = json.dumps([codec.identity_facts(), hashes], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class IdentityCodec(LatentCodec):
    """Pixels are the latents: :math:`z = x` (scale 1, shift 0, deterministic), so training and
    sampling through it are those of pixel space, bit for bit."""

    def __init__(self) -> None:
        super().__init__()

    def moments(self, x: Tensor) -> tuple[Tensor, None]:
        return x, None

    def decode_raw(self, u: Tensor) -> Tensor:
        return u

    def latent_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(int(d) for d in data_shape)

    def encode(
        self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z
