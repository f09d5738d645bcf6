"""Average trained weights files of one architecture, parameter by parameter
(a "model soup", Wortsman et al. 2022).

Why: runs fine-tuned from the same weights land in one basin; their average is
often more accurate than each of them, and it costs nothing at inference.
Check it with `nuclick-bridge evaluate` before shipping: an average of runs that
did not start from the same weights is usually worse than either.

    python scripts/average_weights.py runs/soup.pt bridge/weights/nuclick_default.pt runs/ft/ft.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bridge.errors import BridgeInputError
from bridge.model.weights import derived_meta, load_model, save_weights, source_record


def average(paths: list[Path]) -> tuple[torch.nn.Module, dict]:
    """The average of ``paths`` (same architecture) and the weights' metadata:
    the first file's, plus which files were averaged."""
    models, infos = zip(*(load_model(p) for p in paths), strict=True)
    archs = {info.arch for info in infos}
    if len(archs) > 1:
        raise BridgeInputError(f"cannot average weights of different architectures: {', '.join(sorted(archs))}")
    sizes = {info.patch_size for info in infos}
    if len(sizes) > 1:
        raise BridgeInputError(f"cannot average weights trained on different patch sizes: {sorted(sizes)}")
    out = models[0]
    states = [m.state_dict() for m in models]
    merged = {
        k: (torch.stack([s[k].float() for s in states]).mean(0) if v.is_floating_point() else v)
        for k, v in states[0].items()
    }
    out.load_state_dict(merged)
    averaged_from = [source_record(p, i) for p, i in zip(paths, infos, strict=True)]
    # what belonged to one training run (its epoch, config, validation) now lives in averaged_from
    meta = derived_meta(infos[0], averaged_from=averaged_from)
    return out, meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="where to write the averaged weights")
    ap.add_argument("weights", type=Path, nargs="+", help="two or more weights files of one architecture")
    args = ap.parse_args(argv)
    try:
        if len(args.weights) < 2:
            raise BridgeInputError("give at least two weights files to average")
        model, meta = average(args.weights)
        save_weights(args.out, model, meta)
    except BridgeInputError as exc:
        print(f"average_weights: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: the average of {len(args.weights)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
