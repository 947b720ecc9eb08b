"""Every preset from scratch, side by side with the public peers: same net, data, budget and loop.

Rows:

* flowmap's presets (``flowmap.presets``): the self-distillation ones train from scratch; the
  distillation ones (consistency distillation, sCD, AYF, progressive) distil a CFM teacher that
  this script trains first with the same net and budget (``cfm_teacher`` row), starting from a
  copy of it;
* the peers of rectified-flow-pytorch (``pip install -e ".[peers]"``; the package never imports
  it): ``LsdFlow``, ``MeanFlow``, ``SplitMeanFlow``, each given flowmap's net through an adapter
  into its own time convention, trained by its own ``forward``.

Every row: the 4×256 MLP of ``flowmap.nets.MLP``, ``--steps`` Adam steps at ``--lr`` with batch
``--batch`` (2D) or ``--digits-batch``, no EMA, no schedule (the same loop for all). Quality at
1/2/4/8 NFE: flow-map jumps (``flowmap.ode.sample_flow_map``; a one-time map re-noises between
jumps, ``sample_consistency``) from one fixed noise set, measured by ``flowmap.metrics.Evaluator``:
exact W2 on 2D (``--n`` samples in 5 groups, mean ± 95% t interval), FID in the digits classifier's
features on digits (jackknife interval). A peer is also sampled by its own ``sample`` method
(``own``): MeanFlow's and SplitMeanFlow's multistep samplers are Euler steps of the diagonal.

    python benchmarks/self_distillation.py run --targets checkerboard moons --methods lsd lsdflow
    python benchmarks/self_distillation.py report --out benchmarks/results/self-distillation

``run`` writes one ``rows/<target>__<method>.json`` per row (a finished row is skipped, so an
interrupted run resumes); ``report`` writes ``report.md``, ``results.json`` and ``quality.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from flowmap.data.digits import load_digits_split
from flowmap.data.toy2d import toy2d_sample
from flowmap.flowmap import FlowMap
from flowmap.losses import cfm_loss
from flowmap.metrics.evaluation import Evaluator
from flowmap.metrics.intervals import t_interval
from flowmap.nets import MLP
from flowmap.ode import sample_consistency, sample_flow_map, solve_ode
from flowmap.paths import AffinePath
from flowmap.presets import PRESETS, table
from flowmap.training.base import EMAWithWarmup
from flowmap.training.guard import DivergenceError, DivergenceGuard

NFES = (1, 2, 4, 8)
TOYS = ("checkerboard", "8gaussians", "moons")
PEERS = ("lsdflow", "meanflow_peer", "splitmeanflow_peer")
SELF = tuple(n for n, p in PRESETS.items() if not p.needs_teacher)
DISTIL = tuple(n for n, p in PRESETS.items() if p.needs_teacher)
#: ablations of a preset: (preset, replaced init_args)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # more long jumps: t - s ~ U[0, 1] instead of the triangle's density 2(1 - gap)
    "lsd_gap": ("lsd", {"pairs": {"distribution": "gap", "eta": 0.75}}),
    "meanflow_p1": ("meanflow", {"weighting": {"kind": "adaptive", "p": 1.0, "eps": 1e-3}}),
    # the peer's choices in flowmap's loss: p = 0.5, half the batch on the diagonal
    "meanflow_peer_settings": (
        "meanflow",
        {
            "weighting": {"kind": "adaptive", "p": 0.5, "eps": 1e-3},
            "pairs": {"distribution": "logit_normal", "loc": 0.4, "scale": 1.0, "eta": 0.5},
        },
    ),
}
#: rows sampled from an EMA of the net (FlowMapModule's: decay :data:`EMA_DECAY`, warmed up):
#: ``<row>_ema`` is ``<row>`` with it, the peers too (like for like)
EMA_DECAY = 0.999
EMA_ROWS = ("lsd_ema", "meanflow_ema", "lsdflow_ema", "meanflow_peer_ema")
ALL = ("cfm_teacher",) + SELF + tuple(VARIANTS) + DISTIL + PEERS + EMA_ROWS
OUT = Path("benchmarks/results/self-distillation")


# ----------------------------------------------------------------------------- data
class Data:
    """Training batches and the evaluation reference of one target."""

    def __init__(self, target: str, batch: int, n_eval: int, seed: int) -> None:
        self.target, self.batch, self.image = target, batch, target == "digits"
        self.g = torch.Generator().manual_seed(seed + 1)
        if self.image:
            x, _, _, _ = load_digits_split()
            self.train = x
            self.shape = tuple(x.shape[1:])
            self.evaluator = Evaluator(
                ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), groups=10
            )
        else:
            self.shape = (2,)
            ref = toy2d_sample(target, n_eval, torch.Generator().manual_seed(10_000 + seed))
            self.evaluator = Evaluator(ref, groups=5)
            floor = toy2d_sample(target, n_eval, torch.Generator().manual_seed(20_000 + seed))
            self.floor = self.evaluator.measure(floor).estimates()["w2"]

    def __call__(self) -> Tensor:
        if self.image:
            idx = torch.randint(len(self.train), (self.batch,), generator=self.g)
            return self.train[idx]
        return toy2d_sample(self.target, self.batch, self.g)


# ----------------------------------------------------------------------------- peers
class _MeanFlowTime(nn.Module):
    """MeanFlow's ``model(z, t, t - r)`` (noise at 1, jump t → r) from flowmap's φ (noise at 0):
    :math:`u = -\\phi(z, 1 - t, 1 - t + (t - r))`."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, delta: Tensor) -> Tensor:
        return -self.net(x, 1 - t, 1 - t + delta)


class _SplitMeanFlowTime(nn.Module):
    """SplitMeanFlow's ``model(z, t, t - r)`` (noise at 0, average velocity over [r, t]) from φ:
    :math:`u = \\phi(z, t, t - (t - r))`, the jump back from t to r."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, delta: Tensor) -> Tensor:
        return self.net(x, t, t - delta)


def peer(method: str, net: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """The rectified-flow-pytorch trainer of ``method`` around ``net``."""
    try:
        import rectified_flow_pytorch as rfp
    except ImportError:
        raise SystemExit(
            'The peers need rectified-flow-pytorch: pip install -e ".[peers]" (benchmark only).'
        ) from None
    if method == "lsdflow":
        return rfp.LsdFlow(net, data_shape=shape)
    if method == "meanflow_peer":
        return rfp.MeanFlow(_MeanFlowTime(net), data_shape=shape)
    return rfp.SplitMeanFlow(_SplitMeanFlowTime(net), data_shape=shape)


# ----------------------------------------------------------------------------- training
def make_net(shape: tuple[int, ...], seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP(shape, width=256, depth=4)


def train(
    step_loss: Callable[[Tensor, int], Tensor],
    params: list[nn.Parameter],
    data: Data,
    args: Any,
    fm: FlowMap | None = None,
    after_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The one loop of every row: Adam at ``args.lr``, ``args.steps`` steps; with the row's map
    ``fm``, a :class:`~flowmap.training.DivergenceGuard` stops a run that leaves the data's scale
    (or whose loss is non-finite) and records the step."""
    opt = torch.optim.Adam(params, lr=args.lr)
    guard = DivergenceGuard(keep=False)
    start = time.perf_counter()
    for k in range(args.steps):
        x1 = data()
        loss = step_loss(x1, k)
        try:
            if fm is not None:
                guard(fm, x1, step=k, loss=loss)
            elif not torch.isfinite(loss):
                raise DivergenceError(f"The loss is {float(loss)} at step {k}.")
        except DivergenceError as err:
            return {
                "diverged_at": k,
                "why": str(err).split(". ")[0],
                "wall_s": time.perf_counter() - start,
            }
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
    return {"wall_s": time.perf_counter() - start}


def cfm_step(net: nn.Module) -> Callable[[Tensor, int], Tensor]:
    """A CFM training step of ``net`` as a velocity ``net(x, t, t)`` on the linear path."""
    path = AffinePath("linear")
    return lambda x1, k: cfm_loss(lambda x, t: net(x, t, t), x1, path)


def teacher_net(data: Data, args: Any, cache: Path) -> MLP:
    """The CFM teacher of ``data`` (trained once, then read back with ``weights_only``)."""
    net = make_net(data.shape, args.seed)
    if cache.is_file():
        net.load_state_dict(torch.load(cache, weights_only=True))
        return net
    result = train(cfm_step(net), list(net.parameters()), data, args)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), cache)
    (cache.with_suffix(".json")).write_text(json.dumps(result))
    return net


#: the budget the presets' step counts (warm-ups, curricula) are written for
PRESET_BUDGET = 3000


def scaled_to_budget(spec: Any, steps: int) -> Any:
    """A preset's loss config with its step counts (``*_steps`` but ``teacher_steps``) scaled from
    :data:`PRESET_BUDGET` to ``steps``, so a shorter run keeps the same schedule shape."""
    if isinstance(spec, dict):
        return {
            k: round(v * steps / PRESET_BUDGET)
            if k.endswith("_steps") and k != "teacher_steps" and isinstance(v, int)
            else scaled_to_budget(v, steps)
            for k, v in spec.items()
        }
    return spec


def teacher_path(out: Path, data: Data, args: Any) -> Path:
    """Where the CFM teacher of ``data`` at ``args.seed`` is kept."""
    return out / "teachers" / f"{data.target}_s{args.seed}.pt"


def row_parts(method: str, data: Data, args: Any, out: Path | None) -> dict[str, Any]:
    """What a row trains and samples: ``step_loss(x1, k)``, ``params``, ``sampler(x0, nfe)``, the
    ``net`` and, for a peer, ``own`` (its own ``sample``). ``out=None`` (timing only) skips the
    teacher's training and distils an untrained copy of the net instead."""
    if method in EMA_ROWS:  # the same row; run_row samples it from the EMA of its net
        return row_parts(method.removesuffix("_ema"), data, args, out)
    net = make_net(data.shape, args.seed)
    fm = FlowMap(net)
    teacher_file = teacher_path(out, data, args) if out is not None else None
    parts: dict[str, Any] = {"own": None, "fm": fm, "net": net}
    if method == "cfm_teacher":
        if teacher_file is not None:  # trained once, shared with the distilled rows
            net = parts["net"] = teacher_net(data, args, teacher_file)
            fm = FlowMap(net)
        parts["step_loss"] = cfm_step(net)
        parts["params"] = list(net.parameters())
        parts["fm"] = None  # a velocity, not a map: its loss alone is watched
        parts["sampler"] = lambda x0, nfe: solve_ode(fm.velocity, x0, "euler", nfe=nfe).x
    elif method in PEERS:
        model = peer(method, net, data.shape)

        def own(x0: Tensor, nfe: int) -> Tensor:
            torch.manual_seed(nfe)  # the multistep samplers draw their own noise
            return model.sample(batch_size=len(x0), noise=x0, steps=nfe)

        parts.update(
            step_loss=lambda x1, k: model(x1),
            params=list(model.parameters()),
            sampler=lambda x0, nfe: sample_flow_map(fm, x0, steps=nfe).x,
            own=own,
        )
    else:
        name, change = VARIANTS.get(method, (method, {}))
        spec = scaled_to_budget(PRESETS[name].loss, args.steps)
        spec = {**spec, "init_args": {**spec["init_args"], **change}}
        loss = dataclasses.replace(PRESETS[name], loss=spec).build_loss()
        teacher = None
        if PRESETS[name].needs_teacher:
            if teacher_file is None:
                t_net = make_net(data.shape, args.seed + 1)
            else:
                t_net = teacher_net(data, args, teacher_file)
            teacher = FlowMap(t_net.requires_grad_(False)).velocity
            net.load_state_dict(t_net.state_dict())  # warm start, as the package does
        one_time, g = loss.pairs.one_time, torch.Generator()

        def sampler(x0: Tensor, nfe: int) -> Tensor:
            if one_time:
                return sample_consistency(fm, x0, fm.path, steps=nfe, generator=g.manual_seed(0)).x
            return sample_flow_map(fm, x0, steps=nfe).x

        parts.update(
            step_loss=lambda x1, k: loss(fm, x1, teacher, step=k)["loss"],
            params=list(net.parameters()) + list(loss.parameters()),
            sampler=sampler,
        )
    return parts


def run_row(method: str, data: Data, args: Any, out: Path) -> dict[str, Any]:
    """Train ``method`` on ``data`` and measure it."""
    parts = row_parts(method, data, args, out)
    if method == "cfm_teacher":  # row_parts trained it (teacher_net); its training record
        result = json.loads((teacher_path(out, data, args)).with_suffix(".json").read_text())
    elif method in EMA_ROWS:
        ema = AveragedModel(parts["net"], avg_fn=EMAWithWarmup(EMA_DECAY))  # FlowMapModule's
        result = train(
            parts["step_loss"], parts["params"], data, args, parts["fm"],
            lambda: ema.update_parameters(parts["net"]),
        )  # fmt: skip
        parts["net"].load_state_dict(ema.module.state_dict())  # sampled from the EMA
        parts["own"] = None  # a peer's own sampler would need the swap inside it
    else:
        result = train(parts["step_loss"], parts["params"], data, args, parts["fm"])
    row: dict[str, Any] = {"method": method, "target": data.target, **result}
    row["s_per_step"] = row["wall_s"] / args.steps
    row.update(measure(parts["sampler"], data, args, "quality"))
    if parts["own"] is not None:
        row.update(measure(parts["own"], data, args, "own_sampler"))
    return row


def cmd_speed(args: argparse.Namespace) -> None:
    """ms per training step of every row on ``--target`` (no training to the end, no teacher):
    the median of ``--repeats`` timings of ``--steps`` steps each, after a warm-up."""
    torch.set_num_threads(args.threads)
    data = Data(args.target, args.batch, 100, args.seed)
    out = {}
    for method in args.methods or ALL:
        parts = row_parts(method, data, args, None)
        opt = torch.optim.Adam(parts["params"], lr=1e-4)
        times = []
        for rep in range(args.repeats + 1):
            start = time.perf_counter()
            for k in range(args.steps):
                loss = parts["step_loss"](data(), 1000 + k)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if rep:  # the first round warms up
                times.append(1000 * (time.perf_counter() - start) / args.steps)
        out[method] = sorted(times)[len(times) // 2]
        print(f"{method}: {out[method]:.1f} ms/step", flush=True)
    cfm = out.get("cfm_teacher")
    result = {
        "command": "python " + shlex.join(sys.argv),
        "machine": f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}",
        "target": args.target,
        "batch": args.batch,
        "ms_per_step": out,
        "per_cfm_step": {m: v / cfm for m, v in out.items()} if cfm else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(result, indent=1))


@torch.no_grad()
def measure(sampler: Callable[[Tensor, int], Tensor], data: Data, args: Any, key: str) -> dict:
    n = 2000 if data.image else args.n
    x0 = torch.randn(n, *data.shape, generator=torch.Generator().manual_seed(7))
    metric = "fid" if data.image else "w2"
    out = {}
    for nfe in NFES:
        x = sampler(x0, nfe)
        if not torch.isfinite(x).all():
            out[str(nfe)] = None
            continue
        if data.image:
            x = x.clamp(-1, 1)
        out[str(nfe)] = data.evaluator.measure(x).estimates()[metric].as_dict()
    return {key: out, "metric": metric}


# ----------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    rows = args.out / "rows"
    rows.mkdir(parents=True, exist_ok=True)
    methods = ALL if args.methods == ["all"] else args.methods
    for seed in args.seeds:
        args.seed = seed
        for target in args.targets:
            data = None
            for method in methods:
                path = rows / f"{target}__{method}__s{seed}.json"
                if path.is_file():
                    print(f"{target} {method} seed {seed}: done, skipped", flush=True)
                    continue
                if data is None:
                    batch = args.digits_batch if target == "digits" else args.batch
                    data = Data(target, batch, args.n, seed)
                row = run_row(method, data, args, args.out)
                row.update(
                    steps=args.steps,
                    batch=data.batch,
                    lr=args.lr,
                    seed=seed,
                    threads=torch.get_num_threads(),
                    floor=None if data.image else data.floor.as_dict(),
                )
                path.write_text(json.dumps(row, indent=1))
                q = row["quality"]
                print(
                    f"{target} {method} seed {seed}: {row['wall_s']:.0f} s, "
                    + " ".join(f"{k}:{_fmt(v)}" for k, v in q.items()),
                    flush=True,
                )
    meta = args.out / "commands.json"  # every run that added rows, in order
    done = json.loads(meta.read_text()) if meta.is_file() else []
    done.append(
        {
            "command": "python " + shlex.join(sys.argv),
            "machine": f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} "
            f"torch threads, torch {torch.__version__}",
        }
    )
    meta.write_text(json.dumps(done, indent=1))


def _fmt(e: dict | None) -> str:
    if e is None:
        return "non-finite"
    return f"{e['value']:.3g} ± {(e['ci_high'] - e['ci_low']) / 2:.2g}"


def _load(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "rows").glob("*.json"))]


def _ratio(a: dict | None, b: dict | None) -> str:
    """``a/b`` with a conservative interval from the two intervals' ends."""
    if not a or not b:
        return "n/a"
    lo, hi = a["ci_low"] / b["ci_high"], a["ci_high"] / max(b["ci_low"], 1e-12)
    return f"{a['value'] / b['value']:.2f} [{lo:.2f}, {hi:.2f}]"


def kind(method: str) -> str:
    if method in EMA_ROWS:
        return kind(method.removesuffix("_ema")) + f", EMA {EMA_DECAY}"
    if method in PEERS:
        return "peer (rectified-flow-pytorch)"
    if method == "cfm_teacher":
        return "CFM teacher, Euler"
    return "preset, distilled" if method in DISTIL else "preset, from scratch"


def readme_table(out: Path) -> list[str]:
    """The README's preset table: each preset's place and its measured cost per step."""
    speed_file = out / "speed.json"
    if not speed_file.is_file():
        return []
    speed = json.loads(speed_file.read_text())
    lines = ["## The README's preset table", "", *table(speed)]
    peers = ", ".join(
        f"{m} {speed['per_cfm_step'][m]:.1f}×" for m in PEERS if m in speed["ms_per_step"]
    )
    lines += [
        "",
        f"Cost: one training step at batch {speed['batch']} on {speed['target']} with the "
        f"4×256 MLP as a multiple of a CFM step (median of timed rounds, {speed['machine']}; "
        f"`{speed['command']}`). Peers: {peers}.",
    ]
    return lines + [""]


def over_seeds(rows: list[dict[str, Any]], key: str = "quality") -> dict[str, dict | None]:
    """Per NFE: the mean over the rows' seeds with a t interval over them (one seed: its own
    interval); ``None`` where a seed diverged or was non-finite."""
    out: dict[str, dict | None] = {}
    for n in map(str, NFES):
        cells = [r.get(key, {}).get(n) if "diverged_at" not in r else None for r in rows]
        if any(c is None for c in cells):
            out[n] = None
        elif len(cells) == 1:
            out[n] = cells[0]
        else:
            out[n] = t_interval([c["value"] for c in cells]).as_dict()
    return out


#: the goals' pairs: (flowmap's row, the peer's row)
GOAL_PAIRS = (
    ("lsd", "lsdflow"),
    ("meanflow", "meanflow_peer"),
    ("lsd_ema", "lsdflow"),
    ("meanflow_ema", "meanflow_peer"),
    ("lsd_ema", "lsdflow_ema"),
    ("meanflow_ema", "meanflow_peer_ema"),
)


def paired_ratio(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], nfe: int) -> str:
    """Mean over seeds (and targets) of the paired ratio ours/theirs at ``nfe``, with a t
    interval (one pair: the conservative ratio of the two intervals' ends)."""
    by = {(r["target"], r["seed"]): r for r in theirs}
    pairs = [(r, by[r["target"], r["seed"]]) for r in ours if (r["target"], r["seed"]) in by]
    cells = [(a["quality"].get(str(nfe)), b["quality"].get(str(nfe))) for a, b in pairs]
    if not cells or any(a is None or b is None for a, b in cells):
        return "n/a"
    if len(cells) == 1:
        return _ratio(*cells[0])
    e = t_interval([a["value"] / b["value"] for a, b in cells])
    return f"{e.value:.2f} [{e.ci_low:.2f}, {e.ci_high:.2f}] ({len(cells)} pairs)"


def no_worse_from_2_to_4(q: dict) -> str:
    """Whether the 4-NFE value is inside the 2-NFE interval or better."""
    two, four = q.get("2"), q.get("4")
    if not two or not four:
        return "n/a"
    return "yes" if four["value"] <= two["ci_high"] else "no (4 worse)"


def cmd_report(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _load(args.out)
    meta = json.loads((args.out / "commands.json").read_text())
    targets = [t for t in (*TOYS, "digits") if any(r["target"] == t for r in rows)]
    order = {m: i for i, m in enumerate(ALL)}
    lines = [
        "# From scratch: every preset and the peers, same net, data, budget and loop",
        "",
        "- commands, in order: "
        + "; ".join(dict.fromkeys(f"`{m['command']}`" for m in meta))
        + "; then `python benchmarks/self_distillation.py report`",
        f"- machine: {meta[-1]['machine']}",
        "- every row: `flowmap.nets.MLP` 4×256, Adam (no EMA, constant rate), trained once per "
        "seed (the seed sets the net's initialisation, the batches and the evaluation "
        "reference). Quality is exact W2 (2D, 4000 samples in 5 groups) or FID in the digits "
        "classifier's features (2000 samples), at 1/2/4/8 flow-map jumps (a one-time map "
        "re-noises between jumps) from one fixed noise set. A cell is the mean over the seeds "
        "± the half-width of the 95% t interval over them (one seed: its own interval over "
        "groups).",
        "- a `DivergenceGuard` watches every row (one jump from noise beyond 100× the data's "
        "scale, or a non-finite loss, stops it): a row that diverged says so.",
        "- distilled presets start from a copy of the `cfm_teacher` row's net and distil it; the "
        "teacher's own training time is not in their wall time. A preset's warm-up and "
        f"curriculum step counts, written for {PRESET_BUDGET} steps, are scaled to the budget.",
        "- wall s is as trained (mean over seeds); other work shared the machine's second core "
        "for part of the run, so compare costs in the preset table below (`speed`, idle "
        "machine).",
        "- floor: fresh data against the reference groups; W2 on 800-point groups cannot resolve "
        "a sample set closer to the data than that.",
        "",
    ]
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.6), squeeze=False)
    summary: dict[str, dict[str, Any]] = {}
    for ax, target in zip(axes[0], targets):
        sel = [r for r in rows if r["target"] == target]
        methods = sorted({r["method"] for r in sel}, key=lambda m: order[m])
        by = {
            m: sorted((r for r in sel if r["method"] == m), key=lambda r: r["seed"])
            for m in methods
        }
        r0 = sel[0]
        metric = r0["metric"].upper()
        lines += [f"## {target}", ""]
        lines.append(
            f"{r0['steps']} steps × batch {r0['batch']}, lr {r0['lr']}, {r0['threads']} threads."
        )
        if r0.get("floor"):
            lines.append(
                f"Floor (fresh data against the reference, seed {r0['seed']}): W2 "
                f"{_fmt(r0['floor'])}."
            )
        lines += [
            "",
            f"| method | kind | seeds | {metric} 1 NFE | 2 NFE | 4 NFE | 8 NFE | 4 NFE no worse "
            "than 2 | wall s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        summary[target] = {}
        for m in methods:
            q = over_seeds(by[m])
            summary[target][m] = q
            diverged = [
                f"seed {r['seed']} at step {r['diverged_at']}" for r in by[m] if "diverged_at" in r
            ]
            note = f" (diverged: {', '.join(diverged)})" if diverged else ""
            wall = sum(r["wall_s"] for r in by[m]) / len(by[m])
            cells = [_fmt(q.get(str(n))) for n in NFES]
            lines.append(
                f"| {m}{note} | {kind(m)} | {len(by[m])} | " + " | ".join(cells) + f" | "
                f"{no_worse_from_2_to_4(q)} | {wall:.0f} |"
            )
            ys = [q[str(n)]["value"] if q.get(str(n)) else math.nan for n in NFES]
            style = "--" if m in PEERS else ("-." if m in DISTIL else "-")
            color = plt.get_cmap("tab20")(order[m] % 20)  # one colour per method
            ax.plot(NFES, ys, style, marker="o", ms=3, color=color, label=m)
        own = [m for m in methods if any("own_sampler" in r for r in by[m])]
        if own:
            lines += [
                "",
                "Peers through their own `sample` (multistep: Euler on the diagonal):",
                "",
            ]
            for m in own:
                q = over_seeds(by[m], "own_sampler")
                lines.append(f"- {m}: " + ", ".join(f"{n}: {_fmt(q.get(str(n)))}" for n in NFES))
        lines += ["", "Goals (seed-paired ratio ours / peer, mean and 95% t interval):", ""]
        for ours, theirs in GOAL_PAIRS:
            if ours in by and theirs in by:
                lines.append(
                    f"- {ours} / {theirs} at 1 NFE: {paired_ratio(by[ours], by[theirs], 1)}; "
                    f"at 2 NFE: {paired_ratio(by[ours], by[theirs], 2)}"
                )
        lines.append("")
        ax.set_title(target)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("NFE (jumps)")
        ax.set_ylabel(metric)
    two_d = [r for r in rows if r["target"] != "digits"]
    lines += ["## Every 2D target at once", "", "Paired ratios over every (target, seed):", ""]
    for ours, theirs in GOAL_PAIRS:
        a = [r for r in two_d if r["method"] == ours]
        b = [r for r in two_d if r["method"] == theirs]
        if a and b:
            lines.append(
                f"- {ours} / {theirs} at 1 NFE: {paired_ratio(a, b, 1)}; at 2 NFE: "
                f"{paired_ratio(a, b, 2)}"
            )
    lines.append("")
    lines += readme_table(args.out)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}  # every method
    axes[0][-1].legend(
        [handles[m] for m in ALL if m in handles],
        [m for m in ALL if m in handles],
        fontsize=6,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
    )
    fig.tight_layout()
    fig.savefig(args.out / "quality.png", dpi=120)
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    results = {"meta": meta, "over_seeds": summary, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and measure rows")
    run.add_argument("--targets", nargs="+", default=[*TOYS, "digits"], choices=[*TOYS, "digits"])
    run.add_argument("--methods", nargs="+", default=["all"], choices=["all", *ALL])
    run.add_argument("--steps", type=int, default=3000)
    run.add_argument("--batch", type=int, default=256)
    run.add_argument("--digits-batch", type=int, default=256)
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--n", type=int, default=4000, help="2D evaluation samples")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--out", type=Path, default=OUT)
    run.set_defaults(fn=cmd_run)
    speed = sub.add_parser("speed", help="ms per training step of every row (idle machine)")
    speed.add_argument("--target", default="checkerboard", choices=[*TOYS, "digits"])
    speed.add_argument("--methods", nargs="+", choices=ALL)
    speed.add_argument("--batch", type=int, default=256)
    speed.add_argument("--steps", type=int, default=20)
    speed.add_argument("--repeats", type=int, default=3)
    speed.add_argument("--seed", type=int, default=0)
    speed.add_argument("--threads", type=int, default=1)
    speed.add_argument("--out", type=Path, default=OUT)
    speed.set_defaults(fn=cmd_speed)
    rep = sub.add_parser("report", help="write report.md, results.json and quality.png")
    rep.add_argument("--out", type=Path, default=OUT)
    rep.set_defaults(fn=cmd_report)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
