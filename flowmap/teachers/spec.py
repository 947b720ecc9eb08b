"""A teacher from plain data, as a YAML config or a checkpoint's hyperparameters hold it.

A spec is one of

* ``{"class_path": "flowmap.teachers.DiffusionTeacher", "init_args": {...}}`` — any callable by
  import path; an ``init_args`` value that is itself a ``{"class_path": ...}`` dict is built first
  (so a raw network goes in as ``model``), and such a dict may carry ``"weights":
  "net.safetensors"`` (or a folder holding one), loaded into it with safetensors;
* a diffusers folder (a model's ``config.json`` with its safetensors weights and a scheduler
  config): :class:`flowmap.teachers.diffusers.DiffusersTeacher`;
* a ``.yaml`` / ``.json`` file holding a ``class_path`` spec.

(A flowmap :class:`~flowmap.training.VelocityModule` checkpoint, ``.ckpt``, is read by the
training layer.) Weights are never unpickled.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from flowmap.io import load_safetensors

__all__ = ["build_teacher", "build_component", "is_spec"]


def is_spec(value: Any) -> bool:
    """Whether ``value`` is a ``{"class_path": ...}`` dict."""
    return isinstance(value, Mapping) and "class_path" in value


def is_plain_data(value: Any) -> bool:
    """Whether ``value`` is made of str, numbers, bools, None, lists and str-keyed dicts only
    (what a checkpoint can hold and ``torch.load(weights_only=True)`` reads back)."""
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and is_plain_data(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(is_plain_data(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def _callable_class(target: Any) -> bool:
    """A class whose instances are called (a model, a teacher), not a function or a class such
    as ``subprocess.Popen`` that acts when built: a spec that a checkpoint carries is built only
    from such classes."""
    return inspect.isclass(target) and any(
        "__call__" in vars(k) for k in target.__mro__ if k is not object
    )


def _import(path: str) -> Any:
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(
            f"Cannot import the teacher component {path!r} ({err}); give a full import path such "
            "as flowmap.teachers.DiffusionTeacher, and install the package that provides it."
        ) from None


def build_component(spec: Mapping[str, Any]) -> Any:
    """Instantiate ``{"class_path", "init_args", "weights"}`` (nested specs first)."""
    unknown = set(spec) - {"class_path", "init_args", "weights"}
    if unknown:
        raise ValueError(
            f"A component spec takes class_path, init_args and weights, not {sorted(unknown)}."
        )
    target = _import(spec["class_path"])
    if not _callable_class(target):
        raise ValueError(
            f"{spec['class_path']} is not a class of callable models or teachers; a teacher spec "
            "names classes such as flowmap.teachers.DiffusionTeacher or a torch nn.Module, never "
            "functions."
        )
    args = {
        k: build_component(v) if is_spec(v) else v for k, v in (spec.get("init_args") or {}).items()
    }
    try:
        obj = target(**args)
    except TypeError as err:
        raise ValueError(
            f"Cannot build {spec['class_path']} from init_args {sorted(args)}: {err}."
        ) from None
    if spec.get("weights") is not None:
        if not isinstance(obj, nn.Module):
            raise ValueError(f"{spec['class_path']} is not an nn.Module, so it takes no weights.")
        state = load_safetensors(spec["weights"], f"weights of {spec['class_path']}")
        try:
            obj.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
            raise ValueError(
                f"The weights {spec['weights']!r} do not fit {spec['class_path']} ({first}); "
                "build it with the init_args it was trained with."
            ) from None
        w = Path(spec["weights"])  # a folder holds exactly one .safetensors (load_safetensors)
        obj.weight_files = [str(next(w.glob("*.safetensors")) if w.is_dir() else w)]
    return obj


def build_teacher(spec: str | Mapping[str, Any], **overrides: Any) -> Any:
    """A teacher from a spec (module docstring); ``overrides`` go into its ``init_args`` (e.g.
    ``path="cosine"`` to follow the student's path)."""
    if isinstance(spec, str | Path):
        p = Path(spec)
        if p.is_dir():
            from flowmap.teachers.diffusers import DiffusersTeacher

            return DiffusersTeacher(str(p), **overrides)
        if p.suffix.lower() in (".yaml", ".yml", ".json") and p.is_file():
            import yaml

            spec = (
                yaml.safe_load(p.read_text()) if p.suffix != ".json" else json.loads(p.read_text())
            )
            if not is_spec(spec):
                raise ValueError(
                    f"The teacher spec {str(p)!r} holds no class_path; see flowmap.teachers.spec."
                )
        else:
            raise ValueError(
                f"The teacher {str(p)!r} is neither a folder (a diffusers model) nor a .yaml/.json "
                "spec" + (" and does not exist" if not p.exists() else "") + "; check the path."
            )
    if not is_spec(spec):
        raise ValueError(
            "A teacher spec needs a class_path (and init_args), e.g. {class_path: "
            "flowmap.teachers.DiffusionTeacher, init_args: {model: ..., prediction: epsilon, "
            "schedule: ddpm_linear}}."
        )
    spec = dict(spec)
    spec["init_args"] = {**(spec.get("init_args") or {}), **overrides}
    return build_component(spec)
