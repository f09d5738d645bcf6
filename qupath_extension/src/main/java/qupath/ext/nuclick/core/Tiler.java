package qupath.ext.nuclick.core;

import java.util.ArrayList;
import java.util.BitSet;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;

/**
 * Groups clicks into server requests whose answers equal a whole-image run: the Java twin of
 * {@code bridge.client.plan_tiles}, plan for plan.
 * <p>
 * A member's final mask depends on its own patch, on the neighbours whose guidance reaches into it
 * (within {@code patch/2 + 4 sigma + 1} px, Chebyshev) and on the raw masks of the neighbours whose
 * patches overlap it (within {@code patch} px), which in turn depend on their own guidance neighbours.
 * So each request carries, as context, every click within {@code patch} of a member and every click
 * within guidance reach of those; the tile covers the patches of the members and of the overlapping
 * neighbours, clipped to the image.  Clicks are binned on a grid of cells that leave room for those
 * margins; a bin with more clicks than a request may carry is split in four, recursively.
 * <p>
 * All coordinates are in the grid the server sees: level-0 pixels divided by the downsample.
 */
public final class Tiler {

    private Tiler() {
    }

    /** Smallest allowed tile side, in patches. */
    public static final int MIN_TILE_PATCHES = 4;

    /**
     * @param xs        click x in grid pixels (any value; off-image clicks are only context)
     * @param ys        click y in grid pixels
     * @param inside    whether each click lies on the image (only those become members)
     * @param width     grid width of the image
     * @param height    grid height of the image
     * @param patchSize the model's patch side in grid pixels
     * @param sigma     the guidance maps' sigma in grid pixels
     * @param maxTile   largest tile side in grid pixels (at least 4 patches)
     * @param maxClicks most clicks (members + context) per request
     */
    public static List<TilePlan> plan(double[] xs, double[] ys, boolean[] inside, int width, int height, int patchSize,
                                      double sigma, int maxTile, int maxClicks) throws NuClickException {
        return plan(xs, ys, inside, null, width, height, patchSize, sigma, maxTile, maxClicks);
    }

    /**
     * The requests that answer only the clicks marked {@code wanted} (and on the image); every other click
     * is context where the rules above need it, and its patch is covered when its raw mask takes part, so
     * that the wanted clicks come out exactly as in a whole-image run of all clicks.  {@code wanted == null}
     * wants every click (the plan above).
     */
    public static List<TilePlan> plan(double[] xs, double[] ys, boolean[] inside, boolean[] wanted, int width,
                                      int height, int patchSize, double sigma, int maxTile, int maxClicks)
            throws NuClickException {
        int n = xs.length;
        if (ys.length != n || inside.length != n || (wanted != null && wanted.length != n)) {
            throw new IllegalArgumentException("xs, ys, inside and wanted have different lengths");
        }
        if (patchSize < 1) {
            throw new IllegalArgumentException("patch size must be at least 1");
        }
        if (maxTile < MIN_TILE_PATCHES * patchSize) {
            throw new NuClickException(NuClickException.Kind.INPUT, "Tiles must be at least "
                    + MIN_TILE_PATCHES * patchSize + " px a side for patches of " + patchSize + " px (got " + maxTile
                    + "); raise the server's --max-tile-side or --max-message-mb.");
        }
        if (maxClicks < 1) {
            throw new IllegalArgumentException("maxClicks must be at least 1");
        }
        if (n == 0) {
            return List.of();
        }
        return new Planner(xs, ys, inside, wanted, width, height, patchSize, sigma, maxTile, maxClicks).run();
    }

    private static final class Planner {
        final double[] xs;
        final double[] ys;
        final boolean[] inside;
        final boolean[] wanted;
        final int width;
        final int height;
        final int patch;
        final int maxClicks;
        final double overlap;
        final double reach;
        final double cell;
        final int[] ox;
        final int[] oy;
        final Grid grid;

        Planner(double[] xs, double[] ys, boolean[] inside, boolean[] wanted, int width, int height, int patch,
                double sigma, int maxTile, int maxClicks) {
            this.xs = xs;
            this.ys = ys;
            this.inside = inside;
            this.wanted = wanted;
            this.width = width;
            this.height = height;
            this.patch = patch;
            this.maxClicks = maxClicks;
            this.overlap = patch;
            this.reach = patch / 2.0 + 4 * sigma + 1;
            this.cell = maxTile - 2 * (patch + patch / 2 + 2);
            int n = xs.length;
            ox = new int[n];
            oy = new int[n];
            for (int k = 0; k < n; k++) {
                ox[k] = Coords.patchOrigin(xs[k], patch);
                oy[k] = Coords.patchOrigin(ys[k], patch);
            }
            grid = new Grid(xs, ys, Math.max(overlap, reach));
        }

        List<TilePlan> run() throws NuClickException {
            List<Integer> members = new ArrayList<>();
            for (int k = 0; k < xs.length; k++) {
                if (inside[k] && (wanted == null || wanted[k])) {
                    members.add(k);
                }
            }
            return split(members, cell);
        }

        /** Chebyshev neighbours (distance &lt;= r) of any of {@code indices}, themselves included. */
        BitSet near(BitSet indices, double r) {
            BitSet out = new BitSet(xs.length);
            for (int k = indices.nextSetBit(0); k >= 0; k = indices.nextSetBit(k + 1)) {
                grid.collect(xs[k], ys[k], r, out);
            }
            return out;
        }

        TilePlan plan(List<Integer> members) {
            BitSet mem = new BitSet(xs.length);
            for (int k : members) {
                mem.set(k);
            }
            BitSet ring1 = near(mem, overlap);
            ring1.andNot(mem);
            BitSet both = (BitSet) mem.clone();
            both.or(ring1);
            BitSet ring2 = near(both, reach);
            ring2.andNot(both);
            int x0 = Integer.MAX_VALUE, y0 = Integer.MAX_VALUE, x1 = Integer.MIN_VALUE, y1 = Integer.MIN_VALUE;
            for (int k = both.nextSetBit(0); k >= 0; k = both.nextSetBit(k + 1)) {
                if (inside[k]) {
                    x0 = Math.min(x0, ox[k]);
                    y0 = Math.min(y0, oy[k]);
                    x1 = Math.max(x1, ox[k]);
                    y1 = Math.max(y1, oy[k]);
                }
            }
            x0 = Math.max(0, x0);
            y0 = Math.max(0, y0);
            x1 = Math.min(width, x1 + patch);
            y1 = Math.min(height, y1 + patch);
            BitSet context = (BitSet) ring1.clone();
            context.or(ring2);
            int[] sortedMembers = members.stream().mapToInt(Integer::intValue).sorted().toArray();
            return new TilePlan(x0, y0, x1 - x0, y1 - y0, sortedMembers, context.stream().toArray());
        }

        List<TilePlan> split(List<Integer> members, double size) throws NuClickException {
            // Bins keyed by (floor(x / size), floor(y / size)), in key order, members in index order.
            TreeMap<Long, List<Integer>> bins = new TreeMap<>();
            for (int k : members) {
                long bx = (long) Math.floor(xs[k] / size);
                long by = (long) Math.floor(ys[k] / size);
                long key = order(bx, by);
                bins.computeIfAbsent(key, z -> new ArrayList<>()).add(k);
            }
            List<TilePlan> out = new ArrayList<>();
            for (List<Integer> bin : bins.values()) {
                TilePlan p = plan(bin);
                if (p.clickCount() > maxClicks) {
                    if (size <= 1 || p.memberCount() == 1) {
                        int first = p.members()[0];
                        throw new NuClickException(NuClickException.Kind.INPUT, p.clickCount() + " clicks crowd one "
                                + patch + " px patch near (" + Format.fixed(xs[first], 0) + ", "
                                + Format.fixed(ys[first], 0) + "); the server takes " + maxClicks
                                + " per request: raise 'Max clicks per request' (and the server's --max-clicks).");
                    }
                    out.addAll(split(bin, size / 2));
                } else {
                    out.add(p);
                }
            }
            return out;
        }

        /** A long whose natural order is the lexicographic order of (bx, by). */
        static long order(long bx, long by) {
            return ((bx + (1L << 31)) << 32) | ((by + (1L << 31)) & 0xffffffffL);
        }
    }

    /** A uniform bucket grid for Chebyshev radius queries. */
    private static final class Grid {
        final double[] xs;
        final double[] ys;
        final double size;
        final Map<Long, int[]> buckets = new HashMap<>();

        Grid(double[] xs, double[] ys, double size) {
            this.xs = xs;
            this.ys = ys;
            this.size = Math.max(size, 1e-9);
            Map<Long, List<Integer>> tmp = new HashMap<>();
            for (int k = 0; k < xs.length; k++) {
                if (Double.isFinite(xs[k]) && Double.isFinite(ys[k])) {
                    tmp.computeIfAbsent(key(cellOf(xs[k]), cellOf(ys[k])), z -> new ArrayList<>()).add(k);
                }
            }
            tmp.forEach((key, list) -> buckets.put(key, list.stream().mapToInt(Integer::intValue).toArray()));
        }

        long cellOf(double v) {
            return (long) Math.floor(v / size);
        }

        static long key(long cx, long cy) {
            return Planner.order(cx, cy);
        }

        void collect(double x, double y, double r, BitSet out) {
            long cx0 = cellOf(x - r), cx1 = cellOf(x + r), cy0 = cellOf(y - r), cy1 = cellOf(y + r);
            for (long cx = cx0; cx <= cx1; cx++) {
                for (long cy = cy0; cy <= cy1; cy++) {
                    int[] bucket = buckets.get(key(cx, cy));
                    if (bucket == null) {
                        continue;
                    }
                    for (int j : bucket) {
                        if (Math.abs(xs[j] - x) <= r && Math.abs(ys[j] - y) <= r) {
                            out.set(j);
                        }
                    }
                }
            }
        }
    }
}
