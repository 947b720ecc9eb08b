"""A report's results: the ``results.json`` record of every row (value, interval, ratio to the
teacher's adaptive solve), the machine and versions that made it, and ``samples.npz``, the
samples from which ``flowmap report --from-samples`` recomputes a report without checkpoints."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowmap.apps.report.config import ADAPTIVE
from flowmap.metrics.evaluation import Evaluator, Measurement

__all__ = [
    "FORMAT",
    "adaptive_key",
    "machine_description",
    "package_versions",
    "result_rows",
    "save_samples",
    "steps_results",
    "stored",
]

FORMAT = "flowmap-samples/1"
#: one row of a report: (method, NFE used, key, guidance scale or None)
Entry = tuple[str, int, str, "float | None"]


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    dev = "CUDA " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    # the thread count changes float reduction order: same machine, versions and threads give
    # bit-identical reports, another thread count moves the values within their intervals
    threads = f"{torch.get_num_threads()} torch threads"
    return (
        f"{platform.node()} · {platform.system()} {platform.machine()} {cpu} · "
        f"{os.cpu_count()} cores · {threads} · {dev}"
    )


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in (
        "flowmap",
        "torch",
        "lightning",
        "torchmetrics",
        "torch-fidelity",
        "POT",
        "torchdiffeq",
        "numpy",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


INTERVAL_NOTE = {
    "image": "FID is computed on all samples with a delete-a-group jackknife interval; KID, "
    "precision, recall and the endpoint distance are means over groups with Student-t intervals",
    "vector": "every metric is computed per group (exact W2 between a group of samples and a group "
    "of as many fresh data points) and reported as the mean over groups with a Student-t interval",
}


def stored(evaluator: Evaluator, x: Tensor) -> Tensor:
    """What a row keeps of its samples: what the metrics see (checked by the evaluator), with
    vectors back in float32 (generated in float32, so nothing is lost)."""
    x = evaluator.prepare(x)
    return x if evaluator.image else x.to(torch.float32)


def adaptive_key(w: float | None) -> str:
    """The key of the teacher's adaptive solve at guidance scale ``w`` (``None``: unguided)."""
    return ADAPTIVE if w is None else f"{ADAPTIVE}@w{w:g}"


def result_rows(
    entries: list[Entry], measured: dict[str, Measurement], headline: str
) -> list[dict[str, Any]]:
    """Each row's estimates with their intervals, and its ratio to the adaptive solve at the same
    scale (per group, on the same noise)."""
    rows = []
    for method, nfe, key, w in entries:
        m = measured[key]
        est = {k: e.as_dict() for k, e in m.estimates().items()}
        row: dict[str, Any] = {"method": method, "nfe": nfe}
        if w is not None:
            row["guidance"] = w
        row.update({**est[headline], "metrics": est})
        teacher = measured.get(adaptive_key(w))
        if teacher is not None and method != ADAPTIVE:
            row["ratio_to_teacher"] = m.ratio(teacher, headline).as_dict()
        rows.append(row)
    return rows


def steps_results(
    meta: dict[str, Any],
    entries: list[Entry],
    measured: dict[str, Measurement],
    floor: Measurement,
    evaluator: Evaluator,
) -> dict[str, Any]:
    """The record of a quality-against-steps report, the floor (held-out data) beside the rows."""
    n = measured[entries[0][2]].n
    fl = floor.estimates()
    return {
        **meta,
        "metric": evaluator.headline,
        "feature": evaluator.feature,
        "n_samples": n,
        "groups": evaluator.groups,
        "group_size": n // evaluator.groups,
        "interval_note": INTERVAL_NOTE["image" if evaluator.image else "vector"],
        "floor": fl[evaluator.headline].as_dict(),
        "floor_metrics": {k: e.as_dict() for k, e in fl.items()},
        "rows": result_rows(entries, measured, evaluator.headline),
    }


def save_samples(
    path: Path,
    samples: dict[str, Tensor],
    entries: list[Entry],
    evaluator: Evaluator,
    floor_x: Tensor,
    meta: dict[str, Any],
) -> None:
    """``samples.npz``: every row's samples, the reference, the floor set and a JSON index."""
    index = {
        "format": FORMAT,
        "rows": [
            {"method": m, "nfe": n, "array": f"row{i}"} for i, (m, n, _, _) in enumerate(entries)
        ],
        "reference": "reference",
        "floor": "floor",
        "groups": evaluator.groups,
        "feature": evaluator.feature if evaluator.image else None,
        "seed": evaluator.seed,
        "data_shape": list(evaluator.data_shape),
        "meta": meta,
    }
    arrays = {f"row{i}": samples[k].numpy() for i, (_, _, k, _) in enumerate(entries)}
    arrays["reference"] = evaluator.reference.to(
        torch.uint8 if evaluator.image else torch.float32
    ).numpy()
    arrays["floor"] = floor_x.numpy()
    arrays["index"] = np.array(json.dumps(index))
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def read_samples(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The index and the arrays of a ``samples.npz`` written by :func:`save_samples`."""
    from flowmap.io import read_npz

    z = read_npz(path, "--from-samples", "pass the samples.npz of `flowmap report --save-samples`")
    with z:
        if "index" not in z.files:
            raise ValueError(
                f"{path} is not a samples.npz written by `flowmap report --save-samples`."
            )
        index = json.loads(str(z["index"]))
        if index.get("format") != FORMAT:
            raise ValueError(f"{path} has sample format {index.get('format')!r}, not {FORMAT!r}.")
        arrays = {k: torch.from_numpy(z[k]) for k in z.files if k != "index"}
    return index, arrays
