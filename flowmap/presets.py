r"""Known methods as presets: each a named configuration of the package's losses, no copied loss.

The taxonomy (Boffi et al.; Dieleman's account) places every method at a point of one space:
the **residual** (Lagrangian :math:`\partial_t X = b_t(X)`, Eulerian
:math:`\partial_s X + \nabla_x X\,b_s = 0`, semigroup :math:`X(s,t,\cdot) = X(u,t,X(s,u,\cdot))`),
the **teacher** (a frozen velocity :math:`b`, the model's own diagonal
:math:`\mathrm{sg}\,\phi(\cdot,t,t)`, or the conditional velocity :math:`\dot x_t`), the
**stop-gradient** placement, the **time pairs** and the **weighting**. A preset is that point
written in one line, EDM2-style: its name, whether it distils a teacher, and the ``class_path``
config of its :class:`~flowmap.losses.FlowMapLoss`. Its prose (citation, place, the README table's
columns, where it departs from the paper) is said once, in ``flowmap/presets.yaml``::

    from flowmap.presets import PRESETS, build_loss
    loss = build_loss("lsd")                 # a LagrangianLoss configured as in Boffi et al.
    PRESETS["meanflow"].needs_teacher        # False: trains from scratch

``scripts/write_presets.py`` renders both into ``recipes/presets/<name>.yaml`` (a ``flowmap fit``
config on the toy checkerboard) and the README's preset table; a test keeps them equal.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flowmap.losses import LOSSES, FlowMapLoss

__all__ = ["Preset", "PRESETS", "build_loss", "loss_config", "preset", "table"]

_L, _E, _S, _M = (
    f"flowmap.losses.{n}"
    for n in ("LagrangianLoss", "EulerianLoss", "SemigroupLoss", "MeanFlowLoss")
)
#: the tangent warm-up of the JVP presets, in steps (sCM: 10k of 400k; here a third of the 3000
#: steps of the toy budget)
_WARMUP = 1000
_SCM = {"tangent_norm": 0.1, "tangent_warmup_steps": _WARMUP}  # sCM's stabilisers
_U75, _U25 = {"eta": 0.75}, {"eta": 0.25}  # uniform triangle, 75% / 25% diagonal rows
_LOGIT = {"distribution": "logit_normal", "loc": 0.4, "scale": 1.0}
_MEANFLOW = {"pairs": {**_LOGIT, **_U75}, "weighting": {"kind": "adaptive", "p": 0.75, "eps": 1e-3}}


def _one_time(**law: Any) -> dict[str, Any]:
    """Pairs ``(s, 1)`` with ``s`` drawn by ``law``: the one-time map of consistency models."""
    return {"class_path": "flowmap.losses.OneTimePairSampler", "init_args": law}


_ONE_TIME_UNIFORM = _one_time(distribution="uniform")
_SCM_PAIRS = _one_time(distribution="logit_normal", loc=1.0, scale=1.6)  # sCM's tan law
_CD = {"teacher_share": 1.0, "teacher_steps": 1, "teacher_max_gap": 0.0625}  # one Heun step
_HEUN_128 = {"split": "midpoint", "teacher_gap": 2.0**-7, "teacher_steps": 1}
_DYADIC = {"distribution": "dyadic", "levels": 7}
_ROUNDS = {"gap_start": 2.0**-6, "gap_warmup_steps": 2000}  # progressive distillation's rounds
_NONE, _LEARNED = {"kind": "none"}, {"kind": "learned"}

#: name: (distils a teacher?, loss class, its init args), one line a method
_CONFIGS: dict[str, tuple[bool, str, dict[str, Any]]] = {
    "lsd": (False, _L, dict(form="backprop", pairs=_U75, weighting=_NONE)),
    "esd": (False, _E, dict(form="sg_advective", pairs=_U75)),
    "psd_midpoint": (False, _S, dict(split="midpoint", teacher_gap=0.0, pairs=_U75)),
    "psd_uniform": (False, _S, dict(split="uniform", teacher_gap=0.0, pairs=_U75)),
    "meanflow": (False, _M, dict(tangent="conditional", **_MEANFLOW)),
    "improved_meanflow": (False, _M, dict(tangent="model", **_MEANFLOW)),
    "shortcut": (False, _S, dict(**_HEUN_128, pairs={**_DYADIC, "eta": 0.875})),
    "consistency_distillation": (True, _E, dict(form="discrete", **_CD, pairs=_ONE_TIME_UNIFORM)),
    "scd": (True, _E, dict(form="regression", **_SCM, pairs=_SCM_PAIRS, weighting=_LEARNED)),
    "sct": (False, _M, dict(tangent="conditional", **_SCM, pairs=_SCM_PAIRS, weighting=_LEARNED)),
    "tvm": (False, _L, dict(form="backprop", pairs={**_LOGIT, "eta": 0.5})),
    "ayf_emd": (True, _E, dict(form="regression", **_SCM, pairs=_U25, weighting=_LEARNED)),
    "ayf_lmd": (True, _L, dict(form="regression", tangent_norm=0.1, pairs=_U25, weighting=_NONE)),
    "progressive": (True, _S, dict(**_HEUN_128, pairs={**_DYADIC, **_U25, **_ROUNDS})),
}


@dataclass(frozen=True)
class Preset:
    """A known method as a configuration of the package's classes.

    Attributes:
        name: the key in :data:`PRESETS` and the YAML file's stem.
        loss: the ``{"class_path", "init_args"}`` config of its :class:`FlowMapLoss`.
        needs_teacher: whether it distils a teacher (else it trains from scratch).
        title, citation: the method's usual name and its paper.
        place: its place in the taxonomy, one line.
        residual, teacher, stop_gradient, pairs, weighting: the README table's columns.
        differences: where the preset departs from the paper, and why.
    """

    name: str
    loss: dict[str, Any]
    needs_teacher: bool
    title: str = ""
    citation: str = ""
    place: str = ""
    residual: str = ""
    teacher: str = ""
    stop_gradient: str = ""
    pairs: str = ""
    weighting: str = ""
    differences: str = ""

    def build_loss(self) -> FlowMapLoss:
        """A fresh :class:`FlowMapLoss` built from :attr:`loss` (as ``flowmap fit`` builds it)."""
        parser = _loss_parser()
        return parser.instantiate_classes(parser.parse_object({"loss": self.loss})).loss


def _prose() -> dict[str, dict[str, str]]:
    """``flowmap/presets.yaml``: each preset's prose by name (a list of sentences joined)."""
    text = (Path(__file__).parent / "presets.yaml").read_text(encoding="utf-8")
    raw = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return {
        name: {k: " ".join(v) if isinstance(v, list) else v for k, v in fields.items()}
        for name, fields in raw.items()
    }


def _presets() -> dict[str, Preset]:
    prose = _prose()
    if set(prose) != set(_CONFIGS):  # a preset is its line here and its prose there
        odd = sorted(set(prose) ^ set(_CONFIGS))
        raise RuntimeError(
            f"{odd}: a preset needs its line in presets.py and prose in presets.yaml"
        )
    return {
        name: Preset(
            name, {"class_path": cls, "init_args": copy.deepcopy(args)}, teacher, **prose[name]
        )
        for name, (teacher, cls, args) in _CONFIGS.items()
    }


#: every preset by name
PRESETS: dict[str, Preset] = _presets()


def preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name is a ``ValueError`` listing them."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]


def build_loss(name: str) -> FlowMapLoss:
    """The :class:`FlowMapLoss` of preset ``name``, built fresh."""
    return preset(name).build_loss()


def _loss_parser() -> Any:
    from jsonargparse import ArgumentParser  # only when a loss is built from a config

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--loss", type=FlowMapLoss)
    return parser


def loss_config(name: str) -> dict[str, Any]:
    """The complete ``class_path`` config (every argument, defaults filled in) of a preset's loss
    or of a loss class (``EulerianLoss`` or ``flowmap.losses.EulerianLoss``): what
    ``flowmap fit --model.loss=NAME`` trains with. Anything else is a one-sentence ``ValueError``."""
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


def table(speed: dict[str, Any] | None = None) -> list[str]:
    """The presets as a markdown table (the README's), with the cost per step measured in
    ``speed`` (``benchmarks/self_distillation.py speed``'s ``speed.json``) where it has one."""
    speed = speed or {"ms_per_step": {}}
    lines = [
        "| method | residual | teacher | stop-gradient | pairs | weighting | preset | cost per "
        "step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in PRESETS.values():
        cost = "not measured"
        if p.name in speed["ms_per_step"]:
            ms = speed["ms_per_step"][p.name]
            cost = f"{speed['per_cfm_step'][p.name]:.1f}× CFM ({ms:.0f} ms)"
        lines.append(
            f"| {p.title} | {p.residual} | {p.teacher} | {p.stop_gradient} | {p.pairs} | "
            f"{p.weighting} | [`{p.name}.yaml`](recipes/presets/{p.name}.yaml) | {cost} |"
        )
    return lines
