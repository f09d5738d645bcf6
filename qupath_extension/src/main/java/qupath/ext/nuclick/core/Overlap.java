package qupath.ext.nuclick.core;

/** How much two nucleus outlines agree: intersection over union, by sampling. */
public final class Overlap {

    private Overlap() {
    }

    /** Samples per level-0 pixel side. */
    public static final int SAMPLES = 4;

    /**
     * Intersection over union of two polygons (holes excluded), from {@link #SAMPLES} x {@link #SAMPLES} samples
     * per level-0 pixel over the box of both: 1 for identical outlines, 0 for disjoint ones, 1 for two nulls,
     * 0 when only one is null.
     */
    public static double iou(Polygon a, Polygon b) {
        if (a == null || b == null) {
            return a == b ? 1 : 0;
        }
        double[] ba = a.exterior().bounds();
        double[] bb = b.exterior().bounds();
        double x0 = Math.floor(Math.min(ba[0], bb[0]));
        double y0 = Math.floor(Math.min(ba[1], bb[1]));
        double x1 = Math.ceil(Math.max(ba[2], bb[2]));
        double y1 = Math.ceil(Math.max(ba[3], bb[3]));
        long both = 0;
        long either = 0;
        double step = 1.0 / SAMPLES;
        for (double y = y0 + step / 2; y < y1; y += step) {
            for (double x = x0 + step / 2; x < x1; x += step) {
                boolean inA = a.contains(x, y);
                boolean inB = b.contains(x, y);
                if (inA && inB) {
                    both++;
                }
                if (inA || inB) {
                    either++;
                }
            }
        }
        return either == 0 ? 1 : (double) both / either;
    }
}
