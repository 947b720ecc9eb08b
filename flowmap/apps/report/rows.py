"""A report's rows: which (method, NFE, guidance scale) to sample, how, and the cache of finished
rows that lets a killed report resume (each row's samples and replicates in ``DIR/rows/``)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowmap.apps.report.config import ADAPTIVE, MAX_GUIDED_JUMPS, ReportConfig
from flowmap.conditioning import guidance_cost
from flowmap.metrics.evaluation import Measurement
from flowmap.ode import STAGES
from flowmap.protocols import Sampler, Solution

__all__ = ["Row", "RowCache", "plan_rows", "run_batched", "sampling_device"]


@dataclass
class Row:
    """One row: ``run(x0, y)`` samples it from the shared noise (and labels, under guidance)."""

    method: str
    nfe: int  # requested NFE (fixed-step, flow map) or 0 for adaptive
    run: Callable[[Tensor, Tensor | None], Solution]
    source: str = ""  # the checkpoint the row samples from (for the resume cache's key)
    guidance: float | None = None  # None: unguided

    @property
    def key(self) -> str:
        at = f"{self.method}@{self.nfe}" if self.nfe else self.method
        return at if self.guidance is None else f"{at}@w{self.guidance:g}"


def _solvers(teacher: Sampler, cfg: ReportConfig, guided: bool) -> dict[str, int]:
    """The teacher's fixed-step solvers and their evaluations per step (a diffusion teacher's
    own DDIM sampler joins the unguided ones)."""
    stages = dict(STAGES)
    solvers = list(cfg.solvers)
    if not guided and "ddim" in getattr(teacher, "methods", ()):
        stages["ddim"] = 1
        solvers += [] if "ddim" in solvers else ["ddim"]
    for solver in solvers:
        if solver not in stages:
            raise ValueError(f"Unknown solver {solver!r}; choose from {list(stages)}.")
    return {s: stages[s] for s in solvers}


def plan_rows(
    teacher: Sampler,
    flowmaps: dict[str, tuple[Any, str]],
    cfg: ReportConfig,
    w: float | None = None,
) -> tuple[list[Row], list[str]]:
    """The rows at guidance scale ``w`` (``None``: unguided) and notes on those skipped: a
    solver below one step (a guided step evaluates both branches, so it costs twice), a flow map
    outside the scales it was trained at. An NFE that is not a whole number of a solver's steps
    is an error, raised before any work."""
    if any(int(nfe) < 1 for nfe in cfg.nfe):
        raise ValueError(f"NFE must be at least 1, got {min(cfg.nfe)}; fix --nfe.")
    cond = (lambda y: {}) if w is None else (lambda y: {"y": y, "guidance": w})
    at = "" if w is None else f", w={w:g}"
    rows: list[Row] = []
    skipped: list[str] = []
    for solver, k in _solvers(teacher, cfg, w is not None).items():
        per_step = k * guidance_cost(w)
        for nfe in cfg.nfe:
            if nfe % k and nfe >= k:
                raise ValueError(
                    f"{solver} uses {k} NFE per step and cannot take NFE {nfe}; drop {nfe} "
                    f"from --nfe or {solver} from --solvers."
                )
            if nfe % per_step:
                skipped.append(f"teacher/{solver} at NFE {nfe}{at} (one step takes {per_step})")
                continue
            run = lambda x, y, s=solver, n=nfe: teacher.generate(x, n, s, **cond(y))  # noqa: E731
            rows.append(Row(f"teacher/{solver}", nfe, run, cfg.teacher or "", w))
    tol = {"rtol": cfg.rtol, "atol": cfg.atol}
    run = lambda x, y: teacher.generate(x, method="dopri5", **tol, **cond(y))  # noqa: E731
    rows.append(Row(ADAPTIVE, 0, run, cfg.teacher or "", w))
    for label, (fm, path) in flowmaps.items():
        if w is not None:
            low, high = fm.guidance_range
            if not low - 1e-6 <= w <= high + 1e-6:
                skipped.append(f"flowmap/{label} at w={w:g} (trained at w in [{low:g}, {high:g}])")
                continue
        for nfe in cfg.nfe:
            if w is None or nfe <= MAX_GUIDED_JUMPS:
                run = lambda x, y, m=fm, n=nfe: m.generate(x, n, **cond(y))  # noqa: E731
                rows.append(Row(f"flowmap/{label}", nfe, run, path, w))
    return rows, skipped


def sampling_device() -> torch.device:
    """Where a report generates its samples: the first GPU if there is one (the metrics run on
    the CPU either way)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_batched(
    run: Callable[[Tensor, Tensor | None], Solution],
    x0: Tensor,
    y: Tensor | None,
    batch: int,
    decode: Callable[[Tensor], Tensor] | None = None,
) -> Solution:
    """``run`` on ``x0`` (and labels ``y``) in chunks of ``batch`` on :func:`sampling_device`,
    each chunk decoded to pixels there when ``decode`` is given (latent rows); samples back on
    the CPU, the NFE the most any chunk used."""
    outs, nfe, device = [], 0, sampling_device()
    ys = y.split(batch) if y is not None else [None] * len(x0.split(batch))
    for xs, yc in zip(x0.split(batch), ys):
        sol = run(xs.to(device), None if yc is None else yc.to(device))
        outs.append((sol.x if decode is None else decode(sol.x)).cpu())
        nfe = max(nfe, sol.nfe)
    return Solution(torch.cat(outs), nfe)


class RowCache:
    """Finished rows in ``folder``, one ``.npz`` each (samples, NFE, replicates), named by the
    row and a digest of everything that makes its numbers: the checkpoint it samples (its size and
    modification time, or a foreign teacher's SHA-256) and the measurement's settings."""

    def __init__(self, folder: Path, settings: Sequence[Any], groups: int) -> None:
        self.folder, self.settings, self.groups = folder, list(settings), groups

    def path(self, row: Row, sha: str | None = None) -> Path:
        if sha is not None:  # a foreign teacher: by its content
            ident = [row.source, sha, *self.settings]
        else:
            stat = os.stat(row.source) if row.source else None
            ident = [row.source, stat and stat.st_size, stat and stat.st_mtime_ns, *self.settings]
        digest = hashlib.sha1(repr(ident).encode()).hexdigest()[:12]
        return self.folder / f"{row.key.replace('/', '__')}-{digest}.npz"

    @staticmethod
    def save(f: Path, x: Tensor, nfe: int, meas: Measurement) -> None:
        """The row's samples, NFE and replicates (as :class:`Measurement` writes them)."""
        tmp = f.with_suffix(".tmp.npz")
        np.savez(tmp, x=x.numpy(), nfe=np.int64(nfe), **meas.to_arrays())
        os.replace(tmp, f)

    def load(self, f: Path) -> tuple[Tensor, int, Measurement]:
        """What :meth:`save` wrote."""
        with np.load(f, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        x = torch.from_numpy(arrays["x"])
        return x, int(arrays["nfe"]), Measurement.from_arrays(arrays, len(x), self.groups)
