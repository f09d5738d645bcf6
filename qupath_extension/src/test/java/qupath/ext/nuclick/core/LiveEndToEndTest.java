package qupath.ext.nuclick.core;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assumptions.assumeTrue;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonParser;
import java.awt.image.BufferedImage;
import java.io.IOException;
import java.net.ServerSocket;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Comparator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import javax.imageio.ImageIO;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/**
 * Live mode against a real {@code nuclick-bridge serve} (started by {@code tests/test_qupath_extension.py}): points
 * are added, moved and deleted on a real MoNuSeg image, in single clicks and in bursts, and the nuclei the edits
 * leave are compared with what {@link SegmentJob} (the batch "Segment points") gives for the same final points:
 * one nucleus per point that the batch finds one for, none for the others, IoU at least 0.98 each.  Then the
 * server goes away (a proxy in front of it closes while a round is at the server), and a closed port.
 * Click-to-nucleus latencies are printed as information only.
 * <p>
 * Skipped unless {@code NUCLICK_LIVE_URL} is set.  Also reads {@code NUCLICK_LIVE_TOKEN}, {@code NUCLICK_LIVE_IMAGE}
 * (an 8-bit RGB PNG at 0.25 µm per pixel) and {@code NUCLICK_LIVE_CLICKS} (JSON: {@code [[x, y, class or null],
 * ...]}, one click inside each nucleus of the image).
 */
class LiveEndToEndTest {

    static final double PIXEL_UM = 0.25;
    static final double MIN_IOU = 0.98;

    static String url;
    static String token;
    static BufferedImage image;
    static List<Click> all;

    @BeforeAll
    static void load() throws IOException {
        url = System.getenv("NUCLICK_LIVE_URL");
        assumeTrue(url != null && !url.isBlank(), "NUCLICK_LIVE_URL is not set: no server to talk to");
        token = System.getenv().getOrDefault("NUCLICK_LIVE_TOKEN", "");
        image = ImageIO.read(Path.of(System.getenv("NUCLICK_LIVE_IMAGE")).toFile());
        all = new ArrayList<>();
        for (JsonElement el : JsonParser.parseString(Files.readString(Path.of(System.getenv("NUCLICK_LIVE_CLICKS")),
                StandardCharsets.UTF_8)).getAsJsonArray()) {
            JsonArray c = el.getAsJsonArray();
            all.add(new Click(c.get(0).getAsDouble(), c.get(1).getAsDouble(),
                    c.size() > 2 && !c.get(2).isJsonNull() ? c.get(2).getAsString() : null));
        }
    }

    static NuClickSettings settings(String base) {
        return new NuClickSettings(base, token, NuClickSettings.Output.DETECTIONS, false, 1000, 60);
    }

    /** Raw RGB of the PNG (the image is at the model's pixel size, so always read at downsample 1). */
    static final SegmentJob.PixelSource PIXELS = (x, y, w, h, d) -> {
        assertEquals(1.0, d);
        return TileData.fromPackedRgb(image.getRGB(x, y, w, h, null, 0, w), w, h);
    };

    static LiveController live(String base, LiveView view) throws NuClickException {
        return new LiveController(new SegmentJob(new NuClickHttpClient(settings(base))), image.getWidth(),
                image.getHeight(), PIXEL_UM, PIXELS, Runnable::run, view);
    }

    /** The {@code n} clicks nearest to (x, y), nearest first. */
    static List<Click> near(double x, double y, int n) {
        List<Click> sorted = new ArrayList<>(all);
        sorted.sort(Comparator.comparingDouble(c -> Math.hypot(c.x() - x, c.y() - y)));
        return new ArrayList<>(sorted.subList(0, n));
    }

    static void idle(LiveController c) throws InterruptedException {
        assertTrue(c.awaitIdle(300, TimeUnit.SECONDS), "live mode did not catch up");
    }

    /**
     * The batch run of {@code points} (in this order, as live mode sends them: first added first) against the
     * nuclei the edits left: the same points have nuclei, each at IoU &gt;= 0.98.  Returns the mean IoU.
     */
    static double assertSameAsBatch(Map<String, Click> points, LiveView view, String what) throws Exception {
        List<String> ids = new ArrayList<>(points.keySet());
        List<Click> clicks = new ArrayList<>(points.values());
        var outcome = new SegmentJob(new NuClickHttpClient(settings(url))).run(clicks, image.getWidth(),
                image.getHeight(), PIXEL_UM, PIXELS, null, null, null);
        Map<String, NucleusResult> shown = view.snapshot();
        int found = 0;
        double sum = 0;
        double min = 1;
        for (int k = 0; k < ids.size(); k++) {
            NucleusResult batch = outcome.results().get(k);
            NucleusResult got = shown.remove(ids.get(k));
            assertEquals(batch.found(), got != null, what + ": point " + ids.get(k) + " at " + clicks.get(k)
                    + (batch.found() ? " has no nucleus" : " has a nucleus the batch run does not find: "
                    + batch.reason()));
            if (got == null) {
                continue;
            }
            found++;
            assertEquals(clicks.get(k), got.click(), what + ": the nucleus of " + ids.get(k) + " is for another place");
            double iou = Overlap.iou(batch.polygon(), got.polygon());
            assertTrue(iou >= MIN_IOU, what + ": IoU " + iou + " for point " + ids.get(k));
            sum += iou;
            min = Math.min(min, iou);
        }
        assertTrue(shown.isEmpty(), what + ": nuclei of points that are gone: " + shown.keySet());
        double mean = found == 0 ? 1 : sum / found;
        System.out.printf(Locale.ROOT, "live %s: %d points, %d nuclei, IoU with the batch run mean %.4f min %.4f%n",
                what, ids.size(), found, mean, min);
        assertTrue(found >= ids.size() / 2, what + ": too few nuclei found (" + found + ")");
        return mean;
    }

    static void report(String what, LiveView view, LiveController c) {
        System.out.printf(Locale.ROOT, "live latency %s (information only): click to nucleus %s; %s%n", what,
                LiveView.describe(view.latencies()), c.stats());
    }

    @Test
    void clicksOneAtATimeEachGiveOneEditAndTheBatchRunsNuclei() throws Exception {
        var view = new LiveView();
        Map<String, Click> points = new LinkedHashMap<>();
        try (var c = live(url, view)) {
            int k = 0;
            for (Click click : near(image.getWidth() / 2.0, image.getHeight() / 2.0, 12)) {
                String id = "p" + k++;
                int before = view.edits.size();
                view.asked(id);
                c.add(id, click.x(), click.y(), click.className());
                points.put(id, click);
                idle(c);
                assertEquals(before + 1, view.edits.size(), "one edit for click " + id);
                var edit = view.edits.get(view.edits.size() - 1);
                assertTrue(edit.put().stream().anyMatch(p -> p.pointId().equals(id)), "the edit holds " + id);
            }
            assertSameAsBatch(points, view, "one at a time");
            report("one at a time", view, c);
            assertTrue(view.stops.isEmpty(), view.stops.toString());
        }
    }

    @Test
    void movesAndDeletesEndInTheBatchRunsNucleiOfTheFinalPoints() throws Exception {
        var view = new LiveView();
        Map<String, Click> points = new LinkedHashMap<>();
        List<Click> region = near(250, 250, 22);
        try (var c = live(url, view)) {
            for (int k = 0; k < 15; k++) {
                Click click = region.get(k);
                c.add("p" + k, click.x(), click.y(), click.className());
                points.put("p" + k, click);
            }
            idle(c);
            assertSameAsBatch(points, view, "before moves");
            // Moves onto other nuclei of the region, and deletes: each its own edit.
            int spare = 15;
            for (int k : new int[] {0, 4, 9, 13}) {
                Click to = region.get(spare++);
                int before = view.edits.size();
                view.asked("p" + k);
                c.move("p" + k, to.x(), to.y(), to.className());
                points.put("p" + k, to);
                idle(c);
                assertEquals(before + 1, view.edits.size(), "one edit for the move of p" + k);
            }
            for (int k : new int[] {2, 7, 11}) {
                int before = view.edits.size();
                boolean had = view.snapshot().containsKey("p" + k);
                c.delete("p" + k);
                points.remove("p" + k);
                idle(c);
                if (had) {
                    assertEquals(before + 1, view.edits.size(), "one edit for the delete of p" + k);
                    assertEquals(List.of("p" + k), view.edits.get(view.edits.size() - 1).removed());
                } else {
                    assertTrue(view.edits.size() <= before + 1, "at most one edit for the delete of p" + k);
                }
            }
            // A move by a few pixels within the same nucleus.
            Click nudged = new Click(points.get("p1").x() + 2.25, points.get("p1").y() - 1.5, "Tumor");
            c.move("p1", nudged.x(), nudged.y(), nudged.className());
            points.put("p1", nudged);
            idle(c);
            assertEquals("Tumor", view.snapshot().get("p1").click().className());
            assertSameAsBatch(points, view, "after moves and deletes");
            report("moves", view, c);
            assertTrue(view.stops.isEmpty(), view.stops.toString());
        }
    }

    /**
     * 30 clicks from {@code region} (and 3 moves onto its next clicks and 3 deletes among them), {@code pauseMs}
     * apart (0: as fast as the calls go).
     */
    static void burst(LiveController c, LiveView view, Map<String, Click> points, String prefix, List<Click> region,
                      long pauseMs) throws InterruptedException {
        for (int k = 0; k < 30; k++) {
            Click click = region.get(k);
            view.asked(prefix + k);
            c.add(prefix + k, click.x(), click.y(), click.className());
            points.put(prefix + k, click);
            if (k % 10 == 9) { // a move and a delete in the middle of the burst
                Click to = region.get(30 + k / 10);
                view.asked(prefix + (k - 5));
                c.move(prefix + (k - 5), to.x(), to.y(), to.className());
                points.put(prefix + (k - 5), to);
                c.delete(prefix + (k - 8));
                points.remove(prefix + (k - 8));
            }
            if (pauseMs > 0) {
                Thread.sleep(pauseMs);
            }
        }
    }

    @Test
    void burstsOfThirtyClicksWithMovesAndDeletesEndInTheBatchRunsNuclei() throws Exception {
        var view = new LiveView();
        Map<String, Click> points = new LinkedHashMap<>();
        try (var c = live(url, view)) {
            idle(c); // the model is known: the first click goes to the server at once, the rest pile up
            long t0 = System.nanoTime();
            burst(c, view, points, "a", near(image.getWidth() * 0.75, image.getHeight() * 0.7, 33), 0);
            double sentMs = (System.nanoTime() - t0) / 1e6;
            idle(c);
            double allMs = (System.nanoTime() - t0) / 1e6;
            int edits = view.edits.size();
            assertSameAsBatch(points, view, "burst as fast as the calls go");
            System.out.printf(Locale.ROOT, "live burst: 36 events sent in %.1f ms, all nuclei in %.0f ms, %d edits%n",
                    sentMs, allMs, edits);
            assertTrue(edits < 30, "the burst was coalesced: " + edits + " edits");

            // Clicking fast by hand: an event every 20 ms, so rounds overlap the clicks.
            t0 = System.nanoTime();
            burst(c, view, points, "b", near(image.getWidth() * 0.25, image.getHeight() * 0.3, 33), 20);
            idle(c);
            allMs = (System.nanoTime() - t0) / 1e6;
            assertSameAsBatch(points, view, "burst of a click every 20 ms, after the first burst");
            System.out.printf(Locale.ROOT, "live burst: 36 events 20 ms apart, all nuclei %.0f ms after the first,"
                    + " %d edits%n", allMs, view.edits.size() - edits);
            report("bursts", view, c);
            assertTrue(view.stops.isEmpty(), view.stops.toString());
        }
    }

    /** Forwards every request to the real server until closed; can hold segment requests. */
    static final class Proxy implements FakeServer.Handler {
        final HttpClient http = HttpClient.newHttpClient();
        volatile CountDownLatch gate = new CountDownLatch(0);
        volatile CountDownLatch held = new CountDownLatch(1);

        @Override
        public FakeServer.Reply handle(FakeServer.Request r) throws Exception {
            if (r.path().endsWith("/v1/segment") && gate.getCount() > 0) {
                held.countDown();
                gate.await(60, TimeUnit.SECONDS);
            }
            var b = HttpRequest.newBuilder(URI.create(url + r.path())).timeout(Duration.ofSeconds(120));
            if (r.authorization() != null) {
                b.header("Authorization", r.authorization());
            }
            b.method(r.method(), r.body().isEmpty() ? HttpRequest.BodyPublishers.noBody()
                    : HttpRequest.BodyPublishers.ofString(r.body()));
            if (r.contentType() != null) {
                b.header("Content-Type", r.contentType());
            }
            HttpResponse<String> response = http.send(b.build(), HttpResponse.BodyHandlers.ofString());
            return new FakeServer.Reply(response.statusCode(), response.body());
        }
    }

    @Test
    void aServerThatGoesAwayMidRoundStopsLiveModeOnceAndLeavesTheNucleiItHadGiven() throws Exception {
        var view = new LiveView();
        var proxy = new Proxy();
        var server = new FakeServer(proxy);
        Map<String, Click> points = new LinkedHashMap<>();
        List<Click> region = near(image.getWidth() * 0.3, image.getHeight() * 0.75, 9);
        try (var c = live(server.url(), view)) {
            for (int k = 0; k < 5; k++) {
                Click click = region.get(k);
                c.add("p" + k, click.x(), click.y(), click.className());
                points.put("p" + k, click);
                idle(c);
            }
            int edits = view.edits.size();
            assertSameAsBatch(points, view, "before the server went away");
            Map<String, NucleusResult> before = view.snapshot();

            proxy.gate = new CountDownLatch(1);
            for (int k = 5; k < 9; k++) {
                c.add("p" + k, region.get(k).x(), region.get(k).y(), null);
            }
            assertTrue(proxy.held.await(60, TimeUnit.SECONDS), "a round reached the server");
            server.close(); // while the round is at the server
            proxy.gate.countDown();
            idle(c);
            c.move("p0", region.get(0).x() + 3, region.get(0).y(), null);
            c.delete("p1");
            idle(c);

            assertFalse(c.isRunning());
            assertEquals(1, view.stops.size(), view.stops.toString());
            assertTrue(view.stops.get(0).contains("NuClick server at " + server.url()), view.stops.get(0));
            System.out.println("live stop message: " + view.stops.get(0));
            assertEquals(edits, view.edits.size(), "no edit once the server went away");
            assertTrue(view.afterStop.isEmpty());
            assertEquals(before, view.snapshot(), "the nuclei given before stay as they were");
        } finally {
            proxy.gate.countDown();
            server.close();
        }
    }

    @Test
    void aClosedPortStopsLiveModeWithOneMessage() throws Exception {
        int port;
        try (var socket = new ServerSocket(0)) {
            port = socket.getLocalPort();
        }
        var view = new LiveView();
        try (var c = live("http://127.0.0.1:" + port, view)) {
            Click click = all.get(0);
            c.add("p", click.x(), click.y(), null);
            c.add("q", all.get(1).x(), all.get(1).y(), null);
            idle(c);
            assertFalse(c.isRunning());
            assertEquals(List.of("Cannot reach the NuClick server at http://127.0.0.1:" + port + " (connection"
                    + " refused). Is 'nuclick-bridge serve' running there, with its HTTP port (--http-port, default"
                    + " 8080) in the URL?"), view.stops);
            assertTrue(view.edits.isEmpty());
        }
    }
}
