"""The latent digits report's goals at equal sample size: FID falls with the number of samples, so
the floors (the 359-image test split, plain and through the codec) are compared with rows cut
into disjoint sets of the same 359 samples (from the report's ``samples.npz``), each against the
same reference (the train split, in the digits-CNN features).

    python benchmarks/latent_digits.py --report runs/digits_latent \
        --out benchmarks/results/digits-latent/equal_size.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from flowmap.apps.report.results import read_samples
from flowmap.codecs import build_codec
from flowmap.data import DigitsDataModule
from flowmap.data.base import to_uint8
from flowmap.metrics.evaluation import Evaluator


def fid(evaluator: Evaluator, x: torch.Tensor) -> float:
    return float(evaluator.measure(x).estimates()["fid"].value)


def mean_interval(values: list[float]) -> dict[str, float]:
    v = np.asarray(values)
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    mean = float(v.mean())
    return {"value": mean, "ci_low": mean - half, "ci_high": mean + half, "sets": len(v)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", type=Path, required=True, help="the latent pipeline's --out")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    index, arrays = read_samples(args.report / "samples.npz")
    evaluator = Evaluator(arrays["reference"], groups=2, seed=0)
    floor = arrays["floor"]  # the whole test split, uint8
    n = len(floor)
    codec = build_codec(str(args.report / "codec"))
    data = DigitsDataModule(batch_size=128)
    test = data.reference_samples(data.num_samples("test"), "test", seed=0)
    train = data.reference_samples(data.num_samples("train"), "train", seed=0)
    assert torch.equal(to_uint8(test), floor)  # the report's floor set
    with torch.no_grad():
        coded_test = codec.decode(codec.encode(test, sample=False))
        coded_train = codec.decode(codec.encode(train, sample=False))
    result: dict[str, Any] = {
        "command": shlex.join([sys.executable, "benchmarks/latent_digits.py", *(argv or sys.argv[1:])]),
        "set_size": n,
        "data_floor": fid(evaluator, floor),
        "codec_floor": fid(evaluator, coded_test),
        "codec_train_reconstruction": fid(evaluator, coded_train),
        "rows": {},
    }  # fmt: skip
    for row in index["rows"]:
        x = arrays[row["array"]]
        sets = [x[i * n : (i + 1) * n] for i in range(len(x) // n)]
        result["rows"][f"{row['method']}@{row['nfe']}"] = mean_interval(
            [fid(evaluator, s) for s in sets]
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    for k, v in result["rows"].items():
        print(f"{k}: {v['value']:.2f} [{v['ci_low']:.2f}, {v['ci_high']:.2f}] ({v['sets']} sets)")
    return result


if __name__ == "__main__":
    main()
