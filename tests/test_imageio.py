"""Region reads from real files: a tiled pyramidal TIFF built from a MoNuSeg image,
plus every bad-input case written to disk for real."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import tifffile.zarr
from PIL import Image

from bridge.errors import BridgeInputError
from bridge.io.imageio import ArrayReader, RegionReader, TiffReader, load_rgb, open_image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PNG = DATA / "monuseg" / "images" / "TCGA-21-5786-01Z-00-DX1.png"
TILE = 256

# Windows (x0, y0, w, h): interior, straddling each edge/corner, fully outside.
WINDOWS = [
    (300, 260, 10, 10),
    (100, 200, 300, 150),
    (-50, -30, 200, 100),
    (900, 950, 256, 256),
    (-10, 400, 30, 30),
    (2000, 2000, 64, 64),
    (-100, -100, 50, 50),
    (0, 0, 0, 5),
]


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    if not PNG.is_file():
        pytest.skip(f"shared data missing: {PNG}")
    with Image.open(PNG) as im:
        assert im.mode == "RGB"
        return np.asarray(im).copy()


def write_pyramid(path: Path, a: np.ndarray) -> Path:
    """Tiled 3-level pyramid (level 0 + 2 SubIFDs), zlib so no imagecodecs is needed."""
    opts = {"tile": (TILE, TILE), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        tw.write(a, subifds=2, **opts)
        tw.write(a[::2, ::2], subfiletype=1, **opts)
        tw.write(a[::4, ::4], subfiletype=1, **opts)
    return path


@pytest.fixture(scope="module")
def pyramid(rgb: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pyramid(tmp_path_factory.mktemp("tif") / "slide.tif", rgb)


def expected(a: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Reference window, computed independently by zero-padding the whole array."""
    m = 3000
    padded = np.pad(a, ((m, m), (m, m), (0, 0)))
    return padded[y0 + m : y0 + m + h, x0 + m : x0 + m + w]


def test_pyramid_file_is_really_tiled_and_pyramidal(pyramid: Path, rgb: np.ndarray) -> None:
    with tifffile.TiffFile(pyramid) as tif:
        series = tif.series[0]
        assert [lv.shape[:2] for lv in series.levels] == [(1000, 1000), (500, 500), (250, 250)]
        assert series.levels[0].keyframe.is_tiled
        assert series.levels[0].keyframe.tilewidth == TILE


@pytest.mark.parametrize("window", WINDOWS)
def test_tiff_read_region_matches_png(pyramid: Path, rgb: np.ndarray, window: tuple[int, ...]) -> None:
    with open_image(pyramid) as reader:
        assert isinstance(reader, TiffReader)
        assert isinstance(reader, RegionReader)
        assert (reader.width, reader.height) == (1000, 1000)
        out = reader.read_region(*window)
    _, _, w, h = window
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected(rgb, *window))


def test_outside_is_zero_filled(pyramid: Path, rgb: np.ndarray) -> None:
    with open_image(pyramid) as reader:
        out = reader.read_region(990, -5, 20, 20)
    assert not out[:5].any() and not out[:, 10:].any()
    np.testing.assert_array_equal(out[5:, :10], rgb[0:15, 990:1000])
    assert out[5:, :10].any()


@pytest.mark.parametrize("window", WINDOWS[:4])
def test_png_reader_matches(rgb: np.ndarray, window: tuple[int, ...]) -> None:
    with open_image(PNG) as reader:
        assert isinstance(reader, ArrayReader)
        np.testing.assert_array_equal(reader.read_region(*window), expected(rgb, *window))


def test_planar_and_ome_layouts(rgb: np.ndarray, tmp_path: Path) -> None:
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, np.moveaxis(rgb, -1, 0), tile=(TILE, TILE), photometric="rgb", planarconfig="separate")
    ome_chunky = tmp_path / "chunky.ome.tif"
    tifffile.imwrite(ome_chunky, rgb, tile=(TILE, TILE), photometric="rgb")
    ome_cyx = tmp_path / "channels.ome.tiff"
    tifffile.imwrite(ome_cyx, np.moveaxis(rgb, -1, 0)[None], photometric="minisblack", metadata={"axes": "TCYX"})
    for path in (planar, ome_chunky, ome_cyx):
        with open_image(path) as reader:
            for window in WINDOWS[1:4]:
                np.testing.assert_array_equal(reader.read_region(*window), expected(rgb, *window))


def test_load_rgb(pyramid: Path, rgb: np.ndarray) -> None:
    np.testing.assert_array_equal(load_rgb(pyramid), rgb)
    np.testing.assert_array_equal(load_rgb(PNG), rgb)


def test_jpeg_and_bmp(rgb: np.ndarray, tmp_path: Path) -> None:
    Image.fromarray(rgb).save(tmp_path / "a.bmp")
    np.testing.assert_array_equal(load_rgb(tmp_path / "a.bmp"), rgb)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    out = load_rgb(tmp_path / "a.jpg")
    assert out.shape == rgb.shape and np.abs(out.astype(int) - rgb).mean() < 5


def test_tiff_reader_decodes_only_intersecting_tiles(pyramid: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Count the chunk keys tifffile's Zarr store decodes (each get() decodes one tile),
    and make any whole-plane decode fail outright."""
    fetched: list[tuple[int, int]] = []
    original_get = tifffile.zarr.ZarrTiffStore.get

    async def counting_get(self, key, prototype, byte_range=None):  # type: ignore[no-untyped-def]
        m = re.fullmatch(r"(?:\d+/)?(\d+)\.(\d+)\.0", key)
        if m:
            fetched.append((int(m.group(1)), int(m.group(2))))
        return await original_get(self, key, prototype, byte_range)

    def no_whole_plane(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("whole-plane decode")

    monkeypatch.setattr(tifffile.zarr.ZarrTiffStore, "get", counting_get)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_whole_plane)

    with open_image(pyramid) as reader:
        assert fetched == []  # opening decodes nothing
        for x0, y0, w, h in [(300, 260, 10, 10), (500, 100, 40, 300), (900, 950, 256, 256), (-64, -64, 100, 100)]:
            fetched.clear()
            reader.read_region(x0, y0, w, h)
            xa, ya = max(x0, 0), max(y0, 0)
            xb, yb = min(x0 + w, 1000), min(y0 + h, 1000)
            want = {
                (r, c) for r in range(ya // TILE, (yb - 1) // TILE + 1) for c in range(xa // TILE, (xb - 1) // TILE + 1)
            }
            assert sorted(fetched) == sorted(want), (x0, y0, w, h)
        fetched.clear()
        reader.read_region(3000, 3000, 50, 50)
        assert fetched == []  # nothing to read outside the image
    assert len(want) < 16  # the plane has 4 x 4 tiles


# ------------------------------------------------------------------ bad input


def write_png(path: Path, arr: np.ndarray, bitdepth: int, colour_type: int) -> Path:
    """A valid PNG written by hand (Pillow cannot write 16-bit RGB)."""
    dtype = ">u2" if bitdepth == 16 else "u1"
    raw = b"".join(b"\x00" + row.astype(dtype).tobytes() for row in arr)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    h, w = arr.shape[:2]
    ihdr = struct.pack(">IIBBBBB", w, h, bitdepth, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    return path


def assert_input_error(path: Path, *fragments: str) -> str:
    with pytest.raises(BridgeInputError) as info:
        open_image(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert path.name in msg
    for frag in fragments:
        assert frag in msg, msg
    with pytest.raises(BridgeInputError):
        load_rgb(path)
    return msg


def test_rgba_png(rgb: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    Image.fromarray(np.dstack([rgb[:64, :64], np.full((64, 64), 255, np.uint8)]), "RGBA").save(path)
    msg = assert_input_error(path, "RGBA (4 channels)", "NuClick needs 8-bit RGB")
    assert msg == "image.png is 8-bit RGBA (4 channels); NuClick needs 8-bit RGB"


def test_grey_png(rgb: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.fromarray(rgb[:64, :64, 0], "L").save(path)
    assert_input_error(path, "greyscale (1 channel)")


def test_16bit_grey_png(tmp_path: Path) -> None:
    path = tmp_path / "g16.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(path)
    assert Image.open(path).mode.startswith("I;16")
    assert_input_error(path, "16-bit greyscale")


def test_16bit_rgb_png_is_not_silently_reduced(rgb: np.ndarray, tmp_path: Path) -> None:
    path = write_png(tmp_path / "rgb16.png", rgb[:32, :48].astype(np.uint16) * 257, 16, 2)
    with Image.open(path) as im:  # Pillow would quietly hand back 8-bit RGB
        assert im.mode == "RGB"
    assert_input_error(path, "16-bit RGB")


def test_truncated_png(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    path.write_bytes(PNG.read_bytes()[: PNG.stat().st_size // 2])
    assert_input_error(path, "corrupt")


def test_garbage_files(tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    assert_input_error(tmp_path / "junk.png", "corrupt")
    (tmp_path / "junk.tif").write_bytes(b"this is not an image")
    assert_input_error(tmp_path / "junk.tif", "not a readable TIFF")


def test_truncated_tiff(pyramid: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.tif"
    data = pyramid.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_input_error(path, "truncated")
    path.write_bytes(data[:100])
    assert_input_error(path, "not a readable TIFF")


@pytest.mark.parametrize(
    ("array", "kwargs", "found"),
    [
        (np.zeros((40, 40), np.uint8), {}, "greyscale (1 channel)"),
        (np.zeros((40, 40, 4), np.uint8), {"photometric": "rgb", "extrasamples": [2]}, "RGBA (4 channels)"),
        (np.zeros((40, 40, 3), np.uint16), {"photometric": "rgb"}, "16-bit (uint16) RGB"),
        (np.zeros((40, 40, 3), np.float32), {"photometric": "rgb"}, "floating-point (float32) RGB"),
        (np.zeros((5, 40, 40, 3), np.uint8), {"photometric": "rgb"}, "multi-dimensional"),
    ],
)
def test_bad_tiff_pixel_types(tmp_path: Path, array: np.ndarray, kwargs: dict, found: str) -> None:
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, array, **kwargs)
    assert_input_error(path, found)


@pytest.mark.parametrize("compression", ["lzw", "jpeg"])
def test_compressed_tiles_as_slides_store_them(tmp_path: Path, compression: str, monuseg_pair) -> None:
    """SVS and most pyramidal TIFFs use JPEG (or LZW) tiles; imagecodecs, a
    dependency, decodes them."""
    image = np.ascontiguousarray(monuseg_pair[0][:300, :300])
    path = tmp_path / f"{compression}.svs"
    tifffile.imwrite(path, image, photometric="rgb", tile=(TILE, TILE), compression=compression)
    with open_image(path) as reader:
        window = reader.read_region(10, 20, 100, 80)
    expected = image[20:100, 10:110]
    if compression == "lzw":
        assert np.array_equal(window, expected)
    else:  # lossy: close, not equal
        assert np.abs(window.astype(int) - expected.astype(int)).mean() < 8


def test_missing_and_unsupported(tmp_path: Path) -> None:
    with pytest.raises(BridgeInputError, match=r"not found.*nope\.tif"):
        open_image(tmp_path / "nope.tif")
    (tmp_path / "image.gif").write_bytes(b"GIF89a")
    with pytest.raises(BridgeInputError, match=r"unsupported image type \.gif"):
        open_image(tmp_path / "image.gif")
    with pytest.raises(BridgeInputError, match="not a file"):
        open_image(tmp_path)


def test_array_reader_validates() -> None:
    with pytest.raises(BridgeInputError):
        ArrayReader(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError):
        ArrayReader(np.zeros((4, 4, 3), np.uint8)).read_region(0, 0, -1, 2)
