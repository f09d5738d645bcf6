package qupath.ext.nuclick.core;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.Set;
import org.junit.jupiter.api.Test;
import qupath.ext.nuclick.core.NucleusRules.Mode;
import qupath.ext.nuclick.core.NucleusRules.Nucleus;
import qupath.ext.nuclick.core.NucleusRules.Point;

/**
 * The shared rules about our nuclei and their points: what a second run skips, what a replace removes,
 * which nuclei are orphans and which a point removal releases.
 */
class NucleusRulesTest {

    private static final String ANN = "3f2c8a52-7d7e-4c55-9a53-0d4cbb7a1e10";
    private static final String OTHER_ANN = "8e1d3b7c-1111-4b1a-8c7e-2f5d6a9b0c33";

    private static Point<String> point(String ann, double x, double y) {
        return new Point<>(ann + "@" + x + "," + y, ann, Markers.pointKey(x, y));
    }

    /** A nucleus as the image holds it: only its name and metadata count, never what kind of object it is. */
    private static Nucleus<String> nucleus(String handle, String runId, double x, double y, String pointId) {
        String name = Markers.name(runId, x, y);
        return new Nucleus<>(handle, Markers.parse(name).orElseThrow(), pointId);
    }

    @Test
    void markersParseBackToTheirRunAndPointKeyAndRejectEverythingElse() {
        String name = Markers.name("20261129-023000-0a1b", 1017.25, 3.0005);
        assertEquals("nuclick-bridge 20261129-023000-0a1b @1017.250,3.001", name); // as Python writes f"{3.0005:.3f}"
        var marker = Markers.parse(name).orElseThrow();
        assertEquals("20261129-023000-0a1b", marker.runId());
        assertEquals(Markers.pointKey(1017.25, 3.0005), marker.key());
        assertEquals(name, marker.name());
        assertEquals("-0.500,12.000", Markers.parse("nuclick-bridge r1 @-0.500,12.000").orElseThrow().key());
        for (String notOurs : new String[] {null, "", "Tumor", "nuclick-bridge", "nuclick-bridge r1",
            "nuclick-bridge r1 @12,40", "nuclick-bridge r 1 @1.000,2.000", "my nuclick-bridge r1 @1.000,2.000",
            "nuclick-bridge r1 @1.000,2.000 (edited)", "NuClick-bridge r1 @1.000,2.000"}) {
            assertEquals(Optional.empty(), Markers.parse(notOurs), String.valueOf(notOurs));
        }
    }

    @Test
    void pressingTheKeyTwiceSegmentsNothingTheSecondTime() {
        List<Point<String>> points = List.of(point(ANN, 10.5, 20.5), point(ANN, 40.25, 80.75));

        var first = NucleusRules.plan(points, List.of(), Mode.SKIP);
        assertEquals(points, first.toSegment());
        assertTrue(first.alreadyDone().isEmpty());

        // The first run added one nucleus per point (here as annotations: the kind does not matter).
        List<Nucleus<String>> ours = new ArrayList<>();
        for (var p : first.toSegment()) {
            String[] xy = p.key().split(",");
            ours.add(nucleus("annotation " + p.key(), "run1", Double.parseDouble(xy[0]),
                    Double.parseDouble(xy[1]), p.annotationId()));
        }
        var second = NucleusRules.plan(points, ours, Mode.SKIP);
        assertTrue(second.nothingToDo());
        assertEquals(points, second.alreadyDone());

        var summary = new RunSummary(0, 0, second.alreadyDone().size(), 0, 0, Map.of(), 0, 0, false);
        assertTrue(summary.changedNothing());
        assertEquals("0 detections added; 2 points already have a nucleus (skipped)", summary.message());
    }

    @Test
    void aNucleusOfAnyRunOrToolAtTheSameKeyCountsAndOthersDoNot() {
        var a = point(ANN, 10.5, 20.5);
        var b = point(ANN, 30.0, 30.0);
        var c = point(OTHER_ANN, 50.0, 50.0);
        // The connector's nucleus of a (another run, no point id kept) and the extension's of c in another annotation.
        var ours = List.of(nucleus("connector", "20250101-000000-ffff", 10.5, 20.5, ""),
                nucleus("extension", "run9", 50.0, 50.0, ANN));
        var plan = NucleusRules.plan(List.of(a, b, c), ours, Mode.SKIP);
        assertEquals(List.of(b), plan.toSegment());
        assertEquals(List.of(a, c), plan.alreadyDone());
        // 1/1000 px apart is another point.
        var near = point(ANN, 10.501, 20.5);
        assertEquals(List.of(near), NucleusRules.plan(List.of(near), ours, Mode.SKIP).toSegment());
    }

    @Test
    void replaceSegmentsEveryPointAndRemovesOnlyTheNucleiOfPointsThatGotANewOne() {
        var a = point(ANN, 10.5, 20.5);
        var b = point(ANN, 30.0, 30.0);
        var c = point(ANN, 70.0, 70.0);
        var oldA = nucleus("old a", "run1", 10.5, 20.5, ANN);
        var oldB = nucleus("old b", "run1", 30.0, 30.0, ANN);
        var elsewhere = nucleus("elsewhere", "run1", 500.0, 500.0, ANN);
        List<Nucleus<String>> ours = List.of(oldA, oldB, elsewhere);

        var plan = NucleusRules.plan(List.of(a, b, c), ours, Mode.REPLACE);
        assertEquals(List.of(a, b, c), plan.toSegment());
        assertEquals(List.of(a, b), plan.alreadyDone());

        // The server found a nucleus for a and c, none for b: b keeps its old nucleus, nothing else is touched.
        assertEquals(List.of(oldA), NucleusRules.replaced(List.of(a.key(), c.key()), ours));
    }

    @Test
    void pointsAtTheSameKeyAreSegmentedOnce() {
        var a = point(ANN, 10.5, 20.5);
        var again = point(OTHER_ANN, 10.5, 20.5);
        var plan = NucleusRules.plan(List.of(a, again), List.of(), Mode.SKIP);
        assertEquals(List.of(a), plan.toSegment());
        assertEquals(List.of(again), plan.repeated());
    }

    @Test
    void orphansAreNucleiWhosePointIsGoneFromTheAnnotationTheyRecord() {
        var kept = nucleus("kept", "run1", 10.5, 20.5, ANN);
        var pointGone = nucleus("point gone", "run1", 30.0, 30.0, ANN);
        var annotationGone = nucleus("annotation gone", "run1", 50.0, 50.0, "deleted-annotation-id");
        var movedToOtherAnnotation = nucleus("moved", "run1", 70.0, 70.0, ANN);
        var noPointId = nucleus("no id", "run1", 90.0, 90.0, "");
        var nullPointId = nucleus("null id", "run1", 95.0, 95.0, null);
        Map<String, Set<String>> points = Map.of(
                ANN, Set.of(Markers.pointKey(10.5, 20.5)),
                OTHER_ANN, Set.of(Markers.pointKey(70.0, 70.0), Markers.pointKey(30.0, 30.0)));
        var ours = List.of(kept, pointGone, annotationGone, movedToOtherAnnotation, noPointId, nullPointId);
        assertEquals(List.of(pointGone, annotationGone, movedToOtherAnnotation), NucleusRules.orphans(ours, points));
        assertFalse(NucleusRules.isOrphan(noPointId, Map.of()));
    }

    @Test
    void removingPointsThroughTheExtensionReleasesTheirNucleiSoTheyAreNeverOrphans() {
        double[][] xy = {{10.5, 20.5}, {30.0, 30.0}, {50.0, 50.0}};
        Map<String, Set<String>> before = Map.of(ANN, Set.of(Markers.pointKey(10.5, 20.5),
                Markers.pointKey(30.0, 30.0), Markers.pointKey(50.0, 50.0)));
        List<Nucleus<String>> ours = new ArrayList<>();
        for (double[] p : xy) {
            ours.add(nucleus("n" + p[0], "run1", p[0], p[1], ANN));
        }
        var alreadyOrphan = nucleus("already orphan", "run0", 1.0, 1.0, "gone-annotation");
        ours.add(alreadyOrphan);

        // "Remove the points that got a nucleus" takes the first two points; the third stays.
        Map<String, Set<String>> after = Map.of(ANN, Set.of(Markers.pointKey(50.0, 50.0)));
        var released = NucleusRules.toRelease(ours, before, after);
        assertEquals(List.of(ours.get(0), ours.get(1)), released);

        // Way 1: released as the extension does (point id dropped, marker kept): no new orphan.
        List<Nucleus<String>> afterRelease = new ArrayList<>();
        for (var n : ours) {
            afterRelease.add(released.contains(n) ? new Nucleus<>(n.handle(), n.marker(), null) : n);
        }
        assertEquals(List.of(alreadyOrphan), NucleusRules.orphans(afterRelease, after));
        // ... and a later run still sees that those points' places have a nucleus.
        assertEquals(NucleusRules.keysWithNucleus(ours), NucleusRules.keysWithNucleus(afterRelease));

        // Way 2: the same points deleted by hand in QuPath (nothing released): their nuclei are orphans.
        assertEquals(List.of(ours.get(0), ours.get(1), alreadyOrphan), NucleusRules.orphans(ours, after));

        // Removing the whole annotation releases all three.
        assertEquals(ours.subList(0, 3), NucleusRules.toRelease(ours, before, Map.of()));
    }

    @Test
    void thePointsRemovedAreThoseWithANucleusOfOursAfterTheRun() {
        var found = point(ANN, 10.5, 20.5);
        var notFound = point(ANN, 30.0, 30.0);
        var skipped = point(OTHER_ANN, 50.0, 50.0);
        var oursAfter = List.of(nucleus("new", "run2", 10.5, 20.5, ANN),
                nucleus("earlier", "run1", 50.0, 50.0, OTHER_ANN));
        var remove = NucleusRules.pointsToRemove(List.of(found, notFound, skipped), oursAfter);
        assertEquals(Map.of(ANN, List.of(found), OTHER_ANN, List.of(skipped)), remove);
    }

    @Test
    void runSummaryNamesEveryKindOfChange() {
        var s = new RunSummary(3, 2, 1, 1, 2, Map.of("no nucleus under the point", 2), 4, 4, true);
        assertFalse(s.changedNothing());
        assertEquals("3 annotations added, 2 earlier nuclei replaced, 4 points removed; 1 point already has a"
                + " nucleus (skipped); 1 point at the same place as another (used once); no nucleus for 2 points:\n"
                + "no nucleus under the point (x2)", s.message());
    }

    @Test
    void firstRunMessageSaysWhereTheServerIsSetAndTheDefault() {
        String text = Help.firstRunMessage(NuClickSettings.DEFAULT_URL);
        assertTrue(text.contains("Extensions > NuClick > Settings..."), text);
        assertTrue(text.contains("http://127.0.0.1:8080"), text);
        assertTrue(text.contains("nuclick-bridge serve --http-port 8080"), text);
        assertTrue(Help.README_SECTION.startsWith(Help.HOMEPAGE + "#"), Help.README_SECTION);
        assertEquals("All 2 points already have", Help.alreadyDoneQuestion(2, 2).substring(0, 25));
        assertEquals("Skip them (nothing to add)", Help.skipChoice(0));
    }
}
