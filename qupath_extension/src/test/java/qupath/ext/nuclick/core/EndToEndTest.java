package qupath.ext.nuclick.core;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assumptions.assumeTrue;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.awt.image.BufferedImage;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import javax.imageio.ImageIO;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/**
 * Java against a real {@code nuclick-bridge} server on 127.0.0.1 (started by
 * {@code tests/test_qupath_extension.py}): real tiles of a MoNuSeg image go out over HTTP/JSON,
 * polygons come back and are checked against the in-process engine's whole-image answer.
 * <p>
 * Skipped unless {@code NUCLICK_E2E_URL} is set.  Also reads {@code NUCLICK_E2E_TOKEN} (the server's
 * token), {@code NUCLICK_E2E_IMAGE} (an 8-bit RGB PNG) and {@code NUCLICK_E2E_CASE} (JSON: the clicks,
 * the Python planner's tiles and Python's answers: for the whole image, for one PNG tile placed at an
 * origin, and for the image read at downsample 2).
 */
class EndToEndTest {

    static String url;
    static String token;
    static BufferedImage image;
    static Path imagePath;
    static JsonObject cases;
    static List<Click> clicks;

    @BeforeAll
    static void load() throws IOException {
        url = System.getenv("NUCLICK_E2E_URL");
        assumeTrue(url != null && !url.isBlank(), "NUCLICK_E2E_URL is not set: no server to talk to");
        token = System.getenv().getOrDefault("NUCLICK_E2E_TOKEN", "");
        imagePath = Path.of(System.getenv("NUCLICK_E2E_IMAGE"));
        image = ImageIO.read(imagePath.toFile());
        cases = JsonParser.parseString(Files.readString(Path.of(System.getenv("NUCLICK_E2E_CASE")),
                StandardCharsets.UTF_8)).getAsJsonObject();
        clicks = new ArrayList<>();
        for (JsonElement el : cases.getAsJsonArray("clicks")) {
            JsonArray c = el.getAsJsonArray();
            clicks.add(new Click(c.get(0).getAsDouble(), c.get(1).getAsDouble(),
                    c.size() > 2 && !c.get(2).isJsonNull() ? c.get(2).getAsString() : null));
        }
    }

    static NuClickSettings settings(String base, String tok) {
        return new NuClickSettings(base, tok, NuClickSettings.Output.DETECTIONS, false, 1000, 60);
    }

    /** Raw RGB of the PNG, read the way QuPath's ImageServer hands out an RGB region. */
    static final class PngPixels implements SegmentJob.PixelSource {
        int reads;

        @Override
        public TileData read(int x, int y, int w, int h, double d) {
            reads++;
            if (d == 1.0) {
                return TileData.fromPackedRgb(image.getRGB(x, y, w, h, null, 0, w), w, h);
            }
            // Area average for an integer downsample, as a pyramid level would give.
            int f = (int) d;
            assertEquals(f, d);
            int tw = (int) Math.ceil(w / d);
            int th = (int) Math.ceil(h / d);
            int[] out = new int[tw * th];
            for (int j = 0; j < th; j++) {
                for (int i = 0; i < tw; i++) {
                    int r = 0, g = 0, b = 0, n = 0;
                    for (int dy = 0; dy < f; dy++) {
                        for (int dx = 0; dx < f; dx++) {
                            int px = x + i * f + dx;
                            int py = y + j * f + dy;
                            if (px < x + w && py < y + h) {
                                int v = image.getRGB(px, py);
                                r += (v >> 16) & 255;
                                g += (v >> 8) & 255;
                                b += v & 255;
                                n++;
                            }
                        }
                    }
                    out[j * tw + i] = (r / n) << 16 | (g / n) << 8 | (b / n);
                }
            }
            return TileData.fromPackedRgb(out, tw, th);
        }
    }

    static double distance(Polygon p, double x, double y) {
        if (p.contains(x, y)) {
            return 0;
        }
        Ring r = p.exterior();
        double best = Double.POSITIVE_INFINITY;
        for (int i = 0; i < r.size(); i++) {
            int j = (i + 1) % r.size();
            double ax = r.x(i), ay = r.y(i), bx = r.x(j), by = r.y(j);
            double len = (bx - ax) * (bx - ax) + (by - ay) * (by - ay);
            double t = len == 0 ? 0 : Math.max(0, Math.min(1, ((x - ax) * (bx - ax) + (y - ay) * (by - ay)) / len));
            best = Math.min(best, Math.hypot(x - (ax + t * (bx - ax)), y - (ay + t * (by - ay))));
        }
        return best;
    }

    @Test
    void checkServerReportsTheRealModel() throws Exception {
        ModelInfo info = new NuClickHttpClient(settings(url, token)).modelInfo(null);
        assertEquals("texture", info.name());
        assertEquals(128, info.patchSize());
        assertEquals(2.0, info.sigma());
        assertEquals(0.25, info.pixelSizeUm());
        assertEquals("cpu", info.device());
        assertTrue(info.authRequired());
        assertTrue(info.describe().startsWith("Model texture test on cpu, pixel size 0.25 µm"), info.describe());
    }

    @Test
    void tileByTileEqualsTheWholeImageRunOfTheEngine() throws Exception {
        int w = image.getWidth();
        int h = image.getHeight();
        int maxTile = cases.get("maxTile").getAsInt();
        var pixels = new PngPixels();
        var job = new SegmentJob(new NuClickHttpClient(settings(url, token)), new SegmentJob.Options(maxTile, null));
        var outcome = job.run(clicks, w, h, 0.25, pixels, null, null, null);

        // The same tiles as bridge.client.plan_tiles, plan for plan.
        List<TilePlan> python = new ArrayList<>();
        for (JsonElement el : cases.getAsJsonArray("plans")) {
            JsonObject p = el.getAsJsonObject();
            python.add(new TilePlan(p.get("x").getAsInt(), p.get("y").getAsInt(), p.get("width").getAsInt(),
                    p.get("height").getAsInt(), ints(p.getAsJsonArray("members")), ints(p.getAsJsonArray("context"))));
        }
        assertEquals(python, outcome.tiles());
        assertTrue(python.size() >= 4, "really tiled: " + python.size());
        assertEquals(python.size(), pixels.reads);

        // Every click gets exactly the polygon of the whole-image run, also at tile borders.
        JsonArray expected = cases.getAsJsonArray("expected");
        assertEquals(clicks.size(), outcome.results().size());
        int found = 0;
        for (int k = 0; k < clicks.size(); k++) {
            NucleusResult got = outcome.results().get(k);
            JsonObject e = expected.get(k).getAsJsonObject();
            assertEquals(k, got.index());
            assertEquals(e.get("found").getAsBoolean(), got.found(), "click " + k + ": " + got.reason());
            if (!got.found()) {
                assertEquals(e.get("reason").getAsString(), got.reason(), "click " + k);
                continue;
            }
            found++;
            Ring r = got.polygon().exterior();
            assertSameRing(e.getAsJsonArray("exterior"), r, "click " + k);
            JsonArray holes = e.getAsJsonArray("holes");
            assertEquals(holes.size(), got.polygon().holes().size(), "click " + k);
            for (int i = 0; i < holes.size(); i++) {
                assertSameRing(holes.get(i).getAsJsonArray(), got.polygon().holes().get(i), "click " + k);
            }
            assertEquals(e.get("score").getAsDouble(), got.score(), 1e-6);
            assertEquals(got.polygon().area(), got.areaPx(), 1e-6);
            double[] b = r.bounds();
            assertTrue(b[0] >= 0 && b[1] >= 0 && b[2] <= w && b[3] <= h, "polygon " + k + " leaves the image");
            assertTrue(distance(got.polygon(), clicks.get(k).x(), clicks.get(k).y()) < 1.0, "polygon " + k
                    + " is not at its click");
        }
        assertTrue(found > 50, "found " + found);
        assertTrue(outcome.results().get(clicks.size() - 2).reason().contains("outside the image"));
    }

    @Test
    void aPngTileWithAnOriginComesBackInLevel0() throws Exception {
        // Python's engine on the same pixels and clicks, shifted to the origin: the expected answer.
        JsonObject c = cases.getAsJsonObject("pngTile");
        double ox = c.getAsJsonArray("origin").get(0).getAsDouble();
        double oy = c.getAsJsonArray("origin").get(1).getAsDouble();
        int[] sent = ints(c.getAsJsonArray("clicks"));
        List<Protocol.WireClick> wire = new ArrayList<>();
        for (int k : sent) {
            Click click = clicks.get(k);
            wire.add(new Protocol.WireClick(ox + click.x(), oy + click.y(), "n" + k, click.className(), false));
        }
        byte[] png = Files.readAllBytes(imagePath);
        String body = Protocol.segmentRequest(TileData.encoded(TileData.Encoding.PNG, png, image.getWidth(),
                image.getHeight()), new Protocol.TilePlacement(ox, oy, 1.0, 0.25), wire, "png-1", null);
        var reply = new NuClickHttpClient(settings(url, token)).segment(body, null);
        assertEquals("png-1", reply.requestId());
        assertEquals(1.0, reply.resampleFactor());
        assertEquals("texture test", reply.model());
        JsonArray expected = c.getAsJsonArray("expected");
        assertEquals(sent.length, reply.results().size());
        for (int i = 0; i < sent.length; i++) {
            Protocol.WireResult r = reply.results().get(i);
            JsonObject e = expected.get(i).getAsJsonObject();
            String what = "click " + sent[i];
            assertEquals(wire.get(i).id(), r.clickId());
            assertEquals(wire.get(i).className() == null ? "" : wire.get(i).className(), r.className());
            assertEquals(e.get("found").getAsBoolean(), r.found(), what);
            if (r.found()) {
                assertSamePolygon(e, r.polygon(), what);
                assertEquals(e.get("score").getAsDouble(), r.score(), 1e-6, what);
            }
        }
    }

    @Test
    void aFinerImageIsReadAtDownsampleTwoAndStillMatchesTheClicks() throws Exception {
        // Say the PNG has 0.125 µm pixels: the model's 0.25 µm means reading it at downsample 2.  Python's
        // engine on the same 2x2-averaged pixels, polygons scaled back by 2, is the expected answer.
        JsonObject c = cases.getAsJsonObject("downsample2");
        int[] chosen = ints(c.getAsJsonArray("clicks"));
        List<Click> some = new ArrayList<>();
        for (int k : chosen) {
            some.add(clicks.get(k));
        }
        var pixels = new PngPixels();
        var outcome = new SegmentJob(new NuClickHttpClient(settings(url, token))).run(some, image.getWidth(),
                image.getHeight(), 0.125, pixels, null, null, null);
        assertEquals(new Scale(2.0, 1.0), outcome.scale());
        JsonArray expected = c.getAsJsonArray("expected");
        assertEquals(some.size(), outcome.results().size());
        for (int i = 0; i < some.size(); i++) {
            NucleusResult r = outcome.results().get(i);
            JsonObject e = expected.get(i).getAsJsonObject();
            String what = "click " + chosen[i];
            assertEquals(e.get("found").getAsBoolean(), r.found(), what + ": " + r.reason());
            if (r.found()) {
                assertSamePolygon(e, r.polygon(), what);
                assertEquals(e.get("score").getAsDouble(), r.score(), 1e-6, what);
                assertEquals(r.polygon().area(), r.areaPx(), 1e-6, what); // level-0 px^2, not tile px^2
            }
        }
    }

    @Test
    void aWrongOrMissingTokenIsAClearErrorAndNothingComesBack() throws Exception {
        var job = new SegmentJob(new NuClickHttpClient(settings(url, "not-the-token")));
        NuClickException wrong = assertThrows(NuClickException.class,
                () -> job.run(clicks, image.getWidth(), image.getHeight(), 0.25, new PngPixels(), null, null, null));
        assertEquals(NuClickException.Kind.AUTH, wrong.kind());
        assertEquals(401, wrong.httpStatus());
        assertEquals("The NuClick server at " + url + " refused the token (wrong bearer token). Set the token of"
                + " 'nuclick-bridge serve --token-file' in Extensions > NuClick > Settings.", wrong.getMessage());
        NuClickException missing = assertThrows(NuClickException.class,
                () -> new NuClickHttpClient(settings(url, "")).modelInfo(null));
        assertTrue(missing.getMessage().startsWith("The NuClick server at " + url + " needs a token (missing bearer"
                + " token"), missing.getMessage());
    }

    @Test
    void aWrongPathOrABadTileGetTheServersReason() throws Exception {
        NuClickException path = assertThrows(NuClickException.class,
                () -> new NuClickHttpClient(settings(url + "/api", token)).modelInfo(null));
        assertEquals("NOT_FOUND", path.code());
        assertEquals(404, path.httpStatus());
        assertTrue(path.getMessage().contains("no such route: GET /api/v1/model"), path.getMessage());
        assertTrue(path.getMessage().contains("the base URL of the server, without a path"), path.getMessage());

        String body = Protocol.segmentRequest(TileData.rawRgb(new byte[4 * 4 * 3], 4, 4),
                new Protocol.TilePlacement(10, 10, 1, 0), List.of(new Protocol.WireClick(2.5, 2.5, "a", null, false)),
                "bad", null);
        NuClickException outside = assertThrows(NuClickException.class,
                () -> new NuClickHttpClient(settings(url, token)).segment(body, null));
        assertEquals(NuClickException.Kind.SERVER, outside.kind());
        assertEquals("INVALID_ARGUMENT", outside.code());
        assertTrue(outside.getMessage().contains("click 'a' at (2.5, 2.5) is outside the tile"), outside.getMessage());
    }

    @Test
    void zeroPointsAndPointsOffTheImageNeverReachTheServer() throws Exception {
        var job = new SegmentJob(new NuClickHttpClient(settings(url, token)));
        NuClickException none = assertThrows(NuClickException.class,
                () -> job.run(List.of(), 10, 10, 0.25, new PngPixels(), null, null, null));
        assertTrue(none.getMessage().startsWith("No points to segment."));
        NuClickException off = assertThrows(NuClickException.class, () -> job.run(
                List.of(new Click(-1, -1), new Click(1e6, 5)), image.getWidth(), image.getHeight(), 0.25,
                new PngPixels(), null, null, null));
        assertEquals(NuClickException.Kind.INPUT, off.kind());
        assertTrue(off.getMessage().startsWith("All 2 points are outside the image"), off.getMessage());
    }

    private static void assertSamePolygon(JsonObject expected, Polygon got, String what) {
        assertSameRing(expected.getAsJsonArray("exterior"), got.exterior(), what);
        JsonArray holes = expected.getAsJsonArray("holes");
        assertEquals(holes.size(), got.holes().size(), what);
        for (int i = 0; i < holes.size(); i++) {
            assertSameRing(holes.get(i).getAsJsonArray(), got.holes().get(i), what);
        }
    }

    private static void assertSameRing(JsonArray expected, Ring got, String what) {
        assertEquals(expected.size(), got.size(), what);
        for (int i = 0; i < got.size(); i++) {
            assertEquals(expected.get(i).getAsJsonArray().get(0).getAsDouble(), got.x(i), 1e-6, what);
            assertEquals(expected.get(i).getAsJsonArray().get(1).getAsDouble(), got.y(i), 1e-6, what);
        }
    }

    private static int[] ints(JsonArray a) {
        int[] out = new int[a.size()];
        for (int i = 0; i < out.length; i++) {
            out[i] = a.get(i).getAsInt();
        }
        return out;
    }
}
