import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# torch's threads fixed for the whole run (flowmap would follow the machine's load, and this very
# process's earlier tests raise it): the same count in every test, whatever ran before
os.environ.setdefault("FLOWMAP_THREADS", str(torch.get_num_threads()))

from flowmap.oracles import GaussianTarget  # noqa: E402


@pytest.fixture
def gaussian():
    torch.manual_seed(0)
    return GaussianTarget(
        torch.tensor([1.0, -2.0], dtype=torch.float64),
        torch.tensor([0.5, 1.5], dtype=torch.float64),
        "linear",
    )


@pytest.fixture(scope="session")
def toy_teacher(tmp_path_factory):
    """A tiny 8-Gaussians teacher fitted through the CLI (300 steps): ``(root, last.ckpt)``."""
    from tests.helpers import fit_cli

    root = tmp_path_factory.mktemp("teacher")
    ckpt = fit_cli(
        "recipes/toy2d/teacher.yaml",
        root,
        "--trainer.max_steps=300",
        "--trainer.val_check_interval=150",
        "--data.batch_size=256",
        "--trainer.log_every_n_steps=10",
        "--data.name=8gaussians",
    )
    return root, ckpt


@pytest.fixture(scope="session")
def toy_flowmap(toy_teacher, tmp_path_factory):
    """A tiny Lagrangian flow map distilled from :func:`toy_teacher` (40 steps): ``last.ckpt``."""
    from tests.helpers import fit_cli

    root = tmp_path_factory.mktemp("flowmap")
    return fit_cli(
        "recipes/toy2d/lagrangian.yaml",
        root,
        f"--model.teacher={toy_teacher[1]}",
        "--trainer.max_steps=40",
        "--data.batch_size=128",
        "--trainer.val_check_interval=20",
        "--data.name=8gaussians",
    )


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A 2-step toy teacher fitted through the CLI: its ``last.ckpt``."""
    from flowmap.apps.lightning_cli import cli_main
    from tests.helpers import TINY_CLI

    root = tmp_path_factory.mktemp("cli-teacher")
    cli_main(
        [
            "fit",
            "--config",
            "recipes/toy2d/teacher.yaml",
            *TINY_CLI,
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={root}",
        ]
    )
    return next(root.rglob("last.ckpt"))


@pytest.fixture
def bad_files(tmp_path):
    """Files that are no flowmap checkpoint: text, a foreign torch file, a bare Lightning one."""
    text = tmp_path / "notes.ckpt"
    text.write_text("hello\n")  # torch.load raises a bare KeyError on this
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    lightning = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {}}, lightning)  # a Lightning checkpoint, not a flowmap one
    return {"text": text, "foreign": foreign, "lightning": lightning, "dir": tmp_path}
