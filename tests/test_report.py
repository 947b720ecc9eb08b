"""The FID/W2-vs-steps report on tiny checkpoints: files, schema, rows, resume, bad requests."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import flowmap.apps.report as report
from flowmap.apps.report.setting import build_datamodule
from flowmap.metrics.evaluation import Evaluator
from flowmap.training.checkpoints import CheckpointError, read_checkpoint
from tests.helpers import TINY, fails, fit_cli

TEACHER = "recipes/toy2d/teacher.yaml"


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
            "--groups",
            "4",
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


@pytest.mark.slow
def test_report_writes_its_files_with_the_right_rows(toy_teacher, toy_flowmap, tmp_path, capsys):
    capsys.readouterr()
    res = _run(toy_teacher, toy_flowmap, tmp_path, "--save-samples")
    said = capsys.readouterr().out  # a standalone report ends with its headline table
    assert "W2 on 8gaussians (200 samples per row in 4 groups of 50" in said
    assert "flow map, lagrangian" in said and f"Files: {tmp_path / 'report.md'}" in said
    for name in (
        "report.md",
        "w2_vs_steps.png",
        "samples_grid.png",
        "results.json",
        "samples.npz",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    for key, typ in [
        ("dataset", str),
        ("metric", str),
        ("n_samples", int),
        ("groups", int),
        ("floor", dict),
        ("floor_sets", str),
        ("rows", list),
        ("command", str),
        ("machine", str),
        ("versions", dict),
        ("seed", int),
    ]:
        assert isinstance(on_disk[key], typ), key
    assert on_disk["metric"] == "w2" and on_disk["n_samples"] == 200 and on_disk["groups"] == 4
    got = {(r["method"], r["nfe"]) for r in on_disk["rows"]}
    expected = {("teacher/euler", n) for n in (1, 2, 4)} | {
        ("teacher/heun", 2),
        ("teacher/heun", 4),
    }
    expected |= {("flowmap/lagrangian", n) for n in (1, 2, 4)}
    adaptive = [r for r in on_disk["rows"] if r["method"] == "teacher/dopri5"]
    assert got - {("teacher/dopri5", adaptive[0]["nfe"])} == expected
    assert adaptive[0]["nfe"] > 4  # the NFE dopri5 actually used
    for r in on_disk["rows"]:  # every row: a value inside its own 95% interval from 4 groups
        assert r["ci_low"] < r["value"] < r["ci_high"] and r["n_seeds"] == 4
        assert {"w2", "precision", "recall"} <= set(r["metrics"])
        if r["method"] != "teacher/dopri5":
            assert r["metrics"]["endpoint"]["value"] > 0 and "ratio_to_teacher" in r
    # more Euler steps of the teacher get closer to the data and to the teacher's endpoint
    euler = {r["nfe"]: r for r in on_disk["rows"] if r["method"] == "teacher/euler"}
    assert euler[4]["ci_high"] < euler[1]["ci_low"]
    assert euler[4]["metrics"]["endpoint"]["value"] < euler[1]["metrics"]["endpoint"]["value"]
    assert euler[1]["ratio_to_teacher"]["ci_low"] > 1
    with np.load(tmp_path / "samples.npz", allow_pickle=False) as z:
        index = json.loads(str(z["index"]))
        arrays = {r["method"] + "@" + str(r["nfe"]): z[r["array"]] for r in index["rows"]}
        assert set(arrays) == {f"{m}@{n}" for m, n in got}
        assert arrays["flowmap/lagrangian@2"].shape == (200, 2)
        assert z["reference"].shape == (200, 2) and z["floor"].shape == (200, 2)
    md = (tmp_path / "report.md").read_text()
    assert "teacher/heun at NFE 1" in md and "| flowmap/lagrangian |" in md
    assert "samples_grid.png" in md and " ± " in md


@pytest.mark.slow
def test_a_report_recomputed_from_its_samples_alone_reproduces_it(
    toy_teacher, toy_flowmap, tmp_path
):
    first = _run(toy_teacher, toy_flowmap, tmp_path / "a", "--save-samples")
    again = report.main(
        ["--from-samples", str(tmp_path / "a" / "samples.npz"), "--out", str(tmp_path / "b")]
    )
    assert len(again["rows"]) == len(first["rows"])
    for r1, r2 in zip(first["rows"], again["rows"]):
        assert (r1["method"], r1["nfe"]) == (r2["method"], r2["nfe"])
        for k in ("value", "ci_low", "ci_high"):
            assert r2[k] == pytest.approx(r1[k], rel=1e-9, abs=1e-12)
        assert r2["metrics"].keys() == r1["metrics"].keys()
        assert r2.get("ratio_to_teacher") == pytest.approx(r1.get("ratio_to_teacher"))
    assert again["floor"] == pytest.approx(first["floor"])
    assert (tmp_path / "b" / "report.md").exists()


@pytest.mark.slow
def test_the_callback_logs_the_reports_value_on_the_same_samples(
    toy_teacher, toy_flowmap, tmp_path
):
    from types import SimpleNamespace

    from flowmap.training import FlowMapModule, SampleQuality, load_module

    res = _run(toy_teacher, toy_flowmap, tmp_path)
    module = load_module(FlowMapModule, toy_flowmap)
    dm = build_datamodule(read_checkpoint(toy_teacher[1])["datamodule_hyper_parameters"])
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    trainer = SimpleNamespace(datamodule=dm, sanity_checking=False)
    SampleQuality(nfe=(1, 2), n=200, groups=4, seed=0).on_validation_epoch_end(trainer, module)
    rows = {(r["method"], r["nfe"]): r for r in res["rows"]}
    for k in (1, 2):
        row = rows[("flowmap/lagrangian", k)]
        assert logged[f"val/w2@{k}"] == pytest.approx(row["value"], rel=1e-6)
        assert logged[f"val/recall@{k}"] == pytest.approx(row["metrics"]["recall"]["value"])


@pytest.mark.slow
def test_a_killed_report_resumes_with_finished_rows(
    toy_teacher, toy_flowmap, tmp_path, monkeypatch
):
    class Killed(Exception):
        pass

    calls, resumed = [], False
    real = Evaluator.measure

    def flaky(self, samples, teacher_endpoint=None):
        calls.append(1)
        if len(calls) == 4 and not resumed:
            raise Killed  # the run dies during the fourth evaluation
        return real(self, samples, teacher_endpoint)

    monkeypatch.setattr(Evaluator, "measure", flaky)
    with pytest.raises(Killed):
        _run(toy_teacher, toy_flowmap, tmp_path)
    assert len(list((tmp_path / "rows").glob("*.npz"))) == 2  # floor is not a row file
    calls.clear()
    resumed = True
    res = _run(toy_teacher, toy_flowmap, tmp_path)
    # 1 floor + 9 rows = 10 evaluations in all; the 2 finished rows are not redone
    assert len(calls) == 10 - 2 and len(res["rows"]) == 9
    # a changed flow-map checkpoint invalidates its rows (and only those)
    calls.clear()
    st = Path(toy_flowmap).stat()
    os.utime(toy_flowmap, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _run(toy_teacher, toy_flowmap, tmp_path)
    assert len(calls) == 1 + 3  # the floor is measured on every run; 3 flow-map rows


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra,err,match",
    [
        (["--nfe", "3"], ValueError, "heun uses 2 NFE per step and cannot take NFE 3"),
        (["--nfe", "0"], ValueError, "NFE must be at least 1"),
        (["--groups", "1"], ValueError, "groups must be at least 2"),
        (["--n-samples", "12"], ValueError, "too few for 4 groups"),
        (["--reference-split", "val"], ValueError, "Unknown reference split 'val'"),
    ],
)
def test_report_refuses_impossible_requests_early(
    toy_teacher, toy_flowmap, tmp_path, extra, err, match
):
    with pytest.raises(err, match=match):
        _run(toy_teacher, toy_flowmap, tmp_path, *extra)
    assert not list((tmp_path / "rows").glob("*.npz"))  # nothing was computed


@pytest.mark.slow
def test_report_from_samples_refuses_other_files_and_other_datasets(
    toy_teacher, toy_flowmap, tmp_path
):
    _run(toy_teacher, toy_flowmap, tmp_path / "a", "--save-samples")
    samples = tmp_path / "a" / "samples.npz"
    with np.load(samples, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    index = json.loads(str(arrays["index"]))
    index["meta"]["dataset"] = "moons"
    arrays["index"] = np.array(json.dumps(index))
    np.savez(tmp_path / "moons.npz", **arrays)
    with pytest.raises(ValueError, match="holds samples of moons .* trained on 8gaussians"):
        report.main(
            [
                "--from-samples",
                str(tmp_path / "moons.npz"),
                "--teacher",
                str(toy_teacher[1]),
                "--out",
                str(tmp_path / "b"),
            ]
        )
    np.savez(tmp_path / "other.npz", samples=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="not a samples.npz written by"):
        report.main(["--from-samples", str(tmp_path / "other.npz"), "--out", str(tmp_path / "c")])
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_report_refuses_a_flow_map_as_teacher(toy_flowmap, tmp_path):
    with pytest.raises(CheckpointError, match="is a FlowMapModule checkpoint"):
        report.main(["--teacher", str(toy_flowmap), "--out", str(tmp_path)])


@pytest.mark.slow
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
    assert (tmp_path / "s.png").stat().st_size > 0  # a scatter plot beside the array
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


@pytest.mark.slow
def test_a_report_refuses_flow_maps_of_another_dataset_or_teacher(
    toy_teacher, toy_flowmap, tmp_path, capsys
):
    other_data = fit_cli(TEACHER, tmp_path / "cb", "--trainer.max_steps=2", *TINY)
    with pytest.raises(ValueError, match=r"trained on Toy2DDataModule\(name='8gaussians'\)"):
        report.main(
            [
                "--teacher",
                str(other_data),
                "--flowmap",
                str(toy_flowmap),
                "--out",
                str(tmp_path / "r"),
            ]
        )
    other_teacher = fit_cli(
        TEACHER, tmp_path / "g8", "--trainer.max_steps=2", "--data.name=8gaussians", *TINY
    )
    line = fails(
        capsys,
        "report",
        "--teacher",
        str(other_teacher),
        "--flowmap",
        str(toy_flowmap),
        "--out",
        str(tmp_path / "r2"),
    )
    assert "was distilled from" in line and str(toy_teacher[1]) in line
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()


def test_a_damaged_samples_file_is_refused_without_advice_to_unpickle(tmp_path, capsys):
    bad = tmp_path / "samples.npz"
    bad.write_bytes(b"this is not a numpy archive at all")
    line = fails(capsys, "report", "--from-samples", str(bad), "--out", str(tmp_path / "r"))
    assert "is not a readable .npz archive" in line and "--save-samples" in line
    assert "pickle" not in line.lower()
