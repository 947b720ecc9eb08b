"""The one place a codec spec (plain data) becomes a :class:`~flowmap.codecs.LatentCodec`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowmap.codecs.autoencoder_kl import AutoencoderKLCodec
from flowmap.codecs.base import LatentCodec
from flowmap.teachers.spec import build_component, is_spec

__all__ = ["build_codec"]


def build_codec(spec: str | Mapping[str, Any] | LatentCodec) -> LatentCodec:
    """The codec a spec names: a folder path (a diffusers ``AutoencoderKL``), a ``class_path``
    spec of a :class:`LatentCodec`, or a codec built in Python (taken as it is)."""
    if isinstance(spec, LatentCodec):
        return spec
    if isinstance(spec, str):
        return AutoencoderKLCodec(spec)
    if is_spec(spec):
        codec = build_component(spec)
        if isinstance(codec, LatentCodec):
            return codec
        raise ValueError(
            f"{spec['class_path']} is not a LatentCodec; name flowmap.codecs.IdentityCodec, "
            "flowmap.codecs.AutoencoderKLCodec or a subclass of flowmap.codecs.LatentCodec."
        )
    raise ValueError(
        f"A codec is a diffusers AutoencoderKL folder or a class_path spec, not {spec!r}."
    )
