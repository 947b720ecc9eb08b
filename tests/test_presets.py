"""Known methods as presets: each builds from its YAML, is exact at the Gaussian flow map where that
map is its fixed point, and learns a 2D target in a short run. Also the math the presets added:
MeanFlow's conditional target, the one-time map and its sampler, the dyadic pairs."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from flowmap.flowmap import FlowMap
from flowmap.losses import (
    FlowMapLoss,
    MeanFlowLoss,
    OneTimePairSampler,
    TimePairSampler,
    eulerian_residual,
)
from flowmap.nets import MLP
from flowmap.ode import sample_consistency, sample_flow_map
from flowmap.presets import PRESETS, build_loss, preset
from flowmap.training import FlowMapModule
from tests.helpers import ExactPhi

ROOT = Path(__file__).resolve().parents[1]
PRESET_DIR = ROOT / "recipes" / "presets"
TEACHER_FREE = [n for n, p in PRESETS.items() if not p.needs_teacher]
DISTILLED = [n for n, p in PRESETS.items() if p.needs_teacher]
CONDITIONAL = [n for n, p in PRESETS.items() if p.loss["class_path"].endswith("MeanFlowLoss")]


def test_the_taxonomy_is_covered_and_every_preset_is_documented():
    methods = {
        "lsd", "esd", "psd_midpoint", "psd_uniform", "meanflow", "improved_meanflow", "shortcut",
        "consistency_distillation", "scd", "sct", "tvm", "ayf_emd", "ayf_lmd", "progressive",
    }  # fmt: skip
    assert set(PRESETS) == methods
    for p in PRESETS.values():
        assert p.citation and p.place and p.residual and p.pairs, p.name
    readme = (ROOT / "README.md").read_text()
    missing = [n for n in PRESETS if f"recipes/presets/{n}.yaml" not in readme]
    assert not missing, f"README's preset table lacks {missing}"


def test_preset_yamls_and_readme_table_are_rendered_from_the_catalogue():
    """No copy to drift: the YAMLs and the README's table are exactly what
    scripts/write_presets.py renders from flowmap/presets.py and flowmap/presets.yaml."""
    spec = importlib.util.spec_from_file_location(
        "write_presets", ROOT / "scripts" / "write_presets.py"
    )
    writer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writer)
    assert writer.main(["--check"]) == 0
    assert writer.render(PRESETS["lsd"]).startswith("# Lagrangian self-distillation")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"{writer.BEGIN}\n\n{writer.readme_table()}\n\n{writer.END}" in readme


def test_every_preset_has_its_prose_said_once():
    """Each line of flowmap/presets.py has its prose in flowmap/presets.yaml, every column filled."""
    fields = "title citation place residual teacher stop_gradient pairs weighting".split()
    for p in PRESETS.values():
        assert all(getattr(p, f) for f in fields), p.name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_builds_from_its_yaml(name):
    cfg = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())
    model = cfg["model"]["init_args"]
    assert model["loss"] == PRESETS[name].loss
    assert (model["teacher"] is not None) == PRESETS[name].needs_teacher
    assert isinstance(build_loss(name), FlowMapLoss)
    # the CLI parses every file under recipes/ (tests/test_recipes.py::test_recipe_config_parses)


def test_an_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="Unknown preset 'meanflo'.*'meanflow'"):
        preset("meanflo")


def _exact_and_perturbed(gaussian, name):
    loss = build_loss(name).double()
    x1 = gaussian.sample(256)
    teacher = gaussian.velocity if PRESETS[name].needs_teacher else None
    if getattr(loss, "teacher_steps", None) is not None:  # the teacher's Heun steps: fine
        loss.teacher_steps = 16
    out = {}
    for key, fm in (("exact", ExactPhi(gaussian)), ("perturbed", ExactPhi(gaussian, 0.05))):
        torch.manual_seed(3)
        out[key] = loss(FlowMap(fm), x1, teacher, step=10_000)
    return loss, out


@pytest.mark.parametrize("name", DISTILLED)
def test_distillation_presets_vanish_on_the_exact_gaussian_map(gaussian, name):
    loss, out = _exact_and_perturbed(gaussian, name)
    exact, perturbed = out["exact"]["loss"].abs().item(), out["perturbed"][loss.name].item()
    assert exact < 1e-6, out["exact"]
    assert perturbed > 1e-5 and perturbed > 100 * exact, (exact, perturbed)


@pytest.mark.parametrize("name", [n for n in TEACHER_FREE if n not in CONDITIONAL])
def test_self_distillation_presets_off_diagonal_term_vanishes_on_the_exact_map(gaussian, name):
    """From scratch the teacher is the map's own diagonal, exact here, so the off-diagonal term is
    exact; the diagonal term is CFM on ẋ_s, whose minimum is not 0."""
    loss, out = _exact_and_perturbed(gaussian, name)
    exact, perturbed = out["exact"][loss.name].item(), out["perturbed"][loss.name].item()
    assert exact < 1e-6, out["exact"]
    assert perturbed > 1e-5 and perturbed > 100 * exact, (exact, perturbed)


def _posterior_velocity(gaussian, x_s, s, k):
    r"""``k`` draws of :math:`\dot x_s = x_1 - x_0` given :math:`x_s` on the linear path, for
    Gaussian data: :math:`x_1 \mid x_s` is Gaussian in closed form."""
    mu, c2 = gaussian.mu, gaussian.c**2
    v = s**2 * c2 + (1 - s) ** 2
    mean = mu + s * c2 / v * (x_s - s * mu)
    var = c2 - s**2 * c2**2 / v
    x1 = mean + var.sqrt() * torch.randn(k, *x_s.shape, dtype=x_s.dtype)
    x0 = (x_s - s * x1) / (1 - s)
    return x1 - x0


@pytest.mark.parametrize("tangent", ["conditional", "model"])
def test_meanflow_target_is_exact_in_expectation_over_the_conditional_velocity(gaussian, tangent):
    r"""MeanFlow's residual is affine in :math:`\dot x_s`, so averaged over :math:`\dot x_s \mid x_s`
    it is the Eulerian residual with :math:`b_s`: zero on the exact map, not on a perturbed one."""
    torch.manual_seed(0)
    n, k, s_val, t_val = 6, 4000, 0.3, 0.8
    x = torch.randn(n, 2, dtype=torch.float64)
    s, t = (
        torch.full((n,), s_val, dtype=torch.float64),
        torch.full((n,), t_val, dtype=torch.float64),
    )
    dx = _posterior_velocity(gaussian, x, s_val, k)  # (k, n, 2)
    for perturb, expect_zero in ((0.0, True), (0.05, False)):
        fm = FlowMap(ExactPhi(gaussian, perturb))
        xs, ss, ts, dxs = x.repeat(k, 1), s.repeat(k), t.repeat(k), dx.reshape(-1, 2)
        direction = dxs if tangent == "conditional" else fm.velocity(xs, ss)
        r, _ = eulerian_residual(fm, direction, xs, ss, ts, velocity=dxs)
        r = r.reshape(k, n, 2)
        mean, se = r.mean(0), r.std(0) / k**0.5
        if expect_zero:
            assert (mean.abs() < 4 * se + 1e-12).all(), (mean, se)
        else:
            assert (mean.abs() > 4 * se).any(), (mean, se)
    # and the conditional mean of ẋ_s is the exact velocity the residual needs
    assert torch.allclose(dx.mean(0), gaussian.velocity(x, s), atol=5 * dx.std(0).max() / k**0.5)


def test_meanflow_refuses_a_teacher(gaussian):
    with pytest.raises(ValueError, match="takes no teacher"):
        MeanFlowLoss()(FlowMap(ExactPhi(gaussian)), gaussian.sample(8), gaussian.velocity)
    with pytest.raises(ValueError, match="takes no teacher"):
        FlowMapModule(MLP((2,), width=8, depth=1), loss=MeanFlowLoss(), teacher="t.ckpt")


def test_one_time_pairs_end_at_data_and_sample_as_a_consistency_model(gaussian):
    pairs = OneTimePairSampler("logit_normal", loc=1.0, scale=1.6)(512)
    assert (pairs.t == 1).all() and not pairs.diagonal.any() and (pairs.s < 1).all()
    with pytest.raises(ValueError, match="one-time map draws s from"):
        OneTimePairSampler("dyadic")
    # the exact one-time map keeps every re-noised state on the marginal: samples are exact
    fm = FlowMap(ExactPhi(gaussian))
    x0 = torch.randn(20_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for steps in (1, 2, 4):
        sol = sample_consistency(fm, x0, fm.path, steps=steps, generator=torch.Generator())
        assert sol.nfe == steps
        assert torch.allclose(sol.x.mean(0), gaussian.mu, atol=0.05)
        assert torch.allclose(sol.x.std(0), gaussian.c, rtol=0.03)
    # and the check can fail: a perturbed map's samples are off
    bad = FlowMap(ExactPhi(gaussian, perturb=0.3))
    one = sample_consistency(bad, x0, bad.path, steps=1).x.mean(0)
    assert not torch.allclose(one, gaussian.mu, atol=0.05)


def test_a_one_time_module_samples_the_exact_law_and_refuses_to_invert(gaussian):
    """The module's re-noising noise is its own draw (not x0's, even when x0 was drawn with seed 0
    as the report and the sampler do), so the exact one-time map samples the data law at any NFE."""
    module = FlowMapModule(ExactPhi(gaussian), loss=build_loss("sct"), ema_decay=None)
    assert module.one_time
    x0 = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for nfe in (2, 4):
        a, b = module.generate(x0, nfe=nfe), module.generate(x0, nfe=nfe)
        assert a.nfe == nfe and torch.equal(a.x, b.x)  # seeded by x0's content: reproducible
        assert torch.allclose(a.x.mean(0), gaussian.mu, atol=0.05)
        assert torch.allclose(a.x.std(0), gaussian.c, rtol=0.03)
    # two batches get different re-noising noise: their results are not the same function of x0
    half = module.generate(x0[:10_000], nfe=2).x
    assert not torch.allclose(half, module.generate(x0, nfe=2).x[:10_000])
    with pytest.raises(ValueError, match="one-time map"):
        module.invert(x0)


def test_self_distillation_without_diagonal_rows_is_refused(gaussian):
    """A self-taught loss on one-time pairs with eta = 0 would distil an untrained diagonal."""
    loss = build_loss("scd")  # sCD's loss, asked to self-distil
    with pytest.raises(ValueError, match="pairs.eta = 0 never trains"):
        loss(FlowMap(MLP((2,), width=8, depth=1)), gaussian.sample(8).float())
    MeanFlowLoss(pairs=OneTimePairSampler())(FlowMap(MLP((2,), 8, 1)), gaussian.sample(8).float())


@pytest.mark.parametrize("tangent", ["conditional", "model"])
def test_meanflow_loss_vanishes_at_the_conditional_mean_of_its_velocity(gaussian, tangent):
    """Through the class: with ẋ_s at its conditional mean b_s, the off-diagonal term is 0 on the
    exact map and not on a perturbed one (its residual is affine in ẋ_s)."""
    loss = MeanFlowLoss(tangent=tangent).double()
    x = torch.randn(64, 2, dtype=torch.float64)
    s = torch.rand(64, dtype=torch.float64) * 0.8
    t = s + 0.1 + torch.rand(64, dtype=torch.float64) * (0.9 - s)
    values = []
    for perturb in (0.0, 0.05):
        fm = FlowMap(ExactPhi(gaussian, perturb))
        values.append(loss.off_diagonal(fm, None, x, s, t, 10, gaussian.velocity(x, s)).mean())
    assert values[0] < 1e-20 and values[1] > 1e-5, values


def test_dyadic_pairs_lie_on_the_grid_and_follow_the_curriculum():
    sampler = TimePairSampler("dyadic", eta=0.0, levels=5, gap_start=2**-4, gap_warmup_steps=100)
    early, late = sampler(4096, step=0), sampler(4096, step=100)
    for p in (early, late):
        gap = p.t - p.s
        level = -torch.log2(gap)
        assert torch.allclose(level, level.round()) and (level.round() <= 5).all()
        assert torch.allclose(p.s / gap, (p.s / gap).round()) and (p.t <= 1).all()
    assert (early.t - early.s).max() <= 2**-4 and set(
        (-torch.log2(early.t - early.s)).round().tolist()
    ) == {4, 5}
    assert (late.t - late.s).max() == 1.0
    back = TimePairSampler("dyadic", eta=0.0, levels=3, backward_fraction=0.5)(2048)
    gap = (back.t - back.s).abs()
    assert (back.s > back.t).any() and torch.allclose(-torch.log2(gap), (-torch.log2(gap)).round())
    with pytest.raises(ValueError, match="finest gap is 2\\*\\*-3"):
        TimePairSampler("dyadic", levels=3, gap_start=0.05, gap_warmup_steps=10)


def _one_jump_error(fm, gaussian, x0, one_time):
    with torch.no_grad():
        if one_time:
            x = sample_consistency(fm, x0, fm.path, steps=1).x
        else:
            x = sample_flow_map(fm, x0, steps=1).x
    exact = gaussian.flow_map(x0.double(), 0.0, 1.0).float()
    return (x - exact).pow(2).sum(1).mean().sqrt().item()


#: the one-jump RMS error each kind reaches in the short run below, with a margin (measured: lsd
#: 0.25, shortcut 0.12, consistency distillation 0.05, MeanFlow 0.24, improved MeanFlow 0.23, sCT
#: 0.68; untrained: 2.1-2.4).
#: sCT regresses the one-time map onto the noisy conditional velocity and learns slowest.
SHORT_RUN_BOUND = {
    "lsd": 0.45,
    "shortcut": 0.3,
    "consistency_distillation": 0.15,
    "meanflow": 0.45,
    "improved_meanflow": 0.45,
    "sct": 1.1,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHORT_RUN_BOUND))
def test_a_short_run_of_each_kind_learns_the_gaussian_flow_map(gaussian, name):
    """A tiny net, 400 steps of each kind of preset (Lagrangian, semigroup, MeanFlow, one-time
    maps from scratch and distilled): one jump from noise lands near the exact map's endpoint."""
    torch.manual_seed(0)
    loss, spec = build_loss(name), PRESETS[name]
    net = MLP((2,), width=64, depth=2)
    fm = FlowMap(net)
    teacher = None
    if spec.needs_teacher:  # distil the exact velocity, as the benchmark distils a CFM teacher
        teacher = type(gaussian)(gaussian.mu.float(), gaussian.c.float(), "linear").velocity
    x0 = torch.randn(2048, 2, generator=torch.Generator().manual_seed(1))
    before = _one_jump_error(fm, gaussian, x0, loss.pairs.one_time)
    steps = 400
    opt = torch.optim.Adam(list(net.parameters()) + list(loss.parameters()), lr=2e-3)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)
    g = torch.Generator().manual_seed(2)
    for k in range(steps):
        x1 = gaussian.mu + gaussian.c * torch.randn(256, 2, generator=g, dtype=torch.float64)
        out = loss(fm, x1.float(), teacher, step=k)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        decay.step()
    after = _one_jump_error(fm, gaussian, x0, loss.pairs.one_time)
    assert before > 1.5, before
    assert after < SHORT_RUN_BOUND[name], (name, before, after)


def test_the_self_distillation_benchmark_runs_and_reports(tmp_path):
    """A few steps of two rows through the benchmark's own run and report (no peers: an extra)."""
    spec = importlib.util.spec_from_file_location(
        "self_distillation", ROOT / "benchmarks" / "self_distillation.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    common = ["--targets", "checkerboard", "--steps", "3", "--n", "100", "--out", str(tmp_path)]
    bench.main(
        ["run", "--methods", "lsd", "consistency_distillation", "--seeds", "0", "1", *common]
    )
    rows = sorted(p.name for p in (tmp_path / "rows").glob("*.json"))
    assert rows == [
        f"checkerboard__{m}__s{k}.json" for m in ("consistency_distillation", "lsd") for k in (0, 1)
    ]
    assert (tmp_path / "teachers" / "checkerboard_s1.pt").is_file()  # a distilled row's teacher
    bench.main(["report", "--out", str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    assert "| lsd | preset, from scratch | 2 |" in report and (tmp_path / "quality.png").is_file()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["over_seeds"]["checkerboard"]["lsd"]["1"]["n_seeds"] == 2


def test_a_preset_yaml_fits_through_the_cli_and_its_checkpoint_samples(tmp_path):
    """sCT end to end: MeanFlowLoss on one-time pairs with learned weighting, fitted by
    ``flowmap fit`` from its YAML; the checkpoint reloads as a one-time map that re-noises."""
    from flowmap.training import load_module
    from tests.helpers import fit_cli

    ckpt = fit_cli(
        str(PRESET_DIR / "sct.yaml"),
        tmp_path,
        "--trainer.max_steps=3",
        "--trainer.callbacks=[]",
        "--trainer.val_check_interval=3",
        "--data.init_args.batch_size=64",
    )
    module = load_module(FlowMapModule, ckpt)
    assert isinstance(module.loss, MeanFlowLoss) and module.one_time
    x = module.generate(torch.randn(32, 2), nfe=2)
    assert x.nfe == 2 and torch.isfinite(x.x).all()


def test_a_teacherless_fit_of_a_distillation_preset_is_refused_before_training(tmp_path, capsys):
    """sCD's one-time pairs have no diagonal rows, so self-distilling them is one sentence."""
    from flowmap.apps.cli import main

    with pytest.raises(SystemExit) as done:
        main(
            [
                "fit",
                "--config",
                str(PRESET_DIR / "scd.yaml"),
                "--model.teacher=null",
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.max_steps=2",
            ]
        )
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "flowmap: error:" in err and "pairs.eta = 0 never trains" in err
    assert not list(tmp_path.rglob("*.ckpt"))
