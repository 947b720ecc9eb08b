"""Every recipe config parses; every stage runs a few steps through the CLI on the CPU; the toy
pipeline runs end to end in a tiny setting; CIFAR-10 configs run with fast_dev_run on a stand-in."""

import json
from pathlib import Path

import pytest

from flowmap.apps.cli import cli_main
from tests.fakes import make_fake_cifar10

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CONFIGS = sorted(RECIPES.glob("*/*.yaml"))


def test_there_are_recipes_for_each_dataset_and_stage():
    names = {(p.parent.name, p.stem) for p in CONFIGS}
    for data in ("toy2d", "digits", "cifar10"):
        for stage in ("teacher", "lagrangian", "eulerian", "semigroup"):
            assert (data, stage) in names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: flowmap.training." in printed and "max_steps:" in printed


DIGITS_TINY = [
    "--model.net.width=32",
    "--model.net.depth=1",
    "--data.batch_size=32",
    "--trainer.enable_progress_bar=false",
    "--trainer.check_val_every_n_epoch=1",
]


def test_digits_stages_run_through_the_cli(tmp_path):
    teacher = tmp_path / "teacher"
    cli_main(
        [
            "fit",
            "--config",
            str(RECIPES / "digits/teacher.yaml"),
            *DIGITS_TINY,
            f"--trainer.default_root_dir={teacher}",
            "--trainer.max_steps=5",
        ]
    )
    ckpt = teacher / "checkpoints" / "last.ckpt"
    for loss in ("lagrangian", "eulerian", "semigroup"):
        cli_main(
            [
                "fit",
                "--config",
                str(RECIPES / f"digits/{loss}.yaml"),
                *DIGITS_TINY,
                f"--trainer.default_root_dir={tmp_path / loss}",
                "--trainer.max_steps=3",
                f"--model.teacher={ckpt}",
            ]
        )
        assert (tmp_path / loss / "checkpoints" / "last.ckpt").exists()


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


def test_cifar10_configs_run_with_fast_dev_run_on_a_stand_in(tmp_path):
    root = make_fake_cifar10(tmp_path / "cifar", n_train=16, n_test=8)
    data = [f"--data.root={root}"]
    teacher = tmp_path / "teacher"
    cli_main(
        [
            "fit",
            "--config",
            str(RECIPES / "cifar10/teacher.yaml"),
            *CIFAR_CPU,
            *data,
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={teacher}",
        ]
    )
    # fast_dev_run writes no checkpoint: one real step gives the students a teacher
    cli_main(
        [
            "fit",
            "--config",
            str(RECIPES / "cifar10/teacher.yaml"),
            *CIFAR_CPU,
            *data,
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={teacher}",
        ]
    )
    ckpt = teacher / "checkpoints" / "last.ckpt"
    for loss in ("lagrangian", "eulerian", "semigroup"):
        cli_main(
            [
                "fit",
                "--config",
                str(RECIPES / f"cifar10/{loss}.yaml"),
                *CIFAR_CPU,
                *data,
                "--trainer.fast_dev_run=true",
                f"--model.teacher={ckpt}",
                f"--trainer.default_root_dir={tmp_path / loss}",
            ]
        )


def test_toy_pipeline_runs_end_to_end_and_writes_its_report(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_pipeline", RECIPES / "toy2d/pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "toy"
    module.main(["--out", str(out), "--tiny", "--n-samples", "200"])
    for name in ("report.md", "fid_vs_steps.png", "results.json", "samples.npz"):
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


def test_digits_pipeline_runs_end_to_end_with_fid_in_digits_features(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_pipeline", RECIPES / "digits/pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    res = module.main(["--out", str(tmp_path), "--tiny"])
    assert res["metric"] == "fid" and res["dataset"] == "digits" and res["n_samples"] == 64
    assert res["floor"] > 0
    assert all(r["value"] > 0 for r in res["rows"])
    euler = {r["nfe"]: r["value"] for r in res["rows"] if r["method"] == "teacher/euler"}
    assert set(euler) == {1, 2}
