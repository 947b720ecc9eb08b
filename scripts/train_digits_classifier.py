"""Train the digits FID feature extractor and write its weights plus a sidecar JSON.

Regenerates the weights shipped with :mod:`flowmap.metrics.digits_extractor`::

    python scripts/train_digits_classifier.py --out flowmap/metrics/weights/digits_cnn.pt

:class:`~flowmap.metrics.digits_extractor.DigitsClassifier` is trained on the train split of
:func:`flowmap.data.digits.load_digits_split` (single-threaded, so that a fixed seed on the same
torch build gives the same bytes) and saved as a plain ``state_dict``; ``<out>.json`` records
the seed, epochs, test accuracy, torch version, this command and the file's SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from flowmap.data.digits import load_digits_split
from flowmap.metrics.digits_extractor import (
    DIGITS_WEIGHTS_PATH,
    DigitsClassifier,
    digits_classifier_accuracy,
)

#: How the recorded ``command`` starts (run from the repository root).
COMMAND = "python scripts/train_digits_classifier.py"


def _random_shift(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Translate each image by an integer offset in ``[-max_shift, max_shift]²``; fill with -1."""
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    out = torch.empty_like(x)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


def train_digits_classifier(
    seed: int = 0,
    epochs: int = 40,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
) -> tuple[DigitsClassifier, float]:
    """Train :class:`DigitsClassifier` on the train split; return ``(model, test_accuracy)``.

    Adam with cosine-decayed learning rate, cross-entropy, random ±1 pixel translations as
    augmentation. Everything random (initialisation, shuffling, augmentation, dropout) derives
    from ``seed``, so a fixed seed on the same torch build, device and number of threads gives
    the same weights (:func:`main` trains single-threaded for that reason). The returned model
    is in eval mode, on CPU; the accuracy is on the 359-image test split.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}.")
    x_train, y_train, x_test, y_test = load_digits_split()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitsClassifier().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(x_train), batch_size):
            idx = perm[i : i + batch_size]
            xb = _random_shift(x_train[idx], gen).to(device)
            loss = F.cross_entropy(model(xb), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model = model.cpu().eval()
    return model, digits_classifier_accuracy(model, x_test, y_test)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: Sequence[str] | None = None) -> None:
    """Train the digits classifier and write its state_dict plus a sidecar JSON."""
    parser = argparse.ArgumentParser(
        prog=COMMAND,
        description="Train the digits FID feature extractor and save its weights.",
    )
    parser.add_argument("--out", type=Path, default=DIGITS_WEIGHTS_PATH, help="output .pt file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--min-accuracy", type=float, default=0.97)
    args = parser.parse_args(argv)
    # One thread: the float reduction order (hence the exact weights) depends on the number
    # of threads, so the shipped file is only reproducible with a fixed count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, acc = train_digits_classifier(seed=args.seed, epochs=args.epochs)
    finally:
        torch.set_num_threads(threads)
    print(f"test accuracy: {acc:.4f}")
    if acc < args.min_accuracy:
        raise SystemExit(f"Test accuracy {acc:.4f} is below --min-accuracy {args.min_accuracy}.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    command = " ".join([COMMAND, *(sys.argv[1:] if argv is None else argv)])
    meta = {
        "seed": args.seed,
        "epochs": args.epochs,
        "test_accuracy": acc,
        "n_test": len(load_digits_split()[3]),
        "feature_dim": model.feature_dim,
        "torch_version": torch.__version__,
        "num_threads": 1,
        "command": command,
        "sha256": _sha256(args.out),
    }
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
