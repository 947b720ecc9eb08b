"""Tests of flowmap.metrics: 2D distances, FID oracles and their agreement, extractor weights.

Everything runs offline on CPU. Inception-v3 is exercised with randomly initialised weights
(wiring only); the digits classifier is the shipped one.
"""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import Tensor, nn

from flowmap.data.base import to_uint8
from flowmap.data.digits import load_digits_split
from flowmap.io import UnsafeFileError
from flowmap.metrics import (
    INCEPTION_ENV_VAR,
    load_digits_classifier,
    mmd_rbf,
    sliced_wasserstein2,
    teacher_endpoint_error,
    wasserstein2,
)
from flowmap.metrics import digits_extractor as digits_module
from flowmap.metrics.digits_extractor import (
    DIGITS_FEATURE_EXTRACTOR_NAME,
    DIGITS_WEIGHTS_PATH,
    digits_classifier_accuracy,
    register_digits_feature_extractor,
)
from flowmap.metrics.extractors import UInt8ImageDataset
from flowmap.metrics.inception import (
    INCEPTION_WEIGHTS_FILENAME,
    check_weights_file,
    resolve_inception_weights,
)
from tests.fid_oracles import (
    DigitsFeatures,
    FeatureStatistics,
    fid_from_features,
    fid_of_generator,
    fid_torch_fidelity,
    frechet_distance,
    make_torchmetrics_fid,
    save_random_inception_weights,
)

FID_KEY = "frechet_inception_distance"
#: Relative tolerance at which torch-fidelity, torchmetrics and ``frechet_distance`` agree on
#: the same (digits) features; observed below 4e-7, asserted with a 25× margin.
FID_AGREEMENT_RTOL = 1e-5
#: Absolute tolerance for FIDs near zero (a set against itself); observed at most 3e-6.
FID_AGREEMENT_ATOL = 1e-4

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_digits_classifier.py"


def load_train_script() -> ModuleType:
    """Import ``scripts/train_digits_classifier.py`` (a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("train_digits_classifier", TRAIN_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="module")
def _single_threaded():
    """One BLAS / torch thread: on a shared 2-core machine, spinning thread pools (numpy's
    ``eigvals`` of a 128×128 matrix took 0.8 s under load) cost far more than they save."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


def assert_fid_close(a: float, b: float) -> None:
    assert abs(a - b) <= max(FID_AGREEMENT_RTOL * abs(b), FID_AGREEMENT_ATOL), (a, b)


# --------------------------------------------------------------------------------------------
# 2D / vector metrics


def test_wasserstein2_of_a_translation_is_the_shift():
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([0.7, -0.3], dtype=torch.float64)
    assert wasserstein2(x, x + shift) == pytest.approx(float(shift.norm()), rel=1e-9)
    # the LP optimum is 0 up to rounding (~1e-17), which the square root lifts to ~1e-8
    assert wasserstein2(x.numpy(), x.numpy()) == pytest.approx(0.0, abs=1e-7)


def test_wasserstein2_in_1d_is_sorted_matching():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((50, 1)), rng.exponential(size=(50, 1))
    expected = math.sqrt(np.mean((np.sort(x[:, 0]) - np.sort(y[:, 0])) ** 2))
    assert wasserstein2(x, y) == pytest.approx(expected, rel=1e-9)
    # unequal sizes: {0, 1} vs {0.5} moves half the mass 0.5 each way
    assert wasserstein2(np.array([[0.0], [1.0]]), np.array([[0.5]])) == pytest.approx(0.5)


def test_sliced_wasserstein2_of_a_translation():
    """SW2² = E_θ (θ·s)² = |s|²/d for a translation, so √d · SW2 ≈ W2 = |s|."""
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([0.6, 0.8])
    sw = sliced_wasserstein2(x, x + shift, n_projections=2048, seed=0)
    assert math.sqrt(2) * sw == pytest.approx(wasserstein2(x, x + shift), rel=0.03)
    assert sliced_wasserstein2(x, x + shift, seed=3) == sliced_wasserstein2(x, x + shift, seed=3)
    # in 1D every projection is ±1, so the sliced distance is exact
    x1, y1 = x[:, :1], x[:200, 1:] * 2 + 1
    assert sliced_wasserstein2(x1, y1, n_projections=4) == pytest.approx(wasserstein2(x1, y1))


def test_mmd_rbf_zero_on_identical_sets_and_grows_with_shift():
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    assert mmd_rbf(x, x) == pytest.approx(0.0, abs=1e-12)
    values = [mmd_rbf(x, x + d) for d in (0.1, 0.5, 2.0)]
    assert 0 < values[0] < values[1] < values[2]
    y = torch.randn(150, 2, generator=torch.Generator().manual_seed(1))
    assert mmd_rbf(x, y) == pytest.approx(mmd_rbf(y, x), rel=1e-12)
    assert mmd_rbf(x, y) < values[1]  # two samples of the same law are close


def test_teacher_endpoint_error():
    x = torch.zeros(3, 2)
    ref = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]])
    assert teacher_endpoint_error(x, ref) == pytest.approx(2.0)
    images = torch.ones(2, 1, 2, 2)
    assert teacher_endpoint_error(images, torch.zeros_like(images)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="same shape"):
        teacher_endpoint_error(torch.zeros(3, 2), torch.zeros(4, 2))


@pytest.mark.parametrize(
    "call",
    [
        lambda: wasserstein2(torch.zeros(5), torch.zeros(5, 1)),
        lambda: wasserstein2(torch.zeros(5, 2), torch.zeros(5, 3)),
        lambda: sliced_wasserstein2(torch.full((3, 2), float("nan")), torch.zeros(3, 2)),
        lambda: sliced_wasserstein2(torch.zeros(3, 2), torch.zeros(3, 2), n_projections=0),
        lambda: mmd_rbf(torch.zeros(3, 2), torch.zeros(3, 2), bandwidths=(1.0, -1.0)),
    ],
)
def test_two_d_metrics_reject_bad_input(call):
    with pytest.raises(ValueError):
        call()


# --------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    sigma = a @ a.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    # equal covariances: only the means count
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2))
    # commuting (diagonal) covariances: Σ (√a − √b)²
    d1, d2 = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    expected = np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert frechet_distance(mu1, np.diag(d1), mu1, np.diag(d2)) == pytest.approx(expected)
    # general case against scipy's sqrtm; and a singular covariance stays finite and >= 0
    b = rng.standard_normal((6, 6))
    sigma2 = b @ b.T
    covmean = scipy.linalg.sqrtm(sigma @ sigma2).real
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(sigma + sigma2 - 2 * covmean)
    assert frechet_distance(mu1, sigma, mu2, sigma2) == pytest.approx(ref, rel=1e-8)
    singular = np.outer(mu1, mu1)
    assert frechet_distance(mu1, singular, mu1, singular) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="matrices"):
        frechet_distance(mu1, sigma[:5, :5], mu2, sigma)


def test_feature_statistics_roundtrip(tmp_path):
    f = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    stats = FeatureStatistics.from_features(f)
    assert stats.n == 50
    np.testing.assert_allclose(stats.sigma, np.cov(f.double().numpy(), rowvar=False))
    stats.save(tmp_path / "s.npz")
    loaded = FeatureStatistics.load(tmp_path / "s.npz")
    assert loaded.n == 50 and loaded.frechet_distance(stats) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        FeatureStatistics.from_features(f[:1])


# --------------------------------------------------------------------------------------------
# Digits extractor and FID on digits


@pytest.fixture(scope="module")
def digits_uint8() -> tuple[Tensor, Tensor]:
    x_train, _, x_test, _ = load_digits_split()
    return to_uint8(x_train), to_uint8(x_test)


@pytest.fixture(scope="module")
def digits_features() -> DigitsFeatures:
    return DigitsFeatures()


def test_shipped_digits_weights_load_safely_and_reach_stated_accuracy():
    state = torch.load(DIGITS_WEIGHTS_PATH, map_location="cpu", weights_only=True)
    assert all(isinstance(v, Tensor) for v in state.values())
    meta = json.loads(DIGITS_WEIGHTS_PATH.with_suffix(".json").read_text())
    assert {"seed", "test_accuracy", "torch_version", "command"} <= set(meta)
    assert meta["command"].split(" --")[0] == "python scripts/train_digits_classifier.py"
    assert meta["test_accuracy"] >= 0.97
    model = load_digits_classifier()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    _, _, x_test, y_test = load_digits_split()
    accuracy = digits_classifier_accuracy(model, x_test, y_test)
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(meta["test_accuracy"], abs=1.5 / len(y_test))


def test_digits_training_is_seeded_and_cli_writes_weights(tmp_path):
    script = load_train_script()
    out = tmp_path / "w" / "digits.pt"
    script.main(["--out", str(out), "--epochs", "1", "--min-accuracy", "0"])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["seed"] == 0 and "--epochs 1" in meta["command"]
    assert meta["command"].startswith("python scripts/train_digits_classifier.py ")
    model, accuracy = script.train_digits_classifier(seed=0, epochs=1)
    assert accuracy == meta["test_accuracy"]
    loaded = load_digits_classifier(out)
    assert loaded.feature_dim == 128
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_digits_features_conventions(digits_uint8, digits_features):
    images = digits_uint8[1][:20]
    feats = digits_features(images)
    assert feats.shape == (20, digits_features.num_features)
    rgb = images.expand(-1, 3, -1, -1)
    torch.testing.assert_close(digits_features(rgb), feats)
    # float input in [0, 1] (torchmetrics' normalize=True convention) gives the same features
    torch.testing.assert_close(digits_features(images.float() / 255), feats, atol=1e-4, rtol=1e-4)
    model_space = DigitsFeatures(float_range=(-1.0, 1.0))
    torch.testing.assert_close(model_space(images.float() / 127.5 - 1), feats, atol=1e-4, rtol=0)
    digits_features.train()
    assert not digits_features.training and not digits_features.model.training
    with pytest.raises(ValueError, match="8, 8"):
        digits_features(torch.zeros(2, 1, 9, 9, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8 or float"):
        digits_features(torch.zeros(2, 1, 8, 8, dtype=torch.int64))


def test_register_digits_feature_extractor_is_idempotent():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    assert register_digits_feature_extractor() == DIGITS_FEATURE_EXTRACTOR_NAME
    assert register_digits_feature_extractor() == DIGITS_FEATURE_EXTRACTOR_NAME
    assert FEATURE_EXTRACTORS_REGISTRY[DIGITS_FEATURE_EXTRACTOR_NAME] is (
        digits_module.DigitsFeatureExtractor
    )


def test_fid_self_is_zero_and_grows_with_a_shift(digits_uint8, digits_features):
    _, ref = digits_uint8
    assert fid_torch_fidelity(ref, ref, "flowmap-digits")[FID_KEY] == pytest.approx(0, abs=1e-3)
    shifted = [
        fid_torch_fidelity(to_uint8(ref / 127.5 - 1 + delta), ref, "flowmap-digits")[FID_KEY]
        for delta in (0.1, 0.2, 0.4)
    ]
    assert 0.5 < shifted[0] < shifted[1] < shifted[2]
    # additive noise of growing scale, through the features route
    base = ref.float() / 127.5 - 1
    noise = torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
    f_ref = digits_features(ref)
    fids = [
        fid_from_features(digits_features(to_uint8(base + s * noise)), f_ref)
        for s in (0, 0.1, 0.2, 0.4)
    ]
    assert fids[0] == pytest.approx(0.0, abs=1e-9)
    assert all(a < b for a, b in zip(fids, fids[1:]))


def test_torch_fidelity_and_torchmetrics_agree_on_digits(digits_uint8, digits_features):
    """Digits floor (train split vs test split) and agreement of the three routes."""
    train, test = digits_uint8
    fidelity = fid_torch_fidelity(train, test, "flowmap-digits")[FID_KEY]
    metric = make_torchmetrics_fid(DigitsFeatures())
    metric.update(test, real=True)
    metric.update(train, real=False)
    torchmetrics_value = float(metric.compute())
    direct = fid_from_features(digits_features(train), digits_features(test))
    assert 1.0 < direct < 50.0  # the data-vs-data floor (17.33 with the shipped weights)
    assert_fid_close(fidelity, direct)
    assert_fid_close(torchmetrics_value, direct)
    # real statistics survive reset(); a set against itself is ~0 on every route
    metric.reset()
    metric.update(test, real=False)
    assert_fid_close(float(metric.compute()), 0.0)
    assert_fid_close(fid_torch_fidelity(test, test, "flowmap-digits")[FID_KEY], 0.0)


def test_kid_subset_size_follows_sample_counts(digits_uint8):
    train, test = digits_uint8
    with pytest.warns(UserWarning, match="KID uses subsets of 50"):
        out = fid_torch_fidelity(train[:80], test[:50], "flowmap-digits", kid=True, kid_subsets=5)
    assert out["kid_subset_size"] == 50 and math.isfinite(out["kernel_inception_distance_mean"])
    with pytest.raises(ValueError, match="kid_subset_size"):
        fid_torch_fidelity(train[:80], test[:50], "flowmap-digits", kid=True, kid_subset_size=60)


def test_reference_cache_is_reused(digits_uint8, tmp_path):
    train, test = digits_uint8
    kwargs = dict(reference_cache_name="digits-test", cache_root=tmp_path)
    first = fid_torch_fidelity(train[:200], test, "flowmap-digits", **kwargs)[FID_KEY]
    assert any(p.name.startswith("digits-test-flowmap-digits-stat-fid") for p in tmp_path.iterdir())
    # a different reference under the same cache name is ignored: the cached stats are used
    again = fid_torch_fidelity(train[:200], train[200:400], "flowmap-digits", **kwargs)[FID_KEY]
    assert again == first


def test_fid_of_generator_matches_the_dataset_route(digits_uint8):
    train, test = digits_uint8
    samples = train[:300]

    class Replay(nn.Module):
        """Ignores the noise and replays ``samples`` in order (1 channel, uint8)."""

        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))
            self.pos = 0

        def forward(self, z: Tensor) -> Tensor:
            out = samples[self.pos : self.pos + len(z)]
            self.pos += len(z)
            return out

    gen = Replay().train()
    value = fid_of_generator(gen, 16, len(samples), test, "flowmap-digits", batch_size=64)
    assert gen.training  # the caller's mode is restored
    assert value[FID_KEY] == pytest.approx(
        fid_torch_fidelity(samples, test, "flowmap-digits")[FID_KEY], rel=1e-9
    )


def test_fid_inputs_are_validated(digits_uint8):
    _, test = digits_uint8
    with pytest.raises(TypeError, match="uint8"):
        fid_torch_fidelity(test.float(), test, "flowmap-digits")
    with pytest.raises(ValueError, match="at least 2"):
        fid_torch_fidelity(test[:1], test, "flowmap-digits")
    with pytest.raises(ValueError, match="named arguments"):
        fid_torch_fidelity(test, test, "flowmap-digits", cuda=True)
    assert UInt8ImageDataset(test)[0].shape == (3, 8, 8)


# --------------------------------------------------------------------------------------------
# Inception-v3: weights resolution, safety, and wiring with random weights


@pytest.fixture
def no_inception(monkeypatch, tmp_path):
    """An empty torch hub dir and no environment variable."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.delenv(INCEPTION_ENV_VAR, raising=False)
    return hub


def test_missing_inception_weights_fail_fast(no_inception, tmp_path, monkeypatch, digits_uint8):
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILENAME) as err:
        resolve_inception_weights()
    assert str(no_inception / "checkpoints" / INCEPTION_WEIGHTS_FILENAME) in str(err.value)
    assert "offline" in str(err.value)
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILENAME):
        make_torchmetrics_fid(2048)
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILENAME):
        fid_torch_fidelity(images, images, "inception-v3-compat")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        resolve_inception_weights(tmp_path / "nowhere.pth")
    monkeypatch.setenv(INCEPTION_ENV_VAR, str(tmp_path / "env.pth"))
    with pytest.raises(FileNotFoundError, match=INCEPTION_ENV_VAR):
        resolve_inception_weights()


def test_inception_weights_resolution_order(no_inception, tmp_path, monkeypatch):
    hub_file = no_inception / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"")
    assert resolve_inception_weights() == hub_file
    env_file = tmp_path / "env.pth"
    env_file.write_bytes(b"")
    monkeypatch.setenv(INCEPTION_ENV_VAR, str(env_file))
    assert resolve_inception_weights() == env_file
    explicit = tmp_path / "explicit.pth"
    explicit.write_bytes(b"")
    assert resolve_inception_weights(explicit) == explicit


class _Payload:
    """Unpickling this runs ``open(marker, "w")``, i.e. creates ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_weights_file_with_pickle_payload_is_refused(tmp_path, digits_uint8):
    marker = tmp_path / "pwned"
    bad = tmp_path / INCEPTION_WEIGHTS_FILENAME
    torch.save({"Conv2d_1a_3x3.conv.weight": _Payload(str(marker))}, bad)
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(UnsafeFileError, match="never unpickles"):
        check_weights_file(bad)
    with pytest.raises(UnsafeFileError, match="never unpickles"):
        make_torchmetrics_fid(64, weights_path=bad)
    with pytest.raises(UnsafeFileError, match="never unpickles"):
        fid_torch_fidelity(
            images, images, "inception-v3-compat", feature_extractor_weights_path=str(bad)
        )
    with pytest.raises(UnsafeFileError, match="never unpickles"):
        fid_torch_fidelity(
            digits_uint8[1], digits_uint8[1], "flowmap-digits", feature_extractor_weights_path=bad
        )
    with pytest.raises(UnsafeFileError, match="never unpickles"):
        load_digits_classifier(bad)
    assert not marker.exists()
    # the payload is live: an unrestricted load (what torch-fidelity itself does) runs it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(bad, weights_only=False)
    assert marker.exists()


@pytest.mark.slow
def test_random_inception_weights_wiring(no_inception, tmp_path):
    """Through the hub-cache lookup: torch-fidelity and torchmetrics give the same finite FID."""
    hub_file = no_inception / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    save_random_inception_weights(hub_file, seed=0)
    assert torch.load(hub_file, weights_only=True)["fc.weight"].shape == (1008, 2048)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
    b[:, 0] //= 2  # a visible difference in one channel
    fidelity = fid_torch_fidelity(a, b, "inception-v3-compat", feature_layer_fid="64")[FID_KEY]
    metric = make_torchmetrics_fid(64)
    metric.update(b, real=True)
    metric.update(a, real=False)
    torchmetrics_value = float(metric.compute())
    assert math.isfinite(fidelity) and fidelity > 0
    # float32 (torch-fidelity) vs float64 (torchmetrics after set_dtype) Inception forward
    assert torchmetrics_value == pytest.approx(fidelity, rel=1e-4)
