"""What a report measures: its configuration and defaults, one set for every kind of report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flowmap.metrics.evaluation import W2_GROUP_SIZE

__all__ = ["ADAPTIVE", "DEFAULT_NFE", "DEFAULT_SIZES", "ReportConfig", "sizes"]

DEFAULT_NFE = (1, 2, 4, 8, 16, 32)
#: Default samples per row and replicate groups: images (FID needs thousands of samples at once)
#: and vector data (exact W2 is computed per group of W2_GROUP_SIZE, as many groups as fit).
DEFAULT_SIZES = {"image": (10_000, 20), "vector": (10_000, None)}  # vector: W2_GROUP_SIZE each
#: The half-width the defaults aim at, relative to the value (issue 2/7): W2 2%, FID 5%.
TARGET_HALF_WIDTH = {"w2": 0.02, "fid": 0.05}
#: The teacher's adaptive solve: the reference of every ratio and endpoint distance.
ADAPTIVE = "teacher/dopri5"
#: Under guidance, flow maps are measured up to this many jumps (the teacher at every NFE).
MAX_GUIDED_JUMPS = 8
#: The teacher's fixed-step solve whose round trip is the yardstick of a flow map's inversion.
ROUND_TRIP_SOLVER = ("heun", 8)


@dataclass
class ReportConfig:
    """Everything a report run needs; see ``flowmap report --help``. ``guidance`` is the axis of
    guidance scales (empty: unguided, or 1 for a class-conditional teacher)."""

    teacher: str | None
    out: str
    flowmaps: Sequence[str] = ()
    nfe: Sequence[int] = DEFAULT_NFE
    solvers: Sequence[str] = ("euler", "heun")
    n_samples: int | None = None
    groups: int | None = None
    reference_split: str = "train"
    seed: int = 0
    rtol: float = 1e-5
    atol: float = 1e-5
    save_samples: int | None = None
    feature: str | None = None
    inception_weights: str | None = None
    batch_size: int = 1000
    from_samples: str | None = None
    guidance: Sequence[float] = ()
    command: str = ""


def sizes(image: bool, n: int | None, groups: int | None) -> tuple[int, int]:
    """Samples and groups: the defaults, and on vector data with ``--n-samples`` alone as many
    groups of :data:`W2_GROUP_SIZE` as fit (at least 2), so W2 keeps its scale."""
    dn, dg = DEFAULT_SIZES["image" if image else "vector"]
    n = int(n or dn)
    return n, int(groups or dg or max(2, n // W2_GROUP_SIZE))
