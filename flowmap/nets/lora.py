r"""Low-rank (LoRA) students: a warm-started copy of the teacher's network whose linear and
convolution layers train through adapters, :math:`W' = W + (\alpha/r)\,B A` with
:math:`A \in \mathbb{R}^{r \times n}`, :math:`B \in \mathbb{R}^{m \times r}` and :math:`B = 0` at the
start (so the student starts as its warm-started copy), while the two-time gap branch (which the
teacher never trained) trains in full. The adapters are ``peft``'s (``pip install "flowmap[lora]"``).

In YAML: ``adapter: {class_path: flowmap.nets.LoRA, init_args: {rank: 8}}`` on a
:class:`~flowmap.training.FlowMapModule`; :func:`merge_lora` folds the adapters into plain weights
for sampling.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from flowmap.nets.embedding import ConditionEmbedding, GapBranch

__all__ = ["LoRA", "merge_lora", "trainable_fraction"]

#: the layers the default targets adapt
_DEFAULT_TYPES = (nn.Linear, nn.Conv2d)
#: the layers a named target may adapt (those peft's LoRA supports)
_SUPPORTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
_INSTALL = 'LoRA students need peft; pip install "flowmap[lora]".'


def _peft() -> Any:
    """``peft``, imported on first use (an optional dependency)."""
    try:
        with warnings.catch_warnings():  # its import touches deprecated torch.jit APIs
            warnings.simplefilter("ignore", FutureWarning)
            import peft
    except ImportError:
        raise ImportError(_INSTALL) from None
    return peft


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _matches(name: str, pattern: str) -> bool:
    """A target names a module by its full name, a dotted suffix of it, or a regex of the whole name."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


class LoRA:
    r"""Low-rank adapters :math:`W' = W + (\alpha/r)\,B A` on a network's linear and convolution
    layers, every other weight frozen except the modules in ``full``, which train in full.

    Args:
        rank: :math:`r`, the adapters' rank (at least 1).
        alpha: :math:`\alpha` (default: ``rank``, a scale :math:`\alpha/r = 1`).
        targets: the layers to adapt, by full module name, dotted suffix or regex of the whole
            name (see ``net.named_modules()``); default: every ``nn.Linear`` and ``nn.Conv2d``
            outside ``full``.
        full: module-name prefixes trained in full (e.g. ``["time.gap"]``); default: the gap
            branches :math:`g(t - s)` (``time.gap`` in flowmap's nets, ``adapter.branches.*`` in a
            :class:`~flowmap.teachers.DiffusionStudent`) and a guidance-scale input
            (``condition.scale``), the parts a teacher never trained.
        dropout: dropout on the adapters' input.
        bias: ``"none"`` (every base bias frozen) or ``"all"`` (every bias of the net trains,
            BitFit-style; a few parameters, kept in the checkpoint), as peft's ``bias``.
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: float | None = None,
        targets: Sequence[str] | None = None,
        full: Sequence[str] | None = None,
        dropout: float = 0.0,
        bias: str = "none",
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"The LoRA rank must be a whole number of at least 1, got {rank!r}.")
        if alpha is not None and not alpha > 0:
            raise ValueError(f"The LoRA alpha must be positive (or unset: the rank), got {alpha}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"The LoRA dropout must lie in [0, 1), got {dropout}.")
        if bias not in ("none", "all"):
            raise ValueError(f"The LoRA bias is 'none' or 'all', got {bias!r}.")
        for what, names in (("targets", targets), ("full", full)):
            if isinstance(names, str):
                raise ValueError(f"LoRA {what} takes a list of module names, e.g. [{names!r}].")
        if targets is not None and not targets:
            raise ValueError("LoRA targets is an empty list; leave it unset to adapt every layer.")
        self.rank, self.dropout, self.bias = rank, float(dropout), bias
        self.alpha = float(rank if alpha is None else alpha)
        self.targets = None if targets is None else list(targets)
        self.full = None if full is None else list(full)

    @classmethod
    def of(cls, value: Any) -> LoRA | None:
        """``value`` as a :class:`LoRA`: ``None``, a :class:`LoRA`, or its ``{class_path,
        init_args}`` spec (a checkpoint's plain hyperparameter)."""
        if value is None or isinstance(value, LoRA):
            return value
        names = ("flowmap.nets.LoRA", "flowmap.nets.lora.LoRA")
        if isinstance(value, Mapping) and value.get("class_path") in names:
            return cls(**(value.get("init_args") or {}))
        raise ValueError(
            "adapter takes flowmap.nets.LoRA, e.g. {class_path: flowmap.nets.LoRA, init_args: "
            f"{{rank: 8}}}}, not {type(value).__name__}."
        )

    def spec(self) -> dict[str, Any]:
        """Its ``{class_path, init_args}`` config, plain data (a checkpoint's hyperparameter)."""
        return {
            "class_path": "flowmap.nets.LoRA",
            "init_args": {
                "rank": self.rank,
                "alpha": self.alpha,
                "targets": self.targets,
                "full": self.full,
                "dropout": self.dropout,
                "bias": self.bias,
            },
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.spec()["init_args"].items())
        return f"LoRA({args})"

    @staticmethod
    def check_available() -> None:
        """Raise the one-sentence ``ImportError`` when peft is missing."""
        _peft()

    # ----------------------------------------------------------------- what is trained how
    def full_modules(self, net: nn.Module) -> list[str]:
        """The names of ``net``'s modules trained in full (``full``, or the gap branches found)."""
        modules = dict(net.named_modules())
        if self.full is None:
            found = [n for n, m in modules.items() if isinstance(m, GapBranch)]
            found += [
                f"{n}.scale" if n else "scale"
                for n, m in modules.items()
                if isinstance(m, ConditionEmbedding) and m.scale is not None
            ]
            return found
        for prefix in self.full:
            if not any(_inside(n, prefix) for n in modules if n):
                raise ValueError(
                    f"LoRA full names {prefix!r}, which is no module of {type(net).__name__}; "
                    "name a module to train in full from net.named_modules() (e.g. time.gap)."
                )
        return list(self.full)

    def target_modules(self, net: nn.Module) -> list[str]:
        """The names of the layers that get adapters (every name checked; none is an error)."""
        full = self.full_modules(net)
        modules = dict(net.named_modules())
        # nn.MultiheadAttention reads its out_proj's weight directly: an adapter there is bypassed
        attention = {n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)}

        def free(name: str) -> bool:
            parent = name.rpartition(".")[0]
            return (
                bool(name) and not any(_inside(name, f) for f in full) and parent not in attention
            )

        if self.targets is None:
            found = [n for n, m in modules.items() if isinstance(m, _DEFAULT_TYPES) and free(n)]
        else:
            found = []
            for pattern in self.targets:
                hits = [
                    n
                    for n, m in modules.items()
                    if free(n) and isinstance(m, _SUPPORTED_TYPES) and _matches(n, pattern)
                ]
                if not hits:
                    raise ValueError(
                        f"LoRA target {pattern!r} matches no linear, convolution or embedding "
                        f"layer of {type(net).__name__} outside the fully trained modules; name "
                        "layers from net.named_modules()."
                    )
                found += [n for n in hits if n not in found]
        if not found:
            raise ValueError(
                f"{type(net).__name__} has no nn.Linear or nn.Conv2d outside the fully trained "
                "modules for LoRA to adapt; train it in full (drop the adapter)."
            )
        return found

    def apply(self, net: nn.Module) -> nn.Module:
        r"""Inject the adapters into ``net`` (in place; returned): each target layer becomes
        ``peft``'s LoRA layer (``name.base_layer`` the original, ``name.lora_A.default`` and
        ``name.lora_B.default`` the adapters), every base parameter is frozen, and the adapters
        and the ``full`` modules are trainable. Call it after the warm start."""
        peft = _peft()
        if any(isinstance(m, peft.tuners.lora.LoraLayer) for m in net.modules()):
            raise ValueError(
                f"This {type(net).__name__} already has LoRA adapters; apply LoRA to a plain net."
            )
        full, targets = self.full_modules(net), self.target_modules(net)
        config = peft.LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules="^(" + "|".join(re.escape(n) for n in targets) + ")$",
            bias="none",
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. on a custom module's name
            net = peft.inject_adapter_in_model(config, net)
        trains_bias = self.bias == "all"
        for name, p in net.named_parameters():
            adapter = ".lora_A." in name or ".lora_B." in name
            p.requires_grad_(adapter or (trains_bias and name.endswith("bias")))
        for prefix in full:
            for name, m in net.named_modules():
                if _inside(name, prefix):
                    m.requires_grad_(True)
        return net


def merge_lora(net: nn.Module) -> nn.Module:
    r"""A plain copy of ``net`` with every LoRA layer folded into its base,
    :math:`W \leftarrow W + (\alpha/r)\,B A`, and put back in its place: its state-dict keys are
    the un-adapted network's (the teacher's). ``net`` itself is left as it is."""
    peft = _peft()
    merged = copy.deepcopy(net)
    layers = [
        (n, m) for n, m in merged.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    ]
    merged.__dict__.pop("peft_config", None)  # what peft noted on the net
    for name, layer in layers:
        layer.merge()
        base = layer.get_base_layer()
        if not name:  # the net is one adapted layer
            return base
        parent, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent) if parent else merged, child, base)
    return merged


def trainable_fraction(net: nn.Module) -> float:
    """The fraction of ``net``'s parameters (adapters included) that require gradients."""
    total = sum(p.numel() for p in net.parameters())
    return sum(p.numel() for p in net.parameters() if p.requires_grad) / max(total, 1)
