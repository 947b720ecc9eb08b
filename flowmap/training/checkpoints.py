"""Every rule of what a checkpoint may be used for, in one place: its **format** (read through
:func:`flowmap.io.safe_load`, ``weights_only=True``, and checked for what it holds before Lightning
rebuilds a module from it), its **resume** (the same model config and dataset; a fresh fit never
writes beside another run's checkpoints) and its **origin** (a flow map is reported beside the
teacher it was distilled from)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowmap.data.base import dataset_identity, describe_dataset
from flowmap.io import UnsafeFileError, file_sha256, safe_load

__all__ = [
    "CheckpointError",
    "check_fit_directory",
    "check_same_origin",
    "dataset_differences",
    "last_checkpoint",
    "load_module",
    "read_checkpoint",
    "refuse_run_folder",
    "resume_differences",
    "resume_message",
]


#: The layout of flowmap's checkpoints. 2: the gap embedding g(t - s) - g(0) and the loss as an
#: injected component (flowmap 0.2); a checkpoint of another format computes another function.
CHECKPOINT_FORMAT = 2


class CheckpointError(UnsafeFileError):
    """A checkpoint is missing, unreadable, unsafe or of the wrong kind."""


def refuse_run_folder(path: Any) -> None:
    """A flowmap run folder, or its ``config.yaml``, given where a checkpoint belongs: one
    sentence naming the checkpoint meant (``<run>/checkpoints/last.ckpt``)."""
    if isinstance(path, Mapping) and {"model", "trainer"} <= set(path):  # a run's config.yaml,
        root = (path.get("trainer") or {}).get("default_root_dir")  # read in by the parser
        meant = Path(root or ".") / "checkpoints" / "last.ckpt"
        raise CheckpointError(
            "The teacher given is a flowmap run's config (config.yaml), not a checkpoint; "
            + (f"did you mean {str(meant)!r}?" if meant.is_file() else "pass its last.ckpt.")
        )
    if not isinstance(path, str | Path):
        return
    p = Path(path)
    if p.is_dir():
        places = [p / "checkpoints" / "last.ckpt", p / "last.ckpt"]
    elif p.is_file() and p.suffix.lower() in (".yaml", ".yml"):
        places = [p.parent / "last.ckpt", p.parent / "checkpoints" / "last.ckpt"]
    else:
        return
    meant = next((c for c in places if c.is_file()), None)
    if meant is not None:
        what = "folder" if p.is_dir() else "config"
        raise CheckpointError(
            f"{str(p)!r} is a flowmap run's {what}, not a checkpoint; did you mean {str(meant)!r}?"
        )


def read_checkpoint(path: str | Path, expected_kind: str | None = None) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU with ``weights_only=True`` and check what it holds."""
    refuse_run_folder(path)
    try:
        ckpt = safe_load(path, "checkpoint")
    except UnsafeFileError as err:
        raise CheckpointError(str(err)) from None
    p = str(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{p!r} is not a Lightning checkpoint (no 'state_dict'); pass a .ckpt file "
            "written by a flowmap fit."
        )
    kind = ckpt.get("flowmap_module")
    if kind is not None and ckpt.get("flowmap_format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{p!r} was written by an older flowmap (checkpoint format "
            f"{ckpt.get('flowmap_format', 1)}, this version reads {CHECKPOINT_FORMAT}), whose "
            "networks compute another function; retrain it with this version."
        )
    if expected_kind is not None and kind != expected_kind:
        found = f"a {kind} checkpoint" if kind else "not a flowmap checkpoint"
        raise CheckpointError(f"{p!r} is {found}, but a {expected_kind} checkpoint is needed here.")
    return ckpt


def load_module(cls: type, path: str | Path, **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(path)`` after :func:`read_checkpoint` checked the file (CPU, eval)."""
    read_checkpoint(path, expected_kind=getattr(cls, "module_kind", None))
    return rebuild_module(cls, path, **kwargs)


def rebuild_module(cls: type, path: str | Path, **kwargs: Any) -> Any:
    """Lightning's rebuild of a checkpoint :func:`read_checkpoint` has already checked (CPU, eval)."""
    module = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True, **kwargs)
    return module.eval()


# --------------------------------------------------------------------------- resume
#: hyperparameters that may differ between a checkpoint and the run resuming it
_RESUME_FREE = frozenset({"data_shape", "_instantiator"})
#: hyperparameters a module fills in at setup when left unset (the schedule, from the teacher)
_FILLED_IN = frozenset({"schedule"})


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"net": {"init_args": {"width": 8}}}`` → ``{"net.init_args.width": 8}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``["lr: 0.002 in the checkpoint, 0.001 now", …]`` for every plain-data key that differs
    (keys whose current value is an object, e.g. a net built in Python, are not compared)."""
    plain = (str, int, float, bool, type(None), list, tuple, Mapping)
    a = _flatten({k: v for k, v in saved.items() if k not in _RESUME_FREE})
    b = _flatten({k: v for k, v in now.items() if k not in _RESUME_FREE and isinstance(v, plain)})
    top = {k.split(".")[0] for k in b} | {k for k, v in now.items() if isinstance(v, plain)}
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k.split(".")[0] not in top:
            continue
        if k.startswith("_") and (k not in a or k not in b):  # e.g. _class_path, CLI runs only
            continue
        va, vb = a.get(k, "unset"), b.get(k, "unset")
        if vb is None and (va == "unset" or k in _FILLED_IN):  # a default, or filled in at setup
            continue
        if isinstance(va, tuple | list) and isinstance(vb, tuple | list):
            va, vb = list(va), list(vb)
        if va != vb:
            diffs.append(f"{k}: {va!r} in the checkpoint, {vb!r} now")
    return diffs


def resume_differences(
    checkpoint: Mapping[str, Any], model: Mapping[str, Any], data: Mapping[str, Any] | None
) -> list[str]:
    """``config_differences`` of the model's hyperparameters and of the dataset
    (:func:`~flowmap.data.base.dataset_identity`) between a checkpoint and a run resuming it."""
    diffs = [
        f"model.{d}" for d in config_differences(checkpoint.get("hyper_parameters", {}), model)
    ]
    saved = checkpoint.get("datamodule_hyper_parameters")
    return diffs + [f"data.{d}" for d in dataset_differences(saved, data)]


def dataset_differences(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> list[str]:
    """:func:`config_differences` of two DataModules' hyperparameters as datasets
    (:func:`~flowmap.data.base.dataset_identity`); none when either is unknown."""
    want, got = dataset_identity(dict(a or {})), dataset_identity(dict(b or {}))
    return config_differences(want, got) if want and got else []


def resume_message(path: Any, diffs: list[str]) -> str:
    shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
    return (
        f"Cannot resume {path or 'the checkpoint'} under a different config ({shown}); resume "
        "with the run's own config (config.yaml beside the checkpoint) or train into another "
        "--trainer.default_root_dir."
    )


def last_checkpoint(dirpath: str | None) -> str | None:
    """What ``--ckpt_path last`` resumes: the newest ``last*.ckpt`` in ``dirpath``."""
    if not dirpath or not os.path.isdir(dirpath):
        return None
    found = [os.path.join(dirpath, f) for f in os.listdir(dirpath) if f.startswith("last")]
    found = [f for f in found if f.endswith(".ckpt")]
    return max(found, key=os.path.getmtime) if found else None


def check_fit_directory(
    dirpath: str | None,
    ckpt_path: str | None,
    model: Mapping[str, Any],
    data: Mapping[str, Any] | None,
    *,
    writes_checkpoints: bool = True,
) -> None:
    """Before a fit writes anything (its ``config.yaml`` included): a fresh fit into a directory
    that holds checkpoints is refused (it would write ``last-v1.ckpt`` beside another run's and
    leave both half-described), and so is a resume whose checkpoint was trained with another
    model config (``model``, as hyperparameters) or dataset (``data``). One sentence each."""
    if ckpt_path is None:
        if writes_checkpoints and dirpath and os.path.isdir(dirpath):
            old = sorted(f for f in os.listdir(dirpath) if f.endswith(".ckpt"))
            if old:
                raise CheckpointError(
                    f"{dirpath} already holds the checkpoints of a run ({', '.join(old[:3])}); "
                    "resume it with --ckpt_path last, or train into another "
                    "--trainer.default_root_dir."
                )
        return
    path = last_checkpoint(dirpath) if ckpt_path == "last" else str(ckpt_path)
    if path is None:  # Lightning would train from step 0 and exit 0
        where = f"in {dirpath}" if dirpath else "(this fit saves no checkpoints)"
        raise CheckpointError(
            f"--ckpt_path last found no checkpoint to resume {where}; check "
            "--trainer.default_root_dir (a run keeps its checkpoints in <root>/checkpoints), or "
            "drop --ckpt_path to start a fresh run."
        )
    if ckpt_path in ("best", "hpc", "registry"):
        return  # Lightning's other names: it resolves them
    if not os.path.isfile(path):
        raise CheckpointError(
            f"--ckpt_path {path} does not exist; give the .ckpt file of the run to resume "
            "(<root>/checkpoints/last.ckpt), or drop --ckpt_path to start a fresh run."
        )
    diffs = resume_differences(read_checkpoint(path), model, data)
    if diffs:
        raise CheckpointError(resume_message(path, diffs))


# --------------------------------------------------------------------------- origin
def check_same_origin(
    teacher_path: str,
    teacher_ckpt: dict[str, Any],
    label: str,
    path: str,
    ck: Mapping[str, Any],
    teacher_sha: str | None = None,
) -> None:
    """A flow map is reported only beside its own teacher: the same dataset, the same path and,
    when the map recorded its teacher's SHA-256, the very same teacher checkpoint (a teacher
    resumed or retrained since is another teacher). ``ck`` is the map's checkpoint (read from
    ``path``). Anything else is a one-sentence error."""
    want = dataset_identity(teacher_ckpt.get("datamodule_hyper_parameters"))
    got = dataset_identity(ck.get("datamodule_hyper_parameters"))
    if dataset_differences(want, got):
        raise ValueError(
            f"The flow map {label!r} ({path}) was trained on {describe_dataset(got)} but the "
            f"teacher {teacher_path} on {describe_dataset(want)}; report checkpoints of one dataset."
        )
    schedules = [
        c.get("hyper_parameters", {}).get("schedule") or "linear" for c in (teacher_ckpt, ck)
    ]
    if schedules[0] != schedules[1]:
        raise ValueError(
            f"The flow map {label!r} follows the {schedules[1]!r} path but the teacher the "
            f"{schedules[0]!r} one; report a flow map beside the teacher it was distilled from."
        )
    sha = ck.get("flowmap_teacher_sha256")
    if sha is not None and sha != (teacher_sha or file_sha256(teacher_path)):
        raise ValueError(
            f"The flow map {label!r} ({path}) was distilled from another teacher than "
            f"{teacher_path} (it recorded {ck.get('flowmap_teacher')}, SHA-256 {sha[:12]}…, "
            "which may have been resumed or retrained since); pass the teacher it was distilled "
            "from, or distil the map again."
        )
