"""The training callbacks (flowmap.training.callbacks and .progress): the progress bar names the
stage and counts steps, and a fit uses it unless told otherwise; SampleQuality measures W2 on the
report's group size, so a checkpoint's val/w2 and its report's W2 agree."""

import pytest
import torch

from flowmap.apps.lightning_cli import cli_main
from flowmap.training.progress import FlowmapProgressBar, stage_label
from tests.helpers import TINY_CLI


class _Trainer:
    def __init__(self, max_steps=-1, max_epochs=None, batches=10.0, accumulate=1):
        self.max_steps, self.max_epochs = max_steps, max_epochs
        self.num_training_batches, self.accumulate_grad_batches = batches, accumulate


def test_the_progress_bar_names_the_stage_and_counts_steps():
    from flowmap.losses import EulerianLoss
    from flowmap.nets import MLP
    from flowmap.training import FlowMapModule, VelocityModule

    teacher = VelocityModule(MLP((2,), width=8, depth=1))
    student = FlowMapModule(MLP((2,), width=8, depth=1), loss=EulerianLoss(), warm_start=False)
    assert stage_label(teacher, "teacher") == "teacher"
    assert stage_label(student) == "FlowMapModule/eulerian"
    bar = FlowmapProgressBar("teacher")
    assert bar.total_steps(_Trainer(max_steps=3000)) == 3000
    assert bar.total_steps(_Trainer(max_epochs=3, batches=10, accumulate=2)) == 15
    assert bar.total_steps(_Trainer(max_epochs=-1, batches=float("inf"))) is None


@pytest.mark.parametrize(
    "extra,expected",
    [
        ([], FlowmapProgressBar),
        (["--trainer.enable_progress_bar=false"], None),
        (["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"], "TQDMProgressBar"),
    ],
)
def test_fit_uses_the_flowmap_progress_bar_unless_told_otherwise(tmp_path, extra, expected):
    args = [a for a in TINY_CLI if "enable_progress_bar" not in a]
    cli = cli_main(
        ["--config", "recipes/toy2d/teacher.yaml", *args, *extra]
        + [f"--trainer.default_root_dir={tmp_path / 'teacher'}"],
        run=False,
    )
    bar = cli.trainer.progress_bar_callback
    if expected is None:
        assert bar is None
    elif expected is FlowmapProgressBar:
        assert isinstance(bar, FlowmapProgressBar) and bar.stage == "teacher"
    else:
        assert type(bar).__name__ == expected


@pytest.mark.slow
def test_validation_and_report_measure_w2_on_the_same_group_size(toy_teacher):
    """Exact W2 grows as its groups shrink: the training callback and the report both use
    groups of W2_GROUP_SIZE, so a checkpoint's val/w2 and its report's W2 agree."""
    from flowmap.apps.report.config import sizes
    from flowmap.apps.report.setting import build_datamodule
    from flowmap.metrics.evaluation import W2_GROUP_SIZE, Evaluator
    from flowmap.training import SampleQuality, VelocityModule, load_module, read_checkpoint

    teacher = load_module(VelocityModule, toy_teacher[1])
    dm = build_datamodule(read_checkpoint(toy_teacher[1])["datamodule_hyper_parameters"])
    callback = SampleQuality(nfe=(4,))
    n_val = callback.sample_count(dm)
    assert n_val // callback.groups == W2_GROUP_SIZE
    assert sizes(False, None, None) == (10_000, 10) and sizes(False, 2000, None) == (2000, 2)

    def w2(evaluator: Evaluator, n: int) -> float:
        x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            x = teacher.generate(x0, 4, "euler").x
        return evaluator.measure(x).estimates()["w2"].value

    val = w2(callback.evaluator(dm), n_val)
    report = w2(Evaluator.for_datamodule(dm, 4000, groups=4, split="train", seed=3), 4000)
    small = w2(Evaluator.for_datamodule(dm, 1000, groups=5, split="train", seed=3), 1000)
    assert abs(val - report) < 0.05 * report, (val, report)  # measured: 0.500 and 0.498
    assert small > 1.15 * report, (small, report)  # groups of 200 (the old validation's): 0.63


def test_matmul_precision_holds_for_the_run_and_is_restored_after():
    from flowmap.training import MatmulPrecision

    before = torch.get_float32_matmul_precision()
    callback = MatmulPrecision("high" if before != "high" else "medium")
    callback.setup(None, None, "fit")
    assert torch.get_float32_matmul_precision() == callback.precision != before
    callback.teardown(None, None, "fit")
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(ValueError, match="Unknown matmul precision 'tf32'; choose highest"):
        MatmulPrecision("tf32")
