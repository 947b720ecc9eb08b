"""One step of a flow map under Lightning's FSDP2 strategy (``ModelParallelStrategy``) on 2 CPU
ranks; saves each rank's full gradients and the checkpoint. Run by tests/test_distributed.py:

    python tests/fsdp_fit.py OUT '{"class_path": "flowmap.losses.LagrangianLoss"}'

A script, not a test: the strategy launches its second rank by running this file again.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from flowmap.training import build  # noqa: E402
from tests.test_distributed import (  # noqa: E402
    NET,
    FixedNoiseFlowMap,
    _full_batch,
    _HalfPerRank,
    one_step_trainer,
)


class FullGradients(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_after_backward(self, trainer, module):
        grads = {}
        for name, p in module.named_parameters():
            if p.grad is not None:
                g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                grads[name] = g.clone()
        torch.save(grads, self.out / f"rank{trainer.global_rank}.pt")


def main(out: Path, loss: dict) -> None:
    torch.manual_seed(0)
    module = build(FixedNoiseFlowMap, {"net": NET, "loss": loss})
    strategy = ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False
    )
    trainer = one_step_trainer(strategy, FullGradients(out))
    trainer.fit(module, _HalfPerRank(_full_batch()))
    trainer.save_checkpoint(out / "last.ckpt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
