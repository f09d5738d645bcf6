package qupath.ext.nuclick.core;

/**
 * Pixels of one tile as they go on the wire (the proto's {@code Tile.encoding} and {@code data}),
 * with the tile's size in its own pixels.
 */
public final class TileData {

    /** The proto's Tile.Encoding names. */
    public enum Encoding {
        RAW_RGB8,
        PNG,
        JPEG
    }

    private final Encoding encoding;
    private final byte[] data;
    private final int width;
    private final int height;

    private TileData(Encoding encoding, byte[] data, int width, int height) {
        if (width < 1 || height < 1) {
            throw new IllegalArgumentException("tile is empty (" + width + " x " + height + " pixels)");
        }
        this.encoding = encoding;
        this.data = data;
        this.width = width;
        this.height = height;
    }

    /** Raw 8-bit RGB, row-major, 3 bytes per pixel, no padding. */
    public static TileData rawRgb(byte[] rgb, int width, int height) {
        if ((long) width * height * 3 != rgb.length) {
            throw new IllegalArgumentException(
                    "raw RGB tile of " + width + " x " + height + " needs " + (long) width * height * 3 + " bytes, not "
                            + rgb.length);
        }
        return new TileData(Encoding.RAW_RGB8, rgb, width, height);
    }

    /**
     * Raw 8-bit RGB from packed (A)RGB ints, as {@code BufferedImage.getRGB} returns them for an RGB
     * image: the alpha byte is dropped, the colour bytes are the image's raw values.
     */
    public static TileData fromPackedRgb(int[] argb, int width, int height) {
        if ((long) width * height != argb.length) {
            throw new IllegalArgumentException("expected " + (long) width * height + " pixels, got " + argb.length);
        }
        byte[] rgb = new byte[argb.length * 3];
        for (int i = 0, j = 0; i < argb.length; i++) {
            int p = argb[i];
            rgb[j++] = (byte) (p >> 16);
            rgb[j++] = (byte) (p >> 8);
            rgb[j++] = (byte) p;
        }
        return new TileData(Encoding.RAW_RGB8, rgb, width, height);
    }

    /** An 8-bit RGB PNG (or JPEG) file's bytes, of {@code width} x {@code height} pixels. */
    public static TileData encoded(Encoding encoding, byte[] data, int width, int height) {
        if (encoding == Encoding.RAW_RGB8) {
            return rawRgb(data, width, height);
        }
        return new TileData(encoding, data, width, height);
    }

    public Encoding encoding() {
        return encoding;
    }

    /** The bytes (not copied). */
    public byte[] data() {
        return data;
    }

    public int width() {
        return width;
    }

    public int height() {
        return height;
    }
}
