r"""Latents as training data: a pixel data module seen through a codec.

Training batches are pixels encoded on the device after transfer (online: a fresh posterior draw
:math:`z = (\mu + \sigma\epsilon - \mathrm{shift})\cdot\mathrm{scale}` each time), or, with a
``cache`` file, the posterior moments of the train split computed once and drawn from per step
(FastGen's cached latents). Validation batches are posterior means. Metrics and pictures use the
pixel data module (:attr:`LatentDataModule.pixels`) and :meth:`LatentDataModule.decode`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import instantiate_module
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from flowmap.codecs.base import LatentCodec, codec_identity
from flowmap.codecs.spec import build_codec
from flowmap.data.base import (
    FiniteFlowDataModule,
    FlowDataModule,
    mix_seed,
)
from flowmap.io import load_safetensors
from flowmap.teachers.spec import is_spec

__all__ = ["LatentDataModule", "codec_of", "pixel_data", "trained_codec"]

#: sample at most this many images through the codec at once
ENCODE_BATCH = 256
#: the cached moments' dtype (half the memory of float32; ImageNet-1k at 32×32×4: 21 GB)
CACHE_DTYPE = torch.float16


def _build_pixels(data: Mapping[str, Any]) -> FlowDataModule:
    if not is_spec(data):
        raise ValueError(
            "LatentDataModule's data is the pixel data module as a spec, e.g. {class_path: "
            f"flowmap.data.DigitsDataModule, init_args: {{batch_size: 128}}}}, not {data!r}."
        )
    hp = {"_class_path": data["class_path"], **dict(data.get("init_args") or {})}
    # built inside the CLI's instantiation of the latent module, the pixel module would record
    # the latent module's arguments as its own hyperparameters: it records its own instead
    token = _given_hyperparameters.set(None)
    try:
        return instantiate_module(FlowDataModule, hp)
    finally:
        _given_hyperparameters.reset(token)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LatentDataModule(FlowDataModule):
    r"""The latents :math:`z` of a pixel data module's images through a codec: ``data_shape`` is
    the latent shape; labels, classes and batch size are the pixel data's.

    Args:
        data: the pixel data module, ``{class_path, init_args}``.
        codec: a diffusers ``AutoencoderKL`` folder or a ``class_path`` spec of a
            :class:`~flowmap.codecs.LatentCodec`.
        cache: a ``.safetensors`` file for the train split's posterior moments: written on the
            first fit, then read (and checked to be of this codec and data); ``None``: encode
            every batch on the device.
        sample: draw latents from the posterior (``False``: its mean).
    """

    def __init__(
        self,
        data: dict[str, Any],
        codec: str | dict[str, Any],
        cache: str | None = None,
        sample: bool = True,
    ) -> None:
        pixels = _build_pixels(data)
        super().__init__(pixels.batch_size, pixels.n_val, pixels.num_workers)
        self.save_hyperparameters()
        full = {k: v for k, v in pixels.hparams.items() if not k.startswith("_")}
        self.hparams["data"] = {"class_path": data["class_path"], "init_args": full}
        self.pixels = pixels
        self.codec: LatentCodec = build_codec(codec)
        self.latent = self.codec.latent_shape(pixels.data_shape)  # a wrong shape: one sentence
        self.labels = pixels.labels
        if cache is not None and not isinstance(pixels, FiniteFlowDataModule):
            raise ValueError(
                f"Cached latents need a finite data set, and {type(pixels).__name__} streams "
                "fresh samples; drop cache to encode every batch."
            )
        self.cache, self.sample = cache, sample

    # ----------------------------------------------------------------- the data contract
    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.latent

    @property
    def name(self) -> str:
        """``digits latents``: the pixel data's name, as reports print it."""
        return f"{getattr(self.pixels, 'name', None) or type(self.pixels).__name__} latents"

    @property
    def num_classes(self) -> int | None:
        return self.pixels.num_classes

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return self.pixels.class_names

    def prepare_data(self) -> None:
        """The pixel data's, then the cache written if missing (once, on rank 0)."""
        self.pixels.prepare_data()
        if self.cache is not None and not Path(self.cache).is_file():
            self.write_cache()

    def setup(self, stage: str | None = None) -> None:
        self.pixels.setup(stage)
        if self.cache is not None and stage in (None, "fit"):
            if not Path(self.cache).is_file():  # used outside a Trainer: no prepare_data
                self.write_cache()
            self.check_cache()

    def reference_samples(self, n: int, split: str = "test", seed: int = 0) -> Tensor:
        """Posterior means of ``pixels.reference_samples(n, split, seed)``."""
        return self.encode(self.pixels.reference_samples(n, split, seed), sample=False)

    def train_dataloader(self) -> Any:
        """Pixel batches (encoded after transfer), or with a cache ``[mean, std]`` pairs
        ``(B, 2, *latent)`` drawn from after transfer."""
        if self.cache is None:
            return self.pixels.train_dataloader()
        pairs = CachedLatents(str(self.cache), labels=self.labels)
        if self.batch_size > len(pairs):
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the {len(pairs)} cached latents."
            )
        return DataLoader(
            pairs,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(mix_seed(getattr(self.pixels, "seed", 0), 1)),
        )

    def val_dataloader(self) -> Any:
        """The pixel data's validation batches (encoded to posterior means after transfer)."""
        return self.pixels.val_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Pixels → latents on the batch's device (training: a posterior draw or the cache's
        moments; validation: the posterior mean)."""
        x, rest = (batch, None) if isinstance(batch, Tensor) else (batch[0], list(batch[1:]))
        trainer = self.trainer
        training = trainer is not None and trainer.training
        if training:  # the draw's noise is a function of (seed, step, rank): resume replays it
            seed = mix_seed(
                getattr(self.pixels, "seed", 0), 2, trainer.global_step, trainer.global_rank
            )
            g = torch.Generator(device=x.device).manual_seed(seed)
            z = self.draw(x, g) if self.cache is not None else self.encode(x, self.sample, g)
        else:
            z = self.encode(x, sample=False)
        return z if rest is None else [z, *rest]

    # ----------------------------------------------------------------- codec helpers
    @staticmethod
    def draw(pairs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        r"""Latents from cached ``[mean, std]`` pairs ``(B, 2, *latent)``: :math:`\mu + \sigma\epsilon`."""
        mean, std = pairs.float().unbind(1)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        return mean + std * noise

    def encode(
        self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> Tensor:
        """Scaled latents of pixels ``x`` (in chunks, on ``x``'s device)."""
        self.codec.to(x.device)
        chunks = x.split(ENCODE_BATCH)
        return torch.cat([self.codec.encode(c, sample, generator) for c in chunks])

    def decode(self, z: Tensor) -> Tensor:
        """Pixels of scaled latents ``z`` (in chunks, on ``z``'s device)."""
        self.codec.to(z.device)
        return torch.cat([self.codec.decode(c) for c in z.split(ENCODE_BATCH)])

    # ----------------------------------------------------------------- the cache
    def check_cache(self) -> None:
        """Refuse, in one sentence, a cache written with another codec or for other data."""
        path, n = str(self.cache), self.pixels.num_samples("train")
        meta = CachedLatents(path).metadata
        if meta.get("codec") != codec_identity(self.codec):
            raise ValueError(
                f"The latent cache {path!r} was written with another codec; delete it or give "
                "another cache path."
            )
        if meta.get("count") != str(n):
            raise ValueError(
                f"The latent cache {path!r} holds {meta.get('count')} latents but this data has "
                f"{n} training images; delete it or give another cache path."
            )

    def cached_moments(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(mean, std, labels)`` of the train split in latent space (float32), read whole
        from the checked cache (labels ``None`` if it has none)."""
        self.check_cache()
        state = load_safetensors(str(self.cache), "latent cache")
        return state["mean"].float(), state["std"].float(), state.get("labels")

    def write_cache(self) -> None:
        """Encode the train split once (on the GPU if there is one) into ``cache``: the posterior
        moments in latent space, the labels, and the codec's identity and the count."""
        from safetensors.torch import save_file

        pixels: Any = self.pixels
        device = _device()
        self.codec.to(device)
        means, stds = [], []
        with torch.no_grad():
            for c in pixels.iter_split("train", ENCODE_BATCH):  # streamed: never all pixels
                m, s = self.codec.normalised_moments(c.to(device))
                means.append(m.to(CACHE_DTYPE).cpu())
                stds.append((torch.zeros_like(m) if s is None else s).to(CACHE_DTYPE).cpu())
        state = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}
        if isinstance(pixels, FiniteFlowDataModule) and pixels.labels:
            state["labels"] = pixels.split_labels("train").contiguous()
        path = Path(str(self.cache))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        meta = {"codec": codec_identity(self.codec), "count": str(len(state["mean"]))}
        save_file(state, str(tmp), metadata=meta)
        tmp.replace(path)


class CachedLatents(Dataset):
    """The ``[mean, std]`` pair ``(2, *latent)`` of each cached latent (and its label), read
    from the safetensors file item by item (memory-mapped: an ImageNet cache never sits in RAM)."""

    def __init__(self, path: str, labels: bool = False) -> None:
        self.path, self.labels = path, labels
        self._file: Any = None
        with safe_open(path, framework="pt") as f:
            self.metadata = f.metadata() or {}
            self._len = f.get_slice("mean").get_shape()[0]
            if labels and "labels" not in f.keys():
                raise ValueError(f"The latent cache {path!r} has no labels; write it again.")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Tensor | tuple[Tensor, Tensor]:
        if self._file is None:  # opened in the process (a loader worker) that reads it
            self._file = safe_open(self.path, framework="pt")
        pair = torch.stack(
            [self._file.get_slice("mean")[index], self._file.get_slice("std")[index]]
        )
        if not self.labels:
            return pair
        return pair, self._file.get_slice("labels")[index]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None}


def pixel_data(dm: Any) -> Any:
    """The pixel data module behind ``dm`` (``dm`` itself when it serves pixels)."""
    return dm.pixels if isinstance(dm, LatentDataModule) else dm


def codec_of(dm: Any) -> LatentCodec | None:
    """The codec of a latent data module (``None`` for pixel data)."""
    return dm.codec if isinstance(dm, LatentDataModule) else None


def trained_codec(hparams: Mapping[str, Any] | None) -> LatentCodec | None:
    """The codec of the data a checkpoint was trained on (its ``datamodule_hyper_parameters``),
    ``None`` for pixel data or an unrecorded one."""
    hp = dict(hparams or {})
    if not str(hp.get("_class_path", "")).endswith(".LatentDataModule") or "codec" not in hp:
        return None
    return build_codec(hp["codec"])
