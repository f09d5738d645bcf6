package qupath.ext.nuclick.core;

import java.util.ArrayList;
import java.util.Collection;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;

/**
 * The rules that the extension and {@code nuclick-bridge qupath} share about our nuclei and the points
 * they came from, as plain data so that they are tested without QuPath:
 * <ul>
 *   <li>a point <b>already has a nucleus</b> when one of ours (detection or annotation, any run) carries
 *       its key (coordinates to 1/1000 px) in its name;</li>
 *   <li>a run <b>skips</b> such points, or <b>replaces</b> their nuclei: the old nucleus of a point is
 *       removed only when the new run found one for it, so a replace never loses a nucleus;</li>
 *   <li>one of our nuclei is an <b>orphan</b> iff it records a point id and the image no longer has a
 *       point at its key in the point annotation with that id; nuclei without a point id never are;</li>
 *   <li>removing points <b>releases</b> the nuclei that the removal would orphan (their point id is
 *       dropped, name and other metadata kept), so that a later {@code --replace} keeps them.</li>
 * </ul>
 * Type parameters {@code P} and {@code N} are whatever the caller uses to find the point or the object
 * again (QuPath objects in the extension, plain values in tests).
 */
public final class NucleusRules {

    private NucleusRules() {
    }

    /** Skip points that already have a nucleus of ours, or segment them again and replace it. */
    public enum Mode {
        SKIP,
        REPLACE
    }

    /**
     * One point of a point annotation.
     *
     * @param handle       the caller's reference to it
     * @param annotationId the QuPath object id of its point annotation
     * @param key          {@link Markers#pointKey(double, double)} of its coordinates
     */
    public record Point<P>(P handle, String annotationId, String key) {
    }

    /**
     * One of our nuclei in the image.
     *
     * @param handle  the caller's reference to it
     * @param marker  what its name says (run, key of its point)
     * @param pointId the point annotation id in its metadata; empty or null when it records none
     */
    public record Nucleus<N>(N handle, Markers.Marker marker, String pointId) {

        public String key() {
            return marker.key();
        }

        public boolean recordsPoint() {
            return pointId != null && !pointId.isEmpty();
        }
    }

    /**
     * What a run does with its points.
     *
     * @param toSegment   the points to send to the server (each key once)
     * @param alreadyDone the points that already have a nucleus of ours (in REPLACE mode also in toSegment)
     * @param repeated    points at the same key as an earlier point of the run: used once
     */
    public record Plan<P>(List<Point<P>> toSegment, List<Point<P>> alreadyDone, List<Point<P>> repeated) {

        public boolean nothingToDo() {
            return toSegment.isEmpty();
        }
    }

    /** The keys that have a nucleus of ours. */
    public static Set<String> keysWithNucleus(Collection<? extends Nucleus<?>> ours) {
        Set<String> keys = new HashSet<>();
        for (var n : ours) {
            keys.add(n.key());
        }
        return keys;
    }

    /** Which of the points a run segments, in their order; each key once. */
    public static <P> Plan<P> plan(List<Point<P>> points, Collection<? extends Nucleus<?>> ours, Mode mode) {
        Set<String> done = keysWithNucleus(ours);
        Set<String> seen = new HashSet<>();
        List<Point<P>> toSegment = new ArrayList<>();
        List<Point<P>> alreadyDone = new ArrayList<>();
        List<Point<P>> repeated = new ArrayList<>();
        for (var p : points) {
            if (!seen.add(p.key())) {
                repeated.add(p);
                continue;
            }
            boolean has = done.contains(p.key());
            if (has) {
                alreadyDone.add(p);
            }
            if (!has || mode == Mode.REPLACE) {
                toSegment.add(p);
            }
        }
        return new Plan<>(toSegment, alreadyDone, repeated);
    }

    /** Our nuclei that a replace removes: those at the keys that got a new nucleus, nothing else. */
    public static <N> List<Nucleus<N>> replaced(Collection<String> keysWithNewNucleus, List<Nucleus<N>> ours) {
        Set<String> keys = new HashSet<>(keysWithNewNucleus);
        List<Nucleus<N>> out = new ArrayList<>();
        for (var n : ours) {
            if (keys.contains(n.key())) {
                out.add(n);
            }
        }
        return out;
    }

    /**
     * Our orphans: nuclei that record a point id whose annotation no longer holds a point at their key.
     *
     * @param pointKeys every point annotation of the image: its id, and the keys of its points
     */
    public static <N> List<Nucleus<N>> orphans(List<Nucleus<N>> ours, Map<String, Set<String>> pointKeys) {
        List<Nucleus<N>> out = new ArrayList<>();
        for (var n : ours) {
            if (isOrphan(n, pointKeys)) {
                out.add(n);
            }
        }
        return out;
    }

    public static boolean isOrphan(Nucleus<?> n, Map<String, Set<String>> pointKeys) {
        if (!n.recordsPoint()) {
            return false;
        }
        Set<String> keys = pointKeys.get(n.pointId());
        return keys == null || !keys.contains(n.key());
    }

    /**
     * The nuclei to release when the image's points change from {@code before} to {@code after}: those
     * that the change turns into orphans.  Nuclei that were orphans already are left as they are.
     */
    public static <N> List<Nucleus<N>> toRelease(List<Nucleus<N>> ours, Map<String, Set<String>> before,
                                                 Map<String, Set<String>> after) {
        List<Nucleus<N>> out = new ArrayList<>();
        for (var n : ours) {
            if (!isOrphan(n, before) && isOrphan(n, after)) {
                out.add(n);
            }
        }
        return out;
    }

    /**
     * The points that "remove the points that got a nucleus" takes: those of the run whose key has a
     * nucleus of ours once the run's nuclei are in (new ones and earlier ones), grouped by annotation.
     */
    public static <P> Map<String, List<Point<P>>> pointsToRemove(List<Point<P>> runPoints,
                                                                 Collection<? extends Nucleus<?>> oursAfter) {
        Set<String> done = keysWithNucleus(oursAfter);
        Map<String, List<Point<P>>> out = new LinkedHashMap<>();
        for (var p : runPoints) {
            if (done.contains(p.key())) {
                out.computeIfAbsent(p.annotationId(), k -> new ArrayList<>()).add(p);
            }
        }
        return out;
    }
}
