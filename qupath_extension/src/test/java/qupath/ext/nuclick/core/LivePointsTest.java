package qupath.ext.nuclick.core;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.List;
import org.junit.jupiter.api.Test;

/** Point annotations as QuPath changes them, turned into point events with stable ids. */
class LivePointsTest {

    static LivePoints.Group group(String id, String cls, double... xy) {
        return group(id, "0,0", cls, xy);
    }

    static LivePoints.Group group(String id, String plane, String cls, double... xy) {
        double[] xs = new double[xy.length / 2];
        double[] ys = new double[xy.length / 2];
        for (int i = 0; i < xs.length; i++) {
            xs[i] = xy[2 * i];
            ys[i] = xy[2 * i + 1];
        }
        return new LivePoints.Group(id, plane, cls, xs, ys);
    }

    /** "+id@x,y", "~id@x,y:class" (moved), "-id" (deleted). */
    static List<String> describe(List<LivePoints.Event> events) {
        return events.stream().map(e -> {
            if (e instanceof LivePoints.Added a) {
                return "+" + a.point().id() + "@" + Format.number(a.point().x()) + "," + Format.number(a.point().y());
            }
            if (e instanceof LivePoints.Moved m) {
                return "~" + m.after().id() + "@" + Format.number(m.after().x()) + "," + Format.number(m.after().y())
                        + ":" + m.after().className();
            }
            return "-" + ((LivePoints.Deleted) e).point().id();
        }).toList();
    }

    @Test
    void theFirstLookAddsEveryPointAndAnUnchangedLookNothing() {
        var points = new LivePoints();
        assertEquals(List.of("+p1@1,2", "+p2@3,4", "+p3@5,6"),
                describe(points.update(List.of(group("A", null, 1, 2, 3, 4), group("B", "Tumor", 5, 6)))));
        assertEquals(3, points.size());
        assertEquals("Tumor", points.get("p3").className());
        assertEquals("B", points.get("p3").annotationId());
        assertTrue(points.update(List.of(group("A", null, 1, 2, 3, 4), group("B", "Tumor", 5, 6))).isEmpty());
    }

    @Test
    void aPointAddedToAMultiPointAnnotationIsOneAddition() {
        var points = new LivePoints();
        points.update(List.of(group("A", null, 1, 2, 3, 4)));
        assertEquals(List.of("+p3@7,8"), describe(points.update(List.of(group("A", null, 1, 2, 3, 4, 7, 8)))));
    }

    @Test
    void aDraggedPointIsAMoveThatKeepsItsId() {
        var points = new LivePoints();
        points.update(List.of(group("A", null, 1, 2, 3, 4, 5, 6)));
        assertEquals(List.of("~p2@3.5,4.25:null"),
                describe(points.update(List.of(group("A", null, 1, 2, 3.5, 4.25, 5, 6)))));
        assertEquals(3.5, points.get("p2").x());
    }

    @Test
    void removedPointsAndAnnotationsAreDeletions() {
        var points = new LivePoints();
        points.update(List.of(group("A", null, 1, 2, 3, 4, 5, 6), group("B", null, 9, 9)));
        assertEquals(List.of("-p2"), describe(points.update(List.of(group("A", null, 1, 2, 5, 6), group("B", null, 9,
                9)))));
        assertEquals(List.of("-p4"), describe(points.update(List.of(group("A", null, 1, 2, 5, 6)))));
        assertNull(points.get("p4"));
    }

    @Test
    void severalChangesAtOnceAreDeletionsAndAdditions() {
        var points = new LivePoints();
        points.update(List.of(group("A", null, 1, 2, 3, 4, 5, 6)));
        assertEquals(List.of("-p1", "-p2", "+p4@7,8", "+p5@9,10"),
                describe(points.update(List.of(group("A", null, 7, 8, 5, 6, 9, 10)))));
    }

    @Test
    void aClassChangeMovesEveryPointOfTheAnnotationToTheNewClass() {
        var points = new LivePoints();
        points.update(List.of(group("A", null, 1, 2, 3, 4)));
        assertEquals(List.of("~p1@1,2:Stroma", "~p2@3,4:Stroma"),
                describe(points.update(List.of(group("A", "Stroma", 1, 2, 3, 4)))));
    }

    @Test
    void anotherPlaneIsDeletionAndAddition() {
        var points = new LivePoints();
        points.update(List.of(group("A", "0,0", null, 1, 2)));
        assertEquals(List.of("-p1", "+p2@1,2"), describe(points.update(List.of(group("A", "1,0", null, 1, 2)))));
        assertEquals("1,0", points.get("p2").plane());
    }

    @Test
    void twoPointsAtTheSamePlaceKeepTheirIds() {
        var points = new LivePoints();
        points.update(List.of(group("A", null, 1, 2, 1, 2)));
        assertEquals(List.of("-p2"), describe(points.update(List.of(group("A", null, 1, 2)))));
        assertEquals(1, points.size());
    }
}
