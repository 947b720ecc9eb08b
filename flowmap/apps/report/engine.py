"""The report engine: load the teacher and the flow maps once, plan the rows along the guidance
axis (unguided is its one value ``None``), measure each row once on the shared noise (resuming
from the row cache), then write the results (:mod:`~flowmap.apps.report.render`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor

from flowmap.apps.report.config import ADAPTIVE, ReportConfig
from flowmap.apps.report.diagnostics import (
    class_accuracy_replicates,
    ddim_euler_gap,
    guidance_goals,
    round_trips,
)
from flowmap.apps.report.render import write_guidance_files, write_steps_files
from flowmap.apps.report.results import (
    Entry,
    machine_description,
    package_versions,
    read_samples,
    result_rows,
    save_samples,
    steps_results,
    stored,
)
from flowmap.apps.report.rows import Row, RowCache, plan_rows, run_batched, sampling_device
from flowmap.apps.report.setting import (
    Setting,
    build_datamodule,
    dataset_name,
    guided_setting,
    steps_setting,
)
from flowmap.data.base import REFERENCE_SPLITS
from flowmap.metrics.evaluation import Evaluator, Measurement
from flowmap.protocols import declared_schedule
from flowmap.training import FlowMapModule, VelocityModule, read_checkpoint
from flowmap.training.checkpoints import check_same_origin
from flowmap.training.loading import load_flowmap, load_sampler
from flowmap.training.threads import set_threads

__all__ = ["report_from_samples", "run_report"]


@dataclass
class Measured:
    """A finished row: its samples (as the metrics see them), the NFE it used, its replicates."""

    row: Row
    x: Tensor
    nfe: int
    measurement: Measurement


@dataclass
class Run:
    """One report run, measured: what the writers need."""

    cfg: ReportConfig
    setting: Setting
    meta: dict[str, Any]
    plans: dict[Any, list[Row]]
    done: dict[str, Measured]
    floor: Measurement | None
    skipped: list[str]
    teacher: Any
    flowmaps: dict[str, tuple[FlowMapModule, str]]
    start: float

    def entries(self) -> list[Entry]:
        """``(method, NFE used, key, scale)`` of every row, in the plan's order."""
        return [
            (r.method, self.done[r.key].nfe, r.key, r.guidance)
            for rows in self.plans.values()
            for r in rows
        ]

    def measured(self) -> dict[str, Measurement]:
        return {k: m.measurement for k, m in self.done.items()}


def _load_teacher(cfg: ReportConfig) -> tuple[Any, dict[str, Any], str | None]:
    """The teacher, the checkpoint facts flow maps are checked against (data, path) and, for a
    teacher trained elsewhere, its identity. Such a teacher carries no dataset: the report takes
    the data of its first flow map."""
    teacher, _, sha, ckpt = load_sampler(str(cfg.teacher), "VelocityModule", need_shape=False)
    if ckpt is not None:
        return teacher, ckpt, None
    if not callable(getattr(teacher, "generate", None)):
        raise ValueError(
            f"The teacher {cfg.teacher!r} is a velocity with no generate(); wrap the model with "
            "flowmap.teachers.DiffusionTeacher, which samples, to report it."
        )
    if not cfg.flowmaps:
        raise ValueError(
            f"The teacher {cfg.teacher!r} is a model trained elsewhere and names no dataset; give "
            "a flow map distilled from it (--flowmap), whose checkpoint names the data."
        )
    first = cfg.flowmaps[0].split("=", 1)[-1]
    data = read_checkpoint(first, expected_kind="FlowMapModule").get("datamodule_hyper_parameters")
    facts = {"schedule": declared_schedule(teacher) or "linear"}
    return teacher, {"datamodule_hyper_parameters": data, "hyper_parameters": facts}, sha


def _load_flowmaps(
    cfg: ReportConfig, ck: dict[str, Any], sha: str | None
) -> dict[str, tuple[FlowMapModule, str]]:
    """Every ``--flowmap``, labelled, each checked to come from this teacher."""
    flowmaps: dict[str, tuple[FlowMapModule, str]] = {}
    for spec in cfg.flowmaps:
        label, path, (module, _, _, map_ck) = load_flowmap(spec)
        module.to(sampling_device())
        if label in flowmaps:
            raise ValueError(f"Two flow maps are labelled {label!r}; name them as label=path.")
        flowmaps[label] = (module, path)
        check_same_origin(str(cfg.teacher), ck, label, path, map_ck, sha)
    return flowmaps


def _guidance_axis(cfg: ReportConfig, teacher: Any, flowmaps: dict[str, Any]) -> list[Any]:
    """``[None]`` for an unconditional teacher; the scales of ``--guidance`` (default 1) for a
    class-conditional flowmap teacher, whose flow maps must have its classes."""
    k = getattr(teacher, "num_classes", None)
    if k is None:
        if cfg.guidance:
            raise ValueError(
                "--guidance needs a class-conditional teacher, and this one has no classes; drop "
                "--guidance."
            )
        return [None]
    if not isinstance(teacher, VelocityModule):
        raise ValueError(
            "The guidance report takes a flowmap teacher checkpoint; a class-conditional foreign "
            "teacher is distilled and sampled (flowmap sample) but not yet reported."
        )
    for label, (fm, _) in flowmaps.items():
        if fm.num_classes != k:
            raise ValueError(
                f"The flow map {label!r} has {fm.num_classes or 'no'} classes but the teacher "
                f"{k}; report a flow map beside the teacher it was distilled from."
            )
    scales = [float(w) for w in (cfg.guidance or [1.0])]
    for w in scales:
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"Guidance scales must be finite and >= 0, got {w}; fix --guidance.")
    return scales


def _check_shapes(teacher: Any, flowmaps: dict[str, Any], shape: tuple[int, ...]) -> None:
    for name, mod in [("teacher", teacher), *((k, v[0]) for k, v in flowmaps.items())]:
        mod_shape = getattr(mod, "data_shape", None)
        if mod_shape is not None and tuple(mod_shape) != shape:
            raise ValueError(
                f"The {name} checkpoint was trained on shape {list(mod_shape)} "
                f"but the data has shape {list(shape)}; use checkpoints of one dataset."
            )


def _measure_row(row: Row, s: Setting, exact: Tensor | None, batch: int) -> Measured:
    """Sample ``row`` on the shared noise and measure it (its endpoint against ``exact``)."""
    sol = run_batched(row.run, s.x0, s.y, batch, s.decode)
    if row.nfe and sol.nfe != row.nfe:
        raise RuntimeError(f"{row.key} used {sol.nfe} NFE, not {row.nfe}.")
    x = stored(s.evaluator, sol.x)
    meas = s.evaluator.measure(x, exact)
    if s.classifier is not None:
        meas.replicates["class_accuracy"] = class_accuracy_replicates(
            s.classifier, sol.x, s.y, s.groups
        )
    return Measured(row, x, sol.nfe, meas)


def measure_rows(
    plans: dict[Any, list[Row]], s: Setting, cache: RowCache, cfg: ReportConfig, sha: str | None
) -> tuple[dict[str, Measured], Measurement | None]:
    """Every row of every scale (the adaptive solve first: the others' endpoint reference), each
    from the cache when an earlier run finished it; and the floor set's measurement."""
    done: dict[str, Measured] = {}
    floor = None
    headline = s.evaluator.headline
    with Progress(transient=False) as bar:
        total = sum(len(rows) for rows in plans.values()) + (s.floor_x is not None)
        task = bar.add_task("report rows", total=total)
        if s.floor_x is not None:
            floor = s.evaluator.measure(s.floor_x)
            bar.advance(task)
        for rows in plans.values():
            exact = None
            for row in sorted(rows, key=lambda r: r.method != ADAPTIVE):
                f = cache.path(row, sha if row.source == cfg.teacher else None)
                if f.exists():
                    m = Measured(row, *cache.load(f))
                else:
                    m = _measure_row(row, s, exact, cfg.batch_size)
                    cache.save(f, m.x, m.nfe, m.measurement)
                exact = m.x if row.method == ADAPTIVE else exact
                done[row.key] = m
                value = m.measurement.estimates()[headline]
                bar.update(task, advance=1, description=f"{row.key}: {headline} {value}")
    return done, floor


def run_report(cfg: ReportConfig) -> dict[str, Any]:
    """Evaluate every row (reusing rows finished by an earlier, interrupted run) and write the files."""
    if cfg.from_samples:
        return report_from_samples(cfg)
    if not cfg.teacher:
        raise ValueError("A report needs --teacher (or --from-samples to recompute a saved one).")
    start = time.time()
    if cfg.reference_split not in REFERENCE_SPLITS:
        raise ValueError(
            f"Unknown reference split {cfg.reference_split!r}; choose one of "
            f"{', '.join(REFERENCE_SPLITS)}."
        )
    out = Path(cfg.out)
    set_threads()
    teacher, ck, sha = _load_teacher(cfg)
    if isinstance(teacher, torch.nn.Module):
        teacher.to(sampling_device())
    flowmaps = _load_flowmaps(cfg, ck, sha)
    dm = build_datamodule(ck.get("datamodule_hyper_parameters", {}))
    scales = _guidance_axis(cfg, teacher, flowmaps)
    guided = scales != [None]
    _check_shapes(teacher, flowmaps, tuple(dm.data_shape))
    planned = {w: plan_rows(teacher, flowmaps, cfg, w) for w in scales}
    plans = {w: rows for w, (rows, _) in planned.items()}
    skipped = [note for _, notes in planned.values() for note in notes]
    s = guided_setting(cfg, dm, teacher.num_classes) if guided else steps_setting(cfg, dm)
    try:
        (out / "rows").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"Cannot write the report into {out} ({e.strerror}); choose another --out."
        ) from None
    settings = [s.n, s.groups, cfg.seed, cfg.rtol, cfg.atol, s.evaluator.headline]
    settings += [s.evaluator.feature, cfg.reference_split, dataset_name(dm)]
    settings += [len(s.evaluator.reference)] if guided else []
    done, floor = measure_rows(plans, s, RowCache(out / "rows", settings, s.groups), cfg, sha)
    meta = {
        "dataset": dataset_name(dm),
        "command": cfg.command,
        "machine": machine_description(),
        "versions": package_versions(),
        "seed": cfg.seed,
    }
    run = Run(cfg, s, meta, plans, done, floor, skipped, teacher, flowmaps, start)
    return _guidance_report(run) if guided else _steps_report(run)


def _steps_report(run: Run) -> dict[str, Any]:
    """Quality against NFE: the rows beside the floor, the inversion round trips and, for a
    diffusion teacher, DDIM against Euler; ``samples.npz`` with ``--save-samples``."""
    cfg, s, teacher = run.cfg, run.setting, run.teacher
    meta = {
        **run.meta,
        "floor_sets": s.floor_sets,
        "rtol": cfg.rtol,
        "atol": cfg.atol,
        "reference_split": cfg.reference_split,
    }
    entries = run.entries()
    assert run.floor is not None and s.floor_x is not None  # a steps setting has a floor
    results = steps_results(meta, entries, run.measured(), run.floor, s.evaluator)
    if s.codec_floor_x is not None:  # latent data: what the codec alone costs
        coded = s.evaluator.measure(s.codec_floor_x).estimates()
        results["codec_floor"] = coded[s.evaluator.headline].as_dict()
        results["codec_floor_metrics"] = {k: e.as_dict() for k, e in coded.items()}
    nfes = [n for n in cfg.nfe if n <= 8]
    results["round_trip"] = round_trips(teacher, run.flowmaps, s.x0, nfes, s.groups, cfg.batch_size)
    if "ddim" in getattr(teacher, "methods", ()):
        results["ddim_vs_euler"] = ddim_euler_gap(teacher, s.x0[:256], cfg.nfe)
    results["seconds"] = time.time() - run.start
    samples = {k: m.x for k, m in run.done.items()}
    out = Path(cfg.out)
    write_steps_files(out, results, run.skipped, samples, entries, s.evaluator.reference)
    if cfg.save_samples is not None:
        cap = cfg.save_samples or None  # 0: every sample
        kept = {k: v[:cap] for k, v in samples.items()}
        meta = {**meta, "skipped": run.skipped}
        save_samples(out / "samples.npz", kept, entries, s.evaluator, s.floor_x, meta)
    return results


def _guidance_report(run: Run) -> dict[str, Any]:
    """Quality and class accuracy against the guidance scale, the goals at one jump, and one
    class grid per scale for the adaptive solve and each flow map's single jump."""
    cfg, s, k = run.cfg, run.setting, run.teacher.num_classes
    results = {
        **run.meta,
        "kind": "guidance",
        "metric": "fid",
        "feature": s.evaluator.feature,
        "n_samples": s.n,
        "groups": s.groups,
        "num_classes": k,
        "guidance": list(run.plans),
        "reference": s.reference,
        "class_accuracy": "digits classifier (flowmap.metrics.digits_extractor)"
        if s.classifier is not None
        else None,
        "rows": result_rows(run.entries(), run.measured(), "fid"),
        "skipped": run.skipped,
    }
    if cfg.save_samples is not None:
        results["skipped"].append(
            f"samples.npz (--save-samples): the guidance report keeps each row's samples in "
            f"{Path(cfg.out) / 'rows'}/ instead"
        )
    results["goals"] = guidance_goals(results)
    results["seconds"] = time.time() - run.start
    pictures: dict[float, dict[str, Tensor]] = {}
    for m in run.done.values():
        if m.row.method == ADAPTIVE or (m.row.nfe == 1 and m.row.method.startswith("flowmap/")):
            name = f"{m.row.method} (NFE {m.nfe})"
            pictures.setdefault(m.row.guidance, {})[name] = m.x[: 16 * k]
    write_guidance_files(Path(cfg.out), results, pictures)
    return results


def report_from_samples(cfg: ReportConfig) -> dict[str, Any]:
    """Recompute a report from a ``samples.npz`` alone (no checkpoint): every row's samples, the
    reference and the floor set are in it; the metrics are measured again here."""
    start = time.time()
    path = Path(cfg.from_samples or "")
    index, arrays = read_samples(path)
    meta = index["meta"]
    if cfg.teacher:
        hparams = read_checkpoint(cfg.teacher, expected_kind="VelocityModule")
        dm = build_datamodule(hparams.get("datamodule_hyper_parameters", {}))
        if dataset_name(dm) != meta["dataset"] or list(dm.data_shape) != index["data_shape"]:
            raise ValueError(
                f"{path} holds samples of {meta['dataset']} {index['data_shape']}, but the teacher "
                f"was trained on {dataset_name(dm)} {list(dm.data_shape)}; use files of one dataset."
            )
    evaluator = Evaluator(
        arrays["reference"],
        groups=index["groups"],
        feature=index["feature"],
        seed=index["seed"],
        weights=cfg.inception_weights,
    )
    rows = [
        Row(r["method"], 0 if r["method"] == ADAPTIVE else r["nfe"], None) for r in index["rows"]
    ]
    entries: list[Entry] = [(r.method, i["nfe"], r.key, None) for r, i in zip(rows, index["rows"])]
    samples = {r.key: arrays[i["array"]] for r, i in zip(rows, index["rows"])}
    measured = {}
    if ADAPTIVE in samples:  # first, as in run_report
        measured[ADAPTIVE] = evaluator.measure(samples[ADAPTIVE])
    for key, x in samples.items():
        if key != ADAPTIVE:
            measured[key] = evaluator.measure(x, samples.get(ADAPTIVE))
    floor = evaluator.measure(arrays["floor"])
    meta = {
        **{k: v for k, v in meta.items() if k != "skipped"},
        "command": cfg.command,
        "recomputed_from": str(path),
    }
    results = steps_results(meta, entries, measured, floor, evaluator)
    results["seconds"] = time.time() - start
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    skipped = index["meta"].get("skipped", [])
    write_steps_files(out, results, skipped, samples, entries, evaluator.reference)
    return results
