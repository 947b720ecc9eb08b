"""Common base of every DataModule in ``flowmap.data`` and the pixel-range helpers.

Conventions: a sample ``x1`` is data at time ``t = 1``; a batch is a plain float32
tensor ``(B, *data_shape)`` in *model space*, or, for a finite dataset built with
``labels=True``, a pair ``[x1, y]`` with ``y`` int64 ``(B,)`` class indices in
``0..num_classes-1`` (data never yields -1, which models reserve for "no class"). Images live
in ``[-1, 1]``; :func:`to_uint8` and :func:`from_uint8` are the only two places that know the map
between model space and pixels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "REFERENCE_SPLITS",
    "FiniteFlowDataModule",
    "FlowDataModule",
    "TensorSamples",
    "check_split",
    "dataset_identity",
    "describe_dataset",
    "from_uint8",
    "mix_seed",
    "to_uint8",
]

#: DataModule arguments that change how the data is served, not which distribution it is.
LOADER_ARGS = frozenset(
    {
        "batch_size",
        "n_val",
        "num_workers",
        "seed",
        "download",
        "check_integrity",
        "cache",
        "_instantiator",
    }
)


def dataset_identity(hparams: dict[str, Any] | None) -> dict[str, Any]:
    """What names a dataset in a DataModule's saved hyperparameters (its class and the arguments
    that choose the distribution, e.g. ``name``, ``root``, ``labels``): two checkpoints with equal
    identities were trained on the same data.

    A nested ``data`` spec (the pixel data of a latent data module) is named the same way; a
    ``source_data`` (the data behind a teacher's couplings) is the identity itself.
    ``labels=False`` is left out: it is the default, and a checkpoint saved before the argument
    existed (no ``labels`` key) was trained on the same unlabelled data.
    """
    source = (hparams or {}).get("source_data")
    if not source and str((hparams or {}).get("_class_path", "")).endswith("CouplingDataModule"):
        source = _couplings_source((hparams or {}).get("path"))
    if isinstance(source, dict) and source:
        return dataset_identity(source)
    out = {
        k: v
        for k, v in (hparams or {}).items()
        if k not in LOADER_ARGS and not (k == "labels" and v is False)
    }
    inner = out.get("data")  # a data module seen through another (latents of pixel data)
    if isinstance(inner, dict) and "class_path" in inner:
        out["data"] = dataset_identity(
            {"_class_path": inner["class_path"], **dict(inner.get("init_args") or {})}
        )
    return out


def _couplings_source(path: Any) -> dict[str, Any]:
    """The data behind a couplings file (``{}`` if it cannot be read)."""
    from flowmap.reflow import couplings_source

    try:
        return couplings_source(path)
    except Exception:  # a missing or foreign file: the couplings name themselves
        return {}


def describe_dataset(identity: dict[str, Any]) -> str:
    """``Toy2DDataModule(name='moons')``: a dataset identity as error messages print it."""
    cls = str(identity.get("_class_path", "unknown data")).rpartition(".")[2]
    args = ", ".join(f"{k}={v!r}" for k, v in identity.items() if k != "_class_path")
    return f"{cls}({args})"


#: Names accepted by :meth:`FlowDataModule.reference_samples`.
REFERENCE_SPLITS: tuple[str, ...] = ("train", "test")


def to_uint8(x: Tensor) -> Tensor:
    """Map images from model space ``[-1, 1]`` to uint8 pixels: ``round((x + 1) · 127.5)``.

    Values outside ``[-1, 1]`` are clamped to ``[0, 255]``; the shape is unchanged.
    """
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(x: Tensor) -> Tensor:
    """Map uint8 pixels ``p ∈ {0..255}`` to model space: ``p / 127.5 − 1`` (float32, ``[-1, 1]``).

    Exact inverse of :func:`to_uint8` on uint8 input.
    """
    return x.to(torch.float32) / 127.5 - 1.0


def mix_seed(*parts: int) -> int:
    """Hash integers (a base seed, a stream tag, a rank, a worker id, …) into one 63-bit seed.

    Nearby inputs (``seed`` and ``seed + 1``, rank 0 and rank 1) give unrelated streams, unlike
    ``seed + rank`` offsets, which make run ``seed=1, rank=0`` replay run ``seed=0, rank=1``.
    """
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def check_split(split: str) -> None:
    """Raise ``ValueError`` unless ``split`` is one of :data:`REFERENCE_SPLITS`."""
    if split not in REFERENCE_SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {', '.join(REFERENCE_SPLITS)}.")


def _to_model_space(x: Tensor) -> Tensor:
    """Storage (uint8 pixels or float) to float32 model space."""
    return from_uint8(x) if x.dtype == torch.uint8 else x.to(torch.float32)


class TensorSamples(Dataset):
    """Map-style dataset over a tensor ``(N, *data_shape)``, optionally with labels ``(N,)``.

    uint8 storage (images kept at a quarter of the memory) is converted to model space with
    :func:`from_uint8` item by item; float storage is returned as float32 unchanged. Without
    ``labels`` items are single tensors, so the default collate stacks them into a batch
    ``(B, *data_shape)``; with ``labels`` items are ``(x, y)`` with ``y`` a 0-d int64 tensor,
    which the default collate turns into ``[x (B, *data_shape), y (B,)]``.
    """

    def __init__(self, data: Tensor, labels: Tensor | None = None) -> None:
        if labels is not None and labels.shape != (len(data),):
            raise ValueError(
                f"Labels of shape {tuple(labels.shape)} do not match {len(data)} samples; "
                f"there must be one label per sample."
            )
        self.data = data
        self.labels = labels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Tensor | tuple[Tensor, Tensor]:
        x = _to_model_space(self.data[index])
        return x if self.labels is None else (x, self.labels[index])


class FlowDataModule(L.LightningDataModule, ABC):
    """Base DataModule: plain-tensor batches ``x1`` of shape ``(B, *data_shape)``, float32.

    The contract (abstract here): :attr:`data_shape`, :meth:`reference_samples` and
    :meth:`train_dataloader`. The validation loader is shared: a fixed set of ``n_val``
    reference samples of the ``"test"`` split (``seed=0``), cut into batches of at most
    ``batch_size``, in the same plain-tensor format as training batches.

    Unlabelled here (:attr:`num_classes` and :attr:`class_names` are ``None``); finite datasets
    built with ``labels=True`` (:class:`FiniteFlowDataModule`) yield ``[x1, y]`` batches instead.

    Attributes:
        is_image: whether samples are images ``(C, H, W)`` in ``[-1, 1]``.
        labels: whether batches are ``[x1, y]`` pairs with class labels ``y``.
        batch_size: training (and validation) batch size.
        n_val: number of validation reference samples.
        num_workers: DataLoader worker processes.
    """

    is_image: bool = False
    labels: bool = False

    def __init__(self, batch_size: int, n_val: int, num_workers: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
        if n_val < 1:
            raise ValueError(f"n_val must be a positive integer, got {n_val}.")
        self.batch_size = batch_size
        self.n_val = n_val
        self.num_workers = num_workers

    @property
    @abstractmethod
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(2,)`` for toy 2D or ``(3, 32, 32)`` for CIFAR-10."""

    @property
    def num_classes(self) -> int | None:
        """Number of classes ``K`` of the labels ``y ∈ 0..K-1`` batches carry; ``None`` when
        batches are unlabelled."""
        return None

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Name of each class, indexed by label (``num_classes`` of them); ``None`` when batches
        are unlabelled."""
        return None

    @abstractmethod
    def train_dataloader(self) -> Any:
        """Training batches ``(B, *data_shape)`` float32 in model space."""

    @abstractmethod
    def reference_samples(self, n: int, split: str = "test", seed: int = 0) -> Tensor:
        """Return ``n`` real samples ``(n, *data_shape)`` float32 in model space, for metrics.

        ``split`` is ``"train"`` or ``"test"``; the same ``(n, split, seed)`` always gives the
        same samples, and the two splits are disjoint (finite sets) or drawn from independent
        streams (toy 2D), so data-vs-data metric floors are honest.
        """

    def val_samples(self) -> Tensor:
        """The fixed validation set: ``reference_samples(n_val, "test", seed=0)``."""
        return self.reference_samples(self.n_val, split="test", seed=0)

    def val_dataloader(self) -> DataLoader:
        """Fixed reference batches (plain tensors ``(b, *data_shape)``), never shuffled."""
        x = self.val_samples()
        return DataLoader(TensorSamples(x), batch_size=min(self.batch_size, len(x)), shuffle=False)


class FiniteFlowDataModule(FlowDataModule):
    """Base for finite datasets (digits, torchvision sets, image folders).

    Subclasses implement :meth:`_load_split` returning the whole split as a tensor
    ``(N, *data_shape)`` (uint8 pixels or float32 in model space), and, for class labels,
    :meth:`_load_labels` (int64 ``(N,)``, aligned with :meth:`_load_split`) and
    :meth:`_load_class_names`. Splits and labels are loaded lazily, on first use, and cached; the
    caches are dropped when pickling (``ddp_spawn`` sends the DataModule to each process, which
    reloads from disk instead of receiving a copy).

    Training batches come from the ``"train"`` split, shuffled by a generator seeded with
    ``seed``, with ``drop_last=True`` so every batch has exactly ``batch_size`` samples. Under
    DDP, Lightning swaps in a ``DistributedSampler`` (seeded by ``seed_everything``) instead.
    The validation set is ``min(n_val, len(test split))`` test samples.

    With ``labels=True`` every batch (train and validation) is ``[x, y]``: ``x`` as without
    labels (the same samples in the same order), ``y`` their int64 class labels ``(B,)`` in
    ``0..num_classes-1``.
    """

    is_image: bool = True
    #: Human-readable dataset name used in error messages.
    dataset_name: str = "dataset"

    def __init__(
        self, batch_size: int, n_val: int, num_workers: int, seed: int, labels: bool = False
    ) -> None:
        super().__init__(batch_size=batch_size, n_val=n_val, num_workers=num_workers)
        self.seed = seed
        self.labels = labels
        self._cache: dict[str, Tensor] = {}
        self._label_cache: dict[str, Tensor] = {}

    @abstractmethod
    def _load_split(self, split: str) -> Tensor:
        """Load the whole ``split`` as a tensor ``(N, *data_shape)`` (uint8 or float32)."""

    def _load_labels(self, split: str) -> Tensor:
        """Load the class labels of ``split``: int64 ``(N,)``, in the order of :meth:`_load_split`.

        Overridden by datasets that have labels; the base has none.
        """
        raise NotImplementedError(f"{self.dataset_name} has no class labels.")

    def _load_class_names(self) -> tuple[str, ...]:
        """Name of every class, indexed by label (overridden with :meth:`_load_labels`)."""
        raise NotImplementedError(f"{self.dataset_name} has no class labels.")

    @property
    def num_classes(self) -> int | None:
        """Number of classes when built with ``labels=True``, else ``None``."""
        return len(self._load_class_names()) if self.labels else None

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Class names (indexed by label) when built with ``labels=True``, else ``None``."""
        return self._load_class_names() if self.labels else None

    def split_data(self, split: str) -> Tensor:
        """The cached storage tensor of ``split`` (uint8 pixels or float32), loading it once."""
        check_split(split)
        if split not in self._cache:
            self._cache[split] = self._load_split(split)
        return self._cache[split]

    def split_labels(self, split: str) -> Tensor:
        """The cached class labels of ``split``: int64 ``(N,)`` aligned with :meth:`split_data`.

        Available whether or not ``labels`` is on (for metrics); raises ``NotImplementedError``
        for a dataset without labels.
        """
        check_split(split)
        if split not in self._label_cache:
            self._label_cache[split] = self._load_labels(split)
        # Checked on every call: a subclass may fill the cache itself (e.g. torchvision).
        y = self._label_cache[split] = torch.as_tensor(self._label_cache[split], dtype=torch.long)
        k = len(self._load_class_names())
        if y.ndim != 1 or (len(y) and not 0 <= int(y.min()) <= int(y.max()) < k):
            got = f"values {int(y.min())}..{int(y.max())}" if y.ndim == 1 else f"shape {y.shape}"
            raise ValueError(
                f"The {split} labels of {self.dataset_name} must be a 1-D tensor of class "
                f"indices in 0..{k - 1}, got {got}."
            )
        return y

    def num_samples(self, split: str) -> int:
        """Number of samples in ``split``."""
        return len(self.split_data(split))

    def iter_split(self, split: str, chunk: int) -> Iterator[Tensor]:
        """``split`` in order, ``chunk`` samples at a time, float32 in model space (a dataset
        read from files may stream them instead of holding the split)."""
        for part in self.split_data(split).split(chunk):
            yield _to_model_space(part)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits this stage needs (train and test for ``fit``; test otherwise), and
        their labels with ``labels=True``."""
        splits = ("train", "test") if stage in (None, "fit") else ("test",)
        for split in splits:
            self.split_data(split)
            if self.labels:
                self.split_labels(split)

    def _subset_index(self, n: int, split: str, seed: int) -> Tensor:
        """Indices of ``n`` distinct samples of ``split``: a random subset seeded with ``seed``."""
        size = self.num_samples(split)
        if not 0 < n <= size:
            raise ValueError(
                f"Asked for {n} reference samples from the {split} split of "
                f"{self.dataset_name}, but it only has {size}; ask for between 1 and "
                f"{size} (samples are never repeated)."
            )
        return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n]

    def reference_samples(self, n: int, split: str = "test", seed: int = 0) -> Tensor:
        """Return ``n`` distinct samples of ``split`` (a seeded random subset), float32.

        Raises ``ValueError`` when ``n`` exceeds the size of the split: sampling with
        replacement would duplicate images and bias metrics such as FID.
        """
        return _to_model_space(self.split_data(split)[self._subset_index(n, split, seed)])

    def labelled_reference(
        self, n: int, split: str = "test", seed: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Return ``(x, y)``: ``n`` distinct, class-balanced samples of ``split`` and their labels.

        ``x`` is ``(n, *data_shape)`` float32 in model space, ``y`` int64 ``(n,)``. Each class
        ``c`` of the ``K`` gets ``n // K`` samples, plus one for the ``n % K`` lowest classes;
        each class's samples are a random subset seeded with ``seed`` (the same
        ``(n, split, seed)`` always gives the same result). The result is in class order (all of
        class 0, then class 1, …). Works whether or not ``labels`` is on; the dataset must have
        labels.

        Raises:
            ValueError: if ``n < 1``, or if a class has fewer samples than it needs (samples
                are never repeated); the message names the largest ``n`` that works.
        """
        if n < 1:
            raise ValueError(f"Asked for {n} reference samples; ask for at least 1.")
        data, y = self.split_data(split), self.split_labels(split)
        names = self._load_class_names()
        counts = torch.bincount(y, minlength=len(names)).tolist()
        # n = q·K + r (r < K) works iff the r lowest classes have ≥ q + 1 samples and the others
        # ≥ q, so the largest is q = min(counts) with r = the first class having only q.
        q = min(counts)
        largest = q * len(names) + counts.index(q)
        g = torch.Generator().manual_seed(seed)
        index = []
        for c, have in enumerate(counts):
            need = n // len(names) + (c < n % len(names))
            if need > have:
                fix = f"ask for at most {largest}" if largest else "no n works on this split"
                raise ValueError(
                    f"Asked for {n} class-balanced reference samples from the {split} split of "
                    f"{self.dataset_name}, but class {c} ({names[c]!r}) has only {have} and "
                    f"needs {need}; {fix} (samples are never repeated)."
                )
            members = (y == c).nonzero().squeeze(1)
            index.append(members[torch.randperm(have, generator=g)[:need]])
        index = torch.cat(index)
        return _to_model_space(data[index]), y[index]

    def val_samples(self) -> Tensor:
        """The fixed validation set: ``min(n_val, len(test))`` test samples, ``seed=0``."""
        return self.reference_samples(min(self.n_val, self.num_samples("test")), "test", 0)

    def val_dataloader(self) -> DataLoader:
        """Fixed batches of :meth:`val_samples`, never shuffled: plain tensors
        ``(b, *data_shape)``, or ``[x, y]`` with ``labels=True`` (the same images, with their
        labels)."""
        if not self.labels:
            return super().val_dataloader()
        index = self._subset_index(min(self.n_val, self.num_samples("test")), "test", 0)
        x = _to_model_space(self.split_data("test")[index])
        y = self.split_labels("test")[index]
        return DataLoader(TensorSamples(x, y), batch_size=min(self.batch_size, len(x)))

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the train split (drop_last): ``(batch_size, *data_shape)``, or
        ``[x, y]`` with ``labels=True`` (the same shuffle, with labels ``(batch_size,)``)."""
        data = self.split_data("train")
        if self.batch_size > len(data):
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the {len(data)} training samples "
                f"of {self.dataset_name}; with drop_last no batch would be produced."
            )
        labels = self.split_labels("train") if self.labels else None
        return DataLoader(
            TensorSamples(data, labels),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(mix_seed(self.seed, 1)),
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}
        state["_label_cache"] = {}
        return state
