package qupath.ext.nuclick;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.awt.image.BufferedImage;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.ZonedDateTime;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.random.RandomGenerator;
import javax.imageio.ImageIO;
import org.locationtech.jts.geom.Coordinate;
import org.locationtech.jts.geom.Geometry;
import org.locationtech.jts.geom.GeometryFactory;
import org.locationtech.jts.geom.LinearRing;
import qupath.ext.nuclick.SegmentPointsCommand.PointRef;
import qupath.ext.nuclick.SegmentPointsCommand.PointSelection;
import qupath.ext.nuclick.core.Click;
import qupath.ext.nuclick.core.Markers;
import qupath.ext.nuclick.core.ModelInfo;
import qupath.ext.nuclick.core.NuClickSettings;
import qupath.ext.nuclick.core.NucleusResult;
import qupath.ext.nuclick.core.NucleusRules;
import qupath.ext.nuclick.core.RunSummary;
import qupath.ext.nuclick.core.SegmentJob;
import qupath.ext.nuclick.core.TileData;
import qupath.imagej.images.servers.ImageJServerBuilder;
import qupath.lib.geom.Point2;
import qupath.lib.images.servers.ImageServer;
import qupath.lib.images.servers.ImageServerMetadata;
import qupath.lib.images.servers.ImageServerProvider;
import qupath.lib.objects.PathObject;
import qupath.lib.objects.PathObjects;
import qupath.lib.objects.classes.PathClass;
import qupath.lib.objects.hierarchy.PathObjectHierarchy;
import qupath.lib.regions.ImagePlane;
import qupath.lib.roi.GeometryTools;
import qupath.lib.roi.ROIs;
import qupath.lib.roi.interfaces.ROI;

/**
 * The extension's non-GUI path on QuPath 0.6's own classes, against a live {@code nuclick-bridge serve}:
 * a real image opened through QuPath's {@link ImageServer}, points as QuPath point annotations in a
 * {@link PathObjectHierarchy}, the points collected as Segment points collects them, pixels read through
 * {@link ImageServerPixels}, the job ({@link SegmentJob} over {@code NuClickHttpClient}) against the server,
 * and the results made into QuPath objects by {@link NucleusObjects}, as one run, then a second run (which
 * must add nothing) and a replace run.  Why a program and not a unit test: it needs QuPath's jars, a JDK 21
 * and a running server, none of which CI or {@code javatest.sh} has; {@code make qupath-check} provides all.
 * <p>
 * Usage: {@code QuPathCheck IMAGE POINTS.csv [EXPECTED.geojson]} with {@code NUCLICK_E2E_URL} (the server's
 * HTTP base URL) and {@code NUCLICK_E2E_TOKEN} (its token, if any) set.  POINTS has the header
 * {@code x,y[,class]} (level-0 pixels); EXPECTED is {@code nuclick-bridge segment}'s GeoJSON for the same
 * image and points, against which every nucleus is compared.  An image without a pixel size (a PNG) gets
 * {@code NUCLICK_QUPATH_CHECK_PIXEL_UM} (default 0.25 µm), as the user would set it.  Prints one line per check; exits 1 when any
 * fails, 2 on bad usage.
 */
final class QuPathCheck {

    /** Overlap with the Python client's nucleus for the same click (the network sees the same pixels). */
    static final double MIN_IOU = 0.98;

    /** The pixel size set when the file has none, as a user sets it in QuPath's Image tab (MoNuSeg: 40x). */
    static final double DEFAULT_PIXEL_UM = 0.25;

    private final List<String> failures = new ArrayList<>();
    private int passed;

    private QuPathCheck() {
    }

    public static void main(String[] args) throws Exception {
        String url = System.getenv("NUCLICK_E2E_URL");
        if (args.length < 2 || args.length > 3 || url == null || url.isBlank()) {
            System.err.println("usage: NUCLICK_E2E_URL=http://127.0.0.1:PORT [NUCLICK_E2E_TOKEN=...] QuPathCheck"
                    + " IMAGE POINTS.csv [EXPECTED.geojson]");
            System.exit(2);
        }
        String token = System.getenv().getOrDefault("NUCLICK_E2E_TOKEN", "");
        Path image = Path.of(args[0]);
        List<Click> clicks = readPoints(Path.of(args[1]));
        Map<String, Geometry> expected = args.length > 2 ? readExpected(Path.of(args[2])) : null;
        var settings = new NuClickSettings(url, token, NuClickSettings.Output.DETECTIONS, false, 1000, 120);

        var check = new QuPathCheck();
        ImageServer<BufferedImage> server = open(image);
        try {
            if (!server.getPixelCalibration().hasPixelSizeMicrons()) {
                double um = Double.parseDouble(System.getenv().getOrDefault("NUCLICK_QUPATH_CHECK_PIXEL_UM",
                        Double.toString(DEFAULT_PIXEL_UM)));
                server.setMetadata(new ImageServerMetadata.Builder(server.getMetadata()).pixelSizeMicrons(um, um).build());
                System.out.println("image: no pixel size in the file; set to " + um + " µm, as in QuPath's Image tab");
            }
            check.run(server, image, clicks, expected, settings);
        } finally {
            server.close();
        }
        System.out.println((check.failures.isEmpty() ? "PASSED" : "FAILED") + ": " + check.passed + " checks passed, "
                + check.failures.size() + " failed");
        for (String f : check.failures) {
            System.out.println("  FAIL " + f);
        }
        System.exit(check.failures.isEmpty() ? 0 : 1);
    }

    /**
     * The image as QuPath opens it: through {@link ImageServerProvider} (QuPath's builders, found by their
     * service registrations); if none is registered on this class path, ImageJ's builder, which QuPath uses
     * for plain PNG/TIFF files, directly.  Either way a real QuPath ImageServer reads the file.  (With no
     * builder registered, QuPath 0.6's provider fails with a NullPointerException rather than its IOException,
     * hence the broad catch.)
     */
    static ImageServer<BufferedImage> open(Path image) throws Exception {
        try {
            var server = ImageServerProvider.buildServer(image.toAbsolutePath().toString(), BufferedImage.class);
            System.out.println("image: " + server.getClass().getName() + " via ImageServerProvider");
            return server;
        } catch (Exception e) {
            var server = new ImageJServerBuilder().buildServer(image.toAbsolutePath().toUri());
            if (server == null) {
                throw new IOException("neither QuPath's ImageServerProvider nor ImageJ could open " + image + ": " + e,
                        e);
            }
            System.out.println("image: " + server.getClass().getName() + " via ImageJServerBuilder (the provider said: "
                    + e + ")");
            return server;
        }
    }

    private void run(ImageServer<BufferedImage> server, Path image, List<Click> clicks, Map<String, Geometry> expected,
                     NuClickSettings settings) throws Exception {
        int width = server.getWidth();
        int height = server.getHeight();
        BufferedImage png = ImageIO.read(image.toFile());
        check(server.isRGB(), "the server reads the image as 8-bit RGB");
        check(width == png.getWidth() && height == png.getHeight(), "the server's size " + width + " x " + height
                + " is the file's (" + png.getWidth() + " x " + png.getHeight() + ")");

        // Raw pixels through the ImageServer equal the file's, at the corners and in the middle.
        var pixels = new ImageServerPixels(server, 0, 0);
        int side = Math.min(256, Math.min(width, height));
        int[][] boxes = {{0, 0}, {width - side, height - side}, {(width - side) / 2, (height - side) / 3}};
        for (int[] b : boxes) {
            TileData got = pixels.read(b[0], b[1], side, side, 1.0);
            TileData want = TileData.fromPackedRgb(png.getRGB(b[0], b[1], side, side, null, 0, side), side, side);
            check(got.width() == side && got.height() == side && Arrays.equals(got.data(), want.data()),
                    "ImageServerPixels gives the file's raw RGB at (" + b[0] + ", " + b[1] + ", " + side + " x " + side + ")");
        }

        // The points as a user places them: one multi-point annotation per class.
        var hierarchy = new PathObjectHierarchy();
        Map<String, List<Point2>> byClass = new LinkedHashMap<>();
        for (Click c : clicks) {
            byClass.computeIfAbsent(c.className() == null ? "" : c.className(), k -> new ArrayList<>())
                    .add(new Point2(c.x(), c.y()));
        }
        for (var e : byClass.entrySet()) {
            PathClass pathClass = e.getKey().isEmpty() ? null : PathClass.fromString(e.getKey());
            var roi = ROIs.createPointsROI(e.getValue(), ImagePlane.getDefaultPlane());
            hierarchy.addObject(PathObjects.createAnnotationObject(roi, pathClass), false);
        }

        // Run 1: every point segmented, one detection per nucleus found.
        var first = segment(hierarchy, server, settings, NucleusRules.Mode.SKIP);
        long found = first.results().stream().filter(NucleusResult::found).count();
        int points = first.plan().toSegment().size();
        System.out.println("run 1: " + first.summary().message().replace('\n', ' '));
        check(points == distinctKeys(clicks), "run 1 segments every distinct point (" + points + ")");
        check(found > 0, "the server found nuclei (" + found + " of " + points + ")");
        check(first.summary().added() == found, "run 1 added one detection per nucleus found");
        var ours = NucleusObjects.ours(hierarchy);
        check(ours.size() == found && hierarchy.getDetectionObjects().size() == found,
                "the hierarchy holds exactly the " + found + " nuclei, all recognised as ours");
        checkObjects(hierarchy, first, width, height, expected);

        // Run 2 (pressing the key again): every point has its nucleus, nothing is sent or added.
        var again = NucleusRules.plan(rulePoints(PointSelection.collect(hierarchy)), NucleusObjects.ours(hierarchy),
                NucleusRules.Mode.SKIP);
        check(again.toSegment().size() == points - found && again.alreadyDone().size() == found,
                "run 2 would segment only the " + (points - found) + " points without a nucleus");

        // Run 3 (replace): each nucleus replaced by the new run's, none added on top.
        var replace = segment(hierarchy, server, settings, NucleusRules.Mode.REPLACE);
        long foundAgain = replace.results().stream().filter(NucleusResult::found).count();
        System.out.println("run 3: " + replace.summary().message().replace('\n', ' '));
        check(foundAgain == found, "the replace run finds the same " + found + " nuclei (" + foundAgain + ")");
        check(replace.summary().replaced() == found, "the replace run replaced " + found + " earlier nuclei ("
                + replace.summary().replaced() + ")");
        check(hierarchy.getDetectionObjects().size() == foundAgain,
                "after the replace run the hierarchy still holds one nucleus per point");
        boolean allNew = NucleusObjects.ours(hierarchy).stream().allMatch(n -> n.marker().runId().equals(replace.runId()));
        check(allNew, "every nucleus left is the replace run's (" + replace.runId() + ")");
    }

    /** What one run did. */
    private record Run(String runId, NucleusRules.Plan<PointRef> plan, List<PointRef> segmented,
                       List<NucleusResult> results, RunSummary summary) {
    }

    /** One Segment points run without the GUI: collect, plan, segment plane by plane, apply as one edit. */
    private static Run segment(PathObjectHierarchy hierarchy, ImageServer<BufferedImage> server,
                               NuClickSettings settings, NucleusRules.Mode mode) throws Exception {
        Map<ImagePlane, List<PointRef>> collected = PointSelection.collect(hierarchy);
        List<PointRef> runPoints = new ArrayList<>();
        collected.values().forEach(runPoints::addAll);
        var plan = NucleusRules.plan(rulePoints(collected), NucleusObjects.ours(hierarchy), mode);
        Map<ImagePlane, List<PointRef>> byPlane = new LinkedHashMap<>();
        for (var p : plan.toSegment()) {
            byPlane.computeIfAbsent(p.handle().roi().getImagePlane(), k -> new ArrayList<>()).add(p.handle());
        }
        var cal = server.getPixelCalibration();
        double pixelSize = cal.hasPixelSizeMicrons() ? cal.getAveragedPixelSizeMicrons() : Double.NaN;
        var job = new SegmentJob(new qupath.ext.nuclick.core.NuClickHttpClient(settings));
        List<PointRef> segmented = new ArrayList<>();
        List<NucleusResult> results = new ArrayList<>();
        ModelInfo model = null;
        for (var entry : byPlane.entrySet()) {
            List<Click> clicks = new ArrayList<>();
            for (PointRef p : entry.getValue()) {
                var pathClass = p.annotation().getPathClass();
                clicks.add(new Click(p.x(), p.y(), pathClass == null ? null : pathClass.toString()));
            }
            var pixels = new ImageServerPixels(server, entry.getKey().getZ(), entry.getKey().getT());
            var outcome = job.run(clicks, server.getWidth(), server.getHeight(), pixelSize, pixels, model, null, null);
            model = outcome.model();
            segmented.addAll(entry.getValue());
            results.addAll(outcome.results());
        }
        String runId = Markers.runId(ZonedDateTime.now(), RandomGenerator.getDefault());
        int skipped = mode == NucleusRules.Mode.SKIP ? plan.alreadyDone().size() : 0;
        var summary = NucleusObjects.apply(hierarchy, cal, settings, runId, mode, runPoints, skipped,
                plan.repeated().size(), segmented, results);
        return new Run(runId, plan, segmented, results, summary);
    }

    private static List<NucleusRules.Point<PointRef>> rulePoints(Map<ImagePlane, List<PointRef>> collected) {
        List<NucleusRules.Point<PointRef>> out = new ArrayList<>();
        for (var list : collected.values()) {
            for (var p : list) {
                out.add(p.asRulePoint());
            }
        }
        return out;
    }

    /** Every nucleus object: named and tagged as ours, in its point's class, inside the image, on its click. */
    private void checkObjects(PathObjectHierarchy hierarchy, Run run, int width, int height,
                              Map<String, Geometry> expected) {
        Map<String, PointRef> byKey = new HashMap<>();
        for (var p : run.segmented()) {
            byKey.put(p.key(), p);
        }
        GeometryFactory factory = GeometryTools.getDefaultFactory();
        int named = 0;
        int tagged = 0;
        int inside = 0;
        int onClick = 0;
        int classed = 0;
        List<Double> ious = new ArrayList<>();
        int unmatched = 0;
        for (PathObject obj : hierarchy.getDetectionObjects()) {
            var marker = Markers.parse(obj.getName());
            PointRef p = marker.map(m -> byKey.get(m.key())).orElse(null);
            if (marker.isPresent() && marker.get().runId().equals(run.runId()) && p != null) {
                named++;
            } else {
                failures.add("object '" + obj.getName() + "' does not carry run " + run.runId() + " and a point's key");
                continue;
            }
            var meta = obj.getMetadata();
            if (run.runId().equals(meta.get(Markers.META_RUN)) && p.annotationId().equals(meta.get(Markers.META_POINT_ID))
                    && p.key().equals(meta.get(Markers.META_POINT))) {
                tagged++;
            }
            ROI roi = obj.getROI();
            if (roi.isArea() && roi.getBoundsX() >= 0 && roi.getBoundsY() >= 0
                    && roi.getBoundsX() + roi.getBoundsWidth() <= width
                    && roi.getBoundsY() + roi.getBoundsHeight() <= height) {
                inside++;
            }
            Geometry shape = roi.getGeometry();
            if (shape.distance(factory.createPoint(new Coordinate(p.x(), p.y()))) < 1.0) {
                onClick++;
            }
            if (java.util.Objects.equals(obj.getPathClass(), p.annotation().getPathClass())) {
                classed++;
            }
            if (expected != null) {
                Geometry want = expected.get(p.key());
                if (want == null) {
                    unmatched++;
                } else {
                    ious.add(shape.intersection(want).getArea() / shape.union(want).getArea());
                }
            }
        }
        int n = hierarchy.getDetectionObjects().size();
        check(named == n, "every nucleus is named 'nuclick-bridge <run> @x,y' with this run and its point (" + named
                + " of " + n + ")");
        check(tagged == n, "every nucleus carries metadata nuclick_run, nuclick_point_id, nuclick_point of its point ("
                + tagged + " of " + n + ")");
        check(inside == n, "every nucleus is an area ROI inside the image (" + inside + " of " + n + ")");
        check(onClick == n, "every nucleus lies on its click, within 1 px (" + onClick + " of " + n + ")");
        check(classed == n, "every nucleus has its point's class (" + classed + " of " + n + ")");
        if (expected != null) {
            long pythonFound = run.segmented().stream().filter(p -> expected.containsKey(p.key())).count();
            check(unmatched == 0 && pythonFound == n, "the same points got a nucleus as with 'nuclick-bridge segment' ("
                    + n + " here, " + pythonFound + " there, " + unmatched + " only here)");
            double min = ious.stream().mapToDouble(Double::doubleValue).min().orElse(0);
            double mean = ious.stream().mapToDouble(Double::doubleValue).average().orElse(0);
            check(min >= MIN_IOU, String.format(Locale.ROOT, "every nucleus overlaps the Python client's at IoU >= %.2f"
                    + " (min %.4f, mean %.4f over %d)", MIN_IOU, min, mean, ious.size()));
        }
    }

    private void check(boolean ok, String what) {
        if (ok) {
            passed++;
            System.out.println("ok   " + what);
        } else {
            failures.add(what);
            System.out.println("FAIL " + what);
        }
    }

    private static int distinctKeys(List<Click> clicks) {
        return (int) clicks.stream().map(c -> Markers.pointKey(c.x(), c.y())).distinct().count();
    }

    /** {@code x,y[,class]} with a header line, as {@code nuclick-bridge segment --points} reads. */
    static List<Click> readPoints(Path csv) throws IOException {
        List<String> lines = Files.readAllLines(csv, StandardCharsets.UTF_8);
        if (lines.isEmpty() || !lines.get(0).replace(" ", "").startsWith("x,y")) {
            throw new IOException(csv + ": the first line must be the header x,y[,class]");
        }
        List<Click> out = new ArrayList<>();
        for (int i = 1; i < lines.size(); i++) {
            String line = lines.get(i).strip();
            if (line.isEmpty()) {
                continue;
            }
            String[] f = line.split(",", -1);
            String cls = f.length > 2 && !f[2].isBlank() ? f[2].strip() : null;
            out.add(new Click(Double.parseDouble(f[0].strip()), Double.parseDouble(f[1].strip()), cls));
        }
        if (out.isEmpty()) {
            throw new IOException(csv + " has no points");
        }
        return out;
    }

    /** {@code nuclick-bridge segment}'s GeoJSON: each nucleus by its click's key. */
    static Map<String, Geometry> readExpected(Path geojson) throws IOException {
        JsonObject root = JsonParser.parseString(Files.readString(geojson, StandardCharsets.UTF_8)).getAsJsonObject();
        GeometryFactory factory = GeometryTools.getDefaultFactory();
        Map<String, Geometry> out = new HashMap<>();
        for (JsonElement el : root.getAsJsonArray("features")) {
            JsonObject feature = el.getAsJsonObject();
            JsonObject nuclick = feature.getAsJsonObject("properties").getAsJsonObject("nuclick");
            String key = Markers.pointKey(nuclick.get("click_x").getAsDouble(), nuclick.get("click_y").getAsDouble());
            JsonObject geometry = feature.getAsJsonObject("geometry");
            JsonArray coords = geometry.getAsJsonArray("coordinates");
            Geometry g;
            if ("Polygon".equals(geometry.get("type").getAsString())) {
                g = polygon(factory, coords);
            } else {
                var parts = new org.locationtech.jts.geom.Polygon[coords.size()];
                for (int i = 0; i < parts.length; i++) {
                    parts[i] = polygon(factory, coords.get(i).getAsJsonArray());
                }
                g = factory.createMultiPolygon(parts);
            }
            out.put(key, g);
        }
        return out;
    }

    private static org.locationtech.jts.geom.Polygon polygon(GeometryFactory factory, JsonArray rings) {
        LinearRing shell = ring(factory, rings.get(0).getAsJsonArray());
        LinearRing[] holes = new LinearRing[rings.size() - 1];
        for (int i = 1; i < rings.size(); i++) {
            holes[i - 1] = ring(factory, rings.get(i).getAsJsonArray());
        }
        return factory.createPolygon(shell, holes);
    }

    private static LinearRing ring(GeometryFactory factory, JsonArray points) {
        List<Coordinate> c = new ArrayList<>();
        for (JsonElement p : points) {
            c.add(new Coordinate(p.getAsJsonArray().get(0).getAsDouble(), p.getAsJsonArray().get(1).getAsDouble()));
        }
        if (!c.get(0).equals2D(c.get(c.size() - 1))) {
            c.add(new Coordinate(c.get(0)));
        }
        return factory.createLinearRing(c.toArray(Coordinate[]::new));
    }
}
