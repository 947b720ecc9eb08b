r"""A foreign teacher's student is a copy of the teacher: its own network, seen through the same
exact conversion into flowmap's convention, with the gap :math:`t - s` added at its time modules
(:class:`~flowmap.nets.adapter.TwoTimeAdapter`):

.. math:: \phi(x, s, t \mid c) = \dot\alpha_s\,\hat x_1 + \dot\sigma_s\,\hat\varepsilon,
   \qquad (\hat x_1, \hat\varepsilon) \text{ from } F_{t-s}(r_s x,\ \tau(s) \mid c),

the teacher's velocity :math:`b_s(x)` (:mod:`flowmap.teachers.diffusion`) with its network
:math:`F` replaced by the adapted :math:`F_{t-s}`. On the diagonal and at initialisation
:math:`F_{t-s} = F`, so :math:`\phi(x, t, t) = b_t(x)` and one jump
:math:`X(s, t, x) = x + (t - s)\,b_s(x)` is one Euler step of the teacher.

The student is built from the teacher's *architecture* (:func:`teacher_architecture`: a spec of
plain data without weight files), so its checkpoint loads and samples without the teacher's
files; the weights are copied from the loaded teacher (:meth:`DiffusionStudent.warm_start`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowmap.nets.adapter import TwoTimeAdapter
from flowmap.paths import as_time
from flowmap.teachers.diffusion import DiffusionTeacher
from flowmap.teachers.spec import build_teacher, is_plain_data, is_spec

__all__ = ["DiffusionStudent", "teacher_architecture"]

#: modules that drop class labels at random in train mode (kept in eval mode in a student)
_OWN_LABEL_DROPOUT = ("LabelEmbedding",)


def _without_weights(spec: Any) -> Any:
    """A spec with every ``weights`` entry removed (the architecture alone)."""
    if isinstance(spec, Mapping):
        return {k: _without_weights(v) for k, v in spec.items() if k != "weights"}
    if isinstance(spec, list | tuple):
        return [_without_weights(v) for v in spec]
    return spec


def teacher_architecture(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """A foreign teacher's spec (a diffusers folder, a spec file, a ``class_path`` dict) as plain
    data that builds the same model with fresh weights and the same conversion: configs inline,
    weight files dropped."""
    if isinstance(spec, str | Path):
        p = Path(spec)
        if p.is_dir():
            spec = {"class_path": "flowmap.teachers.diffusers.DiffusersTeacher",
                    "init_args": {"folder": str(p)}}  # fmt: skip
        elif p.suffix.lower() in (".yaml", ".yml", ".json") and p.is_file():
            import yaml

            text = p.read_text()
            spec = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    if not is_spec(spec) or not is_plain_data(spec):
        raise ValueError(
            "A foreign teacher's student is built from the teacher's spec (a diffusers folder, a "
            "spec file or a class_path dict of plain data); give the student a net, or the "
            "teacher as such a spec."
        )
    spec = _without_weights(dict(spec))
    args = dict(spec.get("init_args") or {})
    if spec["class_path"].rpartition(".")[2] == "DiffusersTeacher" and args.get("folder"):
        from flowmap.teachers.diffusers import DiffusersTeacher

        model_config, scheduler_config, _ = DiffusersTeacher.read_folder(args.pop("folder"))
        args.update(model_config=model_config, scheduler_config=scheduler_config)
    return {"class_path": spec["class_path"], "init_args": args}


class DiffusionStudent(nn.Module):
    r""":math:`\phi(x, s, t \mid c)` of a :class:`~flowmap.teachers.DiffusionTeacher`'s own network
    (module docstring).

    Args:
        teacher: the teacher's architecture (:func:`teacher_architecture`), or a live
            :class:`~flowmap.teachers.DiffusionTeacher` (copied: a Python student, whose
            checkpoint then needs the same object to rebuild). As a ``FlowMapModule``'s net in
            YAML, leave it unset: it is filled in from the module's teacher, e.g.
            ``net: {class_path: flowmap.teachers.DiffusionStudent, init_args: {time_modules: [clock]}}``.
        time_modules: the adapter's hook: the network's submodules whose output is its time
            embedding (default: found, :func:`~flowmap.nets.adapter.find_time_modules`).
        gap_dim, gap_scale: the gap branch's sinusoidal features.
    """

    def __init__(
        self,
        teacher: dict[str, Any] | DiffusionTeacher | None = None,
        time_modules: Sequence[str] | None = None,
        gap_dim: int = 64,
        gap_scale: float = 10.0,
    ) -> None:
        super().__init__()
        if teacher is None:
            raise ValueError(
                "A DiffusionStudent needs its teacher's architecture; as a flow map's net, give "
                "the FlowMapModule its teacher and leave init_args.teacher unset (it is filled in)."
            )
        if isinstance(teacher, DiffusionTeacher):
            conversion = copy.deepcopy(teacher)
        else:
            conversion = build_teacher(teacher)
        if not isinstance(conversion, DiffusionTeacher) or not isinstance(
            conversion.model, nn.Module
        ):
            raise ValueError(
                "A student copies a DiffusionTeacher whose model is an nn.Module; for another "
                "teacher give the student a net of its own (warm_start: false)."
            )
        self.adapter = TwoTimeAdapter(conversion.model, time_modules, gap_dim, gap_scale)
        self.adapter.requires_grad_(True).train()  # the teacher's copy was frozen in eval mode
        conversion.model = None  # the network lives in the adapter alone; this is its conversion
        object.__setattr__(self, "conversion", conversion)
        self.num_classes = conversion.num_classes
        self.data_shape = conversion.data_shape

    @property
    def path(self) -> Any:
        """The student's path (the teacher's conversion target)."""
        return self.conversion.path

    def forward(self, x: Tensor, s: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if (y is None) != (self.num_classes is None):
            raise ValueError(
                f"This student is {'class-conditional' if self.num_classes else 'unconditional'}"
                f"; {'give labels y' if self.num_classes else 'drop the labels'}."
            )
        s, t = as_time(s, x), as_time(t, x)
        with self.adapter.gap(t - s):
            return self.conversion._velocity(x, s, y, model=self.adapter)

    def train(self, mode: bool = True) -> DiffusionStudent:
        """Train mode, except for a network's own label dropout (diffusers' ``LabelEmbedding``
        drops labels at random in training): flowmap drops labels itself (``label_dropout``),
        and a label the network dropped unasked would pair a row with another class's target."""
        super().train(mode)
        for m in self.adapter.model.modules():
            if type(m).__name__ in _OWN_LABEL_DROPOUT:
                m.train(False)
        return self

    @torch.no_grad()
    def warm_start(self, teacher: Any) -> DiffusionStudent:
        """Copy the teacher's network into the adapter (the gap branches stay at zero); the
        teacher must convert as this student does."""
        model = getattr(teacher, "model", None)
        if not isinstance(teacher, DiffusionTeacher) or not isinstance(model, nn.Module):
            raise ValueError(
                f"This student copies a DiffusionTeacher's network, and a "
                f"{type(teacher).__name__} has none; distil it into a net of its own "
                "(warm_start: false)."
            )
        mine, theirs = self.conversion.identity_facts(), teacher.identity_facts()
        differ = sorted(k for k in mine if k != "model" and mine[k] != theirs.get(k))
        if differ:
            raise ValueError(
                f"The student converts its network differently from the teacher ({differ[0]} "
                "differs); build it from this teacher's architecture."
            )
        try:
            self.adapter.model.load_state_dict(model.state_dict())
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
            raise ValueError(
                f"The teacher's network does not fit the student's ({first}); build the student "
                "from this teacher's architecture."
            ) from None
        return self

    def extra_repr(self) -> str:
        return f"conversion={self.conversion.extra_repr()}"
