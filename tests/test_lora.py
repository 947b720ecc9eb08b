"""LoRA students (flowmap.nets.LoRA on a FlowMapModule): they start as their warm-started copy;
a step trains the adapters and the gap branch only, the base staying the teacher's bit for bit
(in the EMA too); merged, they sample as before with the teacher's state-dict keys; their
checkpoints hold no base, reload to the same samples and refuse another teacher; the digits
recipe's rank trains at most 10%; bad input is one sentence; the JVP through the adapters is
right; a diffusers teacher's student trains its gap branches in full; the recipe runs through
the CLI; DDP syncs the adapters only (slow)."""

import copy
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from flowmap import FlowMap
from flowmap.apps.lightning_cli import cli_main
from flowmap.nets import MLP, DiT, LoRA, UNet, merge_lora, trainable_fraction
from flowmap.oracles import GaussianTarget
from flowmap.training import FlowMapModule, VelocityModule, load_module, read_checkpoint
from flowmap.training.base import EMAWithWarmup, build
from flowmap.training.loading import load_flowmap

RECIPE = Path(__file__).resolve().parents[1] / "recipes/digits/lora.yaml"
UNET = {
    "class_path": "flowmap.nets.UNet",
    "init_args": {
        "image_size": 8,
        "in_channels": 1,
        "channels": 8,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
    },
}
LORA = {"class_path": "flowmap.nets.LoRA", "init_args": {"rank": 2}}
NETS = {
    "mlp": lambda: MLP((2,), width=16, depth=1),
    "unet": lambda: UNet(
        image_size=8, in_channels=1, channels=8, channel_mult=[1, 2], num_res_blocks=1
    ),
    "dit": lambda: DiT(8, 1, 2, width=32, depth=1, heads=2),
}


def _trainer(root: Path, steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=root,
    )


def _digits_like(n: int = 32) -> DataLoader:
    return DataLoader(torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)), 16)


def _randomise(module: torch.nn.Module, names: tuple[str, ...] = ("",)) -> None:
    """Every all-zero parameter (adaLN-Zero, last layers, the gap branch, LoRA's B) whose name
    starts with one of ``names`` drawn from N(0, 0.1²), so that no term vanishes by accident."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.any() and name.startswith(names):
                p.normal_(0, 0.1)


def _teacher(kind: str) -> VelocityModule:
    """A Python teacher with a random network (its zero layers drawn, its gap branch kept 0)."""
    torch.manual_seed(0)
    net = NETS[kind]()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not p.any() and ".gap." not in f".{name}":
                p.normal_(0, 0.1)
    return VelocityModule(net, ema_decay=None, data_shape=(2,) if kind == "mlp" else (1, 8, 8))


def _x(kind: str, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 2) if kind == "mlp" else torch.randn(n, 1, 8, 8)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two tiny U-Net teacher checkpoints (one optimiser step each, other seeds): ``(a, b)``."""
    root = tmp_path_factory.mktemp("lora-teachers")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        module = build(VelocityModule, {"net": UNET, "data_shape": [1, 8, 8]})
        _randomise(module.net, ("out.",))  # a velocity of some size (its last layer starts at 0)
        trainer = _trainer(root / str(seed), 1)
        trainer.fit(module, _digits_like())
        trainer.save_checkpoint(root / f"teacher{seed}.ckpt")
        paths.append(root / f"teacher{seed}.ckpt")
    return paths


def _student(teacher: Path, **extra) -> FlowMapModule:
    return build(FlowMapModule, {"teacher": str(teacher), "adapter": LORA, **extra})


# --------------------------------------------------------------------------- the start
@pytest.mark.parametrize("kind", list(NETS))
def test_a_lora_student_starts_as_its_warm_started_full_copy(kind):
    teacher = _teacher(kind)
    student = FlowMapModule(teacher=teacher, adapter=LoRA(rank=2), ema_decay=None)
    full = FlowMap(copy.deepcopy(teacher.net)).warm_start(teacher)
    lora = [n for n, _ in student.net.named_parameters() if ".lora_" in n]
    assert lora and student.hparams["adapter"]["class_path"] == "flowmap.nets.LoRA"  # plain data
    x, s = _x(kind), torch.rand(4) * 0.5
    t = s + 0.5
    for a, b in ((s, t), (t, t)):  # off the diagonal (an Euler step) and on it (the teacher)
        torch.testing.assert_close(
            student.student.phi(x, a, b), full.phi(x, a, b), rtol=0, atol=1e-6
        )
    torch.testing.assert_close(student.student.velocity(x, t), teacher(x, t), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- one step
def test_a_step_trains_only_the_adapters_and_the_gap_branch_and_the_base_stays_the_teachers(
    teachers, tmp_path
):
    student = _student(teachers[0], ema_decay=0.9)
    ema = dict(student.ema.module.named_parameters())
    frozen = [n for n, p in student.net.named_parameters() if not p.requires_grad]
    assert frozen and all(ema[n] is p for n, p in student.net.named_parameters() if n in frozen)
    trained = {n for n, p in student.net.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or n.startswith("time.gap.") for n in trained)
    # one backward: gradients on the trainable parameters only, none on the base
    student.setup("fit")
    torch.manual_seed(0)  # 16 rows, a quarter of them off the diagonal (pairs.eta 0.75)
    student._terms(student.student, next(iter(_digits_like())))["loss"].backward()
    for name, p in student.net.named_parameters():
        assert (p.grad is not None) == (name in trained), name
    assert student.net.time.gap[2].weight.grad.abs().sum() > 0  # the gap's zero layer learns
    assert any(p.grad.abs().sum() > 0 for n, p in student.net.named_parameters() if ".lora_B." in n)
    student.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in student.net.named_parameters()}

    trainer = _trainer(tmp_path, 2)
    trainer.fit(student, _digits_like())
    optimised = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert {id(p) for p in optimised} == {
        id(p) for p in student.net.parameters() if p.requires_grad
    }
    after = dict(student.net.named_parameters())
    for name in trained:  # every adapter (A once B left 0) and the gap's last layer moved
        if name.endswith("lora_A.default.weight") or name == "time.gap.2.weight":
            assert not torch.equal(before[name], after[name]), name
    teacher_net = load_module(VelocityModule, teachers[0]).sampling_net.state_dict()
    for name in frozen:  # the base, in the net and its EMA, is the teacher's bit for bit
        assert torch.equal(after[name], teacher_net[name.replace("base_layer.", "")]), name
        assert student.ema.module.get_parameter(name) is after[name]
    assert int(student.ema.n_averaged) == 2  # the EMA moved its adapters
    ema_b = [p for n, p in student.ema.module.named_parameters() if ".lora_B." in n]
    assert any(p.abs().sum() > 0 for p in ema_b)


def test_the_ema_leaves_a_shared_tensor_as_it_is():
    p = torch.randn(3)
    assert EMAWithWarmup(0.9)(p, p, torch.tensor(5)) is p
    torch.testing.assert_close(EMAWithWarmup(0.5)(p, p.clone(), torch.tensor(100)), p)


# --------------------------------------------------------------------------- merging
@pytest.mark.parametrize("kind", list(NETS))
def test_merged_adapters_sample_as_the_adapters_with_the_teachers_keys(kind):
    teacher = _teacher(kind)
    student = FlowMapModule(teacher=teacher, adapter=LoRA(rank=2, alpha=4.0), ema_decay=None)
    _randomise(student.net)  # the adapters' B (and the gap branch) off zero
    x0 = _x(kind, 8)
    unmerged = student.generate(x0, nfe=2).x
    net = student.net
    merged = merge_lora(net)
    assert list(merged.state_dict()) == list(teacher.net.state_dict())
    assert merge_lora(net) is not net and ".lora_" in "".join(n for n, _ in net.named_parameters())
    assert not torch.equal(unmerged, FlowMap(teacher.net).forward(x0, 0.0, 0.5))  # adapters act
    student.merge_adapters()
    assert student.merged and list(student.net.state_dict()) == list(teacher.net.state_dict())
    torch.testing.assert_close(student.generate(x0, nfe=2).x, unmerged, rtol=0, atol=1e-5)
    assert student.merge_adapters() is student  # once merged, a no-op
    with pytest.raises(ValueError, match="merged for sampling; load it again"):
        student.setup("fit")


def test_a_diffusers_teachers_student_adapts_its_network_and_trains_its_gap_branches():
    """The big-teacher case: a foreign model's DiffusionStudent, its gap branches (at the time
    embedding) trained in full, every other layer of the diffusers UNet adapted."""
    from flowmap.teachers import DiffusionStudent, DiffusionTeacher
    from tests.test_teachers_cli import tiny_unet2d

    teacher = DiffusionTeacher(tiny_unet2d(), "epsilon", "ddpm_linear", clip=True)
    student = FlowMapModule(teacher=teacher, adapter=LoRA(rank=2), ema_decay=None)
    assert isinstance(student.net, DiffusionStudent)
    trained = [n for n, p in student.net.named_parameters() if p.requires_grad]
    full = [n for n in trained if ".lora_" not in n]
    assert full and all(n.startswith("adapter.branches.") for n in full)
    assert sum(".lora_A." in n for n in trained) > 10  # convolutions, attention, time MLP
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4) * 0.8 + 0.1
    torch.testing.assert_close(student.student.velocity(x, t), teacher(x, t), rtol=0, atol=1e-5)
    _randomise(student.net)
    phi = student.student.phi(x, t * 0.5, t)
    merged = merge_lora(student.net)
    assert list(merged.state_dict()) == list(DiffusionStudent(teacher).state_dict())
    torch.testing.assert_close(FlowMap(merged).phi(x, t * 0.5, t), phi, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- checkpoints
def test_a_lora_checkpoint_holds_no_base_and_reloads_to_the_same_samples(teachers, tmp_path):
    paths = {}
    for name, adapter in (("lora", LORA), ("full", None)):
        torch.manual_seed(0)
        module = build(FlowMapModule, {"teacher": str(teachers[0]), "adapter": adapter})
        trainer = _trainer(tmp_path / name, 3)
        trainer.fit(module, _digits_like())
        paths[name] = tmp_path / f"{name}.ckpt"
        trainer.save_checkpoint(paths[name])
        if name == "lora":
            student = module.eval()
    raw = read_checkpoint(paths["lora"])
    keys = list(raw["state_dict"])
    assert not any("base_layer" in k for k in keys)
    assert all(".lora_" in k or ".time.gap." in k or k == "ema.n_averaged" for k in keys)
    assert any(k.startswith("ema.module.") and ".lora_B." in k for k in keys)
    assert paths["lora"].stat().st_size < 0.6 * paths["full"].stat().st_size
    assert raw["flowmap_teacher_sha256"] and raw["hyper_parameters"]["adapter"] == LORA | {
        "init_args": {
            "rank": 2,
            "alpha": None,
            "targets": None,
            "full": None,
            "dropout": 0.0,
            "bias": "none",
        }
    }

    x0 = torch.randn(8, 1, 8, 8)
    expected = student.generate(x0, nfe=2).x
    again = load_module(FlowMapModule, paths["lora"])
    assert again.adapter.rank == 2 and not again.merged
    torch.testing.assert_close(again.generate(x0, nfe=2).x, expected, rtol=0, atol=1e-6)
    _, _, loaded = load_flowmap(str(paths["lora"]))  # what `flowmap report` and `sample` read
    assert loaded.module.merged
    torch.testing.assert_close(loaded.module.generate(x0, nfe=2).x, expected, rtol=0, atol=1e-5)
    with pytest.raises(
        ValueError, match="adapters were trained on another teacher .* load it with"
    ):
        load_module(FlowMapModule, paths["lora"], teacher=str(teachers[1]))

    resumed = build(FlowMapModule, {"teacher": str(teachers[0]), "adapter": LORA})
    trainer = _trainer(tmp_path / "resumed", 4)
    trainer.fit(resumed, _digits_like(), ckpt_path=paths["lora"])  # the base is not missing
    assert trainer.global_step == 4 and int(resumed.ema.n_averaged) == 4


# --------------------------------------------------------------------------- the recipe's rank
def test_the_digits_recipes_rank_trains_at_most_a_tenth_of_the_unet():
    model = yaml.safe_load(RECIPE.read_text())["model"]["init_args"]
    rank = model["adapter"]["init_args"]["rank"]

    def fraction(r: int) -> float:
        net = UNet(image_size=8, in_channels=1, channels=32, channel_mult=[1, 2], num_res_blocks=1)
        return trainable_fraction(LoRA(rank=r).apply(net))

    assert fraction(rank) <= 0.10 < fraction(rank + 1)  # the largest such rank


# --------------------------------------------------------------------------- bad input
def test_bad_lora_input_is_refused_in_one_sentence_before_any_work(monkeypatch):
    teacher = _teacher("mlp")
    net = MLP((2,), width=16, depth=1)
    with pytest.raises(ValueError, match="self-distilled map has no teacher; give the module"):
        FlowMapModule(net, adapter=LoRA())
    with pytest.raises(ValueError, match="adapter takes flowmap.nets.LoRA, e.g. .* not str"):
        FlowMapModule(teacher=teacher, adapter="lora")
    with pytest.raises(ValueError, match="set warm_start: true"):  # the file is never read
        FlowMapModule(teacher="no/such/teacher.ckpt", adapter=LoRA(), warm_start=False)
    for rank in (0, -1, 2.5):
        with pytest.raises(ValueError, match="rank must be a whole number of at least 1"):
            LoRA(rank=rank)
    with pytest.raises(ValueError, match="alpha must be positive"):
        LoRA(alpha=0)
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\)"):
        LoRA(dropout=1.0)
    with pytest.raises(ValueError, match="bias is 'none' or 'all'"):
        LoRA(bias="lora_only")
    with pytest.raises(ValueError, match="LoRA full names 'time.gapp', which is no module of MLP"):
        FlowMapModule(teacher=teacher, adapter=LoRA(full=["time.gapp"]))
    with pytest.raises(ValueError, match="LoRA target 'attention' matches no linear"):
        FlowMapModule(teacher=teacher, adapter=LoRA(targets=["attention"]))
    with pytest.raises(ValueError, match="has no nn.Linear or nn.Conv2d outside the fully"):
        LoRA().apply(torch.nn.Sequential(torch.nn.GroupNorm(1, 2), torch.nn.SiLU()))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        LoRA().apply(LoRA().apply(MLP((2,), width=16, depth=1)))
    oracle = GaussianTarget(torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="teacher 'GaussianTarget' has none; drop the adapter"):
        FlowMapModule(net, teacher=oracle, adapter=LoRA())
    monkeypatch.setitem(sys.modules, "peft", None)  # peft not installed
    with pytest.raises(ImportError, match=r'need peft; pip install "flowmap\[lora\]"'):
        FlowMapModule(teacher=teacher, adapter=LoRA())


def test_named_targets_and_full_modules_choose_what_trains():
    net = LoRA(rank=2, targets=["film", r"out\.\d+"], full=["time"]).apply(
        MLP((2,), width=16, depth=2)
    )
    trained = {n.split(".lora_")[0] for n, p in net.named_parameters() if ".lora_" in n}
    assert trained == {"blocks.0.film", "blocks.1.film", "out.2"}
    assert all(p.requires_grad for p in net.time.parameters())
    assert not any(p.requires_grad for p in net.inp.parameters())


def test_bias_all_trains_every_bias_and_no_base_weight():
    net = LoRA(rank=2, bias="all").apply(MLP((2,), width=16, depth=2))
    for name, p in net.named_parameters():
        lora, gap = ".lora_" in name, name.startswith("time.gap.")
        assert p.requires_grad == (lora or gap or name.endswith("bias")), name
    assert any(p.requires_grad for n, p in net.named_parameters() if n.endswith("base_layer.bias"))


def test_a_sharded_strategy_is_refused(teachers):
    class FSDPStrategy:  # named as Lightning's
        pass

    student = _student(teachers[0])
    student._trainer = type("T", (), {"strategy": FSDPStrategy(), "datamodule": None})()
    with pytest.raises(ValueError, match="cannot split; train it with strategy ddp"):
        student.setup("fit")


# --------------------------------------------------------------------------- the JVP
@pytest.mark.parametrize("kind", list(NETS))
def test_the_jvp_through_the_adapters_equals_a_finite_difference(kind):
    teacher = _teacher(kind)
    student = FlowMapModule(teacher=teacher, adapter=LoRA(rank=2), ema_decay=None)
    net = student.net.double()
    _randomise(net)
    fm = FlowMap(net)
    x = _x(kind).double()
    s, t = torch.tensor([0.1, 0.2, 0.3, 0.4]).double(), torch.tensor([0.6, 0.5, 0.9, 0.7]).double()
    dx, ds, dt = torch.randn_like(x), torch.randn(4).double(), torch.randn(4).double()
    got = fm.jvp(x, s, t, dx=dx, ds=ds, dt=dt).dphi
    eps = 1e-6
    with torch.no_grad():
        want = (
            fm.phi(x + eps * dx, s + eps * ds, t + eps * dt)
            - fm.phi(x - eps * dx, s - eps * ds, t - eps * dt)
        ) / (2 * eps)
    assert got.abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- the CLI
def test_the_lora_recipe_runs_through_the_cli_with_fast_dev_run(teachers, tmp_path):
    cli = cli_main(
        [
            "--config",
            str(RECIPE),
            f"--model.teacher={teachers[0]}",
            "--model.adapter.rank=2",
            "--trainer.fast_dev_run=true",
            "--trainer.callbacks=[]",
            "--data.batch_size=16",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    model = cli.model
    assert isinstance(model.adapter, LoRA) and model.adapter.rank == 2
    assert model.hparams["adapter"]["init_args"]["rank"] == 2
    b = [p for n, p in model.net.named_parameters() if ".lora_B." in n]
    assert all(not p.any() for p in b)
    cli.trainer.fit(model, cli.datamodule)
    assert cli.trainer.global_step == 1 and torch.isfinite(
        cli.trainer.callback_metrics["train/loss"]
    )
    assert any(p.any() for p in b)  # the step moved the adapters


def test_the_adapter_is_given_on_the_command_line(teachers, tmp_path):
    cli = cli_main(
        [
            "--config",
            "recipes/digits/lagrangian.yaml",
            f"--model.teacher={teachers[0]}",
            "--model.adapter=flowmap.nets.LoRA",
            "--model.adapter.rank=4",
            "--model.adapter.full=[time.gap]",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert cli.model.adapter.rank == 4 and cli.model.adapter.full == ["time.gap"]
    assert 0 < trainable_fraction(cli.model.net) < 0.5


# --------------------------------------------------------------------------- DDP
@pytest.mark.slow  # spawns two processes
def test_ddp_syncs_the_adapters_and_the_gap_branch_and_ignores_the_frozen_base(tmp_path):
    from tests.test_distributed import FixedNoiseFlowMap, _assert_same, _ddp_and_single

    teacher = _teacher("mlp")
    module = FixedNoiseFlowMap(teacher=teacher, adapter=LoRA(rank=2))
    _randomise(module.net, ("blocks", "inp", "out", "time.start"))  # every adapter's B off 0
    ranks, ref = _ddp_and_single(module, tmp_path)
    _assert_same(ranks, ref)  # both ranks hold one process's gradient
    assert all(".lora_" in n or ".time.gap." in n for n in ref)
