r"""Latent codecs (:mod:`flowmap.codecs.base`): a flow on scaled latents
:math:`z = (u - \mathrm{shift})\cdot\mathrm{scale}` of an encoder's :math:`u`, pictures and FID on
decoded pixels; and the data module that serves latents (online or from cached moments).

A codec is given as plain data (what a data module's hyperparameters hold): a diffusers
``AutoencoderKL`` folder path, or a ``{class_path, init_args}`` spec of a
:class:`LatentCodec` (``flowmap.codecs.IdentityCodec``, ``flowmap.codecs.AutoencoderKLCodec``).
"""

from __future__ import annotations

from flowmap.codecs.autoencoder_kl import AutoencoderKLCodec
from flowmap.codecs.base import IdentityCodec, LatentCodec, codec_identity
from flowmap.codecs.data import LatentDataModule, codec_of, pixel_data, trained_codec
from flowmap.codecs.spec import build_codec

__all__ = [
    "AutoencoderKLCodec",
    "IdentityCodec",
    "LatentCodec",
    "LatentDataModule",
    "build_codec",
    "codec_identity",
    "codec_of",
    "pixel_data",
    "trained_codec",
]
