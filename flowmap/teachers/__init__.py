r"""Teachers trained elsewhere, converted exactly into flowmap's convention.

* :class:`DiffusionTeacher` — any ``model(x_τ, τ)`` with its own schedule and prediction
  (ε, clean sample, v, velocity, score), as the velocity :math:`b_t(x)` of flowmap's path
  (:mod:`flowmap.teachers.diffusion` has the equations).
* :class:`EDMDenoiser` — Karras et al.'s preconditioning :math:`D(x;\sigma)` of a raw network.
* :func:`native_schedule` — the named schedules (linear, cosine, rectified flow, VP cosine,
  discrete DDPM β schedules, EDM σ-time); :class:`FunctionSchedule` for any :math:`a(\tau), g(\tau)`.
* :func:`build_teacher` — a teacher from plain data (a ``class_path`` and ``init_args``, as YAML gives it).
* :mod:`flowmap.teachers.diffusers` (the ``flowmap[diffusers]`` extra) — a diffusers
  ``UNet2DModel`` / ``DiTTransformer2DModel`` folder with its scheduler config, read with safetensors.
"""

from flowmap.teachers.diffusion import PREDICTIONS, DiffusionTeacher, EDMDenoiser, data_and_noise
from flowmap.teachers.schedules import (
    SCHEDULES,
    DiscreteVPSchedule,
    FunctionSchedule,
    NativeSchedule,
    native_schedule,
)
from flowmap.teachers.spec import build_teacher

__all__ = [
    "PREDICTIONS",
    "SCHEDULES",
    "DiffusionTeacher",
    "DiscreteVPSchedule",
    "EDMDenoiser",
    "FunctionSchedule",
    "NativeSchedule",
    "build_teacher",
    "data_and_noise",
    "native_schedule",
]
