"""diffusers models as teachers (the ``flowmap[diffusers]`` extra).

``DiffusersTeacher(folder)`` reads a folder that diffusers wrote (``pipeline.save_pretrained`` or
``model.save_pretrained`` plus ``scheduler.save_pretrained``):

* the model: ``config.json`` and ``diffusion_pytorch_model.safetensors`` in the folder or in its
  ``unet/`` or ``transformer/`` sub-folder; a ``UNet2DModel`` or a ``DiTTransformer2DModel``,
  built from its config and filled with safetensors (never ``from_pretrained``'s pickle path);
* the scheduler: ``scheduler_config.json`` in the folder or its ``scheduler/`` sub-folder.
  ``DDPMScheduler``, ``DDIMScheduler`` and ``EulerDiscreteScheduler`` are one discrete VP
  schedule (``beta_schedule``, ``beta_start``, ``beta_end``, ``num_train_timesteps`` or
  ``trained_betas``) with the config's ``prediction_type``; ``FlowMatchEulerDiscreteScheduler``
  is a rectified flow (noise at σ = 1) whose model takes ``1000 σ`` and predicts
  :math:`\\varepsilon - x_1` (its ``shift`` only moves the sampling grid, not the model).

Such a schedule never reaches pure noise, so the teacher clips by default, as the scheduler does
when it starts from pure noise at its last timestep.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowmap.io import DIFFUSERS_WEIGHTS, diffusers_weights, load_safetensors
from flowmap.teachers.diffusion import DiffusionTeacher
from flowmap.teachers.schedules import DiscreteVPSchedule, native_schedule

__all__ = ["DiffusersTeacher", "schedule_from_config", "MODEL_CLASSES", "SCHEDULER_CLASSES"]

MODEL_CLASSES = ("UNet2DModel", "DiTTransformer2DModel")
VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler")
SCHEDULER_CLASSES = (*VP_SCHEDULERS, "FlowMatchEulerDiscreteScheduler")


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise ValueError(
            "A diffusers teacher needs the diffusers extra; install it with "
            "pip install 'flowmap[diffusers]'."
        ) from None
    return diffusers


def _find(folder: Path, names: tuple[str, ...], subfolders: tuple[str, ...]) -> Path | None:
    for sub in ("", *subfolders):
        for name in names:
            p = folder / sub / name
            if p.is_file():
                return p
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        out = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); save it again.") from None
    if not isinstance(out, dict):
        raise ValueError(f"{str(path)!r} holds no config object; save it again.")
    return out


def schedule_from_config(config: dict[str, Any]) -> tuple[Any, str, dict[str, Any]]:
    """``(schedule, prediction, extra DiffusionTeacher arguments)`` from a scheduler config."""
    name = config.get("_class_name")
    if name not in SCHEDULER_CLASSES:
        raise ValueError(
            f"The scheduler {name!r} is not one flowmap reads; use a config of "
            f"{', '.join(SCHEDULER_CLASSES)} (the model's training schedule, not a sampler's)."
        )
    if name == "FlowMatchEulerDiscreteScheduler":
        n = config.get("num_train_timesteps", 1000)
        return native_schedule("rectified_flow"), "velocity", {"timestep_scale": float(n)}
    if config.get("rescale_betas_zero_snr"):
        raise ValueError(
            "A zero-terminal-SNR schedule (rescale_betas_zero_snr) is not supported yet; convert "
            "the teacher with alpha= and sigma= functions of its time."
        )
    if config.get("trained_betas") is not None:
        schedule = DiscreteVPSchedule(torch.tensor(config["trained_betas"], dtype=torch.float64))
    else:
        schedule = DiscreteVPSchedule.from_betas(
            config.get("beta_schedule", "linear"),
            config.get("beta_start", 1e-4),
            config.get("beta_end", 0.02),
            config.get("num_train_timesteps", 1000),
        )
    return schedule, config.get("prediction_type", "epsilon"), {}


class DiffusersTeacher(DiffusionTeacher):
    """A diffusers model folder with its scheduler config, as flowmap's velocity (module docstring).

    Args:
        folder: the folder diffusers saved (model config, safetensors weights, scheduler config).
        path: the student's path, ``"linear"`` (DDIM = Euler) or ``"cosine"``.
        clip: evaluate student times beyond the schedule's SNR range at its ends (default: yes).
        model_config, scheduler_config: instead of a folder, the two configs themselves; the model
            is then built with fresh weights (a flow-map student's architecture, whose weights come
            from its checkpoint: :meth:`architecture` writes these).
        **kwargs: other :class:`~flowmap.teachers.DiffusionTeacher` arguments (``tau_range``,
            ``integer_timesteps``, ``null_class``, …), which override what the folder says.
    """

    def __init__(
        self,
        folder: str | None = None,
        path: str = "linear",
        clip: bool = True,
        model_config: dict[str, Any] | None = None,
        scheduler_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if (folder is None) == (model_config is None or scheduler_config is None):
            raise ValueError(
                "A diffusers teacher takes a folder, or both model_config and scheduler_config "
                "(a student's architecture), not both and not neither."
            )
        weights = None
        if folder is not None:
            model_config, scheduler_config, weights = self.read_folder(folder)
        config = dict(model_config)
        model = self._build_model(config, weights)
        schedule, prediction, extra = schedule_from_config(scheduler_config)
        size = config.get("sample_size")
        size = (size, size) if isinstance(size, int) else tuple(size or ())
        args: dict[str, Any] = dict(
            prediction=prediction,
            schedule=schedule,
            path=path,
            clip=clip,
            data_shape=(config.get("in_channels", 3), *size) if size else None,
            **extra,
        )
        cls_name = config["_class_name"]
        if cls_name == "DiTTransformer2DModel":
            k = config.get("num_embeds_ada_norm") or 1000
            args.update(num_classes=k, null_class=k, label_keyword="class_labels")
            args["learned_variance"] = config.get("out_channels", 0) == 2 * config.get(
                "in_channels", 4
            )
        elif config.get("num_class_embeds"):
            args.update(num_classes=config["num_class_embeds"], label_keyword="class_labels")
        args.update(kwargs)
        super().__init__(model, **args)
        self.folder = folder
        self._configs = (dict(model_config), dict(scheduler_config))
        self._settings = dict(path=path, clip=clip, **kwargs)
        if folder is not None:
            root = Path(folder)
            model_dir = _find(root, ("config.json",), ("unet", "transformer")).parent
            sched_file = _find(root, ("scheduler_config.json",), ("scheduler",))
            #: the files that define this teacher (its identity for reports)
            self.weight_files = [
                str(model_dir / DIFFUSERS_WEIGHTS),
                str(model_dir / "config.json"),
                str(sched_file),
            ]

    @staticmethod
    def read_folder(folder: str) -> tuple[dict[str, Any], dict[str, Any], Path]:
        """``(model config, scheduler config, weights file)`` of a diffusers folder, each missing
        piece refused in one sentence (pickle-only weights too)."""
        root = Path(folder)
        if not root.is_dir():
            raise ValueError(
                f"The diffusers teacher folder {folder!r} does not exist; check the path."
            )
        config_file = _find(root, ("config.json",), ("unet", "transformer"))
        sched_file = _find(root, ("scheduler_config.json",), ("scheduler",))
        if config_file is None or sched_file is None:
            missing = "a model config.json" if config_file is None else "a scheduler_config.json"
            raise ValueError(
                f"The folder {folder!r} holds no {missing} (looked in it and in its unet/, "
                "transformer/ and scheduler/ sub-folders); save the model and its scheduler "
                "with save_pretrained."
            )
        weights = diffusers_weights(config_file.parent)
        return _read_json(config_file), _read_json(sched_file), weights

    def architecture(self) -> dict[str, Any]:
        """This teacher as plain data without its weights: a ``class_path`` spec that builds the
        same model (fresh weights) with the same conversion."""
        model_config, scheduler_config = self._configs
        return {
            "class_path": f"{DiffusersTeacher.__module__}.DiffusersTeacher",
            "init_args": {
                "model_config": model_config,
                "scheduler_config": scheduler_config,
                **self._settings,
            },
        }

    @staticmethod
    def _build_model(config: dict[str, Any], weights: Path | None) -> nn.Module:
        name = config.get("_class_name")
        if name not in MODEL_CLASSES:
            raise ValueError(
                f"The model {name!r} is not one flowmap wraps; use a {' or '.join(MODEL_CLASSES)} "
                "folder, or wrap any model(x, t) with flowmap.teachers.DiffusionTeacher."
            )
        model_cls = getattr(_diffusers(), name)
        model = model_cls.from_config(config)
        if weights is None:
            return model
        state = load_safetensors(weights, f"{name} weights")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"The weights {str(weights)!r} do not fit the {name} of its config.json "
                f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. "
                f"{(missing or unexpected)[0]}); save the model and its config together."
            )
        return model
