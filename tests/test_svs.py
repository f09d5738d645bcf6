"""A real Aperio-layout SVS, written here with tifffile, read correctly around clicks.

The file has what scanners write and readers trip over: level 0 in 240 px
JPEG tiles whose quantisation and Huffman tables live once in the JPEGTables
tag (each tile an abbreviated stream), a stripped thumbnail as the second
page, then the reduced levels, then label and macro images; every
ImageDescription starts with "Aperio Image Library" and carries ``|MPP = ...|``.
The thumbnail and the reduced levels hold different pixels from level 0 on
purpose, so reading any of them instead of level 0 shows.
"""

from __future__ import annotations

import imagecodecs
import numpy as np
import pytest
import tifffile

from bridge.connectors.qupath.images import open_local_image
from bridge.evaluation.clicks import simulate_clicks
from bridge.io.coords import patch_origin
from bridge.io.imageio import TiffReader, open_image
from bridge.results import Click

TILE = 240
HEAD = "Aperio Image Library v12.0.15 \r\n"
META = "|AppMag = 40|StripeWidth = 1000|ScanScope ID = SS1302|Filename = test|Date = 11/29/26|MPP = 0.2520"


def _segments(stream: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The marker segments of a JPEG stream before its scan, and the scan (SOS to EOI)."""
    assert stream[:2] == b"\xff\xd8"
    pos, out = 2, []
    while True:
        marker = stream[pos + 1]
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: entropy-coded data follows up to EOI
            return out, stream[pos:]
        out.append((marker, stream[pos : pos + 2 + length]))
        pos += 2 + length


def _abbreviate(streams: list[bytes]) -> tuple[bytes, list[bytes]]:
    """Split complete JPEG tiles into one shared tables stream (DQT, DHT) and
    abbreviated tiles without them, as Aperio writes level 0."""
    tables = None
    tiles = []
    for stream in streams:
        segs, scan = _segments(stream)
        shared = b"".join(s for m, s in segs if m in (0xDB, 0xC4))
        kept = b"".join(s for m, s in segs if m not in (0xDB, 0xC4))
        if tables is None:
            tables = shared
        assert shared == tables, "tiles must share one set of tables"
        tiles.append(b"\xff\xd8" + kept + scan)
    assert tables is not None
    return b"\xff\xd8" + tables + b"\xff\xd9", tiles


def _jpeg_tiles(image: np.ndarray) -> list[bytes]:
    """Each 240 px tile of ``image`` (row by row, edge tiles padded) as Aperio
    stores it: baseline JPEG, YCbCr 4:2:0 inside while the TIFF says RGB, and
    no JFIF/APPn marker that would tell a decoder so."""
    h, w = image.shape[:2]
    padded = np.zeros((-(-h // TILE) * TILE, -(-w // TILE) * TILE, 3), np.uint8)
    padded[:h, :w] = image
    out = []
    for y in range(0, padded.shape[0], TILE):
        for x in range(0, padded.shape[1], TILE):
            stream = imagecodecs.jpeg8_encode(np.ascontiguousarray(padded[y : y + TILE, x : x + TILE]), level=80)
            segs, scan = _segments(stream)
            out.append(b"\xff\xd8" + b"".join(seg for m, seg in segs if not 0xE0 <= m <= 0xEF) + scan)
    return out


def write_aperio_svs(path, image: np.ndarray, downsamples=(4, 16)) -> None:
    """An SVS laid out as Aperio's scanners write it (see the module docstring)."""
    h, w = image.shape[:2]
    tables, tiles = _abbreviate(_jpeg_tiles(image))
    q = "JPEG/RGB Q=80"
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            iter(tiles),
            shape=image.shape,
            dtype=np.uint8,
            tile=(TILE, TILE),
            compression="jpeg",
            jpegtables=tables,
            photometric="rgb",
            description=f"{HEAD}{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) {q}{META}",
            metadata=None,
        )
        # Thumbnail: stripped, and deliberately not level 0's pixels (inverted).
        thumb = 255 - image[::8, ::8]
        tif.write(
            thumb,
            rowsperstrip=16,
            photometric="rgb",
            compression="jpeg",
            description=f"{HEAD}{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]} - {META}",
            metadata=None,
        )
        for d in downsamples:
            level = np.ascontiguousarray(image[::d, ::d][..., ::-1])  # channels swapped: not level 0 either
            tif.write(
                level,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                description=f"{HEAD}{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) -> {level.shape[1]}x{level.shape[0]} {q}",
                metadata=None,
            )
        label = np.full((300, 400, 3), 200, np.uint8)
        tif.write(label, photometric="rgb", compression="lzw", subfiletype=1, description=f"{HEAD}label 400x300")
        macro = np.full((400, 1200, 3), 90, np.uint8)
        tif.write(macro, photometric="rgb", compression="jpeg", subfiletype=9, description=f"{HEAD}macro 1200x400")


def _decode_level0(path) -> np.ndarray:
    """Level 0 decoded tile by tile with imagecodecs (the tables given
    explicitly), without tifffile's series or Zarr machinery: the reference."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        h, w = page.shape[:2]
        tables = page.jpegtables
        across = -(-w // TILE)
        out = np.zeros((-(-h // TILE) * TILE, across * TILE, 3), np.uint8)
        fh = tif.filehandle
        for k, (off, count) in enumerate(zip(page.dataoffsets, page.databytecounts, strict=True)):
            fh.seek(off)
            tile = imagecodecs.jpeg8_decode(fh.read(count), tables=tables)  # 3 components, no marker: YCbCr
            ty, tx = divmod(k, across)
            out[ty * TILE : (ty + 1) * TILE, tx * TILE : (tx + 1) * TILE] = tile
    return out[:h, :w]


@pytest.fixture(scope="module")
def svs(tmp_path_factory, data_root):
    from PIL import Image

    names = ["TCGA-21-5786-01Z-00-DX1", "TCGA-18-5592-01Z-00-DX1"]
    imgs = [np.asarray(Image.open(data_root / "monuseg" / "images" / f"{n}.png").convert("RGB")) for n in names]
    labs = [np.asarray(Image.open(data_root / "monuseg" / "labels" / f"{n}.png")).astype(np.int32) for n in names]
    # 1000 x 1700: not square and not a multiple of 240, so edge tiles are partial.
    image = np.ascontiguousarray(np.concatenate([imgs[0], imgs[1][:, :700]], axis=1))
    labels = np.concatenate([labs[0], labs[1][:, :700] + labs[0].max()], axis=1)
    path = tmp_path_factory.mktemp("svs") / "slide.svs"
    write_aperio_svs(path, image)
    return path, image, labels


def test_the_file_has_the_aperio_layout(svs):
    path, _, _ = svs
    with tifffile.TiffFile(path) as tif:
        pages = tif.pages
        assert tif.is_svs and len(pages) == 6
        assert pages[0].is_tiled and pages[0].jpegtables and pages[0].compression == 7
        assert not pages[1].is_tiled  # the stripped thumbnail
        assert [p.subfiletype for p in pages[4:]] == [1, 9]
        assert "MPP = 0.2520" in pages[0].description
        # Every level-0 tile is an abbreviated stream: no tables of its own.
        fh = tif.filehandle
        for off, count in zip(pages[0].dataoffsets, pages[0].databytecounts, strict=True):
            fh.seek(off)
            markers = {m for m, _ in _segments(fh.read(count))[0]}
            assert not markers & {0xDB, 0xC4, 0xE0, 0xEE}  # no tables, no JFIF or Adobe marker
        with pytest.raises(Exception):  # noqa: B017 - the tiles cannot be decoded without the shared tables
            fh.seek(pages[0].dataoffsets[0])
            imagecodecs.jpeg8_decode(fh.read(pages[0].databytecounts[0]))


def test_pixels_around_clicks_are_level0(svs):
    """Every click's patch (border tiles included) equals level 0 as decoded
    tile by tile, and level 0 is the source within the JPEG error measured on
    the whole level; neither the thumbnail nor a reduced level is read."""
    path, image, labels = svs
    reference = _decode_level0(path)
    h, w = image.shape[:2]
    assert reference.shape == image.shape
    err = np.abs(reference.astype(np.int16) - image.astype(np.int16))
    level_mean, level_p999 = float(err.mean()), float(np.percentile(err, 99.9))
    assert level_mean < 6.0  # a JPEG at Q=80 of H&E, not a different picture
    xy, _ = simulate_clicks(labels, seed=1)
    assert len(xy) > 500
    size = 128
    with open_image(path) as reader:
        assert isinstance(reader, TiffReader) and (reader.width, reader.height) == (w, h)
        for x, y in xy:
            ox, oy = patch_origin(x, y, size)
            got = reader.read_region(ox, oy, size, size)
            x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + size, w), min(oy + size, h)
            inside = got[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
            np.testing.assert_array_equal(inside, reference[y0:y1, x0:x1])
            assert not got.any(axis=2)[: y0 - oy].any() and not got[:, : x0 - ox].any()  # zero off the image
            patch_err = np.abs(inside.astype(np.int16) - image[y0:y1, x0:x1].astype(np.int16))
            assert patch_err.mean() <= 3 * level_mean + 1 and np.percentile(patch_err, 99) <= level_p999
        # The whole level at once: the same pixels.
        np.testing.assert_array_equal(reader.read_region(0, 0, w, h), reference)


def test_openslide_reads_the_same_level0(svs):
    """QuPath and OpenSlide see this file as an Aperio slide with the thumbnail
    left out of the pyramid; our reader gives OpenSlide's level-0 pixels."""
    openslide = pytest.importorskip("openslide")
    path, image, _ = svs
    slide = openslide.OpenSlide(str(path))
    try:
        assert slide.properties.get("openslide.vendor") == "aperio"
        assert slide.properties.get("openslide.mpp-x") == "0.252"
        assert slide.level_count == 3 and slide.dimensions == (image.shape[1], image.shape[0])
        assert "thumbnail" in slide.associated_images and "label" in slide.associated_images
        theirs = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))[..., :3]
    finally:
        slide.close()
    with open_local_image(path) as reader:  # the QuPath connector's path for a local .svs
        ours = reader.read_region(0, 0, reader.width, reader.height)
    np.testing.assert_array_equal(ours, theirs)


def test_segment_on_the_svs_matches_the_same_pixels_in_memory(svs, tmp_path):
    """``segment`` on the SVS answers as on its decoded level 0 held in memory."""
    from bridge.evaluation.watershed import WatershedSegmenter
    from bridge.io.imageio import ArrayReader

    path, _, labels = svs
    xy, _ = simulate_clicks(labels, seed=2)
    clicks = [Click(float(x), float(y), str(k)) for k, (x, y) in enumerate(xy[::4])]
    seg = WatershedSegmenter()
    with open_image(path) as reader:
        tiled = seg.segment_tiled(reader, clicks, max_tile=512)
    whole = seg.segment(ArrayReader(_decode_level0(path)), clicks)
    assert sum(r.found for r in whole.results) > 0.8 * len(clicks)
    for a, b in zip(whole.results, tiled.results, strict=True):
        assert a.found == b.found
        if a.found:
            assert a.polygon.equals_exact(b.polygon, 0) and a.score == b.score
