"""The latent digits codec: a small diffusers ``AutoencoderKL`` (8×8×1 pixels → 4×4×C latents, a
diagonal-Gaussian posterior) trained on sklearn's digits train split in a plain torch loop —
reconstruction MSE plus a small KL to N(0, I), AdamW — the shape of Stable Diffusion's VAE at
toy size. After training, ``shift_factor`` and ``scaling_factor`` are set so that the posterior
draws of the train split have mean 0 and standard deviation 1 (SD3/FLUX's convention), and the
VAE is saved with ``save_pretrained`` as safetensors.

    python recipes/digits_latent/train_codec.py --out runs/digits_latent/codec [--steps 4000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from flowmap.data import DigitsDataModule

#: two resolutions (8×8, 4×4), a mid-block with attention; ``latent_channels`` set per run
VAE = dict(
    in_channels=1,
    out_channels=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=16,
    sample_size=8,
)
TINY_VAE = {**VAE, "block_out_channels": (8, 16), "norm_num_groups": 4}


def train(
    out: Path,
    steps: int = 4000,
    latent_channels: int = 4,
    kl_weight: float = 1e-4,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    tiny: bool = False,
    device: str = "cpu",
) -> Path:
    """Train and save the VAE; a finished run with the same settings is reused."""
    settings = dict(
        steps=steps, latent_channels=latent_channels, kl_weight=kl_weight,
        batch_size=batch_size, lr=lr, seed=seed, tiny=tiny,
    )  # fmt: skip
    done = out / "done.json"
    if done.exists() and json.loads(done.read_text()).get("settings") == settings:
        print(f"codec: reusing {out} (same settings)")
        return out
    torch.manual_seed(seed)
    data = DigitsDataModule(batch_size=batch_size, seed=seed)
    data.setup("fit")
    vae = AutoencoderKL(**(TINY_VAE if tiny else VAE), latent_channels=latent_channels).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start, step = time.time(), 0
    while step < steps:
        for x in data.train_dataloader():
            x = x.to(device)
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            mse = (recon - x).square().mean()
            kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
            loss = mse + kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 500 == 0 or step == steps:
                print(f"codec step {step}: mse {mse.item():.5f}, kl/elem {kl.item():.3f}")
            if step == steps:
                break
    vae.eval()
    with torch.no_grad():  # the affine: posterior draws of the train split to mean 0, std 1
        train = data.reference_samples(data.num_samples("train"), "train", seed=0).to(device)
        draws = torch.cat([vae.encode(c).latent_dist.sample() for c in train.split(256)])
        test = data.reference_samples(data.num_samples("test"), "test", seed=0).to(device)
        recon = torch.cat([vae(c).sample for c in test.split(256)])
        test_mse = (recon - test).square().mean().item()
    vae.register_to_config(shift_factor=draws.mean().item(), scaling_factor=1 / draws.std().item())
    vae.save_pretrained(out, safe_serialization=True)
    facts = {
        "settings": settings,
        "seconds": time.time() - start,
        "test_mse": test_mse,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "shift_factor": vae.config.shift_factor,
        "scaling_factor": vae.config.scaling_factor,
    }
    done.write_text(json.dumps(facts, indent=2))
    print(f"codec: {out} in {facts['seconds']:.0f} s, test MSE {test_mse:.5f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args()
    train(a.out, a.steps, a.latent_channels, a.kl_weight, tiny=a.tiny)


if __name__ == "__main__":
    main()
