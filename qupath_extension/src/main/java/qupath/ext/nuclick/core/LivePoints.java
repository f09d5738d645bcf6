package qupath.ext.nuclick.core;

import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.Collection;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Objects;

/**
 * The points of an image as live mode follows them: QuPath's point annotations hold their points as plain
 * coordinates (a multi-point annotation changes its whole ROI when one point is added, dragged or removed), so
 * this gives each point an id and turns each new look at the annotations into point events.  Within one
 * annotation, a point at exactly the same place keeps its id; when exactly one point disappeared and one
 * appeared, that is a move (a drag); otherwise points that disappeared are deletions and new ones additions.
 * A whole annotation that changes class moves its points to their new class; one that changes plane deletes
 * them and adds them on the new plane.
 */
public final class LivePoints {

    /**
     * A point annotation as it is now.
     *
     * @param annotationId its object id
     * @param plane        its image plane, as any key (points of different planes are segmented apart)
     * @param className    its class (null for none)
     * @param xs           its points' level-0 x, in ROI order
     * @param ys           its points' level-0 y
     */
    public record Group(String annotationId, String plane, String className, double[] xs, double[] ys) {

        public Group {
            if (xs.length != ys.length) {
                throw new IllegalArgumentException("xs and ys have different lengths");
            }
            xs = xs.clone();
            ys = ys.clone();
        }
    }

    /** One point that live mode follows. */
    public record Point(String id, String annotationId, String plane, double x, double y, String className) {
    }

    /** What changed at one point. */
    public sealed interface Event permits Added, Moved, Deleted {
    }

    /** A new point. */
    public record Added(Point point) implements Event {
    }

    /** A point moved or changed class (same id, same plane). */
    public record Moved(Point before, Point after) implements Event {
    }

    /** A point is gone. */
    public record Deleted(Point point) implements Event {
    }

    private final Map<String, List<Point>> byAnnotation = new LinkedHashMap<>();
    private final Map<String, Point> byId = new HashMap<>();
    private long next;

    /** The point with this id, or null when there is none (any more). */
    public Point get(String id) {
        return byId.get(id);
    }

    /** How many points are followed. */
    public int size() {
        return byId.size();
    }

    /**
     * The annotations as they are now, against the last look: the point events, in annotation order (deletions
     * of vanished annotations last).  The first look gives an {@link Added} for every point.
     */
    public List<Event> update(Collection<Group> groups) {
        List<Event> events = new ArrayList<>();
        Map<String, List<Point>> seen = new LinkedHashMap<>();
        for (Group g : groups) {
            List<Point> before = byAnnotation.getOrDefault(g.annotationId(), List.of());
            seen.put(g.annotationId(), diff(g, before, events));
        }
        for (var e : byAnnotation.entrySet()) {
            if (!seen.containsKey(e.getKey())) {
                for (Point p : e.getValue()) {
                    events.add(new Deleted(p));
                }
            }
        }
        byAnnotation.clear();
        byAnnotation.putAll(seen);
        byId.clear();
        for (List<Point> list : seen.values()) {
            for (Point p : list) {
                byId.put(p.id(), p);
            }
        }
        return events;
    }

    private record Place(double x, double y) {
    }

    private List<Point> diff(Group g, List<Point> before, List<Event> events) {
        boolean samePlane = before.isEmpty() || before.get(0).plane().equals(g.plane());
        Map<Place, ArrayDeque<Point>> unused = new HashMap<>();
        if (samePlane) {
            for (Point p : before) {
                unused.computeIfAbsent(new Place(p.x(), p.y()), k -> new ArrayDeque<>()).add(p);
            }
        }
        int n = g.xs().length;
        Point[] now = new Point[n];
        List<Integer> fresh = new ArrayList<>();
        for (int i = 0; i < n; i++) {
            ArrayDeque<Point> same = unused.get(new Place(g.xs()[i], g.ys()[i]));
            Point kept = same == null ? null : same.poll();
            if (kept == null) {
                fresh.add(i);
                continue;
            }
            now[i] = kept;
            if (!Objects.equals(kept.className(), g.className())) {
                now[i] = new Point(kept.id(), g.annotationId(), g.plane(), kept.x(), kept.y(), g.className());
                events.add(new Moved(kept, now[i]));
            }
        }
        List<Point> gone = new ArrayList<>();
        if (samePlane) {
            for (Point p : before) {
                ArrayDeque<Point> left = unused.get(new Place(p.x(), p.y()));
                if (left != null && left.remove(p)) {
                    gone.add(p);
                }
            }
        } else {
            gone.addAll(before);
        }
        if (samePlane && gone.size() == 1 && fresh.size() == 1) {
            int i = fresh.get(0);
            Point was = gone.get(0);
            now[i] = new Point(was.id(), g.annotationId(), g.plane(), g.xs()[i], g.ys()[i], g.className());
            events.add(new Moved(was, now[i]));
        } else {
            for (Point p : gone) {
                events.add(new Deleted(p));
            }
            for (int i : fresh) {
                now[i] = new Point("p" + (++next), g.annotationId(), g.plane(), g.xs()[i], g.ys()[i], g.className());
                events.add(new Added(now[i]));
            }
        }
        return List.of(now);
    }
}
