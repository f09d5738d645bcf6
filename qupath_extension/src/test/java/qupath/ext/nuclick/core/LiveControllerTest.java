package qupath.ext.nuclick.core;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTimeoutPreemptively;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.net.ServerSocket;
import java.time.Duration;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeSet;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.Test;

/**
 * The live controller against a scripted server (a 4x4 square around each click it must answer, no nucleus left
 * of x = 100; patch 128, sigma 2 at 0.25 µm, so a click's guidance reaches 73 px and patches overlap within
 * 128 px): which points each event has segmented again, what each edit holds, coalescing, stale results and
 * stopping.  {@code LiveEndToEndTest} checks the nuclei themselves against a real server.
 */
class LiveControllerTest {

    static final String MODEL = FakeServer.modelJson(0.25, 4096, 1000, false);

    /** The scripted server, with a gate that can hold segment requests, and the members of each request. */
    static class Scripted implements FakeServer.Handler {
        final FakeServer.Handler inner = SegmentJobTest.fakeNuclick(MODEL);
        final List<Set<String>> members = new ArrayList<>();
        volatile CountDownLatch gate = new CountDownLatch(0);
        final CountDownLatch entered = new CountDownLatch(1);

        @Override
        public FakeServer.Reply handle(FakeServer.Request r) throws Exception {
            if (r.path().endsWith("/v1/segment")) {
                Set<String> ids = new TreeSet<>();
                for (var el : JsonParser.parseString(r.body()).getAsJsonObject().getAsJsonArray("clicks")) {
                    JsonObject c = el.getAsJsonObject();
                    if (!(c.has("contextOnly") && c.get("contextOnly").getAsBoolean())) {
                        ids.add(Format.number(c.get("x").getAsDouble()) + "," + Format.number(c.get("y").getAsDouble()));
                    }
                }
                synchronized (members) {
                    members.add(ids);
                }
                entered.countDown();
                if (!gate.await(30, TimeUnit.SECONDS)) {
                    throw new IllegalStateException("the test never opened the gate");
                }
            }
            return inner.handle(r);
        }

        List<Set<String>> takeMembers() {
            synchronized (members) {
                List<Set<String>> out = new ArrayList<>(members);
                members.clear();
                return out;
            }
        }
    }

    static LiveController controller(NuClickSettings settings, LiveView view) throws NuClickException {
        return new LiveController(new SegmentJob(new NuClickHttpClient(settings)), 4000, 3000, 0.25,
                new SegmentJobTest.GreyPixels(), Runnable::run, view);
    }

    static String at(double x, double y) {
        return Format.number(x) + "," + Format.number(y);
    }

    static void idle(LiveController c) throws InterruptedException {
        assertTrue(c.awaitIdle(30, TimeUnit.SECONDS), "the controller did not catch up");
    }

    static Set<String> union(List<Set<String>> sets) {
        Set<String> out = new TreeSet<>();
        sets.forEach(out::addAll);
        return out;
    }

    /** The puts of an edit, by point id: true when changed. */
    static Map<String, Boolean> puts(LiveController.Edit edit) {
        Map<String, Boolean> out = new LinkedHashMap<>();
        for (var p : edit.put()) {
            out.put(p.pointId(), p.changed());
        }
        return out;
    }

    @Test
    void eachClickIsOneEditWithItsNucleusAndTheNeighboursItReaches() throws Exception {
        var script = new Scripted();
        var view = new LiveView();
        try (var server = new FakeServer(script); var live = controller(server.settings(""), view)) {
            live.add("p1", 1000.5, 1000.5, "Tumor");
            idle(live);
            assertEquals(List.of(Set.of(at(1000.5, 1000.5))), script.takeMembers());
            assertEquals(1, view.edits.size());
            assertEquals(Map.of("p1", true), puts(view.edits.get(0)));
            assertEquals("Tumor", view.nuclei.get("p1").click().className());

            // 100 px away: the patches overlap, so p1 is segmented again (same square from this server: unchanged).
            live.add("p2", 1100.5, 1000.5, null);
            idle(live);
            assertEquals(List.of(Set.of(at(1000.5, 1000.5), at(1100.5, 1000.5))), script.takeMembers());
            assertEquals(2, view.edits.size());
            assertEquals(Map.of("p1", false, "p2", true), puts(view.edits.get(1)));

            // 200 px from p2: out of reach of everyone.
            live.add("p3", 1300.5, 1000.5, null);
            idle(live);
            assertEquals(List.of(Set.of(at(1300.5, 1000.5))), script.takeMembers());

            // 60 px from p2 (its guidance changes p2's raw mask) and so p1, whose patch overlaps p2's, 160 px away;
            // p3 is 140 px from p4 and 200 from p2: untouched.
            live.add("p4", 1160.5, 1000.5, null);
            idle(live);
            assertEquals(List.of(Set.of(at(1000.5, 1000.5), at(1100.5, 1000.5), at(1160.5, 1000.5))),
                    script.takeMembers());
            assertEquals(4, view.edits.size());
            assertEquals(Set.of("p1", "p2", "p3", "p4"), view.nuclei.keySet());
            assertEquals(List.of(1L, 2L, 3L, 4L), view.edits.stream().map(LiveController.Edit::number).toList());
            assertTrue(view.stops.isEmpty());
        }
    }

    @Test
    void moveAndDeleteReplaceTheNucleusAndRedoBothNeighbourhoods() throws Exception {
        var script = new Scripted();
        var view = new LiveView();
        try (var server = new FakeServer(script); var live = controller(server.settings(""), view)) {
            live.add("a", 1000.5, 1000.5, null);
            live.add("b", 1100.5, 1000.5, null);
            live.add("c", 2000.5, 1000.5, null);
            idle(live);
            script.takeMembers();
            int before = view.edits.size();

            // a moves next to c: its old neighbour b and its new neighbour c are segmented again.
            live.move("a", 1900.5, 1000.5, null);
            idle(live);
            assertEquals(Set.of(at(1900.5, 1000.5), at(1100.5, 1000.5), at(2000.5, 1000.5)),
                    union(script.takeMembers()), "one round (two tiles: the neighbourhoods are far apart)");
            assertEquals(before + 1, view.edits.size());
            var moved = view.edits.get(view.edits.size() - 1);
            assertEquals(Map.of("a", true, "b", false, "c", false), puts(moved));
            assertTrue(view.nuclei.get("a").polygon().contains(1900.5, 1000.5));

            // c goes: its nucleus is removed and its neighbour a redone, in one edit.
            live.delete("c");
            idle(live);
            assertEquals(List.of(Set.of(at(1900.5, 1000.5))), script.takeMembers());
            var deleted = view.edits.get(view.edits.size() - 1);
            assertEquals(List.of("c"), deleted.removed());
            assertEquals(Map.of("a", false), puts(deleted));
            assertEquals(Set.of("a", "b"), view.nuclei.keySet());

            // b has no neighbour left: its removal needs no request.
            live.delete("b");
            idle(live);
            assertTrue(script.takeMembers().isEmpty());
            var alone = view.edits.get(view.edits.size() - 1);
            assertEquals(List.of("b"), alone.removed());
            assertTrue(alone.put().isEmpty());

            // A class change alone redoes only that point and gives its nucleus the new class.
            live.move("a", 1900.5, 1000.5, "Stroma");
            idle(live);
            assertEquals(List.of(Set.of(at(1900.5, 1000.5))), script.takeMembers());
            assertEquals(Map.of("a", true), puts(view.edits.get(view.edits.size() - 1)));
            assertEquals("Stroma", view.nuclei.get("a").click().className());

            // Moved where there is no nucleus: its old one goes.
            live.move("a", 50.5, 1000.5, "Stroma");
            idle(live);
            var gone = view.edits.get(view.edits.size() - 1);
            assertEquals(Map.of("a", true), puts(gone));
            assertFalse(gone.put().get(0).result().found());
            assertTrue(view.nuclei.isEmpty());

            // Deleting a point without a nucleus removes nothing; an unknown id is ignored.
            int edits = view.edits.size();
            live.delete("a");
            live.delete("never-there");
            idle(live);
            assertEquals(edits, view.edits.size());
            assertTrue(view.stops.isEmpty());
        }
    }

    @Test
    void aBurstNeverWaitsIsCoalescedAndEndsInOneNucleusPerPointAtItsLastPlace() throws Exception {
        var script = new Scripted();
        var view = new LiveView();
        try (var server = new FakeServer(script); var live = controller(server.settings(""), view)) {
            script.gate = new CountDownLatch(1);
            live.add("first", 500.5, 500.5, null);
            assertTrue(script.entered.await(30, TimeUnit.SECONDS));
            // While the first round is held at the server, 30 clicks, moves and deletes go in at once.
            Map<String, double[]> expected = new LinkedHashMap<>();
            expected.put("first", new double[] {500.5, 500.5});
            assertTimeoutPreemptively(Duration.ofSeconds(10), () -> {
                for (int k = 0; k < 30; k++) {
                    double x = 420.5 + 37 * (k % 6);
                    double y = 430.5 + 41 * (k / 6);
                    live.add("p" + k, x, y, k % 2 == 0 ? "Tumor" : null);
                    expected.put("p" + k, new double[] {x, y});
                }
                live.move("first", 610.25, 505.75, null); // the point already at the server moves
                expected.put("first", new double[] {610.25, 505.75});
                for (int k = 0; k < 30; k += 7) {
                    live.move("p" + k, 700.5 + k, 300.5, null);
                    expected.put("p" + k, new double[] {700.5 + k, 300.5});
                }
                for (int k = 3; k < 30; k += 9) {
                    live.delete("p" + k);
                    expected.remove("p" + k);
                }
            }, "events must never wait for the server");
            script.gate.countDown();
            idle(live);

            assertEquals(expected.keySet(), view.nuclei.keySet(), "one nucleus per point, none for deleted points");
            for (var e : expected.entrySet()) {
                NucleusResult r = view.nuclei.get(e.getKey());
                assertEquals(e.getValue()[0], r.click().x(), e.getKey());
                assertEquals(e.getValue()[1], r.click().y(), e.getKey());
                assertTrue(r.polygon().contains(e.getValue()[0], e.getValue()[1]), e.getKey() + " at its last place");
            }
            var stats = live.stats();
            assertTrue(stats.rounds() <= 3, "coalesced: " + stats);
            assertTrue(stats.dropped() >= 1, "the first point's stale result was dropped: " + stats);
            // Deleted points never had a nucleus handed out, so no edit removes them, and no edit ever put one.
            for (var edit : view.edits) {
                for (var p : edit.put()) {
                    assertTrue(expected.containsKey(p.pointId()) || !p.result().found() || p.pointId().equals("first"),
                            "stale nucleus for " + p.pointId());
                }
            }
            assertTrue(view.stops.isEmpty());
        }
    }

    @Test
    void randomEventsAtRandomSpeedsEndInExactlyTheNucleiOfTheLastPoints() throws Exception {
        var random = new java.util.Random(7);
        Scripted script = new Scripted() {
            @Override
            public FakeServer.Reply handle(FakeServer.Request r) throws Exception {
                Thread.sleep(random.nextInt(30)); // a server of uneven speed
                return super.handle(r);
            }
        };
        var view = new LiveView();
        Map<String, double[]> last = new LinkedHashMap<>();
        try (var server = new FakeServer(script); var live = controller(server.settings(""), view)) {
            for (int step = 0; step < 400; step++) {
                String id = "p" + random.nextInt(40);
                int what = random.nextInt(10);
                if (what < 2) {
                    live.delete(id);
                    last.remove(id);
                } else {
                    // Some points land left of x = 100, where this server finds no nucleus.
                    double x = 50.5 + random.nextInt(1900);
                    double y = 100.5 + random.nextInt(1800);
                    live.move(id, x, y, what == 9 ? "Tumor" : null);
                    last.put(id, new double[] {x, y, what == 9 ? 1 : 0});
                }
                if (random.nextInt(4) == 0) {
                    Thread.sleep(random.nextInt(8));
                }
            }
            idle(live);
            var shown = view.snapshot();
            for (var e : last.entrySet()) {
                NucleusResult r = shown.remove(e.getKey());
                double[] at = e.getValue();
                if (at[0] < 100) {
                    assertNull(r, e.getKey() + " has no nucleus where it is");
                    continue;
                }
                assertTrue(r != null, e.getKey() + " lost its nucleus");
                assertEquals(new Click(at[0], at[1], at[2] == 1 ? "Tumor" : null), r.click(), e.getKey());
                assertTrue(r.polygon().contains(at[0], at[1]));
            }
            assertTrue(shown.isEmpty(), "nuclei of deleted points: " + shown.keySet());
            assertTrue(view.stops.isEmpty());
            assertTrue(live.stats().rounds() < 400, "coalesced: " + live.stats());
        }
    }

    @Test
    void aResultForAPointThatMovedWhileAtTheServerIsDroppedAndRedone() throws Exception {
        var script = new Scripted();
        var view = new LiveView();
        try (var server = new FakeServer(script); var live = controller(server.settings(""), view)) {
            script.gate = new CountDownLatch(1);
            live.add("x", 1000.5, 1000.5, null);
            assertTrue(script.entered.await(30, TimeUnit.SECONDS));
            live.move("x", 1200.5, 1000.5, null);
            script.gate.countDown();
            idle(live);
            assertEquals(List.of(Set.of(at(1000.5, 1000.5)), Set.of(at(1200.5, 1000.5))), script.takeMembers());
            assertEquals(1, view.edits.size(), "the stale answer made no edit");
            assertEquals(1200.5, view.nuclei.get("x").click().x());
            assertEquals(1, live.stats().dropped());
        }
    }

    @Test
    void aResultWhoseNeighbourChangedWhileAtTheServerIsShownAndReplacedInTheNextRound() throws Exception {
        var script = new Scripted();
        var view = new LiveView();
        try (var server = new FakeServer(script); var live = controller(server.settings(""), view)) {
            script.gate = new CountDownLatch(1);
            live.add("x", 1000.5, 1000.5, null);
            assertTrue(script.entered.await(30, TimeUnit.SECONDS));
            live.add("y", 1050.5, 1000.5, null); // x's neighbour, while x is at the server
            script.gate.countDown();
            idle(live);
            assertEquals(List.of(Set.of(at(1000.5, 1000.5)), Set.of(at(1000.5, 1000.5), at(1050.5, 1000.5))),
                    script.takeMembers());
            assertEquals(2, view.edits.size());
            assertEquals(Map.of("x", true), puts(view.edits.get(0)), "x is shown at once");
            assertEquals(Map.of("x", false, "y", true), puts(view.edits.get(1)), "and redone with y");
            assertEquals(0, live.stats().dropped());
        }
    }

    @Test
    void aClosedPortStopsTheControllerWithOneMessageAndNoEdit() throws Exception {
        int port;
        try (var socket = new ServerSocket(0)) {
            port = socket.getLocalPort();
        }
        var view = new LiveView();
        var settings = new NuClickSettings("http://127.0.0.1:" + port, "", NuClickSettings.Output.DETECTIONS, false,
                1000, 5);
        try (var live = controller(settings, view)) {
            live.add("p", 1000.5, 1000.5, null);
            idle(live);
            assertFalse(live.isRunning());
            live.add("q", 1100.5, 1000.5, null);
            idle(live);
            assertEquals(1, view.stops.size(), view.stops.toString());
            assertTrue(view.stops.get(0).startsWith("Cannot reach the NuClick server at http://127.0.0.1:" + port
                    + " (connection refused)."), view.stops.get(0));
            assertTrue(view.edits.isEmpty());
        }
    }

    @Test
    void aServerThatGoesAwayStopsTheControllerOnceAndNothingComesAfter() throws Exception {
        var script = new Scripted();
        var view = new LiveView();
        var server = new FakeServer(script);
        try (var live = controller(server.settings(""), view)) {
            live.add("a", 1000.5, 1000.5, null);
            idle(live);
            assertEquals(1, view.edits.size());
            server.close();
            live.add("b", 1050.5, 1000.5, null);
            live.move("a", 990.5, 1000.5, null);
            idle(live);
            live.add("c", 3000.5, 1000.5, null);
            live.delete("a");
            idle(live);
            assertFalse(live.isRunning());
            assertEquals(1, view.stops.size(), view.stops.toString());
            assertTrue(view.stops.get(0).contains("NuClick server at " + server.url()), view.stops.get(0));
            assertEquals(1, view.edits.size(), "nothing after the server went away");
            assertTrue(view.afterStop.isEmpty());
            assertEquals(Set.of("a"), view.nuclei.keySet());
        } finally {
            server.close();
        }
    }

    @Test
    void anErrorReplyStopsTheControllerWithTheServersReason() throws Exception {
        var view = new LiveView();
        try (var server = new FakeServer(r -> r.path().endsWith("/v1/model") ? new FakeServer.Reply(200, MODEL)
                : new FakeServer.Reply(503, "{\"code\": \"UNAVAILABLE\", \"message\": \"the server is shutting down\"}"));
             var live = controller(server.settings(""), view)) {
            live.add("a", 1000.5, 1000.5, null);
            idle(live);
            assertEquals(1, view.stops.size());
            assertTrue(view.stops.get(0).contains("UNAVAILABLE: the server is shutting down (HTTP 503)"),
                    view.stops.get(0));
            assertTrue(view.edits.isEmpty());
        }
    }

    @Test
    void closingWhileARoundIsAtTheServerSaysNothingAndHandsOutNothing() throws Exception {
        var script = new Scripted();
        var view = new LiveView();
        try (var server = new FakeServer(script)) {
            var live = controller(server.settings(""), view);
            script.gate = new CountDownLatch(1);
            live.add("a", 1000.5, 1000.5, null);
            assertTrue(script.entered.await(30, TimeUnit.SECONDS));
            live.close();
            script.gate.countDown();
            idle(live); // returns once the worker has ended (the abandoned call polls its cancel flag)
            assertTrue(view.edits.isEmpty());
            assertTrue(view.stops.isEmpty());
            assertFalse(live.isRunning());
        }
    }

    @Test
    void knownPointsAreNeighboursAndTheirOldNucleiAreReplacedOrRemoved() throws Exception {
        var script = new Scripted();
        var view = new LiveView();
        try (var server = new FakeServer(script); var live = controller(server.settings(""), view)) {
            live.known("old1", 1000.5, 1000.5, null, true);
            live.known("old2", 1500.5, 1000.5, null, true);
            live.known("old3", 2500.5, 1000.5, null, false);
            live.add("new", 1050.5, 1000.5, null);
            idle(live);
            assertEquals(List.of(Set.of(at(1000.5, 1000.5), at(1050.5, 1000.5))), script.takeMembers());
            // old1's nucleus from before is replaced (changed: its outline was never seen here).
            assertEquals(Map.of("old1", true, "new", true), puts(view.edits.get(0)));
            live.delete("old2");
            live.delete("old3");
            idle(live);
            assertEquals(List.of("old2"), view.edits.get(1).removed(), "only the point that had a nucleus");
            assertNull(view.nuclei.get("old2"));
        }
    }
}
