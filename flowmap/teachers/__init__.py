r"""Teachers trained elsewhere, converted exactly into flowmap's convention.

* :class:`DiffusionTeacher` — any ``model(x_τ, τ)`` with its own schedule and prediction
  (ε, clean sample, v, velocity, score), as the velocity :math:`b_t(x)` of flowmap's path
  (:mod:`flowmap.teachers.diffusion` has the equations).
* :class:`EDMDenoiser` — Karras et al.'s preconditioning :math:`D(x;\sigma)` of a raw network.
* :func:`native_schedule` — the named schedules (linear, cosine, rectified flow, VP cosine,
  discrete DDPM β schedules, EDM σ-time), all of the one family :class:`flowmap.paths.Schedule`;
  :class:`FunctionSchedule` for any :math:`a(\tau), g(\tau)`.
* :mod:`flowmap.teachers.ddim` — deterministic DDIM in the model's own variables (``teacher.ddim``).
* :class:`DiffusionStudent` — the student that is such a teacher's own network, with the gap
  :math:`t - s` added at its time embedding (:class:`~flowmap.nets.TwoTimeAdapter`), converted
  the same way: :math:`\phi(x, t, t) = b_t(x)` before training.
* :func:`build_teacher` — a teacher from plain data (a ``class_path`` and ``init_args``, as YAML gives it).
* :mod:`flowmap.teachers.diffusers` (the ``flowmap[diffusers]`` extra) — a diffusers
  ``UNet2DModel`` / ``DiTTransformer2DModel`` folder with its scheduler config, read with safetensors.
"""

from flowmap.paths import PREDICTIONS, data_and_noise
from flowmap.teachers.diffusion import DiffusionTeacher, EDMDenoiser
from flowmap.teachers.schedules import (
    SCHEDULES,
    DiscreteVPSchedule,
    FunctionSchedule,
    ReversedSchedule,
    native_schedule,
)
from flowmap.teachers.spec import build_teacher
from flowmap.teachers.student import DiffusionStudent, teacher_architecture

__all__ = [
    "PREDICTIONS",
    "SCHEDULES",
    "DiffusionStudent",
    "DiffusionTeacher",
    "DiscreteVPSchedule",
    "EDMDenoiser",
    "FunctionSchedule",
    "ReversedSchedule",
    "build_teacher",
    "data_and_noise",
    "native_schedule",
    "teacher_architecture",
]
