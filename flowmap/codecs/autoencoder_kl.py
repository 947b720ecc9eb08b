r"""A diffusers ``AutoencoderKL`` folder as a latent codec (Stable Diffusion, SD3, FLUX, SANA VAEs).

The folder (or its ``vae/`` sub-folder) holds ``config.json`` and
``diffusion_pytorch_model.safetensors``; the model is built from its config and filled from the
safetensors file (pickle weights are refused, never read). The affine comes from the config:
:math:`z = (u - \mathrm{shift\_factor})\cdot\mathrm{scaling\_factor}`, or per channel
:math:`z = (u - m_c)\cdot\mathrm{scaling\_factor}/s_c` when it gives ``latents_mean``/``latents_std``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from flowmap.codecs.base import LatentCodec
from flowmap.io import DIFFUSERS_WEIGHTS, diffusers_weights, load_safetensors

__all__ = ["AutoencoderKLCodec"]


def _vae_folder(folder: str) -> Path:
    """The folder that holds the VAE's config and safetensors weights (itself or ``vae/``)."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(
            f"The codec folder {folder!r} does not exist; give the folder a diffusers "
            "AutoencoderKL was saved to (save_pretrained), or its pipeline folder."
        )
    for d in (root, root / "vae"):
        if (d / "config.json").is_file():
            diffusers_weights(d, "VAE")  # safetensors, or a one-sentence refusal
            return d
    raise ValueError(
        f"The codec folder {folder!r} holds no config.json (looked in it and in vae/); save the "
        "AutoencoderKL with save_pretrained."
    )


class AutoencoderKLCodec(LatentCodec):
    """A diffusers ``AutoencoderKL``: the encoder's diagonal Gaussian posterior, the decoder, and
    the config's ``scaling_factor``/``shift_factor`` (or per-channel ``latents_mean/std``).

    Args:
        folder: the VAE's folder (or a pipeline folder with a ``vae/`` sub-folder).
        scale: override of the config's scale (one number or one per latent channel).
        shift: override of the config's shift.
    """

    def __init__(
        self,
        folder: str,
        scale: float | Sequence[float] | None = None,
        shift: float | Sequence[float] | None = None,
    ) -> None:
        try:
            import diffusers
        except ImportError:
            raise ValueError(
                "An AutoencoderKL codec needs the diffusers extra; install it with "
                "pip install 'flowmap[diffusers]'."
            ) from None
        d = _vae_folder(folder)
        config = json.loads((d / "config.json").read_text())
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(
                f"{str(d)!r} holds a {config['_class_name']}, not an AutoencoderKL; give an "
                "AutoencoderKL folder or write a LatentCodec for this model."
            )
        cfg_scale, cfg_shift = self._affine_from(config)
        super().__init__(
            cfg_scale if scale is None else scale, cfg_shift if shift is None else shift
        )
        self.vae = diffusers.AutoencoderKL.from_config(config)
        state = load_safetensors(d / DIFFUSERS_WEIGHTS, "AutoencoderKL weights")
        missing, unexpected = self.vae.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"The weights in {str(d)!r} do not fit its config.json ({len(missing)} missing, "
                f"{len(unexpected)} unexpected keys, e.g. {(missing or unexpected)[0]}); save the "
                "VAE and its config together."
            )
        self.vae.requires_grad_(False).eval()
        self.folder = str(folder)
        self.config = {k: v for k, v in config.items() if not k.startswith("_")}
        self.weight_files = (str(d / DIFFUSERS_WEIGHTS), str(d / "config.json"))

    @staticmethod
    def _affine_from(config: dict[str, Any]) -> tuple[Any, Any]:
        factor = float(config.get("scaling_factor") or 1.0)
        mean, std = config.get("latents_mean"), config.get("latents_std")
        if mean is not None and std is not None:
            return [factor / float(s) for s in std], [float(m) for m in mean]
        return factor, float(config.get("shift_factor") or 0.0)

    @property
    def downsampling(self) -> int:
        """The spatial factor between pixels and latents, :math:`2^{\\text{levels} - 1}`."""
        return 2 ** (len(self.config.get("block_out_channels", (64,))) - 1)

    def latent_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        c, h, w = (int(v) for v in data_shape)
        f, cin = self.downsampling, int(self.config.get("in_channels", 3))
        if c != cin or h % f or w % f:
            raise ValueError(
                f"The VAE takes images of {cin} channels with sides divisible by {f}, but the data "
                f"has shape {list(data_shape)}; use data of its channels and size, or another VAE."
            )
        return (int(self.config.get("latent_channels", 4)), h // f, w // f)

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dist = self.vae.encode(x).latent_dist
        return dist.mean, dist.std

    def decode_raw(self, u: Tensor) -> Tensor:
        return self.vae.decode(u).sample

    def identity_facts(self) -> dict[str, Any]:
        return {**super().identity_facts(), "config": self.config}
