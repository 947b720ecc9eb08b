r"""``flowmap steer``: samples steered towards a high reward :math:`r(x)` (:mod:`flowmap.steering`).

    flowmap steer --ckpt MODEL.ckpt --reward SPEC [--reward-args JSON] --n 64 --out steered.npz
                  [--seed 0] [--steps 4] [--scale 1.0] [--lookahead flow_map|denoiser]
                  [--schedule tilt|constant] [--gradient input|endpoint] [--class C]
                  [--guidance W]
    flowmap steer --ckpt MAP.ckpt --reward SPEC --best-of 8 --out best.npz      (search)
    flowmap steer --ckpt MAP.ckpt --reward SPEC --resample 8 --lam 1 --out tilted.npz
    flowmap steer --ckpt MODEL.ckpt --observed obs.npz --out restored.npz     (inverse problem)

The reward ``SPEC`` is ``class:K`` (:math:`\log p(K \mid x)` under the shipped digits classifier)
or an import path ``package.module:function`` / ``package.module.Class`` of a callable
``(B, *shape) -> (B,)``, built with the keyword arguments of ``--reward-args`` (a JSON object).
``--observed obs.npz`` (arrays ``observed``, one observation or one per sample, and optionally a
0/1 ``mask``) makes the reward :math:`-\|M \odot (x - y)\|^2`.

Guided sampling (the default) pushes each of ``--steps`` steps along the gradient of the reward
of the predicted endpoint: a flow map jumps and looks ahead with :math:`X(t, 1, x)` (or its
denoiser), a teacher takes Euler steps and looks ahead with its denoiser. ``--best-of N`` and
``--resample N`` search instead over ``N`` noises per sample, each sampled with ``--steps`` jumps
of a flow map (no gradients; the guidance options are not used).

Writes ``samples`` (data space), ``noise``, ``reward`` (of each final sample) and, for a
class-conditional model, ``labels`` into an ``.npz`` (no pickle) and a picture beside it, as
``flowmap sample`` does; prints both paths, the NFE per sample and the mean reward.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowmap.apps.kit import CommandParser, positive_int
from flowmap.apps.sample import _labels, run_label, writable_outputs, write_samples
from flowmap.codecs import trained_codec
from flowmap.io import read_npz
from flowmap.steering import (
    GRADIENTS,
    LOOKAHEADS,
    SCHEDULES,
    ClassReward,
    ObservationReward,
    Reward,
    RewardGuidance,
    best_of_n,
    build_reward,
    evaluate_reward,
    guided_sample,
    import_reward,
    importance_resample,
)
from flowmap.training.loading import load_sampler
from flowmap.training.threads import set_threads

__all__ = ["main", "parser", "read_observation", "reward_of"]

#: samples drawn unless --n (or one per observation of --observed) says otherwise
DEFAULT_N = 64


def parser() -> CommandParser:
    p = CommandParser(
        prog="flowmap steer",
        description="Draw samples steered towards a high reward (look-ahead guidance, or a search "
        "over noises with --best-of/--resample); write them, their noise and rewards to an .npz "
        "and a picture beside it.",
    )
    p.add_argument(
        "--ckpt",
        required=True,
        metavar="MODEL.ckpt",
        help="a flow-map or teacher (VelocityModule) checkpoint",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE",
        help="steered.npz (the picture goes beside it as .png) or a picture .png/.jpg/.pdf/.svg",
    )
    p.add_argument(
        "--n",
        type=positive_int,
        default=argparse.SUPPRESS,  # left out: no attribute, no default shown
        help=f"number of samples (default: {DEFAULT_N}, or one per observation in --observed)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=4,
        help="steps of guided sampling (a flow map's jumps, a teacher's Euler steps); with "
        "--best-of/--resample the jumps of each candidate",
    )
    _reward_options(p.add_argument_group("reward (give --reward or --observed)"))
    _guidance_options(p.add_argument_group("guided sampling (the default)"))
    _search_options(p.add_argument_group("search over noises (flow maps; no guidance)"))
    return p


def _reward_options(p: Any) -> None:
    p.add_argument(
        "--reward",
        default=None,
        metavar="SPEC",
        help="class:K (log p(K|x), the shipped digits classifier) or an import path "
        "package.module:function or package.module.Class of a reward x -> (B,)",
    )
    p.add_argument(
        "--reward-args",
        default=None,
        metavar="JSON",
        help="keyword arguments of the --reward function or class, a JSON object: '{\"k\": 3}'",
    )
    p.add_argument(
        "--observed",
        type=Path,
        default=None,
        metavar="OBS.npz",
        help="inverse problems: an .npz with 'observed' (one sample, or one per sample) and "
        "optionally a 0/1 'mask'; the reward is -|mask*(x - observed)|^2",
    )


def _guidance_options(p: Any) -> None:
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="strength of the reward guidance (0: none); not the classifier-free --guidance",
    )
    p.add_argument(
        "--lookahead",
        choices=LOOKAHEADS,
        default=None,
        help="the endpoint each step scores: flow_map X(t,1,x) (flow maps only) or denoiser "
        "E[x1|x]; None: flow_map for a flow map, denoiser for a teacher",
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="tilt",
        help="weight of the guidance over time: tilt (that of the tilted law p(x) exp r(x)) "
        "or constant",
    )
    p.add_argument(
        "--gradient",
        choices=GRADIENTS,
        default="input",
        help="input: differentiate the reward through the look-ahead (a backward call each "
        "step); endpoint: its gradient at the endpoint, applied at x (no backward call)",
    )
    p.add_argument(
        "--class",
        dest="label",
        type=int,
        default=None,
        metavar="C",
        help="class-conditional models: the class of every sample (-1: no class); None: an "
        "equal share of every class",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        metavar="W",
        help="class-conditional models: the classifier-free guidance scale w; None: the "
        "model's own",
    )


def _search_options(p: Any) -> None:
    search = p.add_mutually_exclusive_group()
    search.add_argument(
        "--best-of",
        type=positive_int,
        default=None,
        metavar="N",
        help="keep the best of N candidate noises per sample",
    )
    search.add_argument(
        "--resample",
        type=positive_int,
        default=None,
        metavar="N",
        help="draw one of N candidates per sample with probability proportional to "
        "exp(lam * reward)",
    )
    p.add_argument("--lam", type=float, default=1.0, help="with --resample: the tilt lam >= 0")


def main(argv: Sequence[str] | None = None) -> Path:
    """Run ``flowmap steer``; returns the path of the ``.npz`` written. A problem the user can fix
    raises :class:`ValueError` or :class:`~flowmap.training.CheckpointError` (one sentence)."""
    args = parser().parse_args(argv)
    npz, picture = writable_outputs(args.out)
    if (args.reward is None) == (args.observed is None):
        raise ValueError(
            "Give one reward: --reward SPEC, or --observed obs.npz for an inverse problem "
            f"({'not both' if args.reward else 'neither was given'})."
        )
    if args.reward_args is not None and args.reward is None:
        raise ValueError("--reward-args are the arguments of --reward; give --reward too.")
    reward = reward_of(args.reward, args.reward_args) if args.reward else None
    set_threads()
    module, kind, _, _ = load_sampler(args.ckpt)
    is_map = kind == "FlowMapModule"
    candidates = args.best_of or args.resample
    _check_model(module, kind, args, is_map, candidates)
    shape = tuple(module.data_shape)
    n = getattr(args, "n", None)
    if args.observed is not None:
        observed, mask = read_observation(args.observed, shape)
        many = observed.dim() == len(shape) + 1  # one observation per sample
        if many and n not in (None, len(observed)):
            raise ValueError(
                f"--observed holds {len(observed)} observations, one per sample, but --n is {n}; "
                f"drop --n or give --n {len(observed)}."
            )
        n = len(observed) if many else n
        reward = ObservationReward(observed, mask)
    n = n or DEFAULT_N
    labels = _labels(module, args.label, n)
    g = torch.Generator().manual_seed(args.seed)
    if candidates:
        x, noise, r, nfe, how = _search(module, reward, args, labels, n, g)
    else:
        x, noise, r, nfe, how = _guide(module, reward, args, labels, n, g, is_map)
    mean = float(r.mean())
    arrays = {"samples": x.numpy(), "noise": noise.numpy(), "reward": r.numpy()}
    title = f"{run_label(args.ckpt)} ({kind}): {how}, NFE {nfe}, mean reward {mean:.3g}"
    grid = labels is not None and args.label is None
    write_samples(npz, picture, arrays, x, title, labels, grid)
    print(
        f"{npz}: {n} steered samples ({how}), NFE {nfe} per sample, mean reward {mean:.4g}; "
        f"picture {picture}"
    )
    return npz


def _check_model(module: Any, kind: str, args: Any, is_map: bool, candidates: int | None) -> None:
    """One-sentence refusals, before any sampling, of what this model cannot do."""
    if trained_codec(getattr(module, "trained_on", None)) is not None:
        raise ValueError(
            f"{args.ckpt!r} is a latent model; flowmap steer scores samples in data space and "
            "does not steer through a codec's decoder."
        )
    if not is_map and candidates:
        raise ValueError(
            f"--best-of and --resample search over the jumps of a flow map, but {args.ckpt!r} is "
            f"a {kind}; give a flow-map checkpoint, or drop them to guide the teacher."
        )
    if not is_map and args.lookahead == "flow_map":
        raise ValueError(
            f"--lookahead flow_map needs a flow map's X(t, 1, x), but {args.ckpt!r} is a {kind}; "
            "use --lookahead denoiser to steer a teacher."
        )
    if is_map and module.one_time and args.steps > 1:
        raise ValueError(
            f"{args.ckpt!r} is a one-time map (a consistency model) that jumps only to t = 1; "
            "steer it with --steps 1."
        )


def _guide(
    module: Any, reward: Reward, args: Any, labels: Tensor | None, n: int, g: Any, is_map: bool
) -> tuple[Tensor, Tensor, Tensor, int, str]:
    """Look-ahead guidance (:func:`~flowmap.steering.guided_sample`): ``(x, noise, reward, NFE,
    what)``; a guided teacher's calls (both branches of classifier-free guidance) count 2."""
    x0 = torch.randn(n, *module.data_shape, generator=g)
    lookahead = args.lookahead or ("flow_map" if is_map else "denoiser")
    steering = RewardGuidance(reward, args.scale, lookahead, args.schedule, gradient=args.gradient)
    if is_map:
        model: Any = module.sampling_flow_map
        cond = module.conditioning.sampling_condition(labels, args.guidance, n)
    else:
        model, cond = module, {"y": labels, "w": args.guidance}
    if isinstance(model, torch.nn.Module):
        model.requires_grad_(False)  # gradients in x only
    sol = guided_sample(model, x0, steering, steps=args.steps, cond=cond)
    with torch.no_grad():
        r = evaluate_reward(reward, sol.x)
    how = f"guided, {lookahead} look-ahead, scale {args.scale:g}"
    return sol.x, x0, r, sol.nfe, how


def _search(
    module: Any, reward: Reward, args: Any, labels: Tensor | None, n: int, g: Any
) -> tuple[Tensor, Tensor, Tensor, int, str]:
    """Best-of-N or importance resampling over a flow map's noises: ``(x, noise, reward, NFE,
    what)``."""
    k = args.best_of or args.resample
    x0 = torch.randn(n, k, *module.data_shape, generator=g)
    cond = module.conditioning.sampling_condition(labels, args.guidance, n)
    flow_map = module.sampling_flow_map
    if args.best_of:
        res = best_of_n(flow_map, reward, x0, jumps=args.steps, cond=cond)
        how = f"best of {k}"
    else:
        res = importance_resample(
            flow_map, reward, x0, args.lam, jumps=args.steps, cond=cond, generator=g
        )
        how = f"resampled from {k}, lam {args.lam:g}"
    return res.x, res.noise, res.reward, res.nfe, how


def reward_of(spec: str, args_json: str | None = None) -> Reward:
    """The reward ``--reward SPEC`` names: ``class:K`` (:class:`~flowmap.steering.ClassReward`)
    or an import path of a function (given ``args_json``'s keywords) or a class (built with them)."""
    kwargs = _json_object(args_json)
    if spec.startswith("class:"):
        if kwargs:
            raise ValueError("--reward class:K takes no --reward-args; drop them.")
        try:
            k = int(spec.removeprefix("class:"))
        except ValueError:
            raise ValueError(
                f"--reward {spec!r}: class:K takes a whole number K, the class to steer towards."
            ) from None
        try:
            return ClassReward(k)
        except ValueError as err:  # a class the classifier does not know
            raise ValueError(f"--reward {spec!r}: {err}") from None
    target = import_reward(spec)
    if isinstance(target, type):
        return build_reward({"class_path": spec.replace(":", "."), "init_args": kwargs})
    if not callable(target):
        raise ValueError(
            f"--reward {spec!r} is a {type(target).__name__}, not a function x -> (B,)."
        )
    if not kwargs:
        return target
    try:
        inspect.signature(target).bind_partial(None, **kwargs)
    except TypeError as err:
        raise ValueError(f"--reward-args do not fit {spec}: {err}.") from None
    return functools.update_wrapper(functools.partial(target, **kwargs), target)


def _json_object(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--reward-args is not valid JSON ({err.msg} at character {err.pos}); give an object "
            "such as '{\"k\": 3}'."
        ) from None
    if not isinstance(value, dict):
        raise ValueError(
            f"--reward-args must be a JSON object of keyword arguments such as '{{\"k\": 3}}', "
            f"not a {type(value).__name__}."
        )
    return value


def read_observation(path: Path, shape: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
    """``observed`` (one sample ``shape``, or one per sample ``(n, *shape)``) and the optional
    ``mask`` of ``path``, an ``.npz`` read without pickles."""
    hint = "save it with numpy.savez(path, observed=y, mask=m) (mask optional)"
    with read_npz(path, "--observed", hint) as z:
        if "observed" not in z.files:
            raise ValueError(f"--observed {str(path)!r} has no 'observed' array; {hint}.")
        observed = torch.as_tensor(z["observed"]).float()
        mask = torch.as_tensor(z["mask"]).float() if "mask" in z.files else None
    if tuple(observed.shape) != shape and tuple(observed.shape[1:]) != shape:
        raise ValueError(
            f"--observed {str(path)!r} holds an observation of shape {list(observed.shape)}, but "
            f"the checkpoint's samples have shape {list(shape)}; give one of that shape, or one "
            "per sample."
        )
    return observed, mask
