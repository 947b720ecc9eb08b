r"""The two-time adapter: a one-time network :math:`F(x, \tau)` (a teacher's own velocity, noise or
denoiser net) made into a two-time one by adding the gap :math:`t - s` at its own time conditioning.

Each time module of the network (the submodule whose output is its time embedding
:math:`e(\tau)`, shape ``(B, D)``) gets a branch, so that inside the network

.. math:: e(\tau) \;\mapsto\; e(\tau) + g(t - s) - g(0),

with :math:`g` a small MLP of sinusoidal features whose last layer starts at zero. The added term
vanishes identically at :math:`s = t` (whatever :math:`g`'s weights), and everywhere while
:math:`g` is untrained: the adapted network at :math:`s = t` *is* the teacher's, bit for bit. This is
how the published flow-map students are built (sCM, MeanFlow, AYF: the teacher's weights, a second
time through a zero-initialised branch).

The time modules are found by type or name (:data:`TIME_MODULE_NAMES`, diffusers'
``TimestepEmbedding``), or named by the one hook, ``time_modules=["path.to.embedding"]``.
flowmap's own :class:`~flowmap.nets.MLP` and :class:`~flowmap.nets.UNet` need no adapter: their
:class:`~flowmap.nets.TwoTimeEmbedding` has the gap branch built in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flowmap.nets.embedding import GapBranch, SinusoidalEmbedding
from flowmap.paths import time_dtype

__all__ = ["TIME_MODULE_NAMES", "TwoTimeAdapter", "find_time_modules"]

#: attribute names that hold a network's time embedding (diffusers' UNets, ADM / guided-diffusion,
#: DiT and SiT, EDM2); the diffusers class ``TimestepEmbedding`` is found by type wherever it sits
TIME_MODULE_NAMES = ("time_embedding", "time_embed", "t_embedder", "emb_noise", "time_mlp")
_TIME_MODULE_TYPES = ("TimestepEmbedding",)
HOOK = "time_modules"


def find_time_modules(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """The dotted names of ``model``'s time modules: ``names`` if given, else every diffusers
    ``TimestepEmbedding`` or, failing that, every submodule called one of
    :data:`TIME_MODULE_NAMES`. A network where none is found is refused in one sentence."""
    modules = dict(model.named_modules())
    if names is not None:
        missing = [n for n in names if n not in modules or not n]
        if missing or not names:
            raise ValueError(
                f"{type(model).__name__} has no submodule {missing[0] if missing else '(none given)'!r}; "
                f"{HOOK} names the submodules whose output is the time embedding (B, D), e.g. "
                f"{HOOK}=['time_embedding'] (see named_modules())."
            )
        return list(names)
    found = [n for n, m in modules.items() if type(m).__name__ in _TIME_MODULE_TYPES]
    if not found:
        found = [n for n in modules if n.rpartition(".")[2] in TIME_MODULE_NAMES]
        # a named time module's own children are inside it: keep the outermost
        found = [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]
    if not found:
        raise ValueError(
            f"Cannot find the time conditioning of {type(model).__name__} (no diffusers "
            f"TimestepEmbedding, no submodule named {' / '.join(TIME_MODULE_NAMES)}); pass "
            f"{HOOK}=['name.of.embedding'] naming the submodule whose output is the time "
            "embedding (B, D)."
        )
    return found


def _output_dim(name: str, module: nn.Module, model: nn.Module) -> int:
    """The width of a time module's output: its last ``nn.Linear``'s ``out_features``."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"The time module {name!r} of {type(model).__name__} holds no nn.Linear to read its "
            f"output width from; name in {HOOK} the module that ends in the embedding's Linear."
        )
    return linears[-1].out_features


class _GapTerm(nn.Module):
    r""":math:`g(t - s) - g(0)` of width ``out_dim`` (:class:`~flowmap.nets.embedding.GapBranch`
    on sinusoidal features of the gap), in float32."""

    def __init__(self, out_dim: int, dim: int = 64, scale: float = 10.0) -> None:
        super().__init__()
        self.features = SinusoidalEmbedding(dim, scale)
        self.branch = GapBranch(dim, out_dim, out_dim)

    def forward(self, gap: Tensor) -> Tensor:
        with torch.autocast(device_type=gap.device.type, enabled=False):
            return self.branch.difference(self.features, gap.to(time_dtype(gap)))


class TwoTimeAdapter(nn.Module):
    r"""A one-time network ``model(x, τ, ...)`` with the gap :math:`t - s` added at its time
    modules (module docstring): called as ``adapter(x, τ, ..., gap=t - s)``.

    Args:
        model: the network, its weights kept as they are (a student copies the teacher's first).
        time_modules: the one hook: dotted names of the submodules whose output is the time
            embedding ``(B, D)`` (default: found, :func:`find_time_modules`).
        gap_dim: sinusoidal feature size of the gap.
        gap_scale: highest frequency of the gap's features (rad per unit of student time).

    Without ``gap`` (or with ``gap`` 0) the adapter is ``model`` itself.
    """

    def __init__(
        self,
        model: nn.Module,
        time_modules: Sequence[str] | None = None,
        gap_dim: int = 64,
        gap_scale: float = 10.0,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"The two-time adapter needs an nn.Module to add the gap to, got "
                f"{type(model).__name__}; wrap the model in an nn.Module."
            )
        self.model = model
        self.time_modules = find_time_modules(model, time_modules)
        modules = dict(model.named_modules())
        self.branches = nn.ModuleDict(
            {
                n.replace(".", "__"): _GapTerm(
                    _output_dim(n, modules[n], model), gap_dim, gap_scale
                )
                for n in self.time_modules
            }
        )
        self._gap: Tensor | None = None
        for n in self.time_modules:
            modules[n].register_forward_hook(_AddGap(self, n.replace(".", "__")))

    @contextlib.contextmanager
    def gap(self, gap: Tensor | None) -> Iterator[None]:
        """Within this context the model's time modules add the branch of ``gap`` ``(B,)``."""
        before, self._gap = self._gap, gap
        try:
            yield
        finally:
            self._gap = before

    def add_gap(self, key: str, emb: Tensor) -> Tensor:
        r""":math:`e + g(t - s) - g(0)` for the time module ``key`` (``e`` unchanged outside a
        :meth:`gap` context)."""
        gap = self._gap
        if gap is None:
            return emb
        if emb.shape[0] != gap.shape[0]:
            raise ValueError(
                f"The time module {key.replace('__', '.')!r} returned a batch of {emb.shape[0]} "
                f"for {gap.shape[0]} gaps; name in {HOOK} a module with one embedding per sample."
            )
        g = self.branches[key](gap).to(emb.dtype)
        return emb + g.reshape(*g.shape, *([1] * (emb.ndim - 2)))

    def forward(self, x: Tensor, *args: Any, gap: Tensor | None = None, **kwargs: Any) -> Any:
        """``model(x, *args, **kwargs)`` with ``gap`` added (without it, inside a :meth:`gap`
        context, that context's gap)."""
        if gap is None:
            return self.model(x, *args, **kwargs)
        with self.gap(gap):
            return self.model(x, *args, **kwargs)


class _AddGap:
    """The forward hook of one time module (an object, so ``copy.deepcopy`` of the adapter, as an
    EMA makes, binds the copy's hooks to the copied adapter)."""

    def __init__(self, adapter: TwoTimeAdapter, key: str) -> None:
        self.adapter, self.key = adapter, key

    def __call__(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        return self.adapter.add_gap(self.key, output)
