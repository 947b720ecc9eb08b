"""Toy 2D distributions and an endless, seeded, DDP-aware DataModule over them."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flowmap.data.base import FlowDataModule, check_split, mix_seed

__all__ = ["TOY2D_NAMES", "Toy2DDataModule", "toy2d_sample"]

#: Valid names for :func:`toy2d_sample` and :class:`Toy2DDataModule`.
TOY2D_NAMES: tuple[str, ...] = (
    "checkerboard",
    "8gaussians",
    "moons",
    "spirals",
    "circles",
    "gaussian",
)

# Stream tags for mix_seed: the training stream and each reference split draw independently.
_TAG_STREAM = 0
_TAG_SPLIT = {"train": 1, "test": 2}


def _check_name(name: str) -> None:
    if name not in TOY2D_NAMES:
        raise ValueError(
            f"Unknown toy 2D dataset {name!r}; choose one of {', '.join(TOY2D_NAMES)}."
        )


def _rand(n: int, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g)


def _randn(*shape: int, g: torch.Generator) -> Tensor:
    return torch.randn(*shape, generator=g)


def _checkerboard(n: int, g: torch.Generator) -> Tensor:
    # 4x4 board of 1.5-wide cells on [-3, 3]^2; the 8 cells with (i + j) even are filled.
    i = torch.randint(0, 4, (n,), generator=g)
    j = 2 * torch.randint(0, 2, (n,), generator=g) + i % 2
    cell = torch.stack([i, j], dim=1).float()
    return -3.0 + 1.5 * (cell + torch.rand(n, 2, generator=g))


def _eight_gaussians(n: int, g: torch.Generator) -> Tensor:
    # Equal mixture of N(c_k, 0.25^2 I), c_k = 2.5 (cos 2πk/8, sin 2πk/8).
    k = torch.randint(0, 8, (n,), generator=g).float()
    angle = 2 * math.pi * k / 8
    centers = 2.5 * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centers + 0.25 * _randn(n, 2, g=g)


def _moons(n: int, g: torch.Generator) -> Tensor:
    # sklearn's two moons (outer arc (cos θ, sin θ), inner arc (1 − cos θ, 0.5 − sin θ),
    # θ ~ U[0, π], Gaussian noise 0.1), centred at (0.5, 0.25) and scaled by 2.
    theta = math.pi * _rand(n, g)
    inner = torch.randint(0, 2, (n,), generator=g).bool()
    x = torch.where(inner, 1 - theta.cos(), theta.cos())
    y = torch.where(inner, 0.5 - theta.sin(), theta.sin())
    pts = torch.stack([x, y], dim=1) + 0.1 * _randn(n, 2, g=g)
    return 2.0 * (pts - torch.tensor([0.5, 0.25]))


def _spirals(n: int, g: torch.Generator) -> Tensor:
    # Two interleaved Archimedean spirals r = θ, θ = 3π √u (1.5 turns), the second one the
    # point reflection of the first, scaled by 1/2.5, plus Gaussian noise 0.1.
    theta = 3 * math.pi * _rand(n, g).sqrt()
    sign = 2.0 * torch.randint(0, 2, (n,), generator=g).float() - 1.0
    pts = (sign * theta)[:, None] * torch.stack([-theta.cos(), theta.sin()], dim=1)
    return pts / 2.5 + 0.1 * _randn(n, 2, g=g)


def _circles(n: int, g: torch.Generator) -> Tensor:
    # Two concentric circles of radius 3 and 1.5 (equal mass), Gaussian noise 0.08.
    theta = 2 * math.pi * _rand(n, g)
    radius = torch.where(torch.randint(0, 2, (n,), generator=g).bool(), 1.5, 3.0)
    pts = radius[:, None] * torch.stack([theta.cos(), theta.sin()], dim=1)
    return pts + 0.08 * _randn(n, 2, g=g)


def _gaussian(n: int, g: torch.Generator) -> Tensor:
    return _randn(n, 2, g=g)


_SAMPLERS = {
    "checkerboard": _checkerboard,
    "8gaussians": _eight_gaussians,
    "moons": _moons,
    "spirals": _spirals,
    "circles": _circles,
    "gaussian": _gaussian,
}


def toy2d_sample(name: str, n: int, generator: torch.Generator) -> Tensor:
    """Draw ``n`` i.i.d. points ``(n, 2)`` float32 of a toy 2D distribution.

    All draws come from ``generator`` (a CPU ``torch.Generator``), so equal generator states give
    equal samples. Scales (per-coordinate std in brackets):

    - ``"checkerboard"``: uniform on the 8 "black" cells of a 4×4 board of 1.5-wide cells
      covering ``[-3, 3]²`` (std ≈ 1.73).
    - ``"8gaussians"``: equal mixture of ``N(c_k, 0.25² I)`` with the 8 centres
      ``c_k = 2.5 (cos 2πk/8, sin 2πk/8)``; support ≈ ``[-3.5, 3.5]²`` (std ≈ 1.79).
    - ``"moons"``: sklearn's two moons with noise 0.1, centred and scaled by 2; support ≈
      ``[-3.3, 3.3] × [-1.8, 1.8]`` (std ≈ 1.75 in x, 1.0 in y).
    - ``"spirals"``: two interleaved spirals ``r = θ/2.5``, ``θ = 3π√u`` (1.5 turns each),
      noise 0.1; radius ≤ ≈ 3.8 (std ≈ 1.9).
    - ``"circles"``: two concentric circles of radius 3 and 1.5, equal mass, noise 0.08
      (std ≈ 1.68).
    - ``"gaussian"``: the standard normal ``N(0, I)`` (std 1).

    Raises:
        ValueError: if ``name`` is not in :data:`TOY2D_NAMES`.
    """
    _check_name(name)
    return _SAMPLERS[name](n, generator).to(torch.float32)


class _Toy2DStream(IterableDataset):
    """Endless stream of whole batches ``(batch_size, 2)``, batch ``k`` drawn with the seed
    ``mix_seed(seed, stream tag, rank, k)``.

    DDP ranks never replay each other's samples; DataLoader workers split the batch indices
    (worker ``w`` of ``W`` yields ``k = start + w, start + w + W, …``), so the stream does not
    depend on the number of workers; and a run resumed at step ``start`` sees exactly the batches
    the uninterrupted run would have seen.
    """

    def __init__(self, name: str, batch_size: int, seed: int, rank: int, start: int = 0) -> None:
        self.name = name
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.start = start

    def __iter__(self) -> Iterator[Tensor]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        k = self.start + worker
        while True:
            g = torch.Generator().manual_seed(mix_seed(self.seed, _TAG_STREAM, self.rank, k))
            yield toy2d_sample(self.name, self.batch_size, g)
            k += workers


class Toy2DDataModule(FlowDataModule):
    """Endless seeded samples of a toy 2D distribution (see :func:`toy2d_sample`).

    ``data_shape`` is ``(2,)``. Training batches are plain tensors ``(batch_size, 2)`` drawn
    fresh forever from a stream seeded by ``(seed, global rank, dataloader worker)``; the loader
    has no length, so train with ``trainer.max_steps`` and, to validate mid-run, an integer
    ``val_check_interval`` with ``check_val_every_n_epoch=None``.

    Reference samples are fresh draws from a generator seeded by ``(seed, split, seed arg)``:
    ``"train"`` and ``"test"`` (and the training stream) are independent streams.

    Args:
        name: one of :data:`TOY2D_NAMES`.
        batch_size: samples per training batch (and at most per validation batch).
        n_val: size of the fixed validation set (``reference_samples(n_val, "test", 0)``).
        seed: base seed of every stream.
        num_workers: DataLoader workers (each gets its own stream).
    """

    is_image = False

    def __init__(
        self,
        name: str = "checkerboard",
        batch_size: int = 512,
        n_val: int = 2048,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        _check_name(name)
        super().__init__(batch_size=batch_size, n_val=n_val, num_workers=num_workers)
        self.save_hyperparameters()
        self.name = name
        self.seed = seed

    @property
    def data_shape(self) -> tuple[int, ...]:
        """``(2,)``."""
        return (2,)

    def reference_samples(self, n: int, split: str = "test", seed: int = 0) -> Tensor:
        """Fresh samples ``(n, 2)`` from the stream of ``(self.seed, split, seed)``."""
        check_split(split)
        g = torch.Generator().manual_seed(mix_seed(self.seed, _TAG_SPLIT[split], seed))
        return toy2d_sample(self.name, n, g)

    def train_dataloader(self) -> DataLoader:
        """Endless plain-tensor batches ``(batch_size, 2)``, distinct per rank and worker."""
        rank, start = 0, 0
        if self.trainer is not None:  # resume where the restored run stopped
            rank = self.trainer.global_rank
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches
        stream = _Toy2DStream(self.name, self.batch_size, self.seed, rank, start)
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
