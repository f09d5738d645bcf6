package qupath.ext.nuclick.core;

import java.io.IOException;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.function.BooleanSupplier;

/**
 * Segments the clicks of one image plane through the server, tile by tile: asks the server for its
 * model, picks the downsample that matches the model's pixel size, plans the tiles (with context
 * clicks, so that nuclei at tile borders come out as in a whole-image run), reads each tile's pixels
 * once, sends it and collects one result per click, in click order.
 * <p>
 * All or nothing: any failure (server, protocol, pixels, cancel) ends the run with a
 * {@link NuClickException} and no results, so that callers change nothing on failure.
 */
public final class SegmentJob {

    /** Largest tile side we send, in grid pixels (the server's limit may be lower). */
    public static final int DEFAULT_MAX_TILE = 2048;

    /** Reads pixels of the image being segmented. */
    public interface PixelSource {
        /**
         * The level-0 box ({@code x}, {@code y}, {@code width}, {@code height}) read at {@code downsample}:
         * raw (not display-rendered) 8-bit RGB.  The tile's own size is whatever the reader produced
         * (about {@code width / downsample} x {@code height / downsample}).
         */
        TileData read(int x, int y, int width, int height, double downsample) throws IOException;
    }

    /** Progress: {@code done} of {@code total} tiles, and a line for the user. */
    public interface Progress {
        void update(int done, int total, String message);
    }

    /** Knobs for tests and experts; the defaults are right for QuPath. */
    public record Options(int maxTile, Double simplifyTolerance) {
        public static final Options DEFAULT = new Options(DEFAULT_MAX_TILE, null);
    }

    /** What a run gives back. */
    public record Outcome(List<NucleusResult> results, ModelInfo model, Scale scale, List<TilePlan> tiles) {

        public long found() {
            return results.stream().filter(NucleusResult::found).count();
        }
    }

    private final NuClickHttpClient client;
    private final Options options;

    public SegmentJob(NuClickHttpClient client) {
        this(client, Options.DEFAULT);
    }

    public SegmentJob(NuClickHttpClient client, Options options) {
        this.client = client;
        this.options = options;
    }

    /** The client this job segments through. */
    public NuClickHttpClient client() {
        return client;
    }

    /** The message for an empty selection. */
    public static String noPointsMessage() {
        return "No points to segment. Place points inside nuclei with QuPath's Points tool, then run Segment points"
                + " (it takes the selected point annotations, or the points inside the selected area, or all points"
                + " of the image).";
    }

    /**
     * Segment {@code clicks} (level-0) on an image of {@code width} x {@code height} level-0 pixels.
     *
     * @param pixelSizeUm level-0 pixel size in µm (NaN when unknown)
     * @param model       the server's model info if already fetched, else null
     */
    public Outcome run(List<Click> clicks, int width, int height, double pixelSizeUm, PixelSource pixels,
                       ModelInfo model, Progress progress, BooleanSupplier cancelled) throws NuClickException {
        BooleanSupplier stop = cancelled == null ? () -> false : cancelled;
        Progress report = progress == null ? (d, t, m) -> { } : progress;
        int n = clicks.size();
        if (n == 0) {
            throw new NuClickException(NuClickException.Kind.INPUT, noPointsMessage());
        }
        if (width < 1 || height < 1) {
            throw new NuClickException(NuClickException.Kind.INPUT, "The image is empty (" + width + " x " + height + " px).");
        }
        for (int k = 0; k < n; k++) {
            if (!clicks.get(k).isFinite()) {
                throw new NuClickException(NuClickException.Kind.INPUT, "Point " + (k + 1) + " has a non-finite coordinate ("
                        + clicks.get(k).x() + ", " + clicks.get(k).y() + ").");
            }
        }
        NucleusResult[] results = new NucleusResult[n];
        boolean[] inside = new boolean[n];
        int outside = 0;
        for (int k = 0; k < n; k++) {
            Click c = clicks.get(k);
            inside[k] = Coords.onImage(c.x(), c.y(), width, height);
            if (!inside[k]) {
                outside++;
                results[k] = NucleusResult.notFound(k, c, "click (" + Format.coord(c.x()) + ", " + Format.coord(c.y())
                        + ") is outside the image (" + width + " x " + height + ")");
            }
        }
        if (outside == n) {
            throw new NuClickException(NuClickException.Kind.INPUT, (n == 1 ? "The point is" : "All " + n + " points are")
                    + " outside the image (" + width + " x " + height + " px). Are they from another image?");
        }

        report.update(0, 0, "Asking the server for its model");
        ModelInfo info = model != null ? model : client.modelInfo(stop);
        Geometry geometry = geometry(info, pixelSizeUm);
        List<TilePlan> plans = plan(clicks, inside, null, width, height, geometry);
        segmentTiles(clicks, plans, width, height, pixelSizeUm, pixels, geometry, report, stop, results);
        report.update(plans.size(), plans.size(), "Done");
        return new Outcome(List.of(results), info, geometry.scale(), plans);
    }

    /**
     * How a model sees an image: the downsample to read it at, and the model's sizes in that grid.
     *
     * @param model     the server's model
     * @param scale     the downsample to read at, and the server's own resampling
     * @param patch     the model's patch side in grid pixels (level-0 pixels divided by the downsample)
     * @param sigma     the guidance maps' sigma in grid pixels
     * @param maxTile   largest tile side in grid pixels
     * @param maxClicks most clicks (members + context) in one request
     */
    public record Geometry(ModelInfo model, Scale scale, int patch, double sigma, int maxTile, int maxClicks) {

        /** Level-0 Chebyshev distance within which the raw masks of two clicks can overlap: one patch. */
        public double overlapLevel0() {
            return patch * scale.downsample();
        }

        /** Level-0 Chebyshev distance within which a click's guidance reaches another click's patch. */
        public double reachLevel0() {
            return (patch / 2.0 + 4 * sigma + 1) * scale.downsample();
        }
    }

    /** The geometry of {@code info} on an image of level-0 pixel size {@code pixelSizeUm} (NaN when unknown). */
    public Geometry geometry(ModelInfo info, double pixelSizeUm) throws NuClickException {
        Scale scale = Scale.choose(pixelSizeUm, info.pixelSizeUm());
        double f = scale.serverFactor();
        // Plan in the grid the server sees (pixels at downsample d), with the model's sizes in that grid.
        int patch = (int) Math.ceil(info.patchSize() / f);
        double sigma = info.sigma() / f;
        int maxTile = (int) Math.floor(maxTileSide(info, options.maxTile()) / f);
        int maxClicks = Math.min(client.settings().maxClicksPerRequest(),
                info.maxClicksPerRequest() > 0 ? info.maxClicksPerRequest() : Integer.MAX_VALUE);
        return new Geometry(info, scale, patch, sigma, maxTile, maxClicks);
    }

    /**
     * Segment only the clicks marked {@code wanted}; all the others are context (they guide and bound the
     * wanted ones' nuclei exactly as in a whole-image run of every click, which {@link #run} equals too).
     * Wanted clicks off the image get a "not found" result without a request; nothing is sent when no
     * wanted click is on the image.
     *
     * @return one result per wanted click, in index order ({@link NucleusResult#index()} is the click's index)
     */
    public List<NucleusResult> runSome(List<Click> clicks, boolean[] wanted, int width, int height, double pixelSizeUm,
                                       PixelSource pixels, Geometry geometry, BooleanSupplier cancelled)
            throws NuClickException {
        BooleanSupplier stop = cancelled == null ? () -> false : cancelled;
        int n = clicks.size();
        if (wanted.length != n) {
            throw new IllegalArgumentException("clicks and wanted have different lengths");
        }
        NucleusResult[] results = new NucleusResult[n];
        boolean[] inside = new boolean[n];
        boolean any = false;
        for (int k = 0; k < n; k++) {
            Click c = clicks.get(k);
            inside[k] = c.isFinite() && Coords.onImage(c.x(), c.y(), width, height);
            if (wanted[k] && !inside[k]) {
                results[k] = NucleusResult.notFound(k, c, "click (" + Format.coord(c.x()) + ", " + Format.coord(c.y())
                        + ") is outside the image (" + width + " x " + height + ")");
            }
            any |= wanted[k] && inside[k];
        }
        if (any) {
            List<TilePlan> plans = plan(clicks, inside, wanted, width, height, geometry);
            segmentTiles(clicks, plans, width, height, pixelSizeUm, pixels, geometry, (d, t, m) -> { }, stop, results);
        }
        List<NucleusResult> out = new ArrayList<>();
        for (int k = 0; k < n; k++) {
            if (wanted[k]) {
                out.add(results[k]);
            }
        }
        return out;
    }

    private static List<TilePlan> plan(List<Click> clicks, boolean[] inside, boolean[] wanted, int width, int height,
                                       Geometry g) throws NuClickException {
        int n = clicks.size();
        double d = g.scale().downsample();
        double[] gx = new double[n];
        double[] gy = new double[n];
        for (int k = 0; k < n; k++) {
            gx[k] = clicks.get(k).x() / d;
            gy[k] = clicks.get(k).y() / d;
        }
        return Tiler.plan(gx, gy, inside, wanted, Coords.gridSize(width, d), Coords.gridSize(height, d), g.patch(),
                g.sigma(), g.maxTile(), g.maxClicks());
    }

    /** Reads, sends and collects every planned tile, filling the members' results. */
    private void segmentTiles(List<Click> clicks, List<TilePlan> plans, int width, int height, double pixelSizeUm,
                              PixelSource pixels, Geometry g, Progress report, BooleanSupplier stop,
                              NucleusResult[] results) throws NuClickException {
        double d = g.scale().downsample();
        double sentPixelSize = pixelSizeUm > 0 && Double.isFinite(pixelSizeUm) ? pixelSizeUm : 0;
        for (int t = 0; t < plans.size(); t++) {
            if (stop.getAsBoolean()) {
                throw new NuClickException(NuClickException.Kind.CANCELLED, "Cancelled.");
            }
            TilePlan plan = plans.get(t);
            report.update(t, plans.size(), "Tile " + (t + 1) + " of " + plans.size() + " (" + plan.memberCount()
                    + " points)");
            int[] box = Coords.level0Box(plan.x(), plan.y(), plan.width(), plan.height(), d, width, height);
            TileData tile;
            try {
                tile = pixels.read(box[0], box[1], box[2], box[3], d);
            } catch (IOException | RuntimeException e) {
                throw new NuClickException(NuClickException.Kind.PIXELS, "Could not read the image's pixels at ("
                        + box[0] + ", " + box[1] + ", " + box[2] + " x " + box[3] + ") at downsample " + Format.number(d)
                        + ": " + e.getMessage(), e);
            }
            if (Math.abs(tile.width() * d - box[2]) > d + 1 || Math.abs(tile.height() * d - box[3]) > d + 1) {
                throw new NuClickException(NuClickException.Kind.PIXELS, "Reading (" + box[0] + ", " + box[1] + ", "
                        + box[2] + " x " + box[3] + ") at downsample " + Format.number(d) + " gave " + tile.width()
                        + " x " + tile.height() + " pixels instead of about " + Math.round(box[2] / d) + " x "
                        + Math.round(box[3] / d) + ".");
            }
            String body = Protocol.segmentRequest(tile, new Protocol.TilePlacement(box[0], box[1], d, sentPixelSize),
                    wireClicks(clicks, plan, box[0], box[1], tile.width() * d, tile.height() * d), "tile-" + (t + 1),
                    options.simplifyTolerance(), client.settings().modelName());
            Protocol.SegmentReply reply = client.segment(body, stop);
            client.checkModel(reply);
            collect(reply, plan, clicks, results);
        }
    }

    /** Largest tile side in grid pixels that the server takes, in size and in bytes. */
    static int maxTileSide(ModelInfo info, int wanted) {
        int side = wanted;
        if (info.maxTileSide() > 0) {
            side = Math.min(side, info.maxTileSide());
        }
        if (info.maxMessageBytes() > 0) {
            // Raw RGB in base64 is 4 bytes per pixel; keep a fifth of the body for the clicks and JSON.
            side = (int) Math.min(side, Math.floor(Math.sqrt(0.8 * info.maxMessageBytes() / 4.0)));
        }
        return side;
    }

    /**
     * The clicks of one request, in index order: members (moved inside the tile when rounding of its
     * size left them just past its edge) and context clicks as they are.
     */
    static List<Protocol.WireClick> wireClicks(List<Click> clicks, TilePlan plan, double ox, double oy, double extentX,
                                               double extentY) {
        int[] members = plan.members();
        int[] context = plan.context();
        int[] all = new int[members.length + context.length];
        System.arraycopy(members, 0, all, 0, members.length);
        System.arraycopy(context, 0, all, members.length, context.length);
        Arrays.sort(all);
        List<Protocol.WireClick> out = new ArrayList<>(all.length);
        for (int k : all) {
            Click c = clicks.get(k);
            boolean isContext = Arrays.binarySearch(context, k) >= 0;
            double x = c.x();
            double y = c.y();
            if (!isContext) {
                x = Coords.clampInto(x, ox, ox + extentX);
                y = Coords.clampInto(y, oy, oy + extentY);
            }
            out.add(new Protocol.WireClick(x, y, Integer.toString(k), c.className(), isContext));
        }
        return out;
    }

    private static void collect(Protocol.SegmentReply reply, TilePlan plan, List<Click> clicks, NucleusResult[] results)
            throws NuClickException {
        Map<String, Protocol.WireResult> byId = new HashMap<>();
        for (Protocol.WireResult r : reply.results()) {
            byId.put(r.clickId(), r);
        }
        for (int k : plan.members()) {
            Protocol.WireResult r = byId.get(Integer.toString(k));
            if (r == null) {
                throw Protocol.malformed("it has no result for click " + k + " (" + reply.results().size()
                        + " results for " + plan.memberCount() + " clicks)");
            }
            Click c = clicks.get(k);
            if (r.found()) {
                results[k] = new NucleusResult(k, c, true, r.polygon(), r.areaPx(), r.score(), "");
            } else {
                results[k] = NucleusResult.notFound(k, c, r.reason().isEmpty() ? "no nucleus found" : r.reason());
            }
        }
    }
}
