"""What a new user met in the first hour, each silent failure turned into a loud one (issue 4/7):
inversion of a map never trained backwards, runs that overwrite or resume another run, reports
that mix checkpoints of different datasets or teachers; and (round three, issue 2/7) resumes that
find nothing, teachers of other data, threads that fight other work, files left unnamed."""

import math

import pytest
import torch

from flowmap import FlowMapModule, LagrangianLoss
from flowmap.apps.cli import main
from flowmap.apps.report import main as report_main
from flowmap.losses import TimePairSampler
from flowmap.nets import MLP
from flowmap.ode import solve_ode
from flowmap.oracles import GaussianTarget
from tests.helpers import TINY_NET, fit_cli

TEACHER = "recipes/toy2d/teacher.yaml"
TINY = ["--trainer.enable_progress_bar=false", "--data.batch_size=32", "--logger=none"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def fails(capsys, *argv: str) -> str:
    """Run the ``flowmap`` command, expect a non-zero exit, return its one error sentence."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code not in (0, None)
    line = one_error_line(capsys)
    assert line.startswith("flowmap: error:")
    return line


# --------------------------------------------------------------------------- inversion
def _distil(teacher, backward_fraction: float, steps: int = 250) -> FlowMapModule:
    torch.manual_seed(0)
    loss = LagrangianLoss(pairs=TimePairSampler(backward_fraction=backward_fraction))
    module = FlowMapModule(
        MLP((2,), width=32, depth=1), loss, teacher=teacher, warm_start=False, ema_decay=None
    )
    opt = torch.optim.Adam(module.net.parameters(), lr=3e-3)
    for step in range(steps):
        opt.zero_grad()
        loss(module.student, teacher.sample(256), teacher, step=step)["loss"].backward()
        opt.step()
    return module


def test_a_map_trained_both_ways_inverts_and_a_forward_only_one_refuses():
    teacher = GaussianTarget(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.5]))
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    forward_only, both = _distil(teacher, 0.0), _distil(teacher, 0.5)
    with pytest.raises(ValueError, match="trained only forward"):
        forward_only.invert(forward_only.generate(z, 2).x, 2)
    assert not forward_only.trained_backward and both.trained_backward

    def round_trip(module, n):
        from flowmap.ode import sample_flow_map

        x1 = module.generate(z, n).x
        with torch.no_grad():
            return sample_flow_map(module.sampling_flow_map, x1, steps=n, t0=1.0, t1=0.0).x - z

    miss_both = (both.invert(both.generate(z, 2).x, 2).x - z).norm(dim=1).mean()
    assert torch.allclose(miss_both, round_trip(both, 2).norm(dim=1).mean())
    miss_forward = round_trip(forward_only, 2).norm(dim=1).mean()
    # the untrained backward jumps miss the noise by ~0.7 here, the trained ones by ~0.25
    assert miss_both < 0.45 * miss_forward, (miss_both, miss_forward)
    # and the round trip is a few Euler steps' worth, not the ~1.9 of one Euler step each way
    with torch.no_grad():
        euler = solve_ode(
            teacher.velocity, solve_ode(teacher.velocity, z, nfe=1).x, nfe=1, t0=1, t1=0
        )
    assert miss_both < 0.25 * (euler.x - z).norm(dim=1).mean()


def test_flowmap_sample_inverts_a_two_way_map_and_refuses_a_forward_only_one(
    toy_teacher, toy_flowmap, tmp_path, capsys
):
    import numpy as np

    data, noise = tmp_path / "x.npz", tmp_path / "z.npz"
    main(["sample", "--ckpt", str(toy_flowmap), "--nfe", "2", "--n", "64", "--out", str(data)])
    argv = ["--invert", "--data-npz", str(data), "--nfe", "2", "--out", str(noise)]
    main(["sample", "--ckpt", str(toy_flowmap), *argv])  # the toy recipe trains both ways
    with np.load(noise) as z:
        assert z["noise"].shape == (64, 2) and np.isfinite(z["noise"]).all()
    forward_only = fit_cli(
        "recipes/toy2d/lagrangian.yaml",
        tmp_path / "fwd",
        f"--model.teacher={toy_teacher[1]}",
        "--data.name=8gaussians",
        "--trainer.max_steps=2",
        "--model.loss.init_args.pairs.backward_fraction=0",
        *TINY,
    )
    line = fails(capsys, "sample", "--ckpt", str(forward_only), *argv)
    assert "trained only forward" in line and "backward_fraction=0.5" in line
    np.save(tmp_path / "x.npy", np.zeros((4, 2), dtype=np.float32))
    argv[2] = str(tmp_path / "x.npy")
    line = fails(capsys, "sample", "--ckpt", str(toy_flowmap), *argv)
    assert "is a single array, not an .npz" in line


# --------------------------------------------------------------------------- runs
def test_a_fresh_fit_into_a_run_directory_is_refused_and_a_resume_under_another_config(
    tmp_path, capsys
):
    root = tmp_path / "teacher"
    fit_cli(TEACHER, root, "--trainer.max_steps=2", *TINY)
    files = sorted((root / "checkpoints").iterdir())
    before = {p.name: p.read_bytes() for p in files}
    line = fails(
        capsys, "fit", "--config", TEACHER, f"--trainer.default_root_dir={root}", *TINY_NET, *TINY
    )
    assert "already holds the checkpoints of a run" in line and "--ckpt_path last" in line
    common = ["fit", "--config", TEACHER, f"--trainer.default_root_dir={root}", *TINY_NET, *TINY]
    line = fails(capsys, *common, "--ckpt_path=last", "--data.name=moons", "--trainer.max_steps=4")
    assert (
        "Cannot resume" in line
        and "data.name: 'checkerboard' in the checkpoint, 'moons' now" in line
    )
    line = fails(capsys, *common, "--ckpt_path=last", "--model.lr=0.01", "--trainer.max_steps=4")
    assert "model.lr: 0.002 in the checkpoint, 0.01 now" in line
    # a checkpoint file named outright: Lightning would take its config over the one given
    last = str(root / "checkpoints" / "last.ckpt")
    line = fails(capsys, *common, f"--ckpt_path={last}", "--model.lr=0.01", "--trainer.max_steps=4")
    assert "model.lr: 0.002 in the checkpoint, 0.01 now" in line
    after = {p.name: p.read_bytes() for p in sorted((root / "checkpoints").iterdir())}
    assert after == before  # nothing written, the run's config.yaml included
    # the same config resumes (and only the trainer's budget changed)
    main([*common, "--ckpt_path=last", "--trainer.max_steps=4"])
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4


def test_a_report_refuses_flow_maps_of_another_dataset_or_teacher(
    toy_teacher, toy_flowmap, tmp_path, capsys
):
    other_data = fit_cli(TEACHER, tmp_path / "cb", "--trainer.max_steps=2", *TINY)
    with pytest.raises(ValueError, match=r"trained on Toy2DDataModule\(name='8gaussians'\)"):
        report_main(
            [
                "--teacher",
                str(other_data),
                "--flowmap",
                str(toy_flowmap),
                "--out",
                str(tmp_path / "r"),
            ]
        )
    other_teacher = fit_cli(
        TEACHER, tmp_path / "g8", "--trainer.max_steps=2", "--data.name=8gaussians", *TINY
    )
    line = fails(
        capsys,
        "report",
        "--teacher",
        str(other_teacher),
        "--flowmap",
        str(toy_flowmap),
        "--out",
        str(tmp_path / "r2"),
    )
    assert "was distilled from" in line and str(toy_teacher[1]) in line
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()


# --------------------------------------------------------------------------- README
def _readme_commands(prefix: str) -> list[list[str]]:
    """The README's shell commands starting with ``prefix``, continuation lines joined."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(prefix):
                commands.append(shlex.split(line)[1:])
    return commands


def test_the_readme_fit_commands_parse_as_written():
    from flowmap.apps.lightning_cli import cli_main

    commands = _readme_commands("flowmap fit")
    assert len(commands) >= 4
    roots = set()
    for argv in commands:
        with pytest.raises(SystemExit) as exc:
            cli_main([*argv, "--print_config"])
        assert exc.value.code in (0, None), argv
        roots |= {a for a in argv if a.startswith("--trainer.default_root_dir=")}
    assert len(roots) >= 3  # each example writes into its own directory


# --------------------------------------------------------------------------- round three (2/7)
def test_a_resume_that_finds_no_checkpoint_is_refused_and_writes_nothing(tmp_path, capsys):
    root = tmp_path / "typo"
    common = ["fit", "--config", TEACHER, f"--trainer.default_root_dir={root}", *TINY_NET, *TINY]
    line = fails(capsys, *common, "--ckpt_path=last", "--trainer.max_steps=2")
    assert "--ckpt_path last found no checkpoint to resume in" in line and str(root) in line
    line = fails(capsys, *common, f"--ckpt_path={tmp_path / 'nope.ckpt'}")
    assert "nope.ckpt does not exist" in line
    assert not root.exists()


def test_a_fit_says_where_its_checkpoint_went(tmp_path, capsys):
    root = tmp_path / "run"
    fit_cli(TEACHER, root, "--trainer.max_steps=3", *TINY)
    err = capsys.readouterr().err
    last = root / "checkpoints" / "last.ckpt"
    assert f"flowmap: saved {last} at step 3" in err
    assert f"--config {root / 'checkpoints' / 'config.yaml'} --ckpt_path last" in err
    assert "weights_only" not in err


def test_distilling_a_teacher_of_another_dataset_is_refused_before_the_first_step(
    toy_teacher, tmp_path, capsys
):
    line = fails(
        capsys,
        "fit",
        "--config",
        "recipes/toy2d/lagrangian.yaml",
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.teacher={toy_teacher[1]}",
        "--data.name=checkerboard",  # the teacher saw 8gaussians: same shape, other data
        *TINY_NET,
        *TINY,
    )
    assert "was trained on Toy2DDataModule(name='8gaussians')" in line
    assert "this fit's data is Toy2DDataModule(name='checkerboard')" in line
    assert not list(tmp_path.rglob("*.ckpt"))


def _resolved_loss(capsys, *argv: str) -> dict:
    import yaml

    from flowmap.apps.lightning_cli import cli_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", "recipes/toy2d/lagrangian.yaml", *argv, "--print_config"])
    assert exc.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["loss"]


def test_a_preset_or_loss_class_named_on_the_command_line_starts_from_its_own_defaults(capsys):
    from flowmap.apps.help import command_help
    from flowmap.presets import PRESETS

    loss = _resolved_loss(capsys, "--model.loss=meanflow")
    assert loss["class_path"] == PRESETS["meanflow"].loss["class_path"]
    assert loss["init_args"]["pairs"]["init_args"]["distribution"] == "logit_normal"
    # the recipe's LagrangianLoss trains both ways; EulerianLoss named alone does not inherit it
    swap = _resolved_loss(capsys, "--model.loss=EulerianLoss")
    assert swap["class_path"].endswith("EulerianLoss") and swap["init_args"]["pairs"] is None
    after = _resolved_loss(
        capsys, "--model.loss", "EulerianLoss", "--model.loss.init_args.pairs.backward_fraction=0.5"
    )
    assert after["init_args"]["pairs"]["init_args"]["backward_fraction"] == 0.5
    assert _resolved_loss(capsys, "--model.loss=null") is None  # the module's default loss
    line = fails(capsys, "fit", "--config", "recipes/toy2d/lagrangian.yaml", "--model.loss=meanflw")
    assert "did you mean 'meanflow'?" in line and "improved_meanflow" in line
    assert "preset by name, e.g. --model.loss=meanflow" in " ".join(command_help("fit").split())


def test_the_thread_rule_takes_the_cores_other_processes_leave_free():
    from flowmap.training.threads import choose_threads, own_load

    assert choose_threads(2, 0.0) == 2 and choose_threads(2, 0.6) == 2
    assert choose_threads(2, 0.8) == choose_threads(2, 1.2) == 1  # one busy process, 2 cores
    assert choose_threads(2, 7.0) == 1 and choose_threads(16, 3.0) == 13
    # this process's share of the 1-minute load average follows the average's own update: 5 s
    # of imports at one core barely count, 10 minutes on 2 threads count as 2
    assert own_load(0.0, cpu_s=5.0, wall_s=5.0) == pytest.approx(1 - math.exp(-5 / 60))
    assert own_load(0.0, cpu_s=1200.0, wall_s=600.0) == pytest.approx(2.0, abs=1e-3)
    assert own_load(2.0, cpu_s=0.0, wall_s=60.0) == pytest.approx(2 * math.exp(-1))


def test_set_threads_follows_the_load_says_why_and_leaves_a_users_choice_alone(monkeypatch):
    from flowmap.training import threads

    before = torch.get_num_threads()
    said: list[str] = []
    for var in threads.THREADS_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(threads, "_cores", lambda: 4)
    monkeypatch.setattr(threads, "_busy_now", lambda: 0.2)
    try:
        assert threads.set_threads(said.append) == 4 == torch.get_num_threads() and not said
        monkeypatch.setattr(threads, "_busy_now", lambda: 2.2)
        assert threads.set_threads(said.append) == 2 == torch.get_num_threads()
        assert "load the 4 cores with 2.2" in said[0] and "uses 2 threads" in said[0]
        assert "FLOWMAP_THREADS=N" in said[0]
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert threads.set_threads(said.append) == 3 and len(said) == 1
        monkeypatch.setenv("FLOWMAP_THREADS", "1")
        assert threads.set_threads(said.append) == 1 and len(said) == 1
        monkeypatch.setenv("FLOWMAP_THREADS", "many")
        with pytest.raises(ValueError, match="FLOWMAP_THREADS must be a number of threads"):
            threads.set_threads(said.append)
    finally:
        torch.set_num_threads(before)


def test_a_fit_follows_the_load_when_other_work_comes_and_goes(monkeypatch, capsys):
    from types import SimpleNamespace

    from flowmap.training import threads

    before = torch.get_num_threads()
    for var in threads.THREADS_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(threads, "_cores", lambda: 2)
    callback, trainer = threads.ThreadsForLoad(every_s=0.0), SimpleNamespace(world_size=1)
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(threads, "_busy_now", lambda: 0.1)
        callback.on_train_batch_end(trainer)
        assert torch.get_num_threads() == 2 and not capsys.readouterr().err
        monkeypatch.setattr(threads, "_busy_now", lambda: 1.1)  # another job started
        callback.on_train_batch_end(trainer)
        assert torch.get_num_threads() == 1
        assert "load the 2 cores with 1.1" in capsys.readouterr().err
        monkeypatch.setattr(threads, "_busy_now", lambda: 0.2)  # it finished
        callback.on_train_batch_end(trainer)
        assert torch.get_num_threads() == 2 and "uses 2 threads" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_a_function_teacher_distils_with_the_default_warm_start():
    """A teacher with no network (an analytic velocity) leaves nothing to copy: the default
    warm_start=True starts the student as built, where it used to refuse the fit."""
    teacher = GaussianTarget(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.5]))
    module = FlowMapModule(MLP((2,), width=16, depth=1), LagrangianLoss(), teacher=teacher)
    before = [p.detach().clone() for p in module.net.parameters()]
    module.setup("fit")
    assert all(torch.equal(a, b) for a, b in zip(before, module.net.parameters(), strict=True))
    with pytest.raises(ValueError, match="needs a teacher with a network to copy"):
        module.student.warm_start(teacher)  # asked for outright, it still says why not


def test_a_damaged_samples_file_is_refused_without_advice_to_unpickle(tmp_path, capsys):
    bad = tmp_path / "samples.npz"
    bad.write_bytes(b"this is not a numpy archive at all")
    line = fails(capsys, "report", "--from-samples", str(bad), "--out", str(tmp_path / "r"))
    assert "is not a readable .npz archive" in line and "--save-samples" in line
    assert "pickle" not in line.lower()


def test_a_run_folder_or_its_config_given_as_a_checkpoint_names_the_checkpoint(
    toy_teacher, tmp_path, capsys
):
    root, last = toy_teacher
    for given in (root, last.parent / "config.yaml"):
        line = fails(capsys, "sample", "--ckpt", str(given), "--out", str(tmp_path / "s.npz"))
        assert f"did you mean {str(last)!r}?" in line, line
        line = fails(
            capsys,
            "fit",
            "--config",
            "recipes/toy2d/lagrangian.yaml",
            f"--model.teacher={given}",
            f"--trainer.default_root_dir={tmp_path / 'fm'}",
            "--data.name=8gaussians",
            *TINY_NET,
            *TINY,
        )
        assert f"did you mean {str(last)!r}?" in line, line


def test_a_sample_picture_names_the_run_not_last_ckpt(tmp_path):
    from flowmap.apps.sample import run_label

    ckpt = tmp_path / "runs" / "toy2d" / "lagrangian" / "checkpoints" / "last.ckpt"
    assert run_label(str(ckpt)) == "lagrangian/last.ckpt"
    assert run_label(str(tmp_path / "mine" / "model.ckpt")) == "mine/model.ckpt"


def test_validation_and_report_measure_w2_on_the_same_group_size(toy_teacher):
    """Exact W2 grows as its groups shrink: the training callback and the report both use
    groups of W2_GROUP_SIZE, so a checkpoint's val/w2 and its report's W2 agree."""
    from flowmap.apps.report.config import sizes
    from flowmap.apps.report.setting import build_datamodule
    from flowmap.metrics.evaluation import W2_GROUP_SIZE, Evaluator
    from flowmap.training import SampleQuality, VelocityModule, load_module, read_checkpoint

    teacher = load_module(VelocityModule, toy_teacher[1])
    dm = build_datamodule(read_checkpoint(toy_teacher[1])["datamodule_hyper_parameters"])
    callback = SampleQuality(nfe=(4,))
    n_val = callback.sample_count(dm)
    assert n_val // callback.groups == W2_GROUP_SIZE
    assert sizes(False, None, None) == (10_000, 10) and sizes(False, 2000, None) == (2000, 2)

    def w2(evaluator: Evaluator, n: int) -> float:
        x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            x = teacher.generate(x0, 4, "euler").x
        return evaluator.measure(x).estimates()["w2"].value

    val = w2(callback.evaluator(dm), n_val)
    report = w2(Evaluator.for_datamodule(dm, 4000, groups=4, split="train", seed=3), 4000)
    small = w2(Evaluator.for_datamodule(dm, 1000, groups=5, split="train", seed=3), 1000)
    assert abs(val - report) < 0.05 * report, (val, report)  # measured: 0.500 and 0.498
    assert small > 1.15 * report, (small, report)  # groups of 200 (the old validation's): 0.63
