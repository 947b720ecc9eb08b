"""Tests of flowmap.data: shapes, dtypes, ranges, seeding, splits and early, clear failures."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from flowmap.data import (
    TOY2D_NAMES,
    DigitsDataModule,
    FlowDataModule,
    ImageFolderDataModule,
    TorchvisionDataModule,
    Toy2DDataModule,
    load_digits_split,
    make_datamodule,
    to_uint8,
    toy2d_sample,
)
from flowmap.data.base import dataset_identity, from_uint8

try:
    from fakes import make_fake_cifar10, make_fake_mnist, make_image_folder
except ImportError:  # tests/ imported as a package
    from tests.fakes import make_fake_cifar10, make_fake_mnist, make_image_folder


def _first(loader) -> Tensor:
    return next(iter(loader))


def _check_batches(dm: FlowDataModule, batch_size: int, lo: float, hi: float) -> None:
    """Train and val batches are plain float32 tensors (b, *data_shape) within [lo, hi]."""
    x = _first(dm.train_dataloader())
    assert isinstance(x, Tensor)
    assert x.shape == (batch_size, *dm.data_shape)
    assert x.dtype == torch.float32
    assert lo <= x.min() and x.max() <= hi
    for v in dm.val_dataloader():
        assert isinstance(v, Tensor) and v.dtype == torch.float32
        assert v.shape[1:] == dm.data_shape and len(v) <= batch_size
    ref = dm.reference_samples(4, split="train")
    assert ref.shape == (4, *dm.data_shape) and ref.dtype == torch.float32


# --------------------------------------------------------------------------- pixel range


def test_to_uint8_round_trips_pixels_and_clamps() -> None:
    pixels = torch.arange(256, dtype=torch.uint8)
    x = from_uint8(pixels)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), pixels)
    assert to_uint8(torch.tensor([-3.0, 0.0, 5.0])).tolist() == [0, 128, 255]


# --------------------------------------------------------------------------- toy 2D


@pytest.mark.parametrize("name", TOY2D_NAMES)
def test_toy2d_sample_shape_scale_and_seeding(name: str) -> None:
    x = toy2d_sample(name, 4096, torch.Generator().manual_seed(0))
    assert x.shape == (4096, 2) and x.dtype == torch.float32
    assert (x.abs() <= 4).float().mean() > 0.999
    assert ((0.9 < x.std(0)) & (x.std(0) < 2.0)).all()
    assert torch.equal(x, toy2d_sample(name, 4096, torch.Generator().manual_seed(0)))
    assert not torch.equal(x, toy2d_sample(name, 4096, torch.Generator().manual_seed(1)))


def test_toy2d_unknown_name_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="Unknown toy 2D dataset 'swissroll'; choose one of"):
        Toy2DDataModule(name="swissroll")
    with pytest.raises(ValueError, match="choose one of checkerboard, 8gaussians"):
        toy2d_sample("nope", 3, torch.Generator())


def test_toy2d_datamodule_batches() -> None:
    dm = Toy2DDataModule("moons", batch_size=64, n_val=100)
    assert dm.data_shape == (2,) and not dm.is_image
    _check_batches(dm, 64, -5.0, 5.0)
    val = list(dm.val_dataloader())
    assert [len(v) for v in val] == [64, 36]
    assert torch.equal(torch.cat(val), dm.reference_samples(100, "test", seed=0))


def test_toy2d_stream_is_reproducible_and_distinct_per_rank_seed_and_split() -> None:
    def stream(seed: int = 0, rank: int = 0) -> Tensor:
        dm = Toy2DDataModule(batch_size=32, seed=seed)
        if rank:
            dm.trainer = SimpleNamespace(global_rank=rank, global_step=0, accumulate_grad_batches=1)
        it = iter(dm.train_dataloader())
        return torch.cat([next(it), next(it)])

    base = stream()
    assert torch.equal(base, stream())
    assert not torch.equal(base[:32], base[32:])  # consecutive batches differ
    assert not torch.equal(base, stream(rank=1))
    assert not torch.equal(base, stream(seed=1))
    assert not torch.equal(stream(seed=1, rank=0), stream(seed=0, rank=1))

    dm = Toy2DDataModule(batch_size=32)
    train, test = dm.reference_samples(256, "train"), dm.reference_samples(256, "test")
    assert torch.equal(test, dm.reference_samples(256, "test"))
    assert not torch.equal(train, test)
    assert not torch.equal(test, dm.reference_samples(256, "test", seed=1))
    assert not torch.equal(train[:32], base[:32])  # reference draws are not the training stream
    with pytest.raises(ValueError, match="Unknown split 'valid'"):
        dm.reference_samples(4, "valid")


def test_toy2d_stream_resumes_at_the_restored_step() -> None:
    dm = Toy2DDataModule(batch_size=8)
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(5)]
    dm.trainer = SimpleNamespace(global_rank=0, global_step=3, accumulate_grad_batches=1)
    assert torch.equal(next(iter(dm.train_dataloader())), batches[3])


def test_toy2d_workers_get_distinct_streams() -> None:
    single = _first(Toy2DDataModule(batch_size=16).train_dataloader())
    it = iter(Toy2DDataModule(batch_size=16, num_workers=2).train_dataloader())
    from_worker0, from_worker1 = next(it), next(it)
    assert torch.equal(from_worker0, single)  # worker 0 continues the single-process stream
    assert not torch.equal(from_worker0, from_worker1)


# --------------------------------------------------------------------------- digits


def test_digits_split_is_fixed_and_a_partition() -> None:
    x_tr, y_tr, x_te, y_te = load_digits_split()
    assert x_tr.shape == (1438, 1, 8, 8) and x_te.shape == (359, 1, 8, 8)
    assert len(y_tr) == 1438 and len(y_te) == 359
    x_tr2, _, x_te2, _ = load_digits_split()
    assert torch.equal(x_tr, x_tr2) and torch.equal(x_te, x_te2)

    from sklearn.datasets import load_digits

    full = torch.as_tensor(load_digits().images, dtype=torch.float32).flatten(1) / 8.0 - 1.0
    parts = torch.cat([x_tr, x_te]).flatten(1)
    # The two splits together are the dataset, each image exactly as often as in the original.
    u_full, c_full = torch.unique(full, dim=0, return_counts=True)
    u_parts, c_parts = torch.unique(parts, dim=0, return_counts=True)
    assert torch.equal(u_full, u_parts) and torch.equal(c_full, c_parts)


def test_digits_datamodule() -> None:
    dm = DigitsDataModule(batch_size=256, n_val=100)
    assert dm.data_shape == (1, 8, 8) and dm.is_image
    _check_batches(dm, 256, -1.0, 1.0)
    assert len(dm.train_dataloader()) == 1438 // 256
    x_tr, _, x_te, _ = load_digits_split()
    test = dm.reference_samples(359, "test")
    assert torch.equal(torch.unique(test, dim=0), torch.unique(x_te, dim=0))
    assert torch.equal(test, dm.reference_samples(359, "test"))
    assert len(torch.cat(list(dm.val_dataloader()))) == 100
    # A different training seed changes the shuffle, never the split.
    other = DigitsDataModule(seed=1)
    assert torch.equal(other.reference_samples(359, "test"), test)
    assert not torch.equal(_first(other.train_dataloader()), _first(dm.train_dataloader()))


def test_finite_reference_samples_never_repeat() -> None:
    dm = DigitsDataModule()
    with pytest.raises(ValueError, match="only has 359; ask for between 1 and 359"):
        dm.reference_samples(360, "test")
    with pytest.raises(ValueError, match="batch_size=2000 is larger than the 1438 training"):
        DigitsDataModule(batch_size=2000).train_dataloader()


def _label_of(x: Tensor, images: Tensor, labels: Tensor) -> Tensor:
    """The label of each row of ``x`` found in ``images`` (every row must be there exactly once)."""
    match = (x.flatten(1)[:, None] == images.flatten(1)[None]).all(-1)
    assert (match.sum(1) == 1).all()
    return labels[match.float().argmax(1)]


def test_digits_labels_batches_are_the_same_images_with_their_labels() -> None:
    x_tr, y_tr, x_te, y_te = load_digits_split()
    plain = DigitsDataModule(batch_size=64, n_val=100)
    dm = DigitsDataModule(batch_size=64, n_val=100, labels=True)
    assert dm.hparams.labels is True and plain.hparams.labels is False
    assert plain.num_classes is None and plain.class_names is None
    assert dm.num_classes == 10 and dm.class_names == tuple("0123456789")

    x, y = _first(dm.train_dataloader())
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64 and 0 <= y.min() and y.max() <= 9
    assert torch.equal(x, _first(plain.train_dataloader()))  # same shuffle as without labels
    assert torch.equal(y, _label_of(x, x_tr, y_tr))

    val = list(dm.val_dataloader())
    assert [len(b[0]) for b in val] == [64, 36]
    xv, yv = torch.cat([b[0] for b in val]), torch.cat([b[1] for b in val])
    assert yv.dtype == torch.int64
    assert torch.equal(xv, torch.cat(list(plain.val_dataloader())))  # same validation images
    assert torch.equal(yv, _label_of(xv, x_te, y_te))
    assert len(yv.unique()) == 10


def test_labelled_reference_is_class_balanced_seeded_and_distinct() -> None:
    x_tr, y_tr, x_te, y_te = load_digits_split()
    dm = DigitsDataModule()  # works with labels off: it is for metrics
    x, y = dm.labelled_reference(25)
    assert x.shape == (25, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]
    assert torch.equal(y, y.sort().values)  # in class order
    assert torch.equal(y, _label_of(x, x_te, y_te))  # distinct test images, with their labels
    again, other = dm.labelled_reference(25), dm.labelled_reference(25, seed=1)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    assert torch.equal(other[1], y) and not torch.equal(other[0], x)
    xt, yt = dm.labelled_reference(7, split="train")
    assert yt.tolist() == list(range(7)) and torch.equal(yt, _label_of(xt, x_tr, y_tr))

    # Test split: class 9 is the smallest (30), so 30 each plus one for classes 0-8 is the most.
    assert torch.bincount(dm.labelled_reference(309)[1]).tolist() == [31] * 9 + [30]
    with pytest.raises(
        ValueError, match=r"class 9 \('9'\) has only 30 and needs 31; ask for at most 309"
    ):
        dm.labelled_reference(310)
    # Train split: class 2 is the smallest (126), so only classes 0 and 1 can have one more.
    assert len(dm.labelled_reference(1262, split="train")[1]) == 1262
    with pytest.raises(ValueError, match=r"class 2 \('2'\) has only 126 and needs 127; .* 1262"):
        dm.labelled_reference(1263, split="train")
    with pytest.raises(ValueError, match="ask for at least 1"):
        dm.labelled_reference(0)


def test_dataset_identity_includes_labels_only_when_on() -> None:
    plain, labelled = DigitsDataModule(), DigitsDataModule(labels=True)
    assert "labels" not in dataset_identity(plain.hparams)  # as in checkpoints saved before it
    assert dataset_identity(labelled.hparams)["labels"] is True
    assert dataset_identity(labelled.hparams) != dataset_identity(plain.hparams)
    assert Toy2DDataModule().num_classes is None and Toy2DDataModule().class_names is None
    assert make_datamodule("digits", labels=True).num_classes == 10


# --------------------------------------------------------------------------- torchvision


def test_torchvision_fake_cifar10(tmp_path: Path) -> None:
    make_fake_cifar10(tmp_path, n_train=40, n_test=12)
    dm = TorchvisionDataModule(
        "cifar10", str(tmp_path), batch_size=8, n_val=20, check_integrity=False
    )
    assert dm.data_shape == (3, 32, 32) and dm.is_image
    _check_batches(dm, 8, -1.0, 1.0)
    assert len(dm.train_dataloader()) == 5
    assert len(torch.cat(list(dm.val_dataloader()))) == 12  # n_val capped at the test size
    with pytest.raises(ValueError, match="CIFAR-10, but it only has 12"):
        dm.reference_samples(13, "test")
    # Pixels survive the trip: the model-space sample maps back to the stored uint8 image.
    stored = dm.split_data("test")
    x = dm.reference_samples(12, "test")
    assert torch.equal(
        torch.sort(to_uint8(x).flatten(1), dim=0).values,
        torch.sort(stored.flatten(1), dim=0).values,
    )


def test_torchvision_md5_check_rejects_fake_with_a_hint(tmp_path: Path) -> None:
    make_fake_cifar10(tmp_path)
    dm = TorchvisionDataModule("cifar10", str(tmp_path))  # files present: constructor passes
    with pytest.raises(ValueError, match="--data.check_integrity=false"):
        dm.setup("fit")


@pytest.mark.parametrize("pad", [False, True])
def test_torchvision_fake_mnist(tmp_path: Path, pad: bool) -> None:
    make_fake_mnist(tmp_path, n_train=32, n_test=8)
    dm = TorchvisionDataModule("mnist", str(tmp_path), batch_size=16, n_val=8, pad_to_32=pad)
    size = 32 if pad else 28
    assert dm.data_shape == (1, size, size)
    _check_batches(dm, 16, -1.0, 1.0)
    x = dm.reference_samples(8, "test")
    border = 4 if pad else 2  # fake digits are black (-1) on a 2-pixel border, +2 if padded
    assert (x[..., :border, :] == -1).all() and (x[..., :, -border:] == -1).all()


def test_torchvision_missing_root_fails_early_offline(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(
        FileNotFoundError, match=r"CIFAR-10 is not in .*nowhere.*data.download=true"
    ):
        TorchvisionDataModule("cifar10", str(missing))
    with pytest.raises(FileNotFoundError, match=r"MNIST is not in .*MNIST/raw \(no such folder\)"):
        TorchvisionDataModule("mnist", str(missing))
    make_fake_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"\(missing t10k-labels-idx1-ubyte\); put"):
        TorchvisionDataModule("mnist", str(tmp_path))
    # With download=True the constructor defers to prepare_data (which would fetch the files).
    TorchvisionDataModule("mnist", str(missing), download=True)


def test_torchvision_labels_are_the_files_targets(tmp_path: Path) -> None:
    make_fake_cifar10(tmp_path / "c", n_train=40, n_test=12)
    cifar = TorchvisionDataModule(
        "cifar10", str(tmp_path / "c"), batch_size=8, check_integrity=False, labels=True
    )
    with open(tmp_path / "c" / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f)
    assert cifar.split_labels("test").tolist() == raw["labels"]
    assert torch.equal(cifar.split_data("test").flatten(1), torch.from_numpy(raw["data"]))
    assert cifar.num_classes == 10
    assert cifar.class_names == tuple(cifar._dataset(train=False).classes)  # torchvision's names
    assert cifar.class_names[:2] == ("airplane", "automobile")
    x, y = _first(cifar.train_dataloader())
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,) and y.dtype == torch.int64

    make_fake_mnist(tmp_path / "m", n_train=32, n_test=8)
    mnist = TorchvisionDataModule("mnist", str(tmp_path / "m"), batch_size=16, labels=True)
    raw_labels = (tmp_path / "m" / "MNIST" / "raw" / "train-labels-idx1-ubyte").read_bytes()[8:]
    assert mnist.split_labels("train").tolist() == list(raw_labels)
    assert mnist.num_classes == 10 and mnist.class_names == tuple("0123456789")
    x, y = _first(mnist.val_dataloader())
    assert x.shape == (8, 1, 28, 28) and y.dtype == torch.int64


def test_torchvision_unknown_name() -> None:
    with pytest.raises(ValueError, match="Unknown torchvision dataset 'svhn'; choose one of"):
        TorchvisionDataModule("svhn", "/tmp")


# --------------------------------------------------------------------------- image folder


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder(tmp_path: Path, channels: int) -> None:
    make_image_folder(tmp_path, n=10, size=16)
    dm = ImageFolderDataModule(str(tmp_path), image_size=12, channels=channels, batch_size=4)
    assert dm.data_shape == (channels, 12, 12) and dm.is_image
    assert len(dm.files("train")) == 9 and len(dm.files("test")) == 1
    assert not set(dm.files("train")) & set(dm.files("test"))
    assert any("/sub/" in f for f in dm.files("train"))
    assert any(f.endswith(".jpg") for f in dm.files("train") + dm.files("test"))
    _check_batches(dm, 4, -1.0, 1.0)


def test_image_folder_missing_or_empty_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Image folder .*nope does not exist"):
        ImageFolderDataModule(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"Found 0 \.png/\.jpg/\.jpeg images under"):
        ImageFolderDataModule(str(tmp_path))


def _class_folder(root: Path, counts: dict[str, int]) -> Path:
    """Write ``counts[c]`` constant-grey 6×6 PNGs under ``root/c`` (every other one a level
    deeper); image ``j`` of the ``k``-th class in sorted order has grey ``100 · k + j``."""
    for k, c in enumerate(sorted(counts)):
        for j in range(counts[c]):
            folder = root / c / ("deep" if j % 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((6, 6), 100 * k + j, np.uint8)).save(folder / f"{j}.png")
    return root


def test_image_folder_labels_by_sub_folder(tmp_path: Path) -> None:
    _class_folder(tmp_path, {"zebra": 5, "ant": 7, "moth": 6})
    dm = ImageFolderDataModule(
        str(tmp_path), image_size=4, channels=1, batch_size=4, test_fraction=0.3, labels=True
    )
    assert dm.class_names == ("ant", "moth", "zebra") and dm.num_classes == 3
    for split in ("train", "test"):
        want = [
            dm.class_names.index(Path(f).relative_to(tmp_path).parts[0]) for f in dm.files(split)
        ]
        y = dm.split_labels(split)
        assert y.dtype == torch.int64 and y.tolist() == want
        assert torch.equal(dm.split_data(split)[:, 0, 0, 0].long() // 100, y)  # grey says class
    for x, y in [_first(dm.train_dataloader()), *dm.val_dataloader()]:
        assert y.dtype == torch.int64 and torch.equal(to_uint8(x)[:, 0, 0, 0].long() // 100, y)
    x, y = dm.labelled_reference(6, split="train")
    assert y.tolist() == [0, 0, 1, 1, 2, 2] and torch.equal(
        to_uint8(x)[:, 0, 0, 0].long() // 100, y
    )


def test_image_folder_labels_need_class_sub_folders(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "flat", n=6)  # half the images lie directly in the root
    with pytest.raises(ValueError, match=r"3 of its images lie directly in it .*labels=False\.$"):
        ImageFolderDataModule(str(tmp_path / "flat"), labels=True)
    plain = ImageFolderDataModule(str(tmp_path / "flat"), batch_size=2)
    assert plain.num_classes is None and isinstance(_first(plain.train_dataloader()), Tensor)
    with pytest.raises(ValueError, match="lie directly in it"):
        plain.labelled_reference(1, "train")
    _class_folder(tmp_path / "one", {"cats": 4})
    with pytest.raises(ValueError, match=r"all its images are in one, 'cats'; put each class"):
        ImageFolderDataModule(str(tmp_path / "one"), labels=True)


# --------------------------------------------------------------------------- factory, pickling


def test_make_datamodule(tmp_path: Path) -> None:
    assert isinstance(make_datamodule("spirals"), Toy2DDataModule)
    assert make_datamodule("8gaussians", batch_size=8).hparams.batch_size == 8
    assert isinstance(make_datamodule("digits"), DigitsDataModule)
    make_fake_mnist(tmp_path)
    assert make_datamodule("mnist", root=str(tmp_path)).data_shape == (1, 28, 28)
    make_image_folder(tmp_path / "imgs")
    assert isinstance(make_datamodule("folder", root=str(tmp_path / "imgs")), ImageFolderDataModule)
    with pytest.raises(ValueError, match="Unknown dataset 'imagenet'; choose one of checkerboard"):
        make_datamodule("imagenet")


def test_datamodules_pickle_without_their_cached_data(tmp_path: Path) -> None:
    make_fake_cifar10(tmp_path)
    modules = [
        Toy2DDataModule("circles", seed=3),
        DigitsDataModule(),
        TorchvisionDataModule("cifar10", str(tmp_path), check_integrity=False),
    ]
    for dm in modules:
        ref = dm.reference_samples(8, "test", seed=2)
        clone = pickle.loads(pickle.dumps(dm))
        assert getattr(clone, "_cache", {}) == {}
        assert torch.equal(clone.reference_samples(8, "test", seed=2), ref)
        assert clone.hparams == dm.hparams


def test_labelled_datamodules_pickle_without_their_labels_and_reload_them(
    tmp_path: Path,
) -> None:
    make_fake_cifar10(tmp_path / "c")
    modules = [
        DigitsDataModule(batch_size=32, labels=True),
        TorchvisionDataModule("cifar10", str(tmp_path / "c"), check_integrity=False, labels=True),
        ImageFolderDataModule(
            str(_class_folder(tmp_path / "f", {"a": 8, "b": 8})), batch_size=4, labels=True
        ),
    ]
    for dm in modules:
        dm.setup("fit")
        ref = dm.labelled_reference(2, "train", seed=3)
        val = [y for _, y in dm.val_dataloader()]
        clone = pickle.loads(pickle.dumps(dm))  # as ddp_spawn sends it to each process
        assert clone._cache == {} and clone._label_cache == {}
        assert clone.num_classes == dm.num_classes and clone.class_names == dm.class_names
        again = clone.labelled_reference(2, "train", seed=3)
        assert torch.equal(again[0], ref[0]) and torch.equal(again[1], ref[1])
        assert all(torch.equal(a, b) for a, b in zip([y for _, y in clone.val_dataloader()], val))
        assert torch.equal(clone.split_labels("train"), dm.split_labels("train"))


# --------------------------------------------------------------------------- Lightning wiring


class _Mean(L.LightningModule):
    """Fits a mean by regression; records the shapes of the batches it is fed."""

    def __init__(self) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(2))
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def training_step(self, x1: Tensor, batch_idx: int) -> Tensor:
        self.seen.append(("train", tuple(x1.shape)))
        return ((x1 - self.mu) ** 2).mean()

    def validation_step(self, x1: Tensor, batch_idx: int) -> None:
        self.seen.append(("val", tuple(x1.shape)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_toy2d_endless_stream_trains_with_max_steps() -> None:
    model = _Mean()
    trainer = L.Trainer(
        max_steps=4,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=Toy2DDataModule("gaussian", batch_size=16, n_val=8))
    assert model.seen.count(("train", (16, 2))) == 4
    assert ("val", (8, 2)) in model.seen
