r"""FID (or W2 on 2D data) against the number of sampling steps, with 95% intervals.

``flowmap report --teacher T.ckpt --flowmap L.ckpt [--flowmap name=E.ckpt …] --out DIR``

Protocol: the same noise :math:`x_0` for every method; NFE grid 1, 2, 4, 8, 16, 32; one teacher row
per fixed-step solver at equal NFE (a solver skips NFE below one of its steps), an adaptive
reference row (``teacher/dopri5``, at the NFE it used), one row per flow map, and the floor: held-out
data measured exactly like a method. Every row is measured by one
:class:`~flowmap.metrics.evaluation.Evaluator` (the one the training callback uses): its ``N``
samples are cut into ``G`` groups that serve as independent replicates, each metric gets a 95%
interval, and ratios to the teacher's adaptive solve are taken per group on the same noise.

Files: ``report.md`` (tables with intervals, the pictures embedded), ``fid_vs_steps.png`` or
``w2_vs_steps.png`` (error
bars), ``samples_grid.png`` (every method and NFE from the same noise), ``results.json`` and, with
``--save-samples``, ``samples.npz`` (every row's samples, the reference, the floor set and a JSON
index), from which ``flowmap report --from-samples samples.npz --out DIR2`` recomputes the whole
report without any checkpoint. Finished rows are kept in ``DIR/rows/`` so a killed run resumes where
it stopped.

Guidance is an axis of the same engine (unguided is its one value): for a class-conditional
teacher (``--guidance 1 2 4``) every scale :math:`w` gets the rows above, on the same noise and
labels :math:`0..K-1` in equal shares, against a class-balanced reference; a guided teacher step
costs 2 network evaluations (both branches), a flow-map jump 1 (maps up to 8 jumps, at the scales
they were trained at); the rows add class accuracy (the digits classifier) and the goals at one
jump; files ``quality_vs_guidance.png`` and ``classes_w<w>_<method>.png``.

The parts: :mod:`~.config` (options and defaults), :mod:`~.rows` (planning and the row cache),
:mod:`~.setting` (reference, noise, floor), :mod:`~.engine` (the loop), :mod:`~.diagnostics`
(round trips, DDIM vs Euler, class accuracy, goals), :mod:`~.results` (``results.json``,
``samples.npz``), :mod:`~.render` (``report.md`` and pictures), :mod:`~.command` (the CLI).
"""

from flowmap.apps.report.command import main, parser
from flowmap.apps.report.config import ReportConfig
from flowmap.apps.report.engine import report_from_samples, run_report

__all__ = ["ReportConfig", "main", "parser", "report_from_samples", "run_report"]
