"""Networks :math:`\\phi(x, s, t)`; each takes ``(x, s, t)`` so one class serves a teacher and a flow map."""

from flowmap.nets.adapter import TwoTimeAdapter
from flowmap.nets.dit import DiT
from flowmap.nets.embedding import SinusoidalEmbedding, TwoTimeEmbedding
from flowmap.nets.lora import LoRA, merge_lora, trainable_fraction
from flowmap.nets.mlp import MLP
from flowmap.nets.unet import UNet

__all__ = [
    "DiT",
    "MLP",
    "UNet",
    "TwoTimeAdapter",
    "SinusoidalEmbedding",
    "TwoTimeEmbedding",
    "LoRA",
    "merge_lora",
    "trainable_fraction",
]
