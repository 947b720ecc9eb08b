"""`flowmap steer` (flowmap.apps.steer): the files it writes and prints, rewards by import path
(a function with --reward-args, a class), guidance that moves samples the reward's way for a flow
map and a teacher, best-of-N and resampling above unguided sampling, an inverse problem by
--observed (one observation, or one per sample), and every user mistake as one sentence."""

import numpy as np
import pytest
import torch

import flowmap.apps.steer as steer
from flowmap.apps.cli import main
from flowmap.apps.lightning_cli import cli_main
from tests.helpers import TINY_CLI, one_line_error

HERE = "tests.test_steer_cli"


# --------------------------------------------------------------------------- rewards by import path
def reward_right(x):
    """Further right is better: :math:`r(x) = x_0`."""
    return x[:, 0]


def reward_near(x, c=0.0):
    """Close to ``c`` in the first coordinate: :math:`r(x) = -(x_0 - c)^2`."""
    return -((x[:, 0] - c) ** 2)


def reward_wrong_shape(x):
    """A mistake: one value per coordinate, not per sample."""
    return x


def reward_not_finite(x):
    """A mistake: the log of a coordinate that may be negative."""
    return x[:, 0].log()


def reward_not_a_tensor(x):
    """A mistake: a list, not a tensor."""
    return x[:, 0].tolist()


class RightOf(torch.nn.Module):
    """A reward class built with keyword arguments: :math:`r(x) = w\\,x_0`."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return self.weight * x[:, 0]


# --------------------------------------------------------------------------- a tiny flow map
@pytest.fixture(scope="module")
def tiny_map(tiny_teacher, tmp_path_factory):
    """A 2-step Lagrangian map of the 2-step toy teacher (conftest's ``tiny_teacher``)."""
    root = tmp_path_factory.mktemp("steer-map")
    cli_main(
        [
            "fit",
            "--config",
            "recipes/toy2d/lagrangian.yaml",
            *TINY_CLI,
            "--trainer.max_steps=2",
            f"--model.teacher={tiny_teacher}",
            f"--trainer.default_root_dir={root}",
        ]
    )
    return next(root.rglob("last.ckpt"))


def run(ckpt, out, *argv):
    """``flowmap steer --ckpt CKPT --out OUT ARGV`` → the arrays it wrote."""
    main(["steer", "--ckpt", str(ckpt), "--out", str(out), "--n", "64", *argv])
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------- guided sampling
def test_steer_writes_samples_noise_and_rewards_and_a_picture(tiny_map, tmp_path, capsys):
    out = tmp_path / "pics" / "steered.npz"
    reward = ["--reward", f"{HERE}:reward_right", "--n", "16", "--steps", "2"]
    main(["steer", "--ckpt", str(tiny_map), *reward, "--out", str(out)])
    assert sorted(p.name for p in out.parent.iterdir()) == ["steered.npz", "steered.png"]
    with np.load(out) as z:
        assert sorted(z.files) == ["noise", "reward", "samples"]
        assert z["samples"].shape == z["noise"].shape == (16, 2) and z["reward"].shape == (16,)
        np.testing.assert_allclose(z["reward"], z["samples"][:, 0], rtol=1e-5)
        mean = z["reward"].mean()
    printed = capsys.readouterr().out
    # two jumps: look-ahead forward and backward then the jump, the last jump is the look-ahead
    assert printed.startswith(f"{out}: 16 steered samples (guided, flow_map look-ahead, scale 1)")
    assert "NFE 6 per sample" in printed and f"mean reward {mean:.4g}" in printed
    assert f"picture {out.with_suffix('.png')}" in printed


@pytest.mark.parametrize("model", ["tiny_map", "tiny_teacher"])
def test_a_reward_by_import_path_moves_the_samples_its_way(model, request, tmp_path):
    ckpt = request.getfixturevalue(model)
    reward = ["--reward", f"{HERE}:reward_right", "--steps", "4"]
    plain = run(ckpt, tmp_path / "plain.npz", *reward, "--scale", "0")
    steered = run(ckpt, tmp_path / "steered.npz", *reward)
    np.testing.assert_array_equal(plain["noise"], steered["noise"])  # the same seed
    assert steered["samples"][:, 0].mean() > plain["samples"][:, 0].mean() + 0.5
    at_end = run(ckpt, tmp_path / "at_end.npz", *reward, "--gradient", "endpoint")
    assert at_end["samples"][:, 0].mean() > plain["samples"][:, 0].mean() + 0.5
    # a teacher looks ahead with its denoiser, by default and on request
    if model == "tiny_teacher":
        again = run(ckpt, tmp_path / "again.npz", *reward, "--lookahead", "denoiser")
        np.testing.assert_array_equal(again["samples"], steered["samples"])


def test_reward_args_reach_a_function_and_a_class(tiny_map, tmp_path):
    near = [f"{HERE}:reward_near", "--reward-args", '{"c": 1.5}', "--scale", "2"]
    near = run(tiny_map, tmp_path / "near.npz", "--reward", *near)
    np.testing.assert_allclose(near["reward"], -((near["samples"][:, 0] - 1.5) ** 2), rtol=1e-5)
    assert abs(near["samples"][:, 0].mean() - 1.5) < 0.5
    weighted = [f"{HERE}.RightOf", "--reward-args", '{"weight": 2.0}']
    weighted = run(tiny_map, tmp_path / "w.npz", "--reward", *weighted)
    np.testing.assert_allclose(weighted["reward"], 2 * weighted["samples"][:, 0], rtol=1e-5)


# --------------------------------------------------------------------------- search over noises
@pytest.mark.parametrize("search", [["--best-of", "8"], ["--resample", "8", "--lam", "4"]])
def test_search_beats_unguided_sampling_at_the_same_seed(tiny_map, tmp_path, capsys, search):
    reward = ["--reward", f"{HERE}:reward_right", "--steps", "1"]
    plain = run(tiny_map, tmp_path / "plain.npz", *reward, "--scale", "0")
    found = run(tiny_map, tmp_path / "found.npz", *reward, *search)
    assert found["samples"].shape == found["noise"].shape == (64, 2)
    np.testing.assert_allclose(found["reward"], found["samples"][:, 0], rtol=1e-5)
    assert found["reward"].mean() > plain["reward"].mean() + 0.3
    assert "NFE 8 per sample" in capsys.readouterr().out.splitlines()[-1]  # 8 candidates x 1 jump


# --------------------------------------------------------------------------- inverse problems
def test_an_observed_coordinate_pulls_the_samples_to_it(tiny_map, tmp_path):
    obs = tmp_path / "obs.npz"
    np.savez(obs, observed=np.array([2.0, 0.0], np.float32), mask=np.array([1.0, 0.0], np.float32))
    plain = run(
        tiny_map, tmp_path / "plain.npz", "--reward", f"{HERE}:reward_right", "--scale", "0"
    )
    fit = run(tiny_map, tmp_path / "fit.npz", "--observed", str(obs), "--scale", "2")
    np.testing.assert_array_equal(plain["noise"], fit["noise"])
    np.testing.assert_allclose(fit["reward"], -((fit["samples"][:, 0] - 2.0) ** 2), rtol=1e-5)
    err = np.abs(fit["samples"][:, 0] - 2.0).mean()
    assert err < 0.25 and err < 0.25 * np.abs(plain["samples"][:, 0] - 2.0).mean()
    assert fit["samples"][:, 1].std() > 0.3  # the unobserved coordinate stays free


def test_one_observation_per_sample_sets_n_and_stays_aligned_in_a_search(tiny_map, tmp_path):
    obs = tmp_path / "obs.npz"
    targets = np.linspace(-2, 2, 10, dtype=np.float32)
    np.savez(obs, observed=np.stack([targets, np.zeros(10, np.float32)], 1), mask=[1.0, 0.0])
    out = tmp_path / "fit.npz"
    main(["steer", "--ckpt", str(tiny_map), "--observed", str(obs), "--out", str(out)])
    with np.load(out) as z:
        assert z["samples"].shape == (10, 2)  # one sample per observation
        assert np.abs(z["samples"][:, 0] - targets).max() < 0.5
    main(
        [
            "steer",
            "--ckpt",
            str(tiny_map),
            "--observed",
            str(obs),
            "--best-of",
            "4",
            "--out",
            str(out),
        ]
    )
    with np.load(out) as z:  # each reward is its own sample's distance to its own observation
        np.testing.assert_allclose(z["reward"], -((z["samples"][:, 0] - targets) ** 2), rtol=1e-5)


# --------------------------------------------------------------------------- one-sentence errors
@pytest.mark.parametrize(
    "argv, match",
    [
        (["--reward", f"{HERE}:reward_right", "--observed", "obs.npz"], "(not both)"),
        ([], "Give one reward: --reward SPEC, or --observed"),
        (["--reward-args", "{}", "--observed", "obs.npz"], "give --reward too"),
        (["--reward", f"{HERE}:reward_right", "--reward-args", "{c: 1}"], "not valid JSON"),
        (["--reward", f"{HERE}:reward_right", "--reward-args", "[1]"], "a JSON object"),
        (["--reward", f"{HERE}:no_such_reward"], "Cannot import the reward"),
        (["--reward", "class:x"], "class:K takes a whole number K"),
        (["--reward", "class:12"], "is not a class of this classifier (0..9)"),
        (["--reward", "class:1", "--best-of", "2", "--resample", "2"], "not allowed with"),
    ],
)
def test_a_bad_reward_is_one_sentence_before_any_work(capsys, tmp_path, argv, match):
    out = str(tmp_path / "s.npz")
    one_line_error(capsys, ["steer", "--ckpt", "none.ckpt", "--out", out, *argv], match)


@pytest.mark.parametrize(
    "model, argv, match",
    [
        (
            "tiny_teacher",
            ["--lookahead", "flow_map"],
            "use --lookahead denoiser to steer a teacher",
        ),
        ("tiny_teacher", ["--best-of", "4"], "search over the jumps of a flow map"),
        ("tiny_map", ["--class", "2"], "trained without classes"),
    ],
)
def test_what_a_model_cannot_do_is_one_sentence(capsys, request, tmp_path, model, argv, match):
    ckpt = str(request.getfixturevalue(model))
    argv = ["--reward", f"{HERE}:reward_right", *argv]
    one_line_error(
        capsys, ["steer", "--ckpt", ckpt, "--out", str(tmp_path / "s.npz"), *argv], match
    )
    assert not (tmp_path / "s.npz").exists()


def test_a_bad_reward_or_observation_at_sampling_is_one_sentence(capsys, tiny_map, tmp_path):
    argv = ["steer", "--ckpt", str(tiny_map), "--out", str(tmp_path / "s.npz"), "--n", "16"]
    err = one_line_error(
        capsys, [*argv, "--reward", f"{HERE}:reward_wrong_shape"], "returned shape (16, 2)"
    )
    assert "one value per sample" in err
    one_line_error(capsys, [*argv, "--reward", f"{HERE}:reward_not_finite"], "non-finite value")
    one_line_error(capsys, [*argv, "--reward", f"{HERE}:reward_not_a_tensor"], "returned a list")
    for bad in ([[1.0, 2.0, 3.0]], None):  # an observation of another shape; no 'observed'
        obs = tmp_path / "obs.npz"
        np.savez(obs, **({"observed": np.array(bad)} if bad else {"y": np.zeros(2)}))
        match = "but the checkpoint's samples have shape [2]" if bad else "no 'observed' array"
        one_line_error(capsys, [*argv, "--observed", str(obs)], match)


# --------------------------------------------------------------------------- help
def test_steer_help_is_short_and_describes_every_option(capsys):
    main(["--help"])
    assert "\n  steer " in capsys.readouterr().out
    parser = steer.parser()
    text = parser.format_help()
    assert text.startswith("usage: flowmap steer") and len(text.splitlines()) < 70
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.dest
    assert "``" not in text and "DESIGN" not in text


def test_reward_finetuning_through_fit_starts_at_the_map_and_raises_the_reward(
    tiny_map, tiny_teacher, tmp_path, capsys
):
    """``flowmap fit`` with RewardLoss and a flow map's checkpoint as the teacher: the student
    starts as that map (reward and distance equal the reference's at step 0) and learns to
    raise r(x) = x[:, 0]; a velocity teacher is refused in one sentence before any step."""
    from flowmap.training import FlowMapModule, load_module

    tune = [
        "fit",
        "--config",
        "recipes/toy2d/lagrangian.yaml",
        *TINY_CLI,
        "--model.loss={class_path: flowmap.steering.RewardLoss, init_args: "
        f"{{reward: '{HERE}:reward_right', beta: 0.1}}}}",
        "--model.lr=0.01",
        "--model.warmup_steps=0",
        "--model.lr_schedule=constant",
        "--model.ema_decay=null",
    ]
    root = tmp_path / "tuned"
    cli_main(
        [
            *tune,
            "--trainer.max_steps=40",
            f"--model.teacher={tiny_map}",
            f"--trainer.default_root_dir={root}",
        ]
    )
    tuned = load_module(FlowMapModule, next(root.rglob("last.ckpt")))
    reference = load_module(FlowMapModule, tiny_map).sampling_flow_map
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = reference(z, 0.0, 1.0), tuned.sampling_flow_map(z, 0.0, 1.0)
    assert after[:, 0].mean() > before[:, 0].mean() + 0.5
    # held by the penalty: -x + beta (dx^2 + dy^2)/2 is least at dx = 1/beta = 10, dy = 0
    shift = after - before
    assert shift[:, 0].mean() < 10.5 and shift[:, 1].abs().mean() < 1.0
    # penalty kl fits the tilt p_ref exp(r): its mean of x[:, 0] is the reference's weighted one
    kl = tmp_path / "kl"
    tune_kl = [
        a.replace("beta: 0.1", "penalty: kl, candidates: 2048")
        if a.startswith("--model.loss=")
        else a
        for a in tune
    ]
    cli_main(
        [
            *tune_kl,
            "--trainer.max_steps=60",
            "--model.lr=0.003",
            f"--model.teacher={tiny_map}",
            f"--trainer.default_root_dir={kl}",
        ]
    )
    fitted = load_module(FlowMapModule, next(kl.rglob("last.ckpt"))).sampling_flow_map
    with torch.no_grad():
        tilted = fitted(z, 0.0, 1.0)
    weights = torch.softmax(before[:, 0], 0)
    expected = (weights * before[:, 0]).sum()
    assert abs(tilted[:, 0].mean() - expected) < 0.3 < expected - before[:, 0].mean()
    assert tilted[:, 1].std() > 0.7 * before[:, 1].std()  # the untilted coordinate keeps its spread
    # the student starts as the map: one step at a learning rate of 1e-12 leaves it the reference
    still = tmp_path / "still"
    cli_main(
        [
            *tune,
            "--trainer.max_steps=1",
            "--model.lr=1e-12",
            f"--model.teacher={tiny_map}",
            f"--trainer.default_root_dir={still}",
        ]
    )
    start = load_module(FlowMapModule, next(still.rglob("last.ckpt"))).sampling_flow_map
    with torch.no_grad():
        torch.testing.assert_close(start(z, 0.0, 1.0), before)
    with pytest.raises(ValueError, match="flow map's checkpoint"):
        cli_main(
            [
                *tune,
                "--trainer.max_steps=1",
                f"--model.teacher={tiny_teacher}",
                f"--trainer.default_root_dir={tmp_path / 'refused'}",
            ]
        )
    assert not list((tmp_path / "refused").rglob("*.ckpt"))
