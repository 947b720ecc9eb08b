r"""Known methods as presets: each a named configuration of the package's losses, no copied loss.

The taxonomy (Boffi et al.; Dieleman's account) places every method at a point of one space:
the **residual** (Lagrangian :math:`\partial_t X = b_t(X)`, Eulerian
:math:`\partial_s X + \nabla_x X\,b_s = 0`, semigroup :math:`X(s,t,\cdot) = X(u,t,X(s,u,\cdot))`),
the **teacher** (a frozen velocity :math:`b`, the model's own diagonal
:math:`\mathrm{sg}\,\phi(\cdot,t,t)`, or the conditional velocity :math:`\dot x_t`), the
**stop-gradient** placement, the **time pairs** and the **weighting**. A :class:`Preset` is that
point written as a ``class_path`` config of a :class:`~flowmap.losses.FlowMapLoss`, with its
citation and its place in one line::

    from flowmap.presets import PRESETS, build_loss
    loss = build_loss("lsd")                 # a LagrangianLoss configured as in Boffi et al.
    PRESETS["meanflow"].needs_teacher        # False: trains from scratch

``recipes/presets/<name>.yaml`` holds each as a ``flowmap fit`` config on the toy checkerboard,
written from this module by ``scripts/write_presets.py`` (a test keeps them equal).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from flowmap.losses import LOSSES, FlowMapLoss

__all__ = ["Preset", "PRESETS", "build_loss", "loss_config", "preset"]

_L, _E, _S, _M = (
    f"flowmap.losses.{n}"
    for n in ("LagrangianLoss", "EulerianLoss", "SemigroupLoss", "MeanFlowLoss")
)
_ONE_TIME = "flowmap.losses.OneTimePairSampler"
#: the tangent warm-up of the JVP presets, in steps (sCM: 10k of 400k; here a third of the 3000
#: steps of the toy budget)
_WARMUP = 1000


def _loss(class_path: str, **init_args: Any) -> dict[str, Any]:
    return {"class_path": class_path, "init_args": init_args}


@dataclass(frozen=True)
class Preset:
    """A known method as a configuration of the package's classes.

    Attributes:
        name: the key in :data:`PRESETS` and the YAML file's stem.
        title: the method's usual name.
        citation: the paper.
        place: its place in the taxonomy, one line.
        loss: the ``{"class_path", "init_args"}`` config of its :class:`FlowMapLoss`.
        needs_teacher: whether it distils a teacher (else it trains from scratch).
        residual, teacher, stop_gradient, pairs, weighting: the README table's columns.
        differences: where the preset departs from the paper, and why.
    """

    name: str
    title: str
    citation: str
    place: str
    loss: dict[str, Any]
    needs_teacher: bool
    residual: str
    teacher: str
    stop_gradient: str
    pairs: str
    weighting: str
    differences: str = ""

    def build_loss(self) -> FlowMapLoss:
        """A fresh :class:`FlowMapLoss` built from :attr:`loss` (as ``flowmap fit`` builds it)."""
        parser = _loss_parser()
        return parser.instantiate_classes(parser.parse_object({"loss": self.loss})).loss


def _loss_parser() -> Any:
    from jsonargparse import ArgumentParser  # only when a loss is built from a config

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--loss", type=FlowMapLoss)
    return parser


def loss_config(name: str) -> dict[str, Any]:
    """The complete ``class_path`` config (every argument, defaults filled in) of a preset's loss
    or of a loss class (``EulerianLoss`` or ``flowmap.losses.EulerianLoss``): what
    ``flowmap fit --model.loss=NAME`` trains with. Anything else is a one-sentence ``ValueError``."""
    import yaml

    given = PRESETS[name].loss if name in PRESETS else {"class_path": name}
    parser = _loss_parser()
    try:
        cfg = parser.parse_object({"loss": given})
    except Exception:  # jsonargparse's report of an unknown class: answered by name below
        losses = sorted(c.__name__ for c in LOSSES)
        close = difflib.get_close_matches(name, [*PRESETS, *losses], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"--model.loss={name} is not known; {hint}it takes a preset"
            f" ({', '.join(sorted(PRESETS))}) or a loss class ({', '.join(losses)}); see "
            "`flowmap fit --help`."
        ) from None
    return yaml.safe_load(parser.dump(cfg, skip_none=False))["loss"]


_UNIFORM_75 = {"eta": 0.75}
_MEANFLOW_PAIRS = {"distribution": "logit_normal", "loc": 0.4, "scale": 1.0, "eta": 0.75}
_SCM_PAIRS = {
    "class_path": _ONE_TIME,
    "init_args": {"distribution": "logit_normal", "loc": 1.0, "scale": 1.6},
}
_DYADIC = {"distribution": "dyadic", "levels": 7}
_UNWEIGHTED = (
    "Boffi et al. weight each pair by a learned log-variance; with it, self-distillation collapsed "
    "here (checkerboard W2 3.99 at every NFE: row lsd_learned of "
    "benchmarks/results/self-distillation), so these presets are unweighted, as "
    "rectified-flow-pytorch's LsdFlow."
)

_ALL = [
    Preset(
        name="lsd",
        title="Lagrangian self-distillation (LSD)",
        citation="Boffi, Albergo & Vanden-Eijnden, How to build a consistency model: learning flow "
        "maps via self-distillation (arXiv:2505.18825, 2025)",
        place="Lagrangian residual, the model's own diagonal as teacher, backprop through the "
        "time JVP",
        loss=_loss(_L, form="backprop", pairs=_UNIFORM_75, weighting={"kind": "none"}),
        needs_teacher=False,
        residual="Lagrangian",
        teacher="own diagonal",
        stop_gradient="on X and the teacher; through the time JVP",
        pairs="uniform triangle, 75% diagonal",
        weighting="none",
        differences=_UNWEIGHTED,
    ),
    Preset(
        name="esd",
        title="Eulerian self-distillation (ESD)",
        citation="Boffi, Albergo & Vanden-Eijnden (arXiv:2505.18825, 2025)",
        place="Eulerian residual, own diagonal as teacher, stop-gradient on the advective term",
        loss=_loss(_E, form="sg_advective", pairs=_UNIFORM_75),
        needs_teacher=False,
        residual="Eulerian",
        teacher="own diagonal",
        stop_gradient="on the advective term ∇X·b",
        pairs="uniform triangle, 75% diagonal",
        weighting="none",
        differences=_UNWEIGHTED,
    ),
    Preset(
        name="psd_midpoint",
        title="Progressive self-distillation, midpoint (PSD-M)",
        citation="Boffi, Albergo & Vanden-Eijnden (arXiv:2505.18825, 2025)",
        place="semigroup residual at u = (s+t)/2, own map as teacher, no JVP",
        loss=_loss(_S, split="midpoint", teacher_gap=0.0, pairs=_UNIFORM_75),
        needs_teacher=False,
        residual="semigroup (midpoint)",
        teacher="own map",
        stop_gradient="on both half jumps",
        pairs="uniform triangle, 75% diagonal",
        weighting="none",
        differences=_UNWEIGHTED,
    ),
    Preset(
        name="psd_uniform",
        title="Progressive self-distillation, uniform split (PSD-U)",
        citation="Boffi, Albergo & Vanden-Eijnden (arXiv:2505.18825, 2025)",
        place="semigroup residual at u = γs + (1−γ)t, γ ~ U[0,1], own map as teacher, no JVP",
        loss=_loss(_S, split="uniform", teacher_gap=0.0, pairs=_UNIFORM_75),
        needs_teacher=False,
        residual="semigroup (uniform)",
        teacher="own map",
        stop_gradient="on both sub-jumps",
        pairs="uniform triangle, 75% diagonal",
        weighting="none",
        differences=_UNWEIGHTED
        + " SplitMeanFlow (Guo et al. 2025) is this residual in average-velocity form.",
    ),
    Preset(
        name="meanflow",
        title="MeanFlow",
        citation="Geng, Deng, Bai, Kolter & He, Mean flows for one-step generative modeling "
        "(arXiv:2505.13447, 2025)",
        place="Eulerian residual with the conditional velocity ẋ_s in place of b, regression "
        "(stop-gradient) form",
        loss=_loss(
            _M,
            tangent="conditional",
            pairs=_MEANFLOW_PAIRS,
            weighting={"kind": "adaptive", "p": 0.75, "eps": 1e-3},
        ),
        needs_teacher=False,
        residual="Eulerian",
        teacher="conditional velocity ẋ_s",
        stop_gradient="on the whole target (semigradient)",
        pairs="logit-normal(−0.4, 1) in MeanFlow's time (noise at 1), 75% diagonal",
        weighting="adaptive, p = 0.75",
        differences="p = 0.75 is MeanFlow's CIFAR-10 setting (its ImageNet time law, p = 1.0): "
        "with p = 1 the checkerboard's 1-NFE W2 was 0.74 ± 0.06 at 3000 steps, and a 2D "
        "Gaussian's one-jump error 0.43 against 0.24 (p = 0.75) in 400 steps. flowmap's loss is "
        "a mean over dimensions where MeanFlow sums, so ε acts D times larger; its r = t rows "
        "take one logit-normal draw where MeanFlow takes the larger of two.",
    ),
    Preset(
        name="improved_meanflow",
        title="Improved MeanFlow (iMF)",
        citation="Geng, Lu et al., Improved mean flows (2025)",
        place="MeanFlow with the model's own velocity sg φ(x,s,s) as the JVP's direction",
        loss=_loss(
            _M,
            tangent="model",
            pairs=_MEANFLOW_PAIRS,
            weighting={"kind": "adaptive", "p": 0.75, "eps": 1e-3},
        ),
        needs_teacher=False,
        residual="Eulerian",
        teacher="ẋ_s in the target, own diagonal as tangent",
        stop_gradient="on the target (same semigradient as iMF's v-loss)",
        pairs="as MeanFlow",
        weighting="adaptive, p = 0.75",
        differences="iMF's in-context conditioning and guidance inputs are architecture and "
        "conditioning, not the loss; not part of the preset.",
    ),
    Preset(
        name="shortcut",
        title="Shortcut models",
        citation="Frans, Hafner, Levine & Abbeel, One step diffusion via shortcut models (ICLR 2025)",
        place="semigroup residual at the midpoint on a dyadic grid of step sizes, own map as "
        "teacher (PSD-M, discretised)",
        loss=_loss(
            _S,
            split="midpoint",
            teacher_gap=2.0**-7,
            teacher_steps=1,
            pairs={**_DYADIC, "eta": 0.875},
        ),
        needs_teacher=False,
        residual="semigroup (midpoint)",
        teacher="own map; own diagonal (Heun) at the finest step 1/128",
        stop_gradient="on both half jumps",
        pairs="dyadic d = 2^-k, k ≤ 7, s on the grid of d; 7/8 diagonal",
        weighting="none",
        differences="shortcut bootstraps from EMA weights; flowmap's self-teacher is the current "
        "weights (Boffi et al. found an EMA teacher no better), and no target clipping. Its finest "
        "step 1/128 is trained by flow matching on x1 − x0; here by a Heun step of the model's own "
        "diagonal (the diagonal rows do the flow matching).",
    ),
    Preset(
        name="consistency_distillation",
        title="Consistency distillation (CD)",
        citation="Song, Dhariwal, Chen & Sutskever, Consistency models (ICML 2023)",
        place="discrete Eulerian residual of the one-time map X(s, 1, ·): the teacher moves the "
        "start time one Heun step of 1/16, the map does the rest",
        loss=_loss(
            _E,
            form="discrete",
            teacher_share=1.0,
            teacher_steps=1,
            teacher_max_gap=0.0625,
            pairs={"class_path": _ONE_TIME, "init_args": {"distribution": "uniform"}},
        ),
        needs_teacher=True,
        residual="Eulerian (discrete), one-time",
        teacher="frozen velocity, one Heun step",
        stop_gradient="on the target X(u, 1, x̂_u)",
        pairs="(s, 1), s uniform",
        weighting="none",
        differences="the target uses the current weights (iCT's choice), not CD's EMA θ⁻; ℓ2 "
        "distance, no LPIPS.",
    ),
    Preset(
        name="scd",
        title="Continuous-time consistency distillation (sCD)",
        citation="Lu & Song, Simplifying, stabilizing and scaling continuous-time consistency "
        "models (ICLR 2025)",
        place="continuous Eulerian residual (regression form) of the one-time map X(s, 1, ·) with "
        "sCM's stabilisers",
        loss=_loss(
            _E,
            form="regression",
            tangent_norm=0.1,
            tangent_warmup_steps=_WARMUP,
            pairs=_SCM_PAIRS,
            weighting={"kind": "learned"},
        ),
        needs_teacher=True,
        residual="Eulerian (JVP), one-time",
        teacher="frozen velocity",
        stop_gradient="on the target (semigradient)",
        pairs="(s, 1), log((1−s)/s) ~ N(−1.0, 1.6²) (sCM's tan law)",
        weighting="learned log-variance",
        differences="the linear path instead of TrigFlow (the same ODE up to a change of time and "
        "scale); tangent normalisation c = 0.1 and warm-up as sCM; no adaptive double "
        "normalisation (an architecture change).",
    ),
    Preset(
        name="sct",
        title="Continuous-time consistency training (sCT)",
        citation="Lu & Song (ICLR 2025)",
        place="MeanFlow's Eulerian residual with ẋ_s on the one-time map X(s, 1, ·), with sCM's "
        "stabilisers",
        loss=_loss(
            _M,
            tangent="conditional",
            tangent_norm=0.1,
            tangent_warmup_steps=_WARMUP,
            pairs=_SCM_PAIRS,
            weighting={"kind": "learned"},
        ),
        needs_teacher=False,
        residual="Eulerian (JVP), one-time",
        teacher="conditional velocity ẋ_s",
        stop_gradient="on the target (semigradient)",
        pairs="(s, 1), as sCD",
        weighting="learned log-variance",
        differences="as sCD.",
    ),
    Preset(
        name="tvm",
        title="Terminal velocity matching (TVM)",
        citation="Zhou, Parger, Haque & Song, Terminal velocity matching (ICLR 2026)",
        place="Lagrangian residual (the terminal velocity ∂_t X), own diagonal as teacher, "
        "backprop through the JVP",
        loss=_loss(
            _L,
            form="backprop",
            pairs={"distribution": "logit_normal", "loc": 0.4, "scale": 1.0, "eta": 0.5},
        ),
        needs_teacher=False,
        residual="Lagrangian",
        teacher="own diagonal",
        stop_gradient="on X and the teacher; through the time JVP",
        pairs="logit-normal(−0.4, 1) in TVM's time, 50% diagonal (its separate FM term)",
        weighting="none",
        differences="TVM's teacher is an EMA copy (decay 0.99) and its gap has its own "
        "logit-normal law; flowmap uses the current weights (LSD's choice) and sorted "
        "logit-normal pairs.",
    ),
    Preset(
        name="ayf_emd",
        title="Align Your Flow, Eulerian (AYF-EMD)",
        citation="Sabour, Fidler & Kreis, Align your flow: scaling continuous-time flow map "
        "distillation (arXiv:2506.14603, 2025)",
        place="continuous Eulerian residual (regression form) of the two-time map, from a teacher, "
        "with tangent normalisation and warm-up",
        loss=_loss(
            _E,
            form="regression",
            tangent_norm=0.1,
            tangent_warmup_steps=_WARMUP,
            pairs={"eta": 0.25},
            weighting={"kind": "learned"},
        ),
        needs_teacher=True,
        residual="Eulerian (JVP)",
        teacher="frozen velocity",
        stop_gradient="on the target (semigradient)",
        pairs="uniform triangle, 25% diagonal",
        weighting="learned log-variance",
        differences="AYF ramps the warm-up to 0.99, not 1, and guides its teacher by "
        "autoguidance; no adversarial fine-tuning.",
    ),
    Preset(
        name="ayf_lmd",
        title="Align Your Flow, Lagrangian (AYF-LMD)",
        citation="Sabour, Fidler & Kreis (arXiv:2506.14603, 2025)",
        place="Lagrangian residual in regression (stop-gradient) form, from a teacher, with "
        "tangent normalisation",
        loss=_loss(
            _L, form="regression", tangent_norm=0.1, pairs={"eta": 0.25}, weighting={"kind": "none"}
        ),
        needs_teacher=True,
        residual="Lagrangian",
        teacher="frozen velocity",
        stop_gradient="on the target (semigradient)",
        pairs="uniform triangle, 25% diagonal",
        weighting="none",
        differences="AYF guides its teacher by autoguidance and adds no weighting here either; no "
        "adversarial fine-tuning. AYF found LMD stable in 2D but over-smoothing on images.",
    ),
    Preset(
        name="progressive",
        title="Progressive distillation, as a semigroup schedule",
        citation="Salimans & Ho, Progressive distillation for fast sampling of diffusion models "
        "(ICLR 2022)",
        place="semigroup residual at the midpoint on a dyadic grid whose longest step grows from "
        "1/64 to 1 (the rounds), the teacher's Heun step at the finest 1/128",
        loss=_loss(
            _S,
            split="midpoint",
            teacher_gap=2.0**-7,
            teacher_steps=1,
            pairs={**_DYADIC, "eta": 0.25, "gap_start": 2.0**-6, "gap_warmup_steps": 2000},
        ),
        needs_teacher=True,
        residual="semigroup (midpoint)",
        teacher="frozen velocity at 1/128, then the map itself",
        stop_gradient="on both half jumps",
        pairs="dyadic, the longest step growing 1/64 → 1 over 2000 steps",
        weighting="none",
        differences="Salimans–Ho freeze each round's student as the next round's teacher and "
        "train one step size per round; here the half jumps come from the current map and all "
        "step sizes up to the cap train at once (nothing is forgotten), so the rounds become a "
        "curriculum on the gap.",
    ),
]

#: every preset by name
PRESETS: dict[str, Preset] = {p.name: p for p in _ALL}


def preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name is a ``ValueError`` listing them."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]


def build_loss(name: str) -> FlowMapLoss:
    """The :class:`FlowMapLoss` of preset ``name``, built fresh."""
    return preset(name).build_loss()
