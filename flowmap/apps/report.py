r"""FID (or W2 on 2D data) against the number of sampling steps (DESIGN §6).

``flowmap report --teacher T.ckpt --flowmap L.ckpt [--flowmap name=E.ckpt …] --out DIR``

Protocol: the same noise :math:`x_0` for every method; NFE grid 1, 2, 4, 8, 16, 32; one teacher row
per fixed-step solver at equal NFE (a solver skips NFE below one of its steps), an adaptive
reference row (``teacher/dopri5``, at the NFE it used), one row per flow map, and the floor: data
against data at the same sample size. Files: ``report.md``, ``fid_vs_steps.png``, ``results.json``
and, with ``--save-samples``, ``samples.npz``. Finished rows are kept in ``DIR/rows/`` so a killed
run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from lightning.pytorch.cli import instantiate_module
from rich.progress import Progress
from torch import Tensor

from flowmap.data.base import FlowDataModule, to_uint8
from flowmap.metrics.digits_extractor import register_digits_feature_extractor
from flowmap.metrics.fid import fid_torch_fidelity
from flowmap.metrics.inception import verified_inception_weights
from flowmap.metrics.two_d import wasserstein2
from flowmap.ode import STAGES
from flowmap.protocols import Sampler, Solution
from flowmap.training import (
    CheckpointError,
    FlowMapModule,
    VelocityModule,
    load_module,
    read_checkpoint,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

__all__ = ["ReportConfig", "run_report", "main", "build_datamodule", "plan_rows"]

DEFAULT_NFE = (1, 2, 4, 8, 16, 32)


@dataclass
class ReportConfig:
    """Everything a report run needs; see ``flowmap report --help``."""

    teacher: str
    out: str
    flowmaps: Sequence[str] = ()
    nfe: Sequence[int] = DEFAULT_NFE
    solvers: Sequence[str] = ("euler", "heun")
    n_samples: int | None = None
    seed: int = 0
    rtol: float = 1e-5
    atol: float = 1e-5
    save_samples: bool = False
    feature: str | None = None
    inception_weights: str | None = None
    batch_size: int = 1000
    command: str = ""


# --------------------------------------------------------------------------- data and metric
def build_datamodule(hparams: dict[str, Any]) -> Any:
    """Rebuild the DataModule a checkpoint was trained with (``flowmap.data`` classes only)."""
    hp = {k: v for k, v in (hparams or {}).items() if k != "_instantiator"}
    class_path = hp.get("_class_path", "")
    if not class_path.startswith("flowmap.data."):
        raise CheckpointError(
            "The teacher checkpoint does not name a flowmap DataModule, so the report cannot "
            "find its reference data; train the teacher with `flowmap fit`."
        )
    return instantiate_module(FlowDataModule, hp)


class Metric:
    """W2 on 2D/vector data, FID in a feature space on images; ``floor`` = data vs data."""

    def __init__(self, dm: Any, n: int, seed: int, feature: str | None, weights: str | None):
        self.dm, self.n, self.seed = dm, n, seed
        shape = tuple(dm.data_shape)
        self.is_image = bool(getattr(dm, "is_image", len(shape) == 3))
        self.name = "fid" if self.is_image else "w2"
        self.reference = dm.reference_samples(
            n if not self.is_image else self._ref_n(), "train", seed
        )
        self.feature = feature or (
            "flowmap-digits" if shape == (1, 8, 8) else "inception-v3-compat"
        )
        self.weights = weights
        if self.is_image and self.feature == "inception-v3-compat":
            self.weights = str(verified_inception_weights(weights))  # fails at once offline

    def _ref_n(self) -> int:
        counter = getattr(self.dm, "num_samples", None)
        return counter("train") if counter else max(self.n, 10_000)

    def __call__(self, samples: Tensor) -> float:
        if not self.is_image:
            return wasserstein2(samples.flatten(1), self.reference.flatten(1))
        kw: dict[str, Any] = {}
        if self.feature == "flowmap-digits":
            register_digits_feature_extractor()
        elif self.weights:
            kw["feature_extractor_weights_path"] = self.weights
        out = fid_torch_fidelity(
            to_uint8(samples.clamp(-1, 1)), to_uint8(self.reference), self.feature, **kw
        )
        return float(out["frechet_inception_distance"])

    def floor(self) -> float:
        return self(self.dm.reference_samples(self.n, "test", self.seed + 1))


# --------------------------------------------------------------------------- rows
@dataclass
class Row:
    method: str
    nfe: int  # requested NFE (fixed-step, flow map) or 0 for adaptive
    run: Callable[[Tensor], Solution]
    source: str = ""  # the checkpoint the row samples from (for the resume cache's key)

    @property
    def key(self) -> str:
        return f"{self.method}@{self.nfe}" if self.nfe else self.method


def _load_flowmap(spec: str) -> tuple[str, FlowMapModule, str]:
    """``label=path`` or ``path`` → (label, module, path); the label defaults to the loss's name."""
    label, path = spec.split("=", 1) if "=" in spec else ("", spec)
    module = load_module(FlowMapModule, path)
    return label or module.loss.name, module, path


def plan_rows(
    teacher: VelocityModule, flowmaps: dict[str, tuple[Sampler, str]], cfg: ReportConfig
) -> tuple[list[Row], list[str]]:
    """The rows to evaluate, and notes on (solver, NFE) pairs below one step that are skipped.

    An NFE that is not a whole number of a solver's steps is an error, raised before any work.
    """
    rows: list[Row] = []
    skipped: list[str] = []
    for nfe in cfg.nfe:
        if int(nfe) < 1:
            raise ValueError(f"NFE must be at least 1, got {nfe}; fix --nfe.")
    for solver in cfg.solvers:
        if solver not in STAGES:
            raise ValueError(f"Unknown solver {solver!r}; choose from {list(STAGES)}.")
        k = STAGES[solver]
        for nfe in cfg.nfe:
            if nfe < k:
                skipped.append(f"teacher/{solver} at NFE {nfe} (one step takes {k})")
            elif nfe % k:
                raise ValueError(
                    f"{solver} uses {k} NFE per step and cannot take NFE {nfe}; drop {nfe} "
                    f"from --nfe or {solver} from --solvers."
                )
            else:
                rows.append(
                    Row(
                        f"teacher/{solver}",
                        nfe,
                        lambda x, s=solver, n=nfe: teacher.generate(x, n, s),
                        cfg.teacher,
                    )
                )
    rows.append(
        Row(
            "teacher/dopri5",
            0,
            lambda x: teacher.generate(x, method="dopri5", rtol=cfg.rtol, atol=cfg.atol),
            cfg.teacher,
        )
    )
    for label, (fm, path) in flowmaps.items():
        for nfe in cfg.nfe:
            run = lambda x, m=fm, n=nfe: m.generate(x, n)  # noqa: E731
            rows.append(Row(f"flowmap/{label}", nfe, run, path))
    return rows, skipped


def _batched(run: Callable[[Tensor], Solution], x0: Tensor, batch: int) -> Solution:
    outs, nfe = [], 0
    for chunk in x0.split(batch):
        sol = run(chunk)
        outs.append(sol.x)
        nfe = max(nfe, sol.nfe)
    return Solution(torch.cat(outs), nfe)


# --------------------------------------------------------------------------- outputs
def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    dev = "CUDA " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{platform.node()} · {platform.system()} {platform.machine()} {cpu} · {os.cpu_count()} cores · {dev}"


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


def _plot(results: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({r["method"] for r in results["rows"]})
    for m in methods:
        pts = sorted((r["nfe"], r["value"]) for r in results["rows"] if r["method"] == m)
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(xs) > 1 else "*", ms=6 if len(xs) > 1 else 12, label=m)
    ax.axhline(results["floor"], color="k", ls="--", lw=1, label="floor (data vs data)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel(results["metric"].upper())
    ax.set_title(
        f"{results['dataset']}: {results['metric'].upper()} vs sampling steps "
        f"(n={results['n_samples']})"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(results: dict[str, Any], skipped: list[str], endpoint: dict[str, float]) -> str:
    metric = results["metric"].upper()
    nfes = sorted({r["nfe"] for r in results["rows"] if not r["method"].endswith("dopri5")})
    by = {(r["method"], r["nfe"]): r["value"] for r in results["rows"]}
    methods = list(dict.fromkeys(r["method"] for r in results["rows"]))
    lines = [
        f"# {metric} vs sampling steps: {results['dataset']}",
        "",
        f"- metric: {metric} ({'exact W2, POT' if metric == 'W2' else results.get('feature', '')}),"
        f" {results['n_samples']} samples per row, the same noise for every method",
        f"- floor (data vs data, same size): {results['floor']:.4g} — the metric's own sampling "
        "noise at this sample size, not a lower bound: a model can land below it",
        f"- command: `{results['command']}`",
        f"- machine: {results['machine']}",
        f"- seed: {results['seed']}; wall time: {results.get('seconds', 0):.0f} s",
        f"- versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}",
        "",
        "| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
        "|---|" + "---|" * len(nfes),
    ]
    for m in methods:
        if m.endswith("dopri5"):
            continue
        cells = [f"{by[(m, n)]:.4g}" if (m, n) in by else "n/a" for n in nfes]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for r in results["rows"]:
        if r["method"].endswith("dopri5"):
            lines += [
                "",
                f"Adaptive reference `{r['method']}` (rtol {results['rtol']}, atol "
                f"{results['atol']}): {metric} {r['value']:.4g} at NFE {r['nfe']} "
                "(what the solver used).",
            ]
    if endpoint:
        lines += [
            "",
            "Mean distance from the teacher's adaptive-solve endpoint for the same noise:",
            "",
            "| row | distance |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.4g} |" for k, v in endpoint.items()]
    if skipped:
        lines += ["", "Not run (below one step of the solver): " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main loop
def run_report(cfg: ReportConfig) -> dict[str, Any]:
    """Evaluate every row (reusing rows finished by an earlier, interrupted run) and write the files."""
    start = time.time()
    out = Path(cfg.out)
    rows_dir = out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    ck = read_checkpoint(cfg.teacher, expected_kind="VelocityModule")
    teacher = load_module(VelocityModule, cfg.teacher)
    flowmaps: dict[str, tuple[FlowMapModule, str]] = {}
    for spec in cfg.flowmaps:
        label, module, path = _load_flowmap(spec)
        if label in flowmaps:
            raise ValueError(f"Two flow maps are labelled {label!r}; name them as label=path.")
        flowmaps[label] = (module, path)
    dm = build_datamodule(ck.get("datamodule_hyper_parameters", {}))
    shape = tuple(dm.data_shape)
    for name, mod in [("teacher", teacher), *((k, v[0]) for k, v in flowmaps.items())]:
        if mod.data_shape is not None and tuple(mod.data_shape) != shape:
            raise ValueError(
                f"The {name} checkpoint was trained on shape {list(mod.data_shape)} "
                f"but the data has shape {list(shape)}; use checkpoints of one dataset."
            )
    rows, skipped = plan_rows(teacher, flowmaps, cfg)
    n = cfg.n_samples or (dm.num_samples("test") if hasattr(dm, "num_samples") else 2000)
    metric = Metric(dm, n, cfg.seed, cfg.feature, cfg.inception_weights)
    x0 = torch.randn(n, *shape, generator=torch.Generator().manual_seed(cfg.seed))

    def cached(
        key: str, compute: Callable[[], tuple[Tensor, int, float]], source: str = ""
    ) -> dict[str, Any]:
        """A finished row is reused only if its inputs are the same: the checkpoint file (path,
        size, mtime), the sample count, seed, tolerances and metric."""
        stat = os.stat(source) if source else None
        ident = [
            source,
            stat and stat.st_size,
            stat and stat.st_mtime_ns,
            n,
            cfg.seed,
            cfg.rtol,
            cfg.atol,
            metric.name,
            metric.feature,
        ]
        digest = hashlib.sha1(repr(ident).encode()).hexdigest()[:12]
        f = rows_dir / f"{key.replace('/', '__')}-{digest}.npz"
        if f.exists():
            with np.load(f, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        x, nfe, value = compute()
        rec = {"x": x.numpy().astype(np.float32), "nfe": np.int64(nfe), "value": np.float64(value)}
        tmp = f.with_suffix(".tmp.npz")
        np.savez(tmp, **rec)
        os.replace(tmp, f)
        return rec

    records: dict[str, dict[str, Any]] = {}
    with Progress(transient=False) as bar:
        task = bar.add_task("report rows", total=len(rows) + 1)
        floor_rec = cached("floor", lambda: (torch.zeros(0), 0, metric.floor()))
        bar.advance(task)
        for row in rows:

            def compute(row: Row = row) -> tuple[Tensor, int, float]:
                sol = _batched(row.run, x0, cfg.batch_size)
                if row.nfe and sol.nfe != row.nfe:
                    raise RuntimeError(f"{row.key} used {sol.nfe} NFE, not {row.nfe}.")
                return sol.x, sol.nfe, metric(sol.x)

            records[row.key] = cached(row.key, compute, row.source)
            bar.update(
                task, advance=1, description=f"{row.key}: {float(records[row.key]['value']):.4g}"
            )
    ref_x = torch.as_tensor(records["teacher/dopri5"]["x"])
    endpoint = {
        k: float((torch.as_tensor(r["x"]) - ref_x).flatten(1).norm(dim=1).mean())
        for k, r in records.items()
        if k != "teacher/dopri5"
    }
    results = {
        "dataset": str(getattr(dm, "name", None) or type(dm).__name__),
        "metric": metric.name,
        "n_samples": int(n),
        "floor": float(floor_rec["value"]),
        "rows": [
            {
                "method": r.method,
                "nfe": int(records[r.key]["nfe"]),
                "value": float(records[r.key]["value"]),
            }
            for r in rows
        ],
        "command": cfg.command,
        "machine": machine_description(),
        "versions": package_versions(),
        "seed": cfg.seed,
        "feature": metric.feature if metric.is_image else "exact W2 (POT)",
        "rtol": cfg.rtol,
        "atol": cfg.atol,
        "endpoint_error": [
            {"method": r.method, "nfe": int(records[r.key]["nfe"]), "value": endpoint[r.key]}
            for r in rows
            if r.key in endpoint
        ],
        "seconds": time.time() - start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(_markdown(results, skipped, endpoint))
    _plot(results, out / "fid_vs_steps.png")
    if cfg.save_samples:
        arrays = {f"{r.method}@{int(records[r.key]['nfe'])}": records[r.key]["x"] for r in rows}
        arrays["data"] = metric.reference.numpy().astype(np.float32)
        np.savez_compressed(out / "samples.npz", **arrays)
    return results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowmap report", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="VelocityModule checkpoint")
    p.add_argument(
        "--flowmap",
        action="append",
        default=[],
        dest="flowmaps",
        help="FlowMapModule checkpoint, optionally label=path (repeatable)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--nfe", type=int, nargs="+", default=list(DEFAULT_NFE))
    p.add_argument("--solvers", nargs="+", default=["euler", "heun"], choices=list(STAGES))
    p.add_argument(
        "--n-samples",
        type=int,
        default=None,
        help="samples per row (default: the test split's size, or 2000 for toy data)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--save-samples", action="store_true")
    p.add_argument(
        "--feature",
        default=None,
        help="torch-fidelity feature extractor (default: flowmap-digits on 8×8, "
        "inception-v3-compat otherwise)",
    )
    p.add_argument("--inception-weights", default=None, help="path to Inception-v3 weights")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``flowmap report`` / ``python benchmarks/fid_vs_steps.py``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    cmd = "flowmap report " + " ".join(shlex.quote(a) for a in argv)
    cfg = ReportConfig(command=cmd, **vars(args))
    results = run_report(cfg)
    print(Path(cfg.out) / "report.md")
    return results
