"""Foreign teachers through the package's front doors: a diffusers folder (the ``diffusers``
extra; skipped cleanly without it) and a plain ``nn.Module`` velocity net with safetensors
weights, distilled through ``flowmap fit``, reported and sampled; and the one-sentence errors."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from flowmap.apps.cli import main as flowmap_main
from flowmap.apps.lightning_cli import cli_main
from flowmap.io import UnsafeFileError, load_safetensors
from flowmap.teachers import build_teacher
from flowmap.training import FlowMapModule, load_module, read_checkpoint
from flowmap.training.teachers import load_teacher
from tests.fakes import VelocityNet

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = [  # an MLP student of its own (the digits recipes' maps copy the teacher's net)
    "--model.net=flowmap.nets.MLP",
    "--model.net.data_shape=[1,8,8]",
    "--model.net.width=16",
    "--model.net.depth=1",
    "--data.batch_size=32",
    "--trainer.enable_progress_bar=false",
    "--trainer.max_steps=3",
]


def tiny_unet2d(dtype: torch.dtype = torch.float32):
    """A seeded random diffusers UNet2DModel on 1×8×8 with attention at 4×4 (0.02M parameters)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).to(dtype)


def tiny_unet_folder(root: Path, prediction: str = "epsilon") -> Path:
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet2d()
    unet.save_pretrained(root / "unet", safe_serialization=True)
    diffusers.DDPMScheduler(prediction_type=prediction).save_pretrained(root / "scheduler")
    return root


def test_a_diffusers_ddpm_folder_is_the_velocity_of_its_own_alphas_cumprod(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from flowmap.teachers.diffusers import DiffusersTeacher

    folder = tiny_unet_folder(tmp_path)
    teacher = DiffusersTeacher(str(folder))
    assert teacher.prediction == "epsilon" and teacher.data_shape == (1, 8, 8)
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True)
    abar = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler").alphas_cumprod.double()
    taus, grid = teacher.ddim_times(5)  # student times whose native times are whole steps
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = grid[:-1].float()
    got = teacher(x, t)
    # by hand, from diffusers' own schedule: x_τ = g/σ_t x, x̂1 = (x_τ - g ε̂)/a, b = x̂1 - ε̂
    a, g = abar[taus.long()].sqrt(), (1 - abar[taus.long()]).sqrt()
    x_tau = (g / (1 - grid[:-1])).reshape(-1, 1, 1, 1) * x.double()
    with torch.no_grad():
        eps = unet(x_tau.float(), taus.long()).sample.double()
    want = (x_tau - g.reshape(-1, 1, 1, 1) * eps) / a.reshape(-1, 1, 1, 1) - eps
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_our_ddim_is_diffusers_ddim_scheduler(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from flowmap.teachers.diffusers import DiffusersTeacher

    teacher = DiffusersTeacher(str(tiny_unet_folder(tmp_path)))
    sched = diffusers.DDIMScheduler(
        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True
    )
    sched.set_timesteps(4)
    taus, grid = teacher.ddim_times(4)
    assert sched.timesteps.tolist() == taus.long().tolist()
    x0 = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = x0 * float((1 - teacher.schedule.alphas_cumprod[999]).sqrt() / (1 - grid[0]))  # x_τ0 = r x0
    with torch.no_grad():
        for k in sched.timesteps:
            x = sched.step(teacher.model(x, k).sample, k, x).prev_sample
    torch.testing.assert_close(teacher.ddim(x0, 4).x, x, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_the_ddpm_recipe_distils_through_the_cli_reports_ddim_and_samples(tmp_path, capsys):
    """A tiny random UNet2DModel + DDPMScheduler (trained 20 steps) → three flow maps by
    ``flowmap fit`` with the teacher given as a folder → report with DDIM rows → ``flowmap sample``
    of the folder and of a map."""
    pytest.importorskip("diffusers")
    spec = importlib.util.spec_from_file_location(
        "ddpm_pipeline", RECIPES / "digits_ddpm/pipeline.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    res = module.main(["--out", str(tmp_path), "--tiny"])
    methods = {(r["method"], r["nfe"]) for r in res["rows"]}
    assert {("teacher/ddim", 1), ("teacher/ddim", 2), ("teacher/heun", 2)} <= methods
    assert {("flowmap/lagrangian", 1), ("flowmap/semigroup", 2)} <= methods
    assert all(v < 1e-3 for v in res["ddim_vs_euler"].values()), res["ddim_vs_euler"]
    assert "## DDIM and Euler" in (tmp_path / "report.md").read_text()
    ck = read_checkpoint(tmp_path / "lagrangian/checkpoints/last.ckpt")
    assert (
        ck["flowmap_teacher"] == str(tmp_path / "teacher")
        and len(ck["flowmap_teacher_sha256"]) == 64
    )
    # the folder samples like a checkpoint, with its DDIM
    flowmap_main(
        [
            "sample",
            "--ckpt",
            str(tmp_path / "teacher"),
            "--method",
            "ddim",
            "--nfe",
            "3",
            "--n",
            "16",
            "--out",
            str(tmp_path / "ddim.npz"),
        ]
    )
    z = np.load(tmp_path / "ddim.npz")
    assert z["samples"].shape == (16, 1, 8, 8) and np.isfinite(z["samples"]).all()
    assert "NFE 3" in capsys.readouterr().out
    fm = load_module(
        FlowMapModule, tmp_path / "eulerian/checkpoints/last.ckpt"
    )  # no teacher needed: the student is the teacher's own UNet, its architecture in the checkpoint
    assert type(fm.net).__name__ == "DiffusionStudent" and ck["hyper_parameters"]["warm_start"]
    assert fm.generate(torch.randn(4, 1, 8, 8), 2).x.shape == (4, 1, 8, 8)
    # the folder and a class_path spec naming it are one teacher; another path is another
    folder = str(tmp_path / "teacher")
    spec = {
        "class_path": "flowmap.teachers.diffusers.DiffusersTeacher",
        "init_args": {"folder": folder},
    }
    assert load_teacher(spec)[1] == ck["flowmap_teacher_sha256"]
    spec["init_args"]["path"] = "cosine"
    assert load_teacher(spec)[1] != ck["flowmap_teacher_sha256"]


def test_a_diffusion_student_net_without_its_teacher_takes_the_fits_teacher(tmp_path):
    """``--model.net=flowmap.teachers.DiffusionStudent`` with settings of its own but no teacher:
    the CLI writes the fit's teacher's architecture in, as ``FlowMapModule`` does from Python."""
    folder = tiny_unet_folder(tmp_path / "teacher")
    cli = cli_main(
        [
            "fit",
            "--config",
            str(RECIPES / "digits_ddpm/lagrangian.yaml"),
            f"--model.teacher={folder}",
            "--model.net=flowmap.teachers.DiffusionStudent",
            "--model.net.gap_dim=16",
            f"--trainer.default_root_dir={tmp_path / 'fit'}",
            *TINY[-3:],
        ]
    )
    ck = read_checkpoint(cli.trainer.checkpoint_callback.last_model_path)
    net = ck["hyper_parameters"]["net"]
    assert net["init_args"]["gap_dim"] == 16
    assert net["init_args"]["teacher"]["init_args"]["model_config"]["sample_size"] == 8
    assert "folder" not in str(net)  # the architecture inline: the map loads without the folder
    assert cli.model.net.adapter.branches["time_embedding"].features.freqs.numel() == 8


def plain_teacher_spec(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = VelocityNet()
    save_file(net.state_dict(), str(tmp_path / "net.safetensors"))
    spec = {
        "class_path": "flowmap.teachers.DiffusionTeacher",
        "init_args": {
            "model": {
                "class_path": "tests.fakes.VelocityNet",
                "init_args": {"dim": 64, "width": 32},
                "weights": str(tmp_path / "net.safetensors"),
            },
            "prediction": "velocity",
            "schedule": "linear",  # TorchCFM / Meta flow_matching: noise at t = 0, x_t = t x1 + (1-t) x0
            "data_shape": [1, 8, 8],
        },
    }
    path = tmp_path / "teacher.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_plain_velocity_net_with_safetensors_weights_is_a_teacher_by_class_path(tmp_path):
    spec = plain_teacher_spec(tmp_path)
    teacher, sha = load_teacher(str(spec))
    net = VelocityNet()
    net.load_state_dict(load_safetensors(tmp_path / "net.safetensors"))
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    with torch.no_grad():
        torch.testing.assert_close(
            teacher(x, t), net(x, t), rtol=1e-5, atol=1e-5
        )  # same convention
    assert load_teacher(str(spec))[1] == sha
    # distilled through flowmap fit, the teacher given by its spec (a dict in YAML works the same)
    cli = cli_main(
        [
            "fit",
            "--config",
            str(RECIPES / "digits/lagrangian.yaml"),
            f"--model.teacher={spec}",
            "--model.warm_start=false",
            f"--trainer.default_root_dir={tmp_path / 'fit'}",
            *TINY,
        ]
    )
    assert cli.trainer.global_step == 3
    ck = read_checkpoint(cli.trainer.checkpoint_callback.last_model_path)
    assert ck["flowmap_teacher_sha256"] == sha
    config = {
        "class_path": "flowmap.teachers.DiffusionTeacher",
        "init_args": yaml.safe_load(spec.read_text())["init_args"],
    }
    cli = cli_main(
        [
            "fit",
            "--config",
            str(RECIPES / "digits/lagrangian.yaml"),
            f"--model.teacher={json.dumps(config)}",
            "--model.warm_start=false",
            f"--trainer.default_root_dir={tmp_path / 'fit2'}",
            *TINY,
        ]
    )
    assert cli.model.hparams.teacher["class_path"] == "flowmap.teachers.DiffusionTeacher"
    assert cli.trainer.global_step == 3


# ------------------------------------------------------------------------------ bad input
def test_a_weights_folder_with_a_pickle_file_is_refused_in_one_sentence(tmp_path):
    torch.save(VelocityNet().state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(
        UnsafeFileError,
        match=r"pickle files \(pytorch_model.bin\) and no .safetensors.*never unpickles",
    ):
        load_safetensors(tmp_path)
    with pytest.raises(UnsafeFileError, match="is a pickle file; flowmap never unpickles"):
        load_safetensors(tmp_path / "pytorch_model.bin")
    pytest.importorskip("diffusers")
    from flowmap.teachers.diffusers import DiffusersTeacher

    folder = tiny_unet_folder(tmp_path / "d")
    weights = folder / "unet/diffusion_pytorch_model.safetensors"
    torch.save(load_safetensors(weights), folder / "unet/diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(
        ValueError,
        match=r"has no diffusion_pytorch_model.safetensors but pickle weights \(diffusion_pytorch_model.bin\)",
    ):
        DiffusersTeacher(str(folder))


def test_foreign_teacher_mistakes_are_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="Cannot import the teacher component 'nowhere.Model'"):
        build_teacher({"class_path": "nowhere.Model"})
    with pytest.raises(
        ValueError, match="neither a folder .* nor a .yaml/.json spec and does not exist"
    ):
        build_teacher(str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="takes class_path, init_args and weights, not"):
        build_teacher({"class_path": "flowmap.teachers.DiffusionTeacher", "args": {}})
    spec = plain_teacher_spec(tmp_path)
    save_file({"body.0.weight": torch.zeros(3, 3)}, str(tmp_path / "net.safetensors"))
    with pytest.raises(ValueError, match="do not fit tests.fakes.VelocityNet"):
        load_teacher(str(spec))
    pytest.importorskip("diffusers")
    from flowmap.teachers.diffusers import DiffusersTeacher

    folder = tiny_unet_folder(tmp_path / "d")
    (folder / "scheduler/scheduler_config.json").write_text(
        json.dumps({"_class_name": "LCMScheduler"})
    )
    with pytest.raises(ValueError, match="The scheduler 'LCMScheduler' is not one flowmap reads"):
        DiffusersTeacher(str(folder))
    with pytest.raises(ValueError, match="holds no a model config.json|holds no a scheduler"):
        DiffusersTeacher(str(tmp_path))


def test_a_foreign_teacher_of_another_shape_or_without_data_is_refused_early(tmp_path):
    spec = plain_teacher_spec(tmp_path)
    text = spec.read_text().replace("- 1\n  - 8\n  - 8", "- 1\n  - 4\n  - 4")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(
        ValueError,
        match=r"trained on data of shape \[1, 4, 4\] but this data has shape \[1, 8, 8\]",
    ):
        cli_main(
            [
                "fit",
                "--config",
                str(RECIPES / "digits/lagrangian.yaml"),
                f"--model.teacher={bad}",
                "--model.warm_start=false",
                f"--trainer.default_root_dir={tmp_path / 'fit'}",
                *TINY,
            ]
        )
    with pytest.raises(ValueError, match="names no dataset; give a flow map distilled from it"):
        from flowmap.apps.report import main as report_main

        report_main(["--teacher", str(spec), "--out", str(tmp_path / "r")])
    with pytest.raises(ValueError, match="leave the student's net unset"):
        cli_main(  # an MLP student cannot copy the teacher's VelocityNet
            [
                "fit",
                "--config",
                str(RECIPES / "digits/lagrangian.yaml"),
                f"--model.teacher={spec}",
                f"--trainer.default_root_dir={tmp_path / 'fit3'}",
                *TINY,
            ]
        )
    # no net: the student would be the teacher's own VelocityNet, whose time input is a plain
    # concatenation (no time module to give the gap): refused, naming the hook
    with pytest.raises(
        ValueError, match="Cannot find the time conditioning of VelocityNet.*time_modules"
    ):
        cli_main(
            [
                "fit",
                "--config",
                str(RECIPES / "digits/lagrangian.yaml"),
                f"--model.teacher={spec}",
                f"--trainer.default_root_dir={tmp_path / 'fit4'}",
                "--trainer.max_steps=1",
            ]
        )


def test_a_class_conditional_dit_folder_wraps_with_its_null_class_and_learned_variance(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from flowmap.teachers.diffusers import DiffusersTeacher

    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=2,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=1,
    )  # DiT's learn_sigma: mean and variance channels
    dit.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(
        tmp_path / "scheduler"
    )
    teacher = DiffusersTeacher(str(tmp_path))
    assert (teacher.num_classes, teacher.null_class, teacher.learned_variance) == (10, 10, True)
    assert teacher.schedule.name == "squaredcos_cap_v2"
    x, t = torch.randn(3, 1, 8, 8), torch.full((3,), 0.5)
    y = torch.tensor([1, 2, 3])
    b_c, b_u = teacher(x, t, y=y), teacher(x, t, y=torch.full((3,), -1))
    b_w = teacher(x, t, y=y, w=torch.full((3,), 3.0))
    torch.testing.assert_close(b_w, b_u + 3.0 * (b_c - b_u), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="class-conditional .* give labels y"):
        teacher(x, t)
    sol = teacher.generate(x, 4, "ddim", y=y, guidance=2.0)
    assert sol.nfe == 4 and torch.isfinite(sol.x).all()  # 2 guided steps of 2 evaluations


def test_a_parameter_free_teacher_trains_a_flow_map_through_lightning(tmp_path):
    """An exact (parameter-free) DiffusionTeacher in a FlowMapModule: every step runs."""
    import lightning as L

    from flowmap.nets import MLP
    from flowmap.oracles import GaussianMixtureTarget
    from flowmap.teachers import DiffusionTeacher, native_schedule

    gmm = GaussianMixtureTarget.ring(k=4)
    s = native_schedule("ddpm_linear")

    def eps(x, tau):
        a, g = (c.to(x.dtype) for c in s.coefficients(tau))
        return (x - a[:, None] * gmm.denoise(x, a, g)) / g[:, None]

    teacher = DiffusionTeacher(eps, "epsilon", s, clip=True)
    module = FlowMapModule(MLP((2,), width=16, depth=1), teacher=teacher, warm_start=False)
    data = torch.utils.data.DataLoader(gmm.sample(256), batch_size=64)
    trainer = L.Trainer(
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    assert trainer.global_step == 6


def test_teacher_specs_name_callable_classes_and_their_settings_name_the_teacher(tmp_path):
    from flowmap.teachers import DiffusionTeacher, EDMDenoiser
    from flowmap.training.teachers import teacher_identity

    with pytest.raises(ValueError, match="os.system is not a class of callable models or teachers"):
        build_teacher({"class_path": "os.system", "init_args": {"command": "true"}})
    with pytest.raises(ValueError, match="subprocess.Popen is not a class of callable models"):
        build_teacher({"class_path": "subprocess.Popen", "init_args": {"args": ["true"]}})
    net = VelocityNet()
    ids = {
        teacher_identity({}, DiffusionTeacher(EDMDenoiser(net, sd), "sample", "edm", clip=True))
        for sd in (0.5, 1.0)
    }
    assert len(ids) == 2  # sigma_data is part of the teacher
    # a spec built in Python around live objects is a Python teacher, not a hyperparameter
    from flowmap.nets import MLP

    spec = {
        "class_path": "flowmap.teachers.DiffusionTeacher",
        "init_args": {"model": net, "prediction": "velocity", "schedule": "linear"},
    }
    module = FlowMapModule(MLP((1, 8, 8), width=8, depth=1), teacher=spec, warm_start=False)
    assert "teacher" not in module.hparams and module.teacher is not None
