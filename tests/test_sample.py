"""`flowmap sample` (flowmap.apps.sample): its output names, the files it writes and prints, the
run its picture names, inversion of a map trained both ways and refusal of a forward-only one."""

from pathlib import Path

import pytest

import flowmap.apps.sample as sample
from flowmap.apps.cli import main
from tests.helpers import TINY, fails, fit_cli, one_line_error


def test_sample_output_names_follow_one_rule():
    assert sample.output_paths(Path("a/x.npz")) == (Path("a/x.npz"), Path("a/x.png"))
    assert sample.output_paths(Path("a/x.png")) == (Path("a/x.npz"), Path("a/x.png"))
    assert sample.output_paths(Path("x.JPG")) == (Path("x.npz"), Path("x.JPG"))
    with pytest.raises(ValueError, match="must end in .npz"):
        sample.output_paths(Path("x.pt"))


@pytest.mark.parametrize("out", ["pics/x.png", "x.npz"])
def test_sample_writes_and_prints_the_real_paths(capsys, tiny_teacher, tmp_path, out):
    main(["sample", "--ckpt", str(tiny_teacher), "--n", "16", "--out", str(tmp_path / out)])
    npz, picture = sample.output_paths(tmp_path / out)
    assert npz.is_file() and picture.is_file()
    assert sorted(p.name for p in npz.parent.iterdir()) == sorted({npz.name, picture.name})
    printed = capsys.readouterr().out
    assert printed.startswith(f"{npz}: 16 samples, NFE 1; picture {picture}")


def test_a_directory_as_the_sample_out_is_refused(capsys, tmp_path, bad_files):
    (tmp_path / "d.npz").mkdir()
    one_line_error(
        capsys,
        ["sample", "--ckpt", str(bad_files["lightning"]), "--out", str(tmp_path / "d.npz")],
        "is a directory; give a file name",
    )


def test_a_sample_picture_names_the_run_not_last_ckpt(tmp_path):
    from flowmap.apps.sample import run_label

    ckpt = tmp_path / "runs" / "toy2d" / "lagrangian" / "checkpoints" / "last.ckpt"
    assert run_label(str(ckpt)) == "lagrangian/last.ckpt"
    assert run_label(str(tmp_path / "mine" / "model.ckpt")) == "mine/model.ckpt"


@pytest.mark.slow
def test_flowmap_sample_inverts_a_two_way_map_and_refuses_a_forward_only_one(
    toy_teacher, toy_flowmap, tmp_path, capsys
):
    import numpy as np

    data, noise = tmp_path / "x.npz", tmp_path / "z.npz"
    main(["sample", "--ckpt", str(toy_flowmap), "--nfe", "2", "--n", "64", "--out", str(data)])
    argv = ["--invert", "--data-npz", str(data), "--nfe", "2", "--out", str(noise)]
    main(["sample", "--ckpt", str(toy_flowmap), *argv])  # the toy recipe trains both ways
    with np.load(noise) as z:
        assert z["noise"].shape == (64, 2) and np.isfinite(z["noise"]).all()
    forward_only = fit_cli(
        "recipes/toy2d/lagrangian.yaml",
        tmp_path / "fwd",
        f"--model.teacher={toy_teacher[1]}",
        "--data.name=8gaussians",
        "--trainer.max_steps=2",
        "--model.loss.init_args.pairs.backward_fraction=0",
        *TINY,
    )
    line = fails(capsys, "sample", "--ckpt", str(forward_only), *argv)
    assert "trained only forward" in line and "backward_fraction=0.5" in line
    np.save(tmp_path / "x.npy", np.zeros((4, 2), dtype=np.float32))
    argv[2] = str(tmp_path / "x.npy")
    line = fails(capsys, "sample", "--ckpt", str(toy_flowmap), *argv)
    assert "is a single array, not an .npz" in line
