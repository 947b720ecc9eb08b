"""DDP on CPU (ddp_spawn, 2 gloo ranks): gradients equal one process's on the same total batch.

The batch carries its own noise and times (columns ``x1 | x0 | s | t``) so both runs see exactly
the same samples; each rank holds one half, and the diagonal rows are those with ``s == t``.
"""

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from flowmap.losses import TimePairs, cfm_loss
from flowmap.training import FlowMapModule, VelocityModule, build

pytestmark = pytest.mark.slow  # every test spawns two processes

NET = {"class_path": "flowmap.nets.MLP", "init_args": {"data_shape": [2], "width": 16, "depth": 1}}
HALF, DIAG_ROWS = 8, [1, 4, 6]  # diagonal rows anywhere in the batch: the mask finds them


def _full_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    halves = []
    for _ in range(2):
        x1, x0 = 2 * torch.randn(HALF, 2, generator=g), torch.randn(HALF, 2, generator=g)
        a, b = torch.rand(HALF, generator=g), torch.rand(HALF, generator=g)
        s, t = torch.minimum(a, b), torch.maximum(a, b)
        s[DIAG_ROWS] = t[DIAG_ROWS]
        halves.append(torch.cat([x1, x0, s[:, None], t[:, None]], dim=1))
    return torch.cat(halves)


def _split(batch: torch.Tensor):
    return batch[:, :2], batch[:, 2:4], batch[:, 4], batch[:, 5]


class _Grads(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        torch.save(batch, self.out / f"batch{trainer.global_rank}.pt")

    def on_after_backward(self, trainer, module):
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        torch.save(grads, self.out / f"rank{trainer.global_rank}.pt")


class _HalfPerRank(L.LightningDataModule):
    def __init__(self, full: torch.Tensor) -> None:
        super().__init__()
        self.full = full

    def train_dataloader(self):
        r = self.trainer.global_rank
        return DataLoader(TensorDataset(self.full[r * HALF : (r + 1) * HALF]), batch_size=HALF)


class FixedNoiseTeacher(VelocityModule):
    def training_step(self, batch, batch_idx):
        x1, x0, _, t = _split(batch[0] if isinstance(batch, list) else batch)
        return cfm_loss(lambda x, tt: self.net(x, tt, tt), x1, self.path, x0=x0, t=t)


class FixedNoiseFlowMap(FlowMapModule):
    def _terms(self, flow_map, batch, **kw):
        x1, x0, s, t = _split(batch[0] if isinstance(batch, list) else batch)
        return super()._terms(flow_map, x1, x0=x0, pairs=TimePairs(s, t, s == t))


def one_step_trainer(strategy: object, callback: L.Callback) -> L.Trainer:
    """One optimiser step on 2 CPU ranks, each rank on its own half of the batch, nothing else."""
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=1,
        use_distributed_sampler=False,  # each rank already holds its half
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )


def _ddp_and_single(module: L.LightningModule, tmp_path: Path, full: torch.Tensor | None = None):
    full = _full_batch() if full is None else full
    single = copy.deepcopy(module)
    trainer = one_step_trainer("ddp_spawn", _Grads(tmp_path))
    trainer.fit(module, _HalfPerRank(full))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # one process on the whole batch
    single.trainer = None
    if isinstance(single, FlowMapModule):
        single.setup("fit")
    single.zero_grad()
    loss = (
        single.training_step(full, 0)
        if isinstance(single, VelocityModule)
        else single._terms(single.student, full)["loss"]
    )
    loss.backward()
    ref = {n: p.grad for n, p in single.named_parameters() if p.grad is not None}
    return ranks, ref


def _assert_same(ranks, ref):
    """Both ranks hold the same gradient, equal to one process's up to float32 reduction order
    (half-batch against full-batch matmuls: 1e-5 of the tensor's largest entry; an unsynchronised
    gradient would differ by the order of the entries themselves)."""
    assert set(ranks[0]) == set(ref) and ref
    for name, g in ref.items():
        assert torch.allclose(ranks[0][name], ranks[1][name], atol=1e-7), name
        atol = 1e-6 + 1e-5 * float(g.abs().max())
        assert torch.allclose(ranks[0][name], g, atol=atol, rtol=1e-4), (
            name,
            float((ranks[0][name] - g).abs().max()),
            float(g.abs().max()),
        )


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_teacher")
    torch.manual_seed(0)
    module = build(VelocityModule, {"net": NET, "data_shape": [2]})
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(
        module,
        DataLoader(
            TensorDataset(torch.randn(8, 2)),
            batch_size=8,
            collate_fn=lambda b: torch.stack([x[0] for x in b]),
        ),
    )
    path = root / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_ddp_teacher_gradients_match_single_process(tmp_path):
    torch.manual_seed(0)
    _assert_same(*_ddp_and_single(build(FixedNoiseTeacher, {"net": NET}), tmp_path))


@pytest.mark.parametrize(
    "loss,options",
    [
        ("LagrangianLoss", {"form": "regression"}),
        ("LagrangianLoss", {"form": "backprop", "weighting": {"kind": "none"}}),
        ("LagrangianLoss", {}),  # the default: adaptive weighting
        ("EulerianLoss", {"form": "regression"}),
        ("EulerianLoss", {}),  # the default: discrete
        # sCD's learned weighting: the loss's own parameters are synced too
        ("EulerianLoss", {"form": "regression", "weighting": {"kind": "learned"}}),
        ("LagrangianLoss", {"form": "regression", "jvp": {"mode": "finite_difference"}}),
        ("SemigroupLoss", {"split": "midpoint", "teacher_gap": 0.3}),
    ],
)
def test_ddp_distillation_gradients_match_single_process(tmp_path, teacher_ckpt, loss, options):
    torch.manual_seed(0)
    module = build(
        FixedNoiseFlowMap,
        {
            "net": NET,
            "teacher": str(teacher_ckpt),
            "loss": {"class_path": f"flowmap.losses.{loss}", "init_args": options},
        },
    )
    _assert_same(*_ddp_and_single(module, tmp_path))


@pytest.mark.parametrize(
    "loss",
    [None, {"class_path": "flowmap.losses.MeanFlowLoss"}],
    ids=["lagrangian", "meanflow"],
)
def test_ddp_self_distillation_gradients_match_single_process(tmp_path, loss):
    torch.manual_seed(0)
    module = build(FixedNoiseFlowMap, {"net": NET} | ({"loss": loss} if loss else {}))
    _assert_same(*_ddp_and_single(module, tmp_path))


@pytest.mark.parametrize(
    "loss",
    [
        {"class_path": "flowmap.losses.LagrangianLoss"},  # backprop through the JVP's tangent
        {
            "class_path": "flowmap.losses.MeanFlowLoss",  # a loss with parameters (sCT's
            "init_args": {"weighting": {"kind": "learned"}},  # learned weighting)
        },
        {"class_path": "flowmap.losses.MeanFlowLoss"},
    ],
    ids=["lagrangian", "meanflow-learned-weighting", "meanflow"],
)
def test_fsdp_gradients_of_each_jvp_loss_match_single_process(tmp_path, loss):
    """Lightning's FSDP2 strategy (ModelParallelStrategy: net, EMA and loss sharded over 2 CPU
    ranks) with torch.func.jvp through the sharded net; its checkpoint loads and samples."""
    import subprocess
    import sys

    from flowmap.training import load_module
    from flowmap.training.flow_map import FSDP_JVP_TORCH, fsdp_runs_jvp

    if not fsdp_runs_jvp():
        pytest.skip(f"torch.func.jvp runs through FSDP from torch {FSDP_JVP_TORCH} on")
    script = Path(__file__).with_name("fsdp_fit.py")
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), json.dumps(loss)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    single = build(FixedNoiseFlowMap, {"net": NET, "loss": loss})
    single.setup("fit")
    single._terms(single.student, _full_batch())["loss"].backward()
    _assert_same(ranks, {n: p.grad for n, p in single.named_parameters() if p.grad is not None})
    restored = load_module(FixedNoiseFlowMap, tmp_path / "last.ckpt")
    assert int(restored.ema.n_averaged) == 1
    assert torch.isfinite(restored.generate(torch.randn(8, 2), nfe=1).x).all()


def _fid_rank(rank: int, world: int, port: int, out: str, real, fake) -> None:
    import os

    import torch.distributed as dist

    from tests.fid_oracles import DigitsFeatures, make_torchmetrics_fid

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    metric = make_torchmetrics_fid(DigitsFeatures())
    metric.update(real.chunk(world)[rank], real=True)
    metric.update(fake.chunk(world)[rank], real=False)
    value = float(metric.compute())  # states are summed across ranks before computing
    torch.save(torch.tensor(value), f"{out}/fid{rank}.pt")
    dist.destroy_process_group()


def test_torchmetrics_fid_states_reduce_across_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from flowmap.data import load_digits_split, to_uint8
    from tests.fid_oracles import DigitsFeatures, make_torchmetrics_fid

    x_train, _, x_test, _ = load_digits_split()
    real, fake = to_uint8(x_train[:200]), to_uint8((x_test[:200] + 0.2).clamp(-1, 1))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_fid_rank, args=(2, port, str(tmp_path), real, fake), nprocs=2)
    single = make_torchmetrics_fid(DigitsFeatures())
    single.update(real, real=True)
    single.update(fake, real=False)
    expected = float(single.compute())
    for rank in range(2):
        got = float(torch.load(tmp_path / f"fid{rank}.pt", weights_only=True))
        assert got == pytest.approx(expected, rel=1e-6)


class _LoggedQuality(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_validation_end(self, trainer, module):
        got = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/w2")}
        torch.save(got, self.out / f"val{trainer.global_rank}.pt")


def test_sample_quality_logs_the_single_process_value_on_every_rank(tmp_path):
    from flowmap.data.toy2d import Toy2DDataModule
    from flowmap.training import SampleQuality

    torch.manual_seed(0)
    module = build(VelocityModule, {"net": NET})
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=2,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SampleQuality(nfe=(1, 2), n=200, groups=4), _LoggedQuality(tmp_path)],
    )
    dm = Toy2DDataModule("8gaussians", batch_size=32)
    trainer.fit(module, dm)
    ranks = [torch.load(tmp_path / f"val{r}.pt", weights_only=True) for r in range(2)]
    assert set(ranks[0]) == {"val/w2@1", "val/w2@2"} and ranks[0] == ranks[1]
    # the weights came back from rank 0: one process measures the same value
    quality = SampleQuality(nfe=(1, 2), n=200, groups=4)
    x0 = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    x = module.generate(x0, 1, "euler").x
    single = quality.evaluator(dm).measure(x).estimates()["w2"].value
    assert ranks[0]["val/w2@1"] == pytest.approx(single, rel=1e-5)


# --------------------------------------------------------------------------- with labels and w
NET_C = {
    "class_path": "flowmap.nets.MLP",
    "init_args": {
        "data_shape": [2],
        "width": 16,
        "depth": 1,
        "num_classes": 3,
        "guidance_input": True,
    },
}


def _conditional_batch() -> torch.Tensor:
    """``x1 | x0 | s | t | y | w`` with null rows (y = -1, w = 1) and scales in [1, 3]."""
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (2 * HALF,), generator=g)
    y[::5] = -1
    w = torch.where(y < 0, 1.0, 1 + 2 * torch.rand(2 * HALF, generator=g))
    return torch.cat([_full_batch(), y[:, None].float(), w[:, None]], dim=1)


class FixedConditionTeacher(VelocityModule):
    def training_step(self, batch, batch_idx):
        b = batch[0] if isinstance(batch, list) else batch
        x1, x0, _, t = _split(b)
        y = b[:, 6].long()
        return cfm_loss(lambda x, tt: self.net(x, tt, tt, y=y), x1, self.path, x0=x0, t=t)


class FixedConditionFlowMap(FlowMapModule):
    def _terms(self, flow_map, batch, **kw):
        b = batch[0] if isinstance(batch, list) else batch
        x1, x0, s, t = _split(b)
        teacher = self._teacher_on(x1.device)
        pairs = TimePairs(s, t, s == t)
        return self.loss(flow_map, x1, teacher, x0=x0, pairs=pairs, y=b[:, 6].long(), w=b[:, 7])


@pytest.fixture(scope="module")
def conditional_teacher_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_conditional_teacher")
    torch.manual_seed(0)
    net = {**NET_C, "init_args": {**NET_C["init_args"], "guidance_input": False}}
    module = build(VelocityModule, {"net": net, "data_shape": [2], "label_dropout": 0.2})
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(
        module, DataLoader(TensorDataset(torch.randn(8, 2), torch.arange(8) % 3), batch_size=8)
    )
    path = root / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_ddp_conditional_teacher_gradients_match_single_process(tmp_path):
    torch.manual_seed(0)
    net = {**NET_C, "init_args": {**NET_C["init_args"], "guidance_input": False}}
    module = build(FixedConditionTeacher, {"net": net})
    _assert_same(*_ddp_and_single(module, tmp_path, full=_conditional_batch()))


@pytest.mark.parametrize("distil", [True, False], ids=["distilled", "self-distilled"])
def test_ddp_guided_flow_map_gradients_match_single_process(
    tmp_path, conditional_teacher_ckpt, distil
):
    """Labels and guidance scales: the guided teacher (or, self-distilled, the guided target from
    the map's own null-class diagonal) gives the same gradients on 2 ranks as on one."""
    torch.manual_seed(0)
    config = {
        "net": NET_C,
        "guidance": [1.0, 3.0],
        "guidance_law": "uniform",
        "loss": {"class_path": "flowmap.losses.LagrangianLoss"},
        "warm_start": False,
    }
    if distil:
        config["teacher"] = str(conditional_teacher_ckpt)
    module = build(FixedConditionFlowMap, config)
    ranks, ref = _ddp_and_single(module, tmp_path, full=_conditional_batch())
    assert "net.condition.scale.3.weight" in ref and "net.condition.label.weight" in ref
    _assert_same(ranks, ref)


def test_flowmap_fit_runs_under_ddp_spawn_and_writes_its_files(tmp_path):
    """The CLI's callbacks travel to spawned ranks (the config saver used to lose its parser and
    crash the fit): checkpoint and config.yaml are written, the step count is the budget."""
    from flowmap.apps.lightning_cli import cli_main
    from flowmap.training.checkpoints import read_checkpoint

    cli_main(
        [
            "fit",
            "--config",
            "recipes/toy2d/teacher.yaml",
            "--model.net.width=16",
            "--model.net.depth=1",
            "--data.batch_size=32",
            "--trainer.strategy=ddp_spawn",
            "--trainer.devices=2",
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--logger=none",
        ]
    )
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2
    config = (tmp_path / "checkpoints" / "config.yaml").read_text()
    assert "strategy: ddp_spawn" in config and "width: 16" in config
