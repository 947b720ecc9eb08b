r"""Couplings :math:`(x_0, x_1)` of a teacher's ODE as training data: the data of a reflow.

The file is :func:`flowmap.reflow.save_couplings`'s safetensors (``flowmap couple`` writes it).
Batches are ``{"x0", "x1"[, "y"]}``: a :class:`~flowmap.training.VelocityModule` trains by flow
matching on these pairs instead of independent noise, which gives the rectified flow of the teacher.
The last ``n_val`` couplings are held out for validation and are the reference of metrics (the
teacher's samples, not the data's). The data it stands for is the teacher's (the file says which):
a reflowed teacher distils on the original data like its own teacher.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from flowmap.data.base import FlowDataModule, mix_seed
from flowmap.reflow import couplings_source, load_couplings

__all__ = ["CouplingDataModule"]


class _Couplings(Dataset):
    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["x0"])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}


class CouplingDataModule(FlowDataModule):
    """Serves a couplings file as ``{"x0", "x1"[, "y"]}`` batches.

    Args:
        path: a couplings file (``flowmap couple``).
        batch_size: training batch size.
        n_val: couplings held out.
        labels: yield labels ``y``.
        seed: seed of the shuffle.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 256,
        n_val: int = 1024,
        labels: bool = False,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, n_val, num_workers)
        self.save_hyperparameters()
        self.path, self.labels, self.seed = str(path), labels, seed
        self._tensors: dict[str, Tensor] | None = None

    @property
    def tensors(self) -> dict[str, Tensor]:
        """The file's couplings (read once, checked)."""
        if self._tensors is None:
            t = load_couplings(self.path)
            if self.labels and "y" not in t:
                raise ValueError(
                    f"The couplings {self.path!r} hold no labels y (their teacher was not "
                    "class-conditional); set labels: false."
                )
            if len(t["x0"]) <= self.n_val:
                raise ValueError(
                    f"The couplings {self.path!r} hold {len(t['x0'])} pairs, not more than "
                    f"n_val={self.n_val}; draw more or lower n_val."
                )
            keep = ("x0", "x1", "y") if self.labels else ("x0", "x1")
            self._tensors = {k: t[k].float() if k != "y" else t[k].long() for k in keep}
        return self._tensors

    def setup(self, stage: str | None = None) -> None:
        """Name the teacher's data as this data's source (``source_data``, in the checkpoint)."""
        source = couplings_source(self.path)
        if source:
            self.hparams["source_data"] = source

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.tensors["x0"].shape[1:])

    @property
    def num_classes(self) -> int | None:
        return int(self.tensors["y"].max()) + 1 if self.labels else None

    def _split(self, split: str) -> dict[str, Tensor]:
        cut = len(self.tensors["x0"]) - self.n_val
        return {k: v[:cut] if split == "train" else v[cut:] for k, v in self.tensors.items()}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            _Couplings(self._split("train")),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(mix_seed(self.seed, 1)),
        )

    def val_dataloader(self) -> DataLoader:
        held = self._split("test")
        return DataLoader(_Couplings(held), batch_size=min(self.batch_size, self.n_val))

    def reference_samples(self, n: int, split: str = "test", seed: int = 0) -> Tensor:
        """``n`` teacher samples :math:`x_1` of the ``split`` (``"test"``: the held-out ones)."""
        x1 = self._split(split)["x1"]
        if n > len(x1):
            raise ValueError(f"Only {len(x1)} {split} couplings, fewer than the {n} asked for.")
        index = torch.randperm(len(x1), generator=torch.Generator().manual_seed(seed))[:n]
        return x1[index]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tensors"] = None
        return state
