package qupath.ext.nuclick.core;

/**
 * The one place where coordinates change frame.
 * <p>
 * Every coordinate the extension handles is a continuous level-0 pixel coordinate in QuPath's
 * convention: level-0 pixel (c, r) spans [c, c+1) x [r, r+1), so its centre is (c + 0.5, r + 0.5).
 * QuPath's ROIs use the same convention, so points and polygons go through without half-pixel shifts.
 * A tile read at downsample d with its top-left corner at level-0 (ox, oy) maps its own pixel (i, j)
 * to the level-0 square [ox + i*d, ox + (i+1)*d) x [oy + j*d, oy + (j+1)*d).
 */
public final class Coords {

    private Coords() {
    }

    /** Level-0 coordinate -&gt; coordinate in a tile whose corner is at level-0 {@code origin}, read at {@code downsample}. */
    public static double toTile(double level0, double origin, double downsample) {
        return (level0 - origin) / downsample;
    }

    /** Inverse of {@link #toTile}. */
    public static double toLevel0(double tile, double origin, double downsample) {
        return tile * downsample + origin;
    }

    /** The pixel (column or row) that contains a continuous coordinate. */
    public static int pixelOf(double v) {
        return (int) Math.floor(v);
    }

    /**
     * Top-left pixel (along one axis) of the {@code size}-pixel patch centred on a click: the click's
     * pixel lands at index {@code size / 2}, as on the server.
     */
    public static int patchOrigin(double v, int size) {
        return pixelOf(v) - size / 2;
    }

    /** Whether a level-0 point lies on an image of {@code width} x {@code height} pixels. */
    public static boolean onImage(double x, double y, int width, int height) {
        return x >= 0 && x < width && y >= 0 && y < height;
    }

    /** {@code v} moved into [lo, hi), for clicks that rounding of a tile's size put just past its edge. */
    public static double clampInto(double v, double lo, double hi) {
        return Math.min(Math.max(v, lo), Math.nextDown(hi));
    }

    /**
     * The level-0 box (x, y, width, height) of a tile planned in the grid of an image read at
     * {@code downsample}: the grid box scaled up, rounded outwards to whole level-0 pixels and clipped
     * to the image.  At downsample 1 this is the grid box itself.
     */
    public static int[] level0Box(int gx, int gy, int gw, int gh, double downsample, int width, int height) {
        int x0 = Math.max(0, (int) Math.floor(gx * downsample));
        int y0 = Math.max(0, (int) Math.floor(gy * downsample));
        int x1 = Math.min(width, (int) Math.ceil((gx + gw) * downsample));
        int y1 = Math.min(height, (int) Math.ceil((gy + gh) * downsample));
        return new int[] {x0, y0, Math.max(0, x1 - x0), Math.max(0, y1 - y0)};
    }

    /** Size in grid pixels of an image side of {@code n} level-0 pixels read at {@code downsample}. */
    public static int gridSize(int n, double downsample) {
        return Math.max(1, (int) Math.ceil(n / downsample - 1e-9));
    }
}
