"""The FID/W2-vs-steps report on tiny checkpoints: files, schema, rows, resume, bad requests."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import flowmap.apps.report as report
from flowmap.training.checkpoints import CheckpointError


def _run(toy_teacher, toy_flowmap, out, *extra):
    return report.main(
        [
            "--teacher",
            str(toy_teacher[1]),
            "--flowmap",
            str(toy_flowmap),
            "--out",
            str(out),
            "--n-samples",
            "200",
            "--nfe",
            "1",
            "2",
            "4",
            "--solvers",
            "euler",
            "heun",
            *extra,
        ]
    )


def test_report_writes_its_files_with_the_right_rows(toy_teacher, toy_flowmap, tmp_path):
    res = _run(toy_teacher, toy_flowmap, tmp_path, "--save-samples")
    for name in ("report.md", "fid_vs_steps.png", "results.json", "samples.npz"):
        assert (tmp_path / name).stat().st_size > 0, name
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    for key, typ in [
        ("dataset", str),
        ("metric", str),
        ("n_samples", int),
        ("floor", float),
        ("rows", list),
        ("command", str),
        ("machine", str),
        ("versions", dict),
        ("seed", int),
    ]:
        assert isinstance(on_disk[key], typ), key
    assert on_disk["metric"] == "w2" and on_disk["n_samples"] == 200
    got = {(r["method"], r["nfe"]) for r in on_disk["rows"]}
    expected = {("teacher/euler", n) for n in (1, 2, 4)} | {
        ("teacher/heun", 2),
        ("teacher/heun", 4),
    }
    expected |= {("flowmap/lagrangian", n) for n in (1, 2, 4)}
    adaptive = [r for r in on_disk["rows"] if r["method"] == "teacher/dopri5"]
    assert got - {("teacher/dopri5", adaptive[0]["nfe"])} == expected
    assert adaptive[0]["nfe"] > 4  # the NFE dopri5 actually used
    assert all(np.isfinite(r["value"]) and r["value"] > 0 for r in on_disk["rows"])
    # more Euler steps of the teacher get closer to the data than one
    euler = {r["nfe"]: r["value"] for r in on_disk["rows"] if r["method"] == "teacher/euler"}
    assert euler[4] < euler[1]
    samples = np.load(tmp_path / "samples.npz", allow_pickle=False)
    assert set(samples.files) == {f"{m}@{n}" for m, n in got} | {"data"}
    assert samples["flowmap/lagrangian@2"].shape == (200, 2)
    md = (tmp_path / "report.md").read_text()
    assert "teacher/heun at NFE 1" in md and "| flowmap/lagrangian |" in md


def test_a_killed_report_resumes_with_finished_rows(
    toy_teacher, toy_flowmap, tmp_path, monkeypatch
):
    class Killed(Exception):
        pass

    calls, resumed = [], False
    real = report.Metric.__call__

    def flaky(self, samples):
        calls.append(1)
        if len(calls) == 4 and not resumed:
            raise Killed  # the run dies during the fourth evaluation
        return real(self, samples)

    monkeypatch.setattr(report.Metric, "__call__", flaky)
    with pytest.raises(Killed):
        _run(toy_teacher, toy_flowmap, tmp_path)
    assert len(list((tmp_path / "rows").glob("*.npz"))) == 3
    calls.clear()
    resumed = True
    res = _run(toy_teacher, toy_flowmap, tmp_path)
    # 1 floor + 9 rows = 10 evaluations in all; the 3 finished ones are not redone
    assert len(calls) == 10 - 3 and len(res["rows"]) == 9
    # a changed flow-map checkpoint invalidates its rows (and only those)
    calls.clear()
    st = Path(toy_flowmap).stat()
    os.utime(toy_flowmap, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _run(toy_teacher, toy_flowmap, tmp_path)
    assert len(calls) == 3


@pytest.mark.parametrize(
    "extra,err,match",
    [
        (["--nfe", "3"], ValueError, "heun uses 2 NFE per step and cannot take NFE 3"),
        (["--nfe", "0"], ValueError, "NFE must be at least 1"),
    ],
)
def test_report_refuses_impossible_requests_early(
    toy_teacher, toy_flowmap, tmp_path, extra, err, match
):
    with pytest.raises(err, match=match):
        _run(toy_teacher, toy_flowmap, tmp_path, *extra)
    assert not list((tmp_path / "rows").glob("*.npz"))  # nothing was computed


def test_report_refuses_a_flow_map_as_teacher(toy_flowmap, tmp_path):
    with pytest.raises(CheckpointError, match="is a FlowMapModule checkpoint"):
        report.main(["--teacher", str(toy_flowmap), "--out", str(tmp_path)])


def test_console_subcommands_sample_and_report_exit_cleanly(toy_teacher, toy_flowmap, tmp_path):
    from flowmap.apps.cli import main

    assert (
        main(
            [
                "sample",
                "--ckpt",
                str(toy_flowmap),
                "--nfe",
                "2",
                "--n",
                "50",
                "--out",
                str(tmp_path / "s.npz"),
            ]
        )
        is None
    )
    z = np.load(tmp_path / "s.npz", allow_pickle=False)
    assert z["samples"].shape == (50, 2) and np.isfinite(z["samples"]).all()
    assert (
        main(
            [
                "sample",
                "--ckpt",
                str(toy_teacher[1]),
                "--nfe",
                "4",
                "--method",
                "heun",
                "--n",
                "20",
                "--out",
                str(tmp_path / "t.npz"),
            ]
        )
        is None
    )
    assert (
        main(
            [
                "report",
                "--teacher",
                str(toy_teacher[1]),
                "--out",
                str(tmp_path / "r"),
                "--nfe",
                "1",
                "--solvers",
                "euler",
                "--n-samples",
                "50",
            ]
        )
        is None
    )
    assert (tmp_path / "r" / "results.json").exists()
