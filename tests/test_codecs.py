"""Latent codecs: the identity codec changes nothing, the AutoencoderKL wrapper is the VAE with its
config's affine, cached latents draw from the right posterior, and wrong input is one sentence."""

import json

import lightning as L
import pytest
import torch

from flowmap.codecs import (
    AutoencoderKLCodec,
    IdentityCodec,
    LatentDataModule,
    build_codec,
    codec_identity,
    trained_codec,
)
from flowmap.data import DigitsDataModule
from flowmap.data.base import dataset_identity, from_uint8
from flowmap.nets import UNet
from flowmap.training import VelocityModule

diffusers = pytest.importorskip("diffusers")

DIGITS = {"class_path": "flowmap.data.DigitsDataModule", "init_args": {"batch_size": 16}}


def tiny_vae(folder, channels=1, latent=2, safe=True, **config):
    """A random two-level AutoencoderKL (8×8 → 4×4) saved with ``save_pretrained``."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent,
        norm_num_groups=4,
        sample_size=8,
        **config,
    )
    vae.save_pretrained(folder, safe_serialization=safe)
    return vae.eval()


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    return folder, tiny_vae(folder, scaling_factor=0.7, shift_factor=0.2)


def test_identity_codec_is_the_identity():
    codec, x = IdentityCodec(), torch.randn(4, 1, 8, 8)
    assert codec.encode(x) is x and codec.decode(x) is x
    assert codec.latent_shape((1, 8, 8)) == (1, 8, 8)


def test_autoencoder_kl_codec_is_the_vae_with_its_configs_scale_and_shift(vae_folder):
    folder, vae = vae_folder
    codec = build_codec(str(folder))
    assert isinstance(codec, AutoencoderKLCodec)
    assert codec.latent_shape((1, 8, 8)) == (2, 4, 4)
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        z = codec.encode(x, sample=False)
        torch.testing.assert_close(z, (mean - 0.2) * 0.7)
        torch.testing.assert_close(codec.decode(z), vae.decode(mean).sample, atol=1e-5, rtol=1e-5)
        # a draw: the posterior mean plus its spread, scaled
        g = torch.Generator().manual_seed(1)
        std = vae.encode(x).latent_dist.std
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
        drawn = codec.encode(x, sample=True, generator=g)
        torch.testing.assert_close(drawn, (mean + std * noise - 0.2) * 0.7)


def test_per_channel_latents_mean_and_std_give_a_per_channel_affine(tmp_path):
    vae = tiny_vae(tmp_path, scaling_factor=2.0, latents_mean=[0.5, -1.0], latents_std=[2.0, 4.0])
    codec = AutoencoderKLCodec(str(tmp_path))
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    m, s = torch.tensor([0.5, -1.0]).view(1, 2, 1, 1), torch.tensor([2.0, 4.0]).view(1, 2, 1, 1)
    torch.testing.assert_close(codec.encode(x, sample=False), (mean - m) * 2.0 / s)
    z = torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(codec.denormalise(codec.normalise(z)), z)


def test_a_pickle_only_vae_and_a_missing_folder_are_refused(tmp_path):
    tiny_vae(tmp_path / "pickled", safe=False)
    with pytest.raises(ValueError, match="never unpickles; re-save the VAE with save_pretrained"):
        AutoencoderKLCodec(str(tmp_path / "pickled"))
    with pytest.raises(ValueError, match="does not exist"):
        build_codec(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="is not a LatentCodec"):
        build_codec({"class_path": "flowmap.nets.MLP", "init_args": {"data_shape": [2]}})


def test_data_of_the_wrong_shape_for_the_vae_is_one_sentence_at_construction(tmp_path):
    tiny_vae(tmp_path, channels=3)
    with pytest.raises(
        ValueError, match=r"takes images of 3 channels .* data has shape \[1, 8, 8\]"
    ):
        LatentDataModule(DIGITS, str(tmp_path))
    with pytest.raises(ValueError, match="pixel data module as a spec"):
        LatentDataModule({"batch_size": 16}, str(tmp_path))


def test_latent_data_serves_the_codecs_latents_and_names_its_codec(vae_folder):
    folder, _ = vae_folder
    dm = LatentDataModule(DIGITS, str(folder))
    dm.setup("fit")
    assert dm.data_shape == (2, 4, 4) and dm.batch_size == 16 and dm.name == "digits latents"
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (16, 1, 8, 8)  # pixels, encoded on the device after transfer
    assert dm.on_after_batch_transfer(batch, 0).shape == (16, 2, 4, 4)
    ref = dm.reference_samples(5, "test")
    torch.testing.assert_close(ref, dm.codec.encode(dm.pixels.reference_samples(5, "test"), False))
    # the data's identity: the pixel data's (loader settings left out) and the codec
    ident = dataset_identity(dict(dm.hparams))
    assert ident["data"] == {"_class_path": "flowmap.data.DigitsDataModule"}
    assert ident["codec"] == str(folder)
    assert isinstance(
        trained_codec(dict(dm.hparams, _class_path="x.LatentDataModule")), AutoencoderKLCodec
    )
    assert trained_codec({"_class_path": "flowmap.data.DigitsDataModule"}) is None


def test_cached_latents_draw_from_the_posterior_with_its_mean_and_std(vae_folder, tmp_path):
    folder, _ = vae_folder
    cache = tmp_path / "latents.safetensors"
    dm = LatentDataModule(
        {**DIGITS, "init_args": {"batch_size": 64, "labels": True}}, str(folder), cache=str(cache)
    )
    dm.setup("fit")
    assert cache.is_file()
    mean, std, labels = dm.cached_moments()
    pixels = dm.pixels
    n = pixels.num_samples("train")
    assert mean.shape == std.shape == (n, 2, 4, 4) and torch.equal(
        labels, pixels.split_labels("train")
    )
    first = pixels.split_data("train")[:4]  # digits are stored in model space, float32
    m, s = dm.codec.normalised_moments(first)
    torch.testing.assert_close(mean[:4], m, atol=2e-3, rtol=2e-3)  # float16 cache
    torch.testing.assert_close(std[:4], s, atol=2e-3, rtol=2e-3)
    # one cached sample drawn 4000 times: its draws have the cached mean and std
    pair = torch.stack([mean[:1], std[:1]], 1).expand(4000, -1, -1, -1, -1)
    torch.manual_seed(0)
    draws = dm.draw(pair)
    torch.testing.assert_close(draws.mean(0), mean[0], atol=4 * float(std[0].max()) / 60, rtol=0)
    torch.testing.assert_close(draws.std(0), std[0], atol=0, rtol=0.08)
    batch = next(iter(dm.train_dataloader()))  # [mean/std pairs, labels]
    assert batch[0].shape == (64, 2, 2, 4, 4) and batch[1].shape == (64,)
    # the cache of another codec is refused, in one sentence
    other = tmp_path / "other"
    tiny_vae(other, scaling_factor=0.5)
    again = LatentDataModule(DIGITS, str(other), cache=str(cache))
    with pytest.raises(ValueError, match="was written with another codec; delete it"):
        again.setup("fit")


def test_streaming_data_cannot_be_cached(vae_folder, tmp_path):
    toy = {"class_path": "flowmap.data.Toy2DDataModule", "init_args": {"name": "moons"}}
    with pytest.raises(ValueError, match="takes images|need a finite data set"):
        LatentDataModule(
            toy, {"class_path": "flowmap.codecs.IdentityCodec"}, cache=str(tmp_path / "c")
        )


def _fit_teacher(dm, steps=3):
    """The tiny U-Net's weights before and after ``steps`` CFM steps on ``dm``."""
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, channels=8, channel_mult=[1, 2], num_res_blocks=1)
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    module = VelocityModule(net, ema_decay=None)
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
    )  # fmt: skip
    L.seed_everything(0)
    trainer.fit(module, dm)
    return before, torch.cat([p.detach().flatten() for p in module.net.parameters()])


def test_training_through_the_identity_codec_is_bit_identical_to_pixel_space():
    start, pixels = _fit_teacher(DigitsDataModule(batch_size=16))
    _, latent = _fit_teacher(
        LatentDataModule(DIGITS, {"class_path": "flowmap.codecs.IdentityCodec"})
    )
    assert not torch.equal(pixels, start)  # it trained
    assert torch.equal(pixels, latent)


def test_codec_identity_follows_the_weights_and_the_affine(vae_folder, tmp_path):
    folder, _ = vae_folder
    a = build_codec(str(folder))
    assert codec_identity(a) == codec_identity(build_codec(str(folder)))
    tiny_vae(tmp_path / "rescaled", scaling_factor=0.5, shift_factor=0.2)  # same weights (seed)
    assert codec_identity(build_codec(str(tmp_path / "rescaled"))) != codec_identity(a)
    tiny_vae(tmp_path / "retrained", scaling_factor=0.7, shift_factor=0.2)
    torch.manual_seed(5)
    state = {k: torch.randn_like(v) for k, v in a.vae.state_dict().items()}
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "retrained" / "diffusion_pytorch_model.safetensors"))
    assert codec_identity(build_codec(str(tmp_path / "retrained"))) != codec_identity(a)


@pytest.mark.slow
def test_latent_digits_pipeline_reports_decoded_rows_beside_the_codec_floor(tmp_path, capsys):
    """Codec → latent teacher → latent maps → report on pixels, tiny; then `flowmap sample`
    decodes, and a student fitted on another codec's latents is refused."""
    import importlib.util
    from pathlib import Path

    import numpy as np

    from flowmap.apps.cli import main as flowmap_main
    from flowmap.apps.lightning_cli import cli_main

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    spec = importlib.util.spec_from_file_location(
        "latent_pipeline", recipes / "digits_latent/pipeline.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    res = module.main(["--out", str(tmp_path), "--tiny", "--losses", "lagrangian"])
    assert res["dataset"] == "digits latents" and res["metric"] == "fid"
    assert res["codec_floor"]["value"] > 0 and res["floor"]["value"] > 0
    assert "codec floor" in (tmp_path / "report.md").read_text()
    with np.load(tmp_path / "samples.npz") as z:  # rows are decoded pixels
        assert z["floor"].shape[1:] == z[z.files[0]].shape[1:] == (1, 8, 8)
    ckpt = json.loads((tmp_path / "lagrangian" / "done.json").read_text())["checkpoint"]
    out = tmp_path / "s.npz"
    assert flowmap_main(["sample", "--ckpt", ckpt, "--n", "6", "--out", str(out)]) in (0, None)
    with np.load(out) as z:
        assert z["samples"].shape == (6, 1, 8, 8) and z["latents"].shape == (6, 2, 4, 4)
    # the student's data through another codec than the teacher's: one sentence, no step
    other = tmp_path / "other-codec"
    tiny_vae(other)
    teacher = json.loads((tmp_path / "teacher" / "done.json").read_text())["checkpoint"]
    with pytest.raises(ValueError, match=r"was trained on LatentDataModule\(.*codec="):
        cli_main(
            [
                "fit",
                "--config",
                str(recipes / "digits_latent/lagrangian.yaml"),
                f"--model.teacher={teacher}",
                f"--data.init_args.codec={other}",
                "--trainer.max_steps=1",
                f"--trainer.default_root_dir={tmp_path / 'refused'}",
            ]
        )
    assert not list((tmp_path / "refused").rglob("*.ckpt"))
    # a latent teacher given pixel data: one sentence, no step
    with pytest.raises(
        ValueError,
        match=r"trained on data of shape \[2, 4, 4\] but this data has shape \[1, 8, 8\]",
    ):
        cli_main(
            [
                "fit",
                "--config",
                str(recipes / "digits_latent/lagrangian.yaml"),
                f"--model.teacher={teacher}",
                "--data=flowmap.data.DigitsDataModule",
                "--data.batch_size=32",
                "--trainer.max_steps=1",
                f"--trainer.default_root_dir={tmp_path / 'refused'}",
            ]
        )
    assert not list((tmp_path / "refused").rglob("*.ckpt"))


def test_an_image_folder_streams_into_the_cache_in_its_split_order(tmp_path):
    from tests.fakes import make_image_folder

    root = make_image_folder(tmp_path / "images", n=10, size=8)
    folder = {
        "class_path": "flowmap.data.ImageFolderDataModule",
        "init_args": {"root": str(root), "image_size": 8, "batch_size": 2},
    }
    identity = {"class_path": "flowmap.codecs.IdentityCodec"}
    dm = LatentDataModule(folder, identity, cache=str(tmp_path / "c.safetensors"))
    dm.prepare_data()
    dm.setup("fit")
    mean, std, _ = dm.cached_moments()
    split = torch.cat(list(dm.pixels.iter_split("train", 3)))  # streamed, 3 files at a time
    assert torch.equal(split, from_uint8(dm.pixels.split_data("train")))
    torch.testing.assert_close(mean, split, atol=4e-3, rtol=0)  # float16 storage
    assert torch.equal(std, torch.zeros_like(std))


def _class_folder(root, classes=2, per_class=6, size=16):
    """RGB images in one sub-folder per class (an ImageNet layout at toy size)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.mark.slow
def test_imagenet256_latent_recipes_run_with_fast_dev_run_on_a_stand_in(tmp_path):
    """The GPU recipes (DiT-B/2 on a VAE's latents, cached moments) on a CPU stand-in: a random
    VAE, a folder of 16×16 images in two classes, a tiny DiT; one step each."""
    from pathlib import Path

    from flowmap.apps.lightning_cli import cli_main

    recipes = Path(__file__).resolve().parents[1] / "recipes" / "imagenet256_latent"
    tiny_vae(tmp_path / "vae", channels=3, latent=4)
    images = _class_folder(tmp_path / "images")
    pixels = {
        "class_path": "flowmap.data.ImageFolderDataModule",
        "init_args": {
            "root": str(images),
            "image_size": 16,
            "channels": 3,
            "labels": True,
            "batch_size": 4,
            "test_fraction": 0.25,
        },
    }
    dit = [
        "--model.net.init_args.image_size=8",
        "--model.net.init_args.width=32",
        "--model.net.init_args.depth=1",
        "--model.net.init_args.heads=2",
        "--model.net.init_args.num_classes=2",
    ]
    stand_in = [
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
        "--trainer.enable_progress_bar=false", f"--data.init_args.data={json.dumps(pixels)}",
        f"--data.init_args.codec={tmp_path / 'vae'}", f"--data.init_args.cache={tmp_path / 'lat.safetensors'}", *dit,
    ]  # fmt: skip

    def one_step(config, *extra):
        cli = cli_main(["--config", str(recipes / config), *stand_in, *extra], run=False)
        before = torch.cat([p.detach().flatten().clone() for p in cli.model.net.parameters()])
        cli.trainer.fit(cli.model, cli.datamodule)
        after = torch.cat([p.detach().flatten() for p in cli.model.net.parameters()])
        assert cli.trainer.global_step == 1 and not torch.equal(before, after)
        assert cli.datamodule.data_shape == (4, 8, 8)
        return cli

    one_step(
        "teacher.yaml",
        "--trainer.fast_dev_run=true",
        f"--trainer.default_root_dir={tmp_path / 'dev'}",
    )
    assert (tmp_path / "lat.safetensors").is_file()  # the cache, written on the first fit
    root = tmp_path / "teacher"
    one_step(
        "teacher.yaml",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={root}",
    )
    ckpt = root / "checkpoints" / "last.ckpt"
    for loss in ("lagrangian", "eulerian", "semigroup"):
        one_step(
            f"{loss}.yaml",
            "--trainer.fast_dev_run=true",
            f"--model.teacher={ckpt}",
            f"--trainer.default_root_dir={tmp_path / loss}",
        )


def test_a_training_draw_is_a_function_of_the_step_so_a_resumed_run_replays_it(vae_folder):
    from types import SimpleNamespace

    folder, _ = vae_folder
    dm = LatentDataModule(DIGITS, str(folder))
    x = dm.pixels.reference_samples(8, "train")
    dm.trainer = SimpleNamespace(training=True, global_step=7, global_rank=0)
    first = dm.on_after_batch_transfer(x, 0)
    torch.manual_seed(123)  # the global RNG (the module's noise) plays no part
    assert torch.equal(dm.on_after_batch_transfer(x, 0), first)
    dm.trainer.global_step = 8
    assert not torch.equal(dm.on_after_batch_transfer(x, 0), first)
    dm.trainer.training = False  # validation: the posterior mean
    torch.testing.assert_close(dm.on_after_batch_transfer(x, 0), dm.codec.encode(x, sample=False))
