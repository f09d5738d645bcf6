package qupath.ext.nuclick.core;

import java.util.Arrays;

/**
 * A closed ring of a polygon in level-0 coordinates; the last vertex is not a repeat of the first.
 */
public final class Ring {

    private final double[] xs;
    private final double[] ys;

    public Ring(double[] xs, double[] ys) {
        if (xs.length != ys.length) {
            throw new IllegalArgumentException("x and y have different lengths");
        }
        this.xs = xs.clone();
        this.ys = ys.clone();
    }

    public int size() {
        return xs.length;
    }

    public double x(int i) {
        return xs[i];
    }

    public double y(int i) {
        return ys[i];
    }

    public double[] xs() {
        return xs.clone();
    }

    public double[] ys() {
        return ys.clone();
    }

    /** Signed shoelace area (positive for counter-clockwise in a y-up frame). */
    public double signedArea() {
        double s = 0;
        int n = xs.length;
        for (int i = 0; i < n; i++) {
            int j = (i + 1) % n;
            s += xs[i] * ys[j] - xs[j] * ys[i];
        }
        return s / 2;
    }

    /** [minX, minY, maxX, maxY]. */
    public double[] bounds() {
        double[] b = {Double.POSITIVE_INFINITY, Double.POSITIVE_INFINITY, Double.NEGATIVE_INFINITY, Double.NEGATIVE_INFINITY};
        for (int i = 0; i < xs.length; i++) {
            b[0] = Math.min(b[0], xs[i]);
            b[1] = Math.min(b[1], ys[i]);
            b[2] = Math.max(b[2], xs[i]);
            b[3] = Math.max(b[3], ys[i]);
        }
        return b;
    }

    /** Even-odd point-in-ring test. */
    public boolean contains(double x, double y) {
        boolean inside = false;
        int n = xs.length;
        for (int i = 0, j = n - 1; i < n; j = i++) {
            if ((ys[i] > y) != (ys[j] > y) && x < (xs[j] - xs[i]) * (y - ys[i]) / (ys[j] - ys[i]) + xs[i]) {
                inside = !inside;
            }
        }
        return inside;
    }

    @Override
    public boolean equals(Object o) {
        return o instanceof Ring r && Arrays.equals(xs, r.xs) && Arrays.equals(ys, r.ys);
    }

    @Override
    public int hashCode() {
        return 31 * Arrays.hashCode(xs) + Arrays.hashCode(ys);
    }

    @Override
    public String toString() {
        return "Ring(" + xs.length + " points)";
    }
}
