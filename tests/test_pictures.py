"""The quality-vs-steps figure: fixed colours per method, a linear axis that marks off-scale values,
and a floor that says what it is."""

import matplotlib.pyplot as plt
import pytest
from matplotlib.colors import to_hex

from flowmap.apps.pictures import (
    METHOD_STYLES,
    method_style,
    quality_vs_steps_figure,
    quality_vs_steps_plot,
)


def _est(value, half=None):
    half = 0.05 * value if half is None else half
    return {
        "value": value,
        "ci_low": value - half,
        "ci_high": value + half,
        "n_seeds": 10,
        "interval": "replicates",
    }


def _results(curves, floor=(17.0, 14.0), metric="fid"):
    """A report's ``results`` dict from ``{method: {nfe: value}}`` (endpoint = value / 100)."""
    rows = []
    for method, points in curves.items():
        for nfe, v in points.items():
            metrics = {metric: _est(v)}
            if method != "teacher/dopri5":
                metrics["endpoint"] = _est(v / 100)
            rows.append({"method": method, "nfe": nfe, **_est(v), "metrics": metrics})
    return {
        "dataset": "synthetic",
        "metric": metric,
        "n_samples": 1000,
        "groups": 10,
        "group_size": 100,
        "floor": _est(floor[0], floor[1]),
        "rows": rows,
    }


DIGITS_LIKE = {  # shaped like benchmarks/results/digits: Euler at 1 step is 1350, the rest 5-30
    "teacher/euler": {1: 1350.0, 2: 247.0, 4: 57.6, 8: 19.0, 16: 9.9, 32: 7.1},
    "teacher/heun": {2: 755.0, 4: 80.0, 8: 17.9, 16: 8.1, 32: 6.0},
    "teacher/dopri5": {92: 5.2},
    "flowmap/lagrangian": {1: 19.0, 2: 9.5, 4: 7.0, 8: 5.4},
    "flowmap/eulerian": {1: 26.0, 2: 15.7, 4: 10.8, 8: 6.6},
    "flowmap/semigroup": {1: 28.7, 2: 16.1, 4: 10.8, 8: 6.7},
}


def _colours(ax):
    """``label → colour`` of every error-bar series drawn on ``ax``."""
    return {c.get_label(): to_hex(c.lines[0].get_color()) for c in ax.containers}


@pytest.fixture
def figure():
    made = []

    def make(results):
        fig, axes = quality_vs_steps_figure(results)
        made.append(fig)
        return fig, axes

    yield make
    for fig in made:
        plt.close(fig)


def test_a_method_keeps_its_colour_and_marker_across_reports(figure):
    one = _results(DIGITS_LIKE)
    other = _results(
        {
            "flowmap/my-new-loss": {1: 12.0, 2: 8.0},
            "teacher/rk4": {4: 30.0, 8: 7.0},
            "flowmap/lagrangian": {1: 20.0, 2: 10.0},
        }
    )
    one["rows"] += _results({"flowmap/my-new-loss": {1: 11.0}})["rows"]
    _, (ax_one, end_one) = figure(one)
    _, (ax_other, end_other) = figure(other)
    a, b = _colours(ax_one), _colours(ax_other)
    assert (
        a["flowmap/lagrangian"]
        == b["flowmap/lagrangian"]
        == to_hex(METHOD_STYLES["flowmap/lagrangian"][0])
    )
    assert a["flowmap/my-new-loss"] == b["flowmap/my-new-loss"]  # an unknown name: hashed
    assert _colours(end_one)["flowmap/lagrangian"] == a["flowmap/lagrangian"]  # both panels
    known = {to_hex(c) for c, _ in METHOD_STYLES.values()}
    for name in ("flowmap/my-new-loss", "flowmap/lagrangian-eta0.5", "x", "teacher/ssp3"):
        assert to_hex(method_style(name)[0]) not in known
    assert method_style("eulerian") == METHOD_STYLES["flowmap/eulerian"]
    assert method_style("euler") == METHOD_STYLES["teacher/euler"]
    assert len({c for c, _ in METHOD_STYLES.values()}) == len(METHOD_STYLES) - 1  # dopri5 alias


def test_the_metric_axis_is_linear_and_marks_values_above_it(figure):
    _, (ax, ax_end) = figure(_results(DIGITS_LIKE))
    assert ax.get_yscale() == "linear"
    bottom, top = ax.get_ylim()
    assert bottom == 0
    # the top is set by the flow maps (semigroup at one step, 28.7 + its interval) and the teacher
    # rows within 3x of its adaptive solve; Euler's 1350 and 247, Heun's 755 are far above it
    assert 28.7 * 1.05 <= top < 57.6
    texts = {t.get_text() for t in ax.texts}
    assert {"1350", "247", "755", "57.6", "80"} <= texts
    assert "19" not in texts and "9.9" not in texts  # rows inside the axis are not annotated
    marks = [ln for ln in ax.lines if ln.get_marker() == "^"]
    assert len(marks) == 5 and all(ln.get_ydata()[0] == top for ln in marks)
    assert ax_end.get_yscale() == "log" and "endpoint" in ax_end.get_ylabel()


def test_nothing_is_clipped_when_every_row_is_comparable(figure):
    curves = {
        "teacher/euler": {1: 0.6, 2: 0.4},
        "teacher/dopri5": {68: 0.28},
        "flowmap/lagrangian": {1: 0.29, 2: 0.28},
    }
    fig, (ax, _) = figure(_results(curves, floor=(0.27, 0.03), metric="w2"))
    assert ax.get_ylim()[1] >= 0.6 * 1.05
    assert not [ln for ln in ax.lines if ln.get_marker() == "^"] and not ax.texts
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert not any("above the axis" in t for t in labels)


def test_the_floor_is_explained_in_the_legend_and_the_caption(figure, tmp_path):
    fig, _ = figure(_results(DIGITS_LIKE))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    floor = [t for t in labels if t.startswith("floor")]
    assert floor == ["floor: held-out data vs data (noise level, not a bound)"]
    assert any("above the axis" in t for t in labels)
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "95% intervals" in caption and "Floor" in caption and "not a lower bound" in caption
    path = quality_vs_steps_plot(_results(DIGITS_LIKE), tmp_path / "fid_vs_steps.png")
    assert path == tmp_path / "fid_vs_steps.png" and path.stat().st_size > 0
