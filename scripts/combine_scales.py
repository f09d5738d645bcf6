"""Join a trained Lite0 (whole patch) and a trained Lite0-x2 (the patch's
centre, magnified twice) into one `effunet-lite0-2scale` weights file.

Why: the two views fail differently (the magnified one draws small nuclei
better, the wide one keeps the context of large ones); the mean of their
logits has the best mean validation AJI over monuseg and consep of the
three, and shipping them as one file keeps inference one network.

    python scripts/combine_scales.py runs/2scale.pt bridge/weights/nuclick_default.pt runs/x2/x2.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bridge.errors import BridgeInputError
from bridge.model.architectures import JOINED_FROM, build, parse_arch
from bridge.model.weights import derived_meta, load_model, save_weights, source_record

JOINED = "effunet-lite0-2scale"
(WIDE, _), (NEAR, _) = JOINED_FROM[JOINED].parts  # the recipe train's error message gives, by construction


def combine(wide_path: Path, near_path: Path):
    """The joined network and its metadata (the wide file's, plus both sources)."""
    wide, wi = load_model(wide_path)
    near, ni = load_model(near_path)
    if wi.arch != WIDE or ni.arch != NEAR:
        raise BridgeInputError(
            f"need {WIDE} then {NEAR} weights; {wide_path.name} is {wi.arch}, {near_path.name} is {ni.arch}"
        )
    if ni.patch_size * 2 != wi.patch_size:
        raise BridgeInputError(
            f"the {NEAR} patch must be half the {WIDE} patch: {ni.patch_size} px is not half of {wi.patch_size} px"
        )
    if ni.sigma != wi.sigma:
        raise BridgeInputError(f"guidance sigma differs: {wi.sigma:g} px and {ni.sigma:g} px")
    joined = build(parse_arch(JOINED))
    joined.wide.load_state_dict(wide.state_dict())
    joined.near.load_state_dict(near.state_dict())
    joined_from = [source_record(p, i, part=part) for part, p, i in (("wide", wide_path, wi), ("near", near_path, ni))]
    meta = derived_meta(wi, name=JOINED, joined_from=joined_from)
    return joined, meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="where to write the joined weights")
    ap.add_argument("wide", type=Path, help=f"{WIDE} weights (the whole patch, e.g. 128 px)")
    ap.add_argument("near", type=Path, help=f"{NEAR} weights trained with half that --patch-size")
    args = ap.parse_args(argv)
    try:
        model, meta = combine(args.wide, args.near)
        save_weights(args.out, model, meta)
    except BridgeInputError as exc:
        print(f"combine_scales: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {JOINED} from {args.wide.name} and {args.near.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
