"""The one evaluation path: intervals that cover, KID and precision/recall against hand
computations, reference features cached by content, clear errors on too few samples."""

import numpy as np
import pytest
import torch

from flowmap.data.base import to_uint8
from flowmap.data.digits import load_digits_split
from flowmap.data.toy2d import Toy2DDataModule
from flowmap.metrics import (
    FEATURE_EXTRACTORS,
    Evaluator,
    FeatureExtractor,
    default_feature_extractor,
    jackknife_interval,
    kernel_distance,
    precision_recall,
    t_interval,
)
from tests.fid_oracles import DigitsFeatures, fid_torch_fidelity, frechet_distance


def _fid_to_standard_normal(x: np.ndarray) -> float:
    """Fréchet distance of the sample statistics of ``x`` to the exact N(0, I)."""
    d = x.shape[1]
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), np.zeros(d), np.eye(d))


def _jackknife_fid(x: np.ndarray, groups: int):
    parts = np.array_split(np.arange(len(x)), groups)
    loo = [_fid_to_standard_normal(np.delete(x, p, axis=0)) for p in parts]
    return jackknife_interval(_fid_to_standard_normal(x), loo)


def test_jackknife_interval_of_a_frechet_distance_covers_the_closed_form_and_shrinks():
    # samples of N(m, I) against the exact N(0, I): the true Fréchet distance is |m|² = 1
    rng = np.random.default_rng(0)
    shift = np.array([0.6, 0.8])
    trials, covered, widths = 300, 0, {400: [], 1600: []}
    for i in range(trials):
        e = _jackknife_fid(rng.standard_normal((400, 2)) + shift, groups=10)
        covered += e.ci_low <= 1.0 <= e.ci_high
        widths[400].append(e.half_width)
        if i < 40:
            widths[1600].append(
                _jackknife_fid(rng.standard_normal((1600, 2)) + shift, 10).half_width
            )
    assert 0.90 <= covered / trials <= 0.99, covered / trials
    # the interval shrinks like 1/sqrt(n): 4× the samples, about half the width
    ratio = np.mean(widths[1600]) / np.mean(widths[400])
    assert 0.4 < ratio < 0.62, ratio


def test_t_interval_over_groups_covers_the_mean_of_a_skewed_metric():
    # per-sample distances are exponential (skewed); groups of 50 are the replicates
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(400):
        d = rng.exponential(2.0, size=500)
        e = t_interval([g.mean() for g in np.array_split(d, 10)])
        covered += e.ci_low <= 2.0 <= e.ci_high
        assert e.n_seeds == 10 and e.method == "replicates"
    assert 0.91 <= covered / 400 <= 0.985


def test_interval_inputs_are_checked():
    with pytest.raises(ValueError, match="at least 2 replicates"):
        t_interval([1.0])
    with pytest.raises(ValueError, match="non-finite"):
        t_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="finite full-sample value"):
        jackknife_interval(float("inf"), [1.0, 2.0])


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randn(9, 4, generator=g, dtype=torch.float64) + 0.5

    def k(a, b):
        return (a @ b.T / a.shape[1] + 1) ** 3

    # with m = 9 (the smaller set), each subset is 9 of x and all of y; do it by hand
    rng = np.random.RandomState(3)
    by_hand = []
    for _ in range(5):
        xs = x[torch.as_tensor(rng.choice(12, 9, replace=False))]
        ys = y[torch.as_tensor(rng.choice(9, 9, replace=False))]
        kxx, kyy, kxy = k(xs, xs), k(ys, ys), k(xs, ys)
        m = 9
        mmd = (
            (kxx.sum() - kxx.diag().sum()) / (m * (m - 1))
            + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
            - 2 * kxy.mean()
        )
        by_hand.append(float(mmd))
    assert kernel_distance(x, y, subsets=5, seed=3) == pytest.approx(np.mean(by_hand), rel=1e-9)


def test_precision_and_recall_match_a_hand_computation():
    real = torch.tensor([[0.0, 0], [1, 0], [0, 1], [1, 1], [0.5, 0.5]])
    fake = torch.tensor([[0.1, 0.1], [0.9, 0.9], [5.0, 5.0], [0.5, 0.4], [4.0, 4.0]])

    def covered(points, centres, k=3):
        d_cc = torch.cdist(centres, centres)
        radius = d_cc.sort(dim=1).values[:, k]  # k-th neighbour, self excluded
        return (torch.cdist(points, centres) <= radius).any(dim=1).float().mean().item()

    got = precision_recall(fake, real)
    assert got["precision"] == pytest.approx(covered(fake, real))
    assert got["recall"] == pytest.approx(covered(real, fake))
    assert got["precision"] == pytest.approx(3 / 5)  # the two far points are off the manifold
    with pytest.raises(ValueError, match="3 nearest neighbours"):
        precision_recall(fake[:3], real)


def test_vector_evaluator_metrics_are_per_group_with_intervals():
    dm = Toy2DDataModule("8gaussians", batch_size=64)
    ev = Evaluator.for_datamodule(dm, 400, groups=4, seed=0)
    good = dm.reference_samples(400, "test", 1)
    bad = good * 0.5
    m_good, m_bad = ev.measure(good, good + 0.1), ev.measure(bad)
    est = m_good.estimates()
    assert set(est) == {"w2", "precision", "recall", "endpoint"}
    assert est["endpoint"].value == pytest.approx(0.1 * np.sqrt(2), rel=1e-4)
    assert all(e.n_seeds == 4 and e.ci_low <= e.value <= e.ci_high for e in est.values())
    assert m_bad.estimates()["w2"].ci_low > est["w2"].ci_high  # a shrunk mixture is worse
    ratio = m_bad.ratio(m_good, "w2")
    assert ratio.value > 1 and ratio.ci_low > 1
    with pytest.raises(ValueError, match="counts must match"):
        ev.measure(good[:200])
    with pytest.raises(ValueError, match="another dataset"):
        ev.measure(torch.zeros(400, 3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        ev.measure(torch.full((400, 2), float("nan")))
    with pytest.raises(ValueError, match="too few for 4 groups"):
        Evaluator(good[:12], groups=4)
    with pytest.raises(ValueError, match="at least 2"):
        Evaluator(good, groups=1)


def test_digits_evaluator_fid_matches_torch_fidelity_and_caches_reference_features(tmp_path):
    x_train, _, _, _ = load_digits_split()
    real, fake = to_uint8(x_train[:300]), to_uint8(x_train[300:500])
    ev = Evaluator(real, groups=4, cache_dir=tmp_path)
    cached = list(tmp_path.glob("reference-flowmap-digits-*.npz"))
    assert len(cached) == 1
    m = ev.measure(fake)
    fid = m.estimates()["fid"]
    expected = fid_torch_fidelity(fake, real, "flowmap-digits")["frechet_inception_distance"]
    assert fid.value == pytest.approx(expected, rel=1e-4)
    assert fid.method == "jackknife" and fid.ci_low < fid.value < fid.ci_high
    assert set(m.estimates()) == {"fid", "kid", "precision", "recall"}
    # model-space floats and their uint8 pixels are the same samples to the metrics
    same = ev.measure(fake.float() / 127.5 - 1).estimates()["fid"].value
    assert same == pytest.approx(fid.value, rel=1e-9)
    # the cache is read (not recomputed) and keyed by content: other images, another file
    Evaluator(real, groups=4, cache_dir=tmp_path)
    assert list(tmp_path.glob("reference-flowmap-digits-*.npz")) == cached
    Evaluator(to_uint8(torch.zeros(300, 1, 8, 8)), groups=4, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("reference-flowmap-digits-*.npz"))) == 2


def test_feature_extractor_registry_names_loads_and_refuses():
    assert set(FEATURE_EXTRACTORS) == {"flowmap-digits", "inception-v3-compat"}
    assert default_feature_extractor((1, 8, 8)) == "flowmap-digits"
    assert default_feature_extractor((3, 32, 32)) == "inception-v3-compat"
    with pytest.raises(ValueError, match="Unknown feature extractor 'nope'; use 'flowmap-digits'"):
        FeatureExtractor("nope")
    with pytest.raises(ValueError, match="Unknown feature extractor"):
        Evaluator(torch.zeros(20, 1, 8, 8, dtype=torch.uint8), groups=2, feature="nope")
    # the registered digits extractor gives the oracle's features of the same images
    images = to_uint8(load_digits_split()[2][:50])
    digits = FeatureExtractor("flowmap-digits")
    assert digits.layer == "features"
    feats = digits(images)
    assert feats.dtype == torch.float64 and feats.shape == (50, 128)
    torch.testing.assert_close(feats, DigitsFeatures()(images).double(), rtol=1e-5, atol=1e-5)
