package qupath.ext.nuclick.core;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.atomic.AtomicInteger;
import org.junit.jupiter.api.Test;

/**
 * The whole client-side flow against a scripted server that answers like the real one (a square
 * around each click it must answer): model info, downsample, tiles, context clicks, results.
 */
class SegmentJobTest {

    /** Answers /v1/model with {@code model} and /v1/segment with a 4x4 square per member click. */
    static FakeServer.Handler fakeNuclick(String model) {
        return r -> {
            if (r.path().endsWith("/v1/model")) {
                return new FakeServer.Reply(200, model);
            }
            JsonObject req = JsonParser.parseString(r.body()).getAsJsonObject();
            JsonArray results = new JsonArray();
            for (var el : req.getAsJsonArray("clicks")) {
                JsonObject c = el.getAsJsonObject();
                if (c.has("contextOnly") && c.get("contextOnly").getAsBoolean()) {
                    continue;
                }
                double x = c.get("x").getAsDouble();
                double y = c.get("y").getAsDouble();
                JsonObject res = new JsonObject();
                res.addProperty("clickId", c.get("id").getAsString());
                res.addProperty("className", c.has("className") ? c.get("className").getAsString() : "");
                if (x < 100) { // pretend there is no nucleus left of x = 100
                    res.addProperty("found", false);
                    res.addProperty("reason", "no nucleus under the click");
                } else {
                    res.addProperty("found", true);
                    JsonArray pts = new JsonArray();
                    double[][] sq = {{x - 2, y - 2}, {x + 2, y - 2}, {x + 2, y + 2}, {x - 2, y + 2}};
                    for (double[] p : sq) {
                        JsonObject pt = new JsonObject();
                        pt.addProperty("x", p[0]);
                        pt.addProperty("y", p[1]);
                        pts.add(pt);
                    }
                    JsonObject ext = new JsonObject();
                    ext.add("points", pts);
                    JsonObject poly = new JsonObject();
                    poly.add("exterior", ext);
                    res.add("polygon", poly);
                    res.addProperty("areaPx", 16.0);
                    res.addProperty("score", 0.9);
                }
                results.add(res);
            }
            JsonObject out = new JsonObject();
            out.addProperty("requestId", req.has("requestId") ? req.get("requestId").getAsString() : "");
            out.add("results", results);
            out.addProperty("resampleFactor", 1.0);
            out.addProperty("model", "fake v1");
            return new FakeServer.Reply(200, out.toString());
        };
    }

    /** Grey pixels of the requested size; records every read. */
    static final class GreyPixels implements SegmentJob.PixelSource {
        final List<double[]> reads = new ArrayList<>();

        @Override
        public TileData read(int x, int y, int w, int h, double d) {
            reads.add(new double[] {x, y, w, h, d});
            int tw = (int) Math.round(w / d);
            int th = (int) Math.round(h / d);
            return TileData.rawRgb(new byte[tw * th * 3], tw, th);
        }
    }

    private static List<JsonObject> segmentRequests(FakeServer server) {
        List<JsonObject> out = new ArrayList<>();
        for (var r : server.requests) {
            if (r.path().endsWith("/v1/segment")) {
                out.add(JsonParser.parseString(r.body()).getAsJsonObject());
            }
        }
        return out;
    }

    @Test
    void resultsComeBackInClickOrderWithReasonsAndContextClicksAreSent() throws Exception {
        try (var server = new FakeServer(fakeNuclick(FakeServer.modelJson(0.25, 4096, 1000, false)))) {
            var pixels = new GreyPixels();
            var job = new SegmentJob(new NuClickHttpClient(server.settings("")), new SegmentJob.Options(512, null));
            List<Click> clicks = List.of(new Click(150.5, 150.5, "Tumor"), new Click(50.5, 60.5), new Click(900.5, 150.5),
                    new Click(200.5, 160.5, "Stroma"), new Click(-5, 10), new Click(1500.5, 700.5));
            List<String> progress = new ArrayList<>();
            var outcome = job.run(clicks, 2000, 1000, 0.25, pixels, null, (d, t, m) -> progress.add(d + "/" + t), null);
            List<NucleusResult> results = outcome.results();
            assertEquals(6, results.size());
            for (int k = 0; k < 6; k++) {
                assertEquals(k, results.get(k).index());
                assertEquals(clicks.get(k), results.get(k).click());
            }
            assertTrue(results.get(0).found());
            assertEquals(16.0, results.get(0).areaPx());
            assertTrue(results.get(0).polygon().contains(150.5, 150.5));
            assertFalse(results.get(1).found());
            assertEquals("no nucleus under the click", results.get(1).reason());
            assertTrue(results.get(2).found());
            assertTrue(results.get(3).found());
            assertFalse(results.get(4).found());
            assertEquals("click (-5.0, 10.0) is outside the image (2000 x 1000)", results.get(4).reason());
            assertTrue(results.get(5).found());
            assertEquals(4, outcome.found());
            assertEquals(Scale.IDENTITY, outcome.scale());

            List<JsonObject> requests = segmentRequests(server);
            assertEquals(outcome.tiles().size(), requests.size());
            assertEquals(pixels.reads.size(), requests.size());
            assertTrue(requests.size() >= 3, "max tile 512 splits the clicks into several tiles");
            assertEquals("0/0", progress.get(0));
            assertEquals(requests.size() + "/" + requests.size(), progress.get(progress.size() - 1));
            // Click 1 (50.5, 60.5) and click 0 (150.5, 150.5) are within a patch of each other: whichever tile
            // answers one sends the other as context, and every member lies inside its tile.
            boolean sawContext = false;
            for (JsonObject req : requests) {
                JsonObject tile = req.getAsJsonObject("tile");
                double ox = tile.get("originX").getAsDouble();
                double oy = tile.get("originY").getAsDouble();
                int w = tile.get("width").getAsInt();
                int h = tile.get("height").getAsInt();
                assertEquals(1.0, tile.get("downsample").getAsDouble());
                assertEquals(0.25, tile.get("pixelSizeUm").getAsDouble());
                assertEquals("RAW_RGB8", tile.get("encoding").getAsString());
                List<String> ids = new ArrayList<>();
                for (var el : req.getAsJsonArray("clicks")) {
                    JsonObject c = el.getAsJsonObject();
                    ids.add(c.get("id").getAsString());
                    boolean context = c.has("contextOnly") && c.get("contextOnly").getAsBoolean();
                    double x = c.get("x").getAsDouble();
                    double y = c.get("y").getAsDouble();
                    if (!context) {
                        assertTrue(x >= ox && x < ox + w && y >= oy && y < oy + h, "member outside its tile");
                    }
                    sawContext |= context && (ids.contains("0") || ids.contains("1"));
                }
                List<String> sorted = new ArrayList<>(ids);
                sorted.sort((a, b) -> Integer.compare(Integer.parseInt(a), Integer.parseInt(b)));
                assertEquals(sorted, ids, "clicks are sent in index order");
                assertFalse(ids.contains("4") && !req.toString().contains("\"id\":\"4\",\"contextOnly\":true"),
                        "the off-image click is never a member");
            }
            assertTrue(sawContext);
        }
    }

    @Test
    void runSomeAnswersOnlyTheWantedClicksWithTheOthersAsContext() throws Exception {
        try (var server = new FakeServer(fakeNuclick(FakeServer.modelJson(0.25, 4096, 1000, false)))) {
            var job = new SegmentJob(new NuClickHttpClient(server.settings("")));
            var geometry = job.geometry(job.client().modelInfo(null), 0.25);
            List<Click> clicks = List.of(new Click(500.5, 500.5), new Click(560.5, 500.5), new Click(1500.5, 500.5),
                    new Click(-3, 5));
            var results = job.runSome(clicks, new boolean[] {false, true, false, true}, 2000, 1000, 0.25,
                    new GreyPixels(), geometry, null);
            assertEquals(2, results.size());
            assertEquals(1, results.get(0).index());
            assertTrue(results.get(0).found());
            assertEquals(3, results.get(1).index());
            assertEquals("click (-3.0, 5.0) is outside the image (2000 x 1000)", results.get(1).reason());
            List<JsonObject> requests = segmentRequests(server);
            assertEquals(1, requests.size());
            List<String> members = new ArrayList<>();
            List<String> context = new ArrayList<>();
            for (var el : requests.get(0).getAsJsonArray("clicks")) {
                JsonObject c = el.getAsJsonObject();
                boolean ctx = c.has("contextOnly") && c.get("contextOnly").getAsBoolean();
                (ctx ? context : members).add(c.get("id").getAsString());
            }
            assertEquals(List.of("1"), members);
            assertEquals(List.of("0"), context);
            // Only off-image clicks wanted: answered without a request.
            assertEquals(1, job.runSome(clicks, new boolean[] {false, false, false, true}, 2000, 1000, 0.25,
                    new GreyPixels(), geometry, null).size());
            assertEquals(1, segmentRequests(server).size());
        }
    }

    @Test
    void aFinerImageIsReadAtTheModelsDownsampleAndPolygonsStayInLevel0() throws Exception {
        try (var server = new FakeServer(fakeNuclick(FakeServer.modelJson(0.25, 4096, 1000, false)))) {
            var pixels = new GreyPixels();
            var job = new SegmentJob(new NuClickHttpClient(server.settings("")));
            List<Click> clicks = List.of(new Click(1001.5, 2001.5), new Click(1301.0, 2051.0));
            var outcome = job.run(clicks, 4001, 3001, 0.125, pixels, null, null, null);
            assertEquals(new Scale(2.0, 1.0), outcome.scale());
            assertEquals(1, pixels.reads.size());
            double[] read = pixels.reads.get(0);
            assertEquals(2.0, read[4]);
            // Grid box of the clicks' patches: x in [500-64, 650-64+128), y in [1000-64, 1025-64+128), times 2.
            assertArrayEquals(new double[] {872, 1872, 556, 306, 2.0}, read);
            JsonObject tile = segmentRequests(server).get(0).getAsJsonObject("tile");
            assertEquals(872.0, tile.get("originX").getAsDouble());
            assertEquals(1872.0, tile.get("originY").getAsDouble());
            assertEquals(2.0, tile.get("downsample").getAsDouble());
            assertEquals(278, tile.get("width").getAsInt());
            assertEquals(0.125, tile.get("pixelSizeUm").getAsDouble());
            // Clicks go in level 0 unchanged; the server answers in level 0.
            JsonObject c0 = segmentRequests(server).get(0).getAsJsonArray("clicks").get(0).getAsJsonObject();
            assertEquals(1001.5, c0.get("x").getAsDouble());
            assertTrue(outcome.results().get(0).polygon().contains(1001.5, 2001.5));
            assertEquals(1299.0, outcome.results().get(1).polygon().exterior().x(0));
        }
    }

    @Test
    void zeroPointsAllOutsideAndNonFinitePointsAreClearErrorsBeforeAnyCall() throws Exception {
        try (var server = new FakeServer(fakeNuclick(FakeServer.modelJson(0.25, 4096, 1000, false)))) {
            var job = new SegmentJob(new NuClickHttpClient(server.settings("")));
            NuClickException none = assertThrows(NuClickException.class,
                    () -> job.run(List.of(), 100, 100, 0.25, new GreyPixels(), null, null, null));
            assertEquals(NuClickException.Kind.INPUT, none.kind());
            assertTrue(none.getMessage().startsWith("No points to segment."), none.getMessage());
            NuClickException outside = assertThrows(NuClickException.class, () -> job.run(
                    List.of(new Click(100, 5), new Click(-1, 5)), 100, 100, 0.25, new GreyPixels(), null, null, null));
            assertEquals("All 2 points are outside the image (100 x 100 px). Are they from another image?",
                    outside.getMessage());
            NuClickException one = assertThrows(NuClickException.class, () -> job.run(
                    List.of(new Click(500, 5)), 100, 100, 0.25, new GreyPixels(), null, null, null));
            assertTrue(one.getMessage().startsWith("The point is outside the image"), one.getMessage());
            NuClickException nan = assertThrows(NuClickException.class, () -> job.run(
                    List.of(new Click(5, 5), new Click(Double.NaN, 5)), 100, 100, 0.25, new GreyPixels(), null, null,
                    null));
            assertTrue(nan.getMessage().contains("Point 2 has a non-finite coordinate"), nan.getMessage());
            assertTrue(server.requests.isEmpty(), "nothing was sent");
        }
    }

    @Test
    void anUncalibratedImageFailsBeforePixelsAreRead() throws Exception {
        try (var server = new FakeServer(fakeNuclick(FakeServer.modelJson(0.25, 4096, 1000, false)))) {
            var pixels = new GreyPixels();
            NuClickException e = assertThrows(NuClickException.class,
                    () -> new SegmentJob(new NuClickHttpClient(server.settings(""))).run(List.of(new Click(5, 5)), 100,
                            100, Double.NaN, pixels, null, null, null));
            assertTrue(e.getMessage().contains("no pixel size"), e.getMessage());
            assertTrue(pixels.reads.isEmpty());
        }
    }

    @Test
    void aMissingResultIsAProtocolErrorAndNothingIsReturned() throws Exception {
        try (var server = new FakeServer(r -> r.path().endsWith("/v1/model")
                ? new FakeServer.Reply(200, FakeServer.modelJson(0.25, 4096, 1000, false))
                : new FakeServer.Reply(200, "{\"results\": []}"))) {
            NuClickException e = assertThrows(NuClickException.class,
                    () -> new SegmentJob(new NuClickHttpClient(server.settings(""))).run(List.of(new Click(5, 5)), 100,
                            100, 0.25, new GreyPixels(), null, null, null));
            assertEquals(NuClickException.Kind.PROTOCOL, e.kind());
            assertTrue(e.getMessage().contains("it has no result for click 0"), e.getMessage());
        }
    }

    @Test
    void aPixelReadFailureAndAWrongSizedTileAreClearErrors() throws Exception {
        try (var server = new FakeServer(fakeNuclick(FakeServer.modelJson(0.25, 4096, 1000, false)))) {
            var job = new SegmentJob(new NuClickHttpClient(server.settings("")));
            NuClickException e = assertThrows(NuClickException.class, () -> job.run(List.of(new Click(5, 5)), 100, 100,
                    0.25, (x, y, w, h, d) -> {
                        throw new IOException("disk on fire");
                    }, null, null, null));
            assertEquals(NuClickException.Kind.PIXELS, e.kind());
            assertTrue(e.getMessage().contains("Could not read the image's pixels at (0, 0, 69 x 69) at downsample 1:"
                    + " disk on fire"), e.getMessage());
            NuClickException size = assertThrows(NuClickException.class, () -> job.run(List.of(new Click(5, 5)), 100,
                    100, 0.25, (x, y, w, h, d) -> TileData.rawRgb(new byte[30], 5, 2), null, null, null));
            assertTrue(size.getMessage().contains("gave 5 x 2 pixels instead of about 69 x 69"), size.getMessage());
        }
    }

    @Test
    void cancellingBetweenTilesStopsTheRun() throws Exception {
        try (var server = new FakeServer(fakeNuclick(FakeServer.modelJson(0.25, 4096, 1000, false)))) {
            var job = new SegmentJob(new NuClickHttpClient(server.settings("")), new SegmentJob.Options(512, null));
            AtomicInteger reads = new AtomicInteger();
            SegmentJob.PixelSource pixels = (x, y, w, h, d) -> {
                reads.incrementAndGet();
                return TileData.rawRgb(new byte[w * h * 3], w, h);
            };
            List<Click> far = List.of(new Click(200, 200), new Click(1800, 200), new Click(200, 1800));
            NuClickException e = assertThrows(NuClickException.class,
                    () -> job.run(far, 2000, 2000, 0.25, pixels, null, null, () -> reads.get() >= 1));
            assertEquals(NuClickException.Kind.CANCELLED, e.kind());
            assertEquals(1, reads.get());
        }
    }

    @Test
    void theServersClickLimitSplitsRequests() throws Exception {
        try (var server = new FakeServer(fakeNuclick(FakeServer.modelJson(0.25, 4096, 3, false)))) {
            var job = new SegmentJob(new NuClickHttpClient(server.settings("")));
            List<Click> clicks = new ArrayList<>();
            for (int k = 0; k < 6; k++) {
                clicks.add(new Click(200.5 + 400 * k, 300.5));
            }
            var outcome = job.run(clicks, 4000, 1000, 0.25, new GreyPixels(), null, null, null);
            assertEquals(6, outcome.found());
            for (JsonObject req : segmentRequests(server)) {
                assertTrue(req.getAsJsonArray("clicks").size() <= 3);
            }
        }
    }

    @Test
    void theModelSettingTravelsWithEveryTileAndAReplyFromAnotherModelIsRefused() throws Exception {
        // A server of two models that echoes the name it is asked for, as the real one does.
        FakeServer.Handler plain = fakeNuclick(ProtocolTest.twoModels());
        FakeServer.Handler echoing = r -> {
            FakeServer.Reply reply = plain.handle(r);
            if (!r.path().endsWith("/v1/segment")) {
                return reply;
            }
            JsonObject body = JsonParser.parseString(reply.body()).getAsJsonObject();
            JsonObject req = JsonParser.parseString(r.body()).getAsJsonObject();
            body.addProperty("modelName", req.has("modelName") ? req.get("modelName").getAsString() : "default");
            return new FakeServer.Reply(200, body.toString());
        };
        List<Click> clicks = List.of(new Click(150.5, 150.5), new Click(900.5, 150.5));
        try (var server = new FakeServer(echoing)) {
            var s = server.settings("");
            var lung = new NuClickSettings(s.serverUrl(), "", s.output(), false, 1000, 5, "lung");
            var outcome = new SegmentJob(new NuClickHttpClient(lung), new SegmentJob.Options(512, null))
                    .run(clicks, 2000, 1000, 0.5, new GreyPixels(), null, null, null);
            assertEquals("lung", outcome.model().servedName());
            assertEquals(64, outcome.model().patchSize()); // the tiles were planned with lung's patch, not the default's
            assertEquals(Scale.IDENTITY, outcome.scale()); // lung's pixel size is 0.5 um
            List<JsonObject> requests = segmentRequests(server);
            assertFalse(requests.isEmpty());
            for (JsonObject req : requests) {
                assertEquals("lung", req.get("modelName").getAsString());
            }
        }
        // A server that lists the model but answers with another (ignoring the name) is refused.
        try (var server = new FakeServer(plain)) {
            var s = server.settings("");
            var lung = new NuClickSettings(s.serverUrl(), "", s.output(), false, 1000, 5, "lung");
            NuClickException e = assertThrows(NuClickException.class, () -> new SegmentJob(new NuClickHttpClient(lung))
                    .run(clicks, 2000, 1000, 0.5, new GreyPixels(), null, null, null));
            assertEquals(NuClickException.Kind.SERVER, e.kind());
            assertEquals("The NuClick server at " + s.serverUrl() + " answered with model 'fake v1', not 'lung': it"
                    + " cannot choose models. Upgrade it, or clear the model in Extensions > NuClick > Settings.",
                    e.getMessage());
        }
    }
}
