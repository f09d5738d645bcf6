package qupath.ext.nuclick.core;

import java.util.List;

/** A nucleus outline in level-0 coordinates: an exterior ring and optional holes. */
public record Polygon(Ring exterior, List<Ring> holes) {

    public Polygon {
        holes = List.copyOf(holes);
    }

    /** Area in level-0 pixels^2 (exterior minus holes). */
    public double area() {
        double a = Math.abs(exterior.signedArea());
        for (Ring h : holes) {
            a -= Math.abs(h.signedArea());
        }
        return a;
    }

    public boolean contains(double x, double y) {
        if (!exterior.contains(x, y)) {
            return false;
        }
        for (Ring h : holes) {
            if (h.contains(x, y)) {
                return false;
            }
        }
        return true;
    }
}
