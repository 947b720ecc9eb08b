"""A DDPM-style teacher trained "elsewhere": a diffusers UNet2DModel that predicts the noise on
DDPMScheduler's discrete linear-β schedule (1000 integer timesteps, noise at t = 999), trained on
sklearn's digits the way diffusers' ``train_unconditional.py`` example does (random timestep, add
noise, MSE on ε, AdamW, EMA weights), in a plain torch loop with no flowmap in it but the data.
Saved with ``save_pretrained`` as safetensors: ``<out>/unet`` and ``<out>/scheduler``.

    python recipes/digits_ddpm/train_ddpm.py --out runs/digits_ddpm/teacher [--steps 5000]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from flowmap.data import DigitsDataModule

#: the UNet: two resolutions (8×8, 4×4), attention at 4×4, 0.7M parameters
UNET = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=16,
)
TINY_UNET = {**UNET, "block_out_channels": (16, 16), "norm_num_groups": 8}


def train(
    out: Path, steps: int, batch_size: int, lr: float, seed: int, tiny: bool, device: str = "cpu"
) -> Path:
    """Train and save the model (on ``device``); a finished run with the same settings is reused."""
    settings = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, tiny=tiny)
    done = out / "done.json"
    if done.exists() and json.loads(done.read_text()).get("settings") == settings:
        print(f"ddpm: reusing {out} (same settings)")
        return out
    torch.manual_seed(seed)
    data = DigitsDataModule(batch_size=batch_size, seed=seed)
    data.setup("fit")
    model = UNet2DModel(**(TINY_UNET if tiny else UNET)).to(device)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon"
    )
    ema = EMAModel(model.parameters(), decay=0.999, use_ema_warmup=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10)
    lr_at = lambda k: min(1.0, (k + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * k / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start, step, losses = time.time(), 0, []
    while step < steps:
        for batch in data.train_dataloader():
            x = (batch[0] if isinstance(batch, list | tuple) else batch).to(device)
            noise = torch.randn_like(x)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (x.shape[0],), device=device)
            loss = torch.nn.functional.mse_loss(
                model(scheduler.add_noise(x, noise, t), t).sample, noise
            )
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            ema.step(model.parameters())
            losses.append(loss.item())
            step += 1
            if step % 500 == 0 or step == steps:
                print(
                    f"ddpm step {step}/{steps}: loss {sum(losses[-500:]) / len(losses[-500:]):.4f}"
                )
            if step == steps:
                break
    ema.copy_to(model.parameters())
    model.cpu().save_pretrained(out / "unet", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    seconds = time.time() - start
    done.write_text(
        json.dumps(
            {
                "settings": settings,
                "seconds": seconds,
                "final_loss": sum(losses[-500:]) / len(losses[-500:]),
            },
            indent=2,
        )
    )
    print(f"ddpm: {steps} steps in {seconds:.0f} s, saved to {out}")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    return p


if __name__ == "__main__":
    a = parser().parse_args()
    train(a.out, a.steps, a.batch_size, a.lr, a.seed, a.tiny, a.device)
