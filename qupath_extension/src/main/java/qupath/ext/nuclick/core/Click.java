package qupath.ext.nuclick.core;

/**
 * One point placed by the user: continuous level-0 image coordinates in QuPath's convention
 * (pixel (c, r) spans [c, c+1) x [r, r+1)), and its class name (null for none).
 */
public record Click(double x, double y, String className) {

    public Click(double x, double y) {
        this(x, y, null);
    }

    public boolean isFinite() {
        return Double.isFinite(x) && Double.isFinite(y);
    }
}
