"""Join trained single-view networks into one multi-view weights file:
Lite0 (the whole patch) and Lite0-x2 (its centre half, magnified twice) make
`effunet-lite0-2scale`; adding Lite0-x4 (its centre quarter, magnified four
times) makes `effunet-lite0-3scale`.  A joined file may stand for the views it
holds, so a two-scale file plus an x4 file make a three-scale one (as the
shipped file was made).  ``FILE:VIEW`` takes one view of a joined file
(``wide``, ``near`` or ``closer``), so a Lite2 wide view can replace a
joined file's Lite0 one (`effunet-lite2wide-3scale`).

Why: the views fail differently (the magnified ones draw small nuclei better,
the wide one keeps the context of large ones); the mean of their logits has
the best mean validation AJI over monuseg and consep, and shipping them as one
file keeps inference one network.

    python scripts/combine_scales.py runs/2scale.pt runs/wide/wide.pt runs/x2/x2.pt
    python scripts/combine_scales.py runs/3scale.pt bridge/weights/nuclick_default.pt runs/x4/x4.pt
    python scripts/combine_scales.py runs/mixed.pt runs/lite2/lite2.pt \
        bridge/weights/nuclick_default.pt:near bridge/weights/nuclick_default.pt:closer
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

from torch import nn

from bridge.errors import BridgeInputError
from bridge.model.architectures import JOINED_FROM, build, parse_arch, spec_of
from bridge.model.weights import ModelInfo, derived_meta, load_model, save_weights, source_record

SHARE = {2: "half", 4: "a quarter"}


class View(NamedTuple):
    """One trained view: its network, the file it came from and the patch it was trained on."""

    arch: str
    net: nn.Module
    patch_size: int
    path: Path
    info: ModelInfo
    part: str | None  # its name inside a joined file, None for a file of one view


def views_of(arg: Path) -> list[View]:
    """The views ``arg`` names: a file of one view, each part of a joined
    file, or ``FILE:VIEW``, one named part of a joined file."""
    path, wanted = arg, None
    if not arg.exists() and ":" in arg.name:
        name, _, wanted = arg.name.rpartition(":")
        path = arg.with_name(name)
    net, info = load_model(path)
    if info.arch not in JOINED_FROM:
        if wanted is not None:
            raise BridgeInputError(f"{path.name} holds one network ({info.arch}), so it has no view {wanted!r}")
        return [View(info.arch, net, info.patch_size, path, info, None)]
    # a joined network's children are its views, widest first (bridge/model/twoscale.py)
    views = [View(spec_of(p).label, p, info.patch_size // p.zoom, path, info, n) for n, p in net.named_children()]
    if wanted is None:
        return views
    chosen = [v for v in views if v.part == wanted]
    if not chosen:
        raise BridgeInputError(
            f"{path.name} ({info.arch}) has no view {wanted!r}; its views: {', '.join(str(v.part) for v in views)}"
        )
    return chosen


def combine(paths: list[Path]) -> tuple[nn.Module, dict]:
    """The joined network and its metadata (the widest view's, plus every source)."""
    views = [v for p in paths for v in views_of(p)]
    archs = tuple(v.arch for v in views)
    joined_name = next((n for n, j in JOINED_FROM.items() if tuple(a for a, _ in j.parts) == archs), None)
    if joined_name is None:
        wanted = "; or ".join(" then ".join(a for a, _ in j.parts) for j in JOINED_FROM.values())
        got = ", ".join(f"{v.path.name} is {v.arch}" + (f" ({v.part} view)" if v.part else "") for v in views)
        raise BridgeInputError(f"need {wanted} weights, widest first; {got}")
    wide = views[0]
    for v in views[1:]:
        zoom = v.net.zoom
        if v.patch_size * zoom != wide.patch_size:
            raise BridgeInputError(
                f"the {v.arch} patch must be {SHARE[zoom]} the {wide.arch} patch: "
                f"{v.patch_size} px is not {SHARE[zoom]} of {wide.patch_size} px"
            )
        if v.info.sigma != wide.info.sigma:
            raise BridgeInputError(f"guidance sigma differs: {wide.info.sigma:g} px and {v.info.sigma:g} px")
    joined = build(parse_arch(joined_name))
    joined_from = []
    for (name, part), v in zip(joined.named_children(), views, strict=True):
        part.load_state_dict(v.net.state_dict())
        joined_from.append(source_record(v.path, v.info, part=name, **({"view_in_file": v.part} if v.part else {})))
    return joined, derived_meta(wide.info, name=joined_name, joined_from=joined_from)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="where to write the joined weights")
    ap.add_argument(
        "views",
        type=Path,
        nargs="+",
        metavar="WEIGHTS",
        help="the views' weights, widest first: effunet-lite0 (or effunet-lite2, three views only; e.g. 128-px "
        "patches), effunet-lite0-x2 trained on half that patch, and for three views effunet-lite0-x4 on a "
        "quarter; a joined file stands for the views it holds, FILE:VIEW (wide, near, closer) for one of them",
    )
    args = ap.parse_args(argv)
    try:
        model, meta = combine(args.views)
        save_weights(args.out, model, meta)
    except BridgeInputError as exc:
        print(f"combine_scales: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {meta['name']} from {', '.join(p.name for p in args.views)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
