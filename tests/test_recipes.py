"""Every recipe config parses; every stage runs a few steps through the CLI on the CPU; the toy
pipeline runs end to end in a tiny setting; CIFAR-10 configs run with fast_dev_run on a stand-in."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from flowmap import losses
from flowmap.apps.kit import run_command
from flowmap.apps.lightning_cli import cli_main
from flowmap.training import FlowMapModule, VelocityModule, load_module, read_checkpoint
from tests.fakes import make_fake_cifar10

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FLOW_MAP_LOSSES = ("lagrangian", "eulerian", "semigroup")
CONFIGS = sorted(RECIPES.glob("*/*.yaml"))


def test_there_are_recipes_for_each_dataset_and_stage():
    names = {(p.parent.name, p.stem) for p in CONFIGS}
    for data in ("toy2d", "digits", "cifar10"):
        for stage in ("teacher", "lagrangian", "eulerian", "semigroup"):
            assert (data, stage) in names


@pytest.mark.parametrize(
    "config",
    [c for c in CONFIGS if not c.stem.startswith("teacher") and c.parent.name != "presets"],
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_flow_map_recipes_inject_their_loss_by_class_path(config):
    """A dataset's stage recipes are named after their loss (the presets: tests/test_presets.py)."""
    model = yaml.safe_load(config.read_text())["model"]
    assert model["class_path"] == "flowmap.training.FlowMapModule"
    loss = {"lora": "lagrangian"}.get(config.stem, config.stem)  # LoRA adapters, Lagrangian loss
    package = "steering" if loss == "reward" else "losses"  # reward fine-tuning: flowmap.steering
    assert model["init_args"]["loss"]["class_path"] == f"flowmap.{package}.{loss.title()}Loss"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: flowmap.training." in printed and "max_steps:" in printed


DIGITS_TINY = [  # the flow maps take no net: theirs is the teacher's own
    "--data.batch_size=32",
    "--trainer.enable_progress_bar=false",
    "--trainer.check_val_every_n_epoch=1",
]


def _flat_params(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.net.parameters()])


@pytest.mark.slow
def test_digits_stages_run_through_the_cli_and_train(tmp_path):
    teacher = tmp_path / "teacher"
    cli_main(
        [
            "fit",
            "--config",
            str(RECIPES / "digits/teacher.yaml"),
            *DIGITS_TINY,
            "--model.net.channels=8",
            f"--trainer.default_root_dir={teacher}",
            "--trainer.max_steps=5",
        ]
    )
    ckpt = teacher / "checkpoints" / "last.ckpt"
    t = load_module(VelocityModule, ckpt)
    assert read_checkpoint(ckpt)["global_step"] == 5 and t.data_shape == (1, 8, 8)
    for name in ("Lagrangian", "Eulerian", "Semigroup"):
        root = tmp_path / name
        cli_main(
            [
                "fit",
                "--config",
                str(RECIPES / f"digits/{name.lower()}.yaml"),
                *DIGITS_TINY,
                f"--trainer.default_root_dir={root}",
                "--trainer.max_steps=3",
                f"--model.teacher={ckpt}",
            ]
        )
        student_ckpt = root / "checkpoints" / "last.ckpt"
        raw = read_checkpoint(student_ckpt)
        assert raw["global_step"] == 3
        assert raw["hyper_parameters"]["loss"]["class_path"] == f"flowmap.losses.{name}Loss"
        student = load_module(FlowMapModule, student_ckpt)
        assert isinstance(student.loss, getattr(losses, f"{name}Loss"))
        assert raw["hyper_parameters"]["net"] == read_checkpoint(ckpt)["hyper_parameters"]["net"]
        # warm-started from the teacher's (EMA) net, then moved by 3 optimiser steps of its own loss
        moved = (
            (_flat_params(student) - torch.cat([p.flatten() for p in t.sampling_net.parameters()]))
            .abs()
            .max()
        )
        assert 0 < moved < 0.1, (name, moved)
        x = student.generate(torch.randn(16, 1, 8, 8), nfe=2).x
        assert x.shape == (16, 1, 8, 8) and torch.isfinite(x).all()


CIFAR_CPU = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.strategy=auto",
    "--trainer.precision=bf16-mixed",
    "--model.net.channels=16",
    "--model.net.channel_mult=[1,2]",
    "--model.net.num_res_blocks=1",
    "--data.batch_size=4",
    "--data.num_workers=0",
    "--data.check_integrity=false",
    "--trainer.enable_progress_bar=false",
]


def _fit_and_check_one_step(args: list[str]) -> None:
    """Run a ``fast_dev_run`` fit and check it took one finite, weight-changing step."""
    cli = cli_main(args, run=False)
    before = _flat_params(cli.model)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert not torch.equal(before, _flat_params(cli.model))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["cifar10", "cifar10_guided"])
def test_cifar10_configs_run_with_fast_dev_run_on_a_stand_in(tmp_path, recipe):
    """The GPU configs, unconditional and class-conditional with guidance, on a CPU stand-in."""
    root = make_fake_cifar10(tmp_path / "cifar", n_train=16, n_test=8)
    data = [f"--data.root={root}"]
    teacher = tmp_path / "teacher"
    config = ["--config", str(RECIPES / f"{recipe}/teacher.yaml"), *CIFAR_CPU, *data]
    _fit_and_check_one_step(
        [*config, "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path / 'dev'}"]
    )
    # fast_dev_run writes no checkpoint: one real step gives the students a teacher
    cli_main(
        [
            "fit",
            *config,
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={teacher}",
        ]
    )
    ckpt = teacher / "checkpoints" / "last.ckpt"
    for loss in ("lagrangian", "eulerian", "semigroup"):
        _fit_and_check_one_step(
            [
                "--config",
                str(RECIPES / f"{recipe}/{loss}.yaml"),
                *CIFAR_CPU,
                *data,
                "--trainer.fast_dev_run=true",
                f"--model.teacher={ckpt}",
                f"--trainer.default_root_dir={tmp_path / loss}",
            ]
        )


@pytest.mark.slow
def test_toy_pipeline_runs_end_to_end_and_writes_its_report(tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_pipeline", RECIPES / "toy2d/pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)  # the README's paths, relative to a fresh directory
    out = Path("runs/toy2d")
    module.main(["--out", str(out), "--tiny", "--n-samples", "200"])
    console = capsys.readouterr().out
    assert "flow map, lagrangian" in console and "Files: runs/toy2d/report.md" in console
    assert "Inversion, round trip" in console  # the toy recipes train both directions
    for name in ("report.md", "w2_vs_steps.png", "results.json", "samples.npz"):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    methods = {r["method"] for r in res["rows"]}
    assert {
        "flowmap/lagrangian",
        "flowmap/eulerian",
        "flowmap/semigroup",
        "teacher/euler",
        "teacher/heun",
        "teacher/dopri5",
    } <= methods
    assert res["metric"] == "w2" and res["dataset"] == "checkerboard"
    assert all(math.isfinite(r["value"]) and r["value"] > 0 for r in res["rows"])
    for r in res["rows"]:  # every row used the NFE it was asked for (dopri5: what it used)
        if r["method"] == "teacher/dopri5":
            assert r["nfe"] > 6
        else:
            assert r["nfe"] in (1, 2, 4)
    euler1 = next(r for r in res["rows"] if (r["method"], r["nfe"]) == ("teacher/euler", 1))
    assert 0 < res["floor"]["ci_low"] < res["floor"]["value"] < euler1["ci_low"]
    rt = res["round_trip"]
    assert {r["method"] for r in rt["rows"]} == {f"flowmap/{k}" for k in FLOW_MAP_LOSSES}
    assert rt["teacher"]["method"] == "teacher/heun" and not rt["forward_only"]

    # the same command again reuses every stage (same recipe, overrides and teacher) ...
    again = module.main(["--out", str(out), "--tiny", "--n-samples", "200"])
    assert "reusing" in capsys.readouterr().out
    fits = ("teacher", *FLOW_MAP_LOSSES)
    assert [again["stage_seconds"][k] for k in fits] == [res["stage_seconds"][k] for k in fits]
    # ... and other flags into the same --out are refused, saying which input changed
    with pytest.raises(ValueError, match=r"--data.name=moons now\); pass another --out"):
        module.main(["--out", str(out), "--tiny", "--dataset", "moons"])
    # as a script (`python recipes/toy2d/pipeline.py …`) the refusal is one line, no traceback
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        run_command(lambda: module.main(["--out", str(out), "--tiny", "--dataset", "moons"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert refused.value.code == 2 and len(err) == 1 and "pass another --out" in err[0]
    assert json.loads((out / "results.json").read_text())["dataset"] == "checkerboard"

    # the README's Python snippets run as written against this run's checkpoints
    readme = (RECIPES.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})


@pytest.mark.slow
def test_digits_pipeline_runs_end_to_end_with_fid_in_digits_features(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_pipeline", RECIPES / "digits/pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    res = module.main(["--out", str(tmp_path), "--tiny"])
    assert res["metric"] == "fid" and res["dataset"] == "digits" and res["n_samples"] == 64
    assert res["floor"]["value"] > 0
    assert all(r["value"] > 0 for r in res["rows"])
    euler = {r["nfe"]: r["value"] for r in res["rows"] if r["method"] == "teacher/euler"}
    assert set(euler) == {1, 2}


@pytest.mark.slow
def test_guided_digits_pipeline_runs_end_to_end_and_samples_a_class(tmp_path, capsys):
    """Teacher → guided flow maps → guidance report, tiny; then `flowmap sample --class 3
    --guidance 2` on the distilled map, with honest NFE and the class in the saved labels."""
    import importlib.util

    import numpy as np

    from flowmap.apps.cli import main as flowmap_main

    path = RECIPES / "digits_guided/pipeline.py"
    spec = importlib.util.spec_from_file_location("guided_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    res = module.main(["--out", str(tmp_path), "--tiny"])
    assert res["kind"] == "guidance" and res["guidance"] == [1.0, 2.0, 4.0]
    assert "class_accuracy" in res["rows"][0]["metrics"]
    for r in res["rows"]:
        assert r["value"] > 0 and 0 <= r["metrics"]["class_accuracy"]["value"] <= 1
        if r["method"] == "teacher/euler" and r["guidance"] != 1:
            assert r["nfe"] % 2 == 0  # a guided step evaluates both branches
    maps = {(r["method"], r["nfe"]) for r in res["rows"] if r["guidance"] == 4.0}
    assert ("flowmap/lagrangian", 1) in maps and ("teacher/euler", 1) not in maps
    assert (tmp_path / "quality_vs_guidance.png").stat().st_size > 0
    assert (tmp_path / "classes_w2_flowmap-lagrangian.png").stat().st_size > 0
    assert {g["method"] for g in res["goals"]} >= {"flowmap/lagrangian"}
    ckpt = json.loads((tmp_path / "lagrangian" / "done.json").read_text())["checkpoint"]
    out = tmp_path / "three.npz"
    argv = ["sample", "--ckpt", ckpt, "--nfe", "1", "--n", "8", "--class", "3"]
    assert flowmap_main([*argv, "--guidance", "2", "--out", str(out)]) in (0, None)
    with np.load(out) as z:
        assert (z["labels"] == 3).all() and z["samples"].shape == (8, 1, 8, 8)
    assert "NFE 1" in capsys.readouterr().out
    grid = tmp_path / "all.png"
    assert flowmap_main(["sample", "--ckpt", ckpt, "--n", "20", "--out", str(grid)]) in (0, None)
    with np.load(grid.with_suffix(".npz")) as z:
        assert np.bincount(z["labels"]).tolist() == [2] * 10  # one grid row per class
    # a guidance scale outside what the map learned is one sentence
    with pytest.raises(SystemExit) as exit_info:
        flowmap_main([*argv, "--guidance", "9", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "trained at the guidance scales [1, 4], not 9" in capsys.readouterr().err
