package qupath.ext.nuclick;

import java.util.ArrayList;
import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import org.locationtech.jts.geom.Coordinate;
import org.locationtech.jts.geom.LinearRing;
import qupath.ext.nuclick.SegmentPointsCommand.PointRef;
import qupath.ext.nuclick.core.Markers;
import qupath.ext.nuclick.core.NuClickSettings;
import qupath.ext.nuclick.core.NucleusResult;
import qupath.ext.nuclick.core.NucleusRules;
import qupath.ext.nuclick.core.Polygon;
import qupath.ext.nuclick.core.Ring;
import qupath.ext.nuclick.core.RunSummary;
import qupath.lib.geom.Point2;
import qupath.lib.images.servers.PixelCalibration;
import qupath.lib.objects.PathObject;
import qupath.lib.objects.PathObjects;
import qupath.lib.objects.PathROIObject;
import qupath.lib.objects.classes.PathClass;
import qupath.lib.objects.hierarchy.PathObjectHierarchy;
import qupath.lib.regions.ImagePlane;
import qupath.lib.roi.GeometryTools;
import qupath.lib.roi.ROIs;
import qupath.lib.roi.interfaces.ROI;

/**
 * Results to QuPath objects, and the objects of ours already in the image.  One run is one edit: every
 * change (nuclei added, earlier nuclei replaced, points removed, nuclei released) is made without an event
 * and then announced by a single hierarchy event, which is what QuPath's {@code UndoRedoManager} records as
 * one undo step (it snapshots the hierarchy on each event that is not {@code isChanging}).  The decisions
 * (which nuclei go, which are released) are {@link NucleusRules}'; this class only carries them out.
 */
final class NucleusObjects {

    static final String AREA_PX = "Area px^2";
    static final String AREA_UM = "Area µm^2";
    static final String PROBABILITY = "NuClick probability";

    private NucleusObjects() {
    }

    /** Our nuclei in the image: detections and annotations whose name carries our marker. */
    static List<NucleusRules.Nucleus<PathObject>> ours(PathObjectHierarchy hierarchy) {
        List<NucleusRules.Nucleus<PathObject>> out = new ArrayList<>();
        List<PathObject> candidates = new ArrayList<>(hierarchy.getDetectionObjects());
        candidates.addAll(hierarchy.getAnnotationObjects());
        for (PathObject p : candidates) {
            var marker = Markers.parse(p.getName());
            if (marker.isPresent()) {
                out.add(new NucleusRules.Nucleus<>(p, marker.get(), p.getMetadata().get(Markers.META_POINT_ID)));
            }
        }
        return out;
    }

    /** Every point annotation of the image: its id and the keys of its points. */
    static Map<String, Set<String>> pointKeys(PathObjectHierarchy hierarchy) {
        Map<String, Set<String>> out = new HashMap<>();
        for (PathObject p : hierarchy.getAllPointAnnotations()) {
            out.put(p.getID().toString(), keys(p.getROI().getAllPoints()));
        }
        return out;
    }

    private static Set<String> keys(List<Point2> points) {
        Set<String> keys = new HashSet<>();
        for (Point2 pt : points) {
            keys.add(Markers.pointKey(pt.getX(), pt.getY()));
        }
        return keys;
    }

    /**
     * Apply one run (on the FX thread): add one detection (or annotation) per found nucleus, in its point's
     * class, named with our marker and carrying the marker's metadata; in REPLACE mode remove our earlier
     * nuclei of the points that got a new one; optionally remove the points that have a nucleus and release
     * the nuclei that this would orphan.  One hierarchy event for all of it.
     *
     * @param runPoints every point the run took (including those skipped because they had a nucleus)
     * @param segmented the points sent to the server, in the order of {@code results}
     */
    static RunSummary apply(PathObjectHierarchy hierarchy, PixelCalibration cal, NuClickSettings settings,
                            String runId, NucleusRules.Mode mode, List<PointRef> runPoints, int skipped, int repeated,
                            List<PointRef> segmented, List<NucleusResult> results) {
        var existing = ours(hierarchy);
        Set<String> doneNow = NucleusRules.keysWithNucleus(existing);

        List<PathObject> created = new ArrayList<>();
        List<NucleusRules.Nucleus<PathObject>> createdOurs = new ArrayList<>();
        List<String> newKeys = new ArrayList<>();
        Map<String, Integer> reasons = new LinkedHashMap<>();
        int notFound = 0;
        for (int k = 0; k < results.size(); k++) {
            var r = results.get(k);
            var p = segmented.get(k);
            if (!r.found()) {
                notFound++;
                reasons.merge(r.reason(), 1, Integer::sum);
                continue;
            }
            if (mode == NucleusRules.Mode.SKIP && doneNow.contains(p.key())) {
                skipped++; // a nucleus of ours appeared at this point while we worked: keep that one
                continue;
            }
            PathObject obj = nucleus(r, p.annotation().getPathClass(), p.roi().getImagePlane(), p.annotationId(),
                    p.key(), runId, settings, cal);
            created.add(obj);
            createdOurs.add(new NucleusRules.Nucleus<>(obj, new Markers.Marker(runId, p.key()), p.annotationId()));
            newKeys.add(p.key());
        }

        var replaced = mode == NucleusRules.Mode.REPLACE ? NucleusRules.replaced(newKeys, existing)
                : List.<NucleusRules.Nucleus<PathObject>>of();
        List<NucleusRules.Nucleus<PathObject>> oursAfter = new ArrayList<>(existing);
        oursAfter.removeAll(replaced);
        oursAfter.addAll(createdOurs);

        int removed = 0;
        int released = 0;
        if (settings.removePoints()) {
            Map<String, Set<String>> before = pointKeys(hierarchy);
            Map<String, Set<String>> after = new HashMap<>(before);
            List<NucleusRules.Point<PointRef>> rulePoints = new ArrayList<>();
            for (var p : runPoints) {
                rulePoints.add(p.asRulePoint());
            }
            List<Runnable> edits = new ArrayList<>();
            for (var entry : NucleusRules.pointsToRemove(rulePoints, oursAfter).entrySet()) {
                var refs = entry.getValue().stream().map(NucleusRules.Point::handle).toList();
                var edit = pointRemoval(hierarchy, refs);
                if (edit != null) {
                    removed += edit.count();
                    if (edit.kept().isEmpty()) {
                        after.remove(entry.getKey());
                    } else {
                        after.put(entry.getKey(), keys(edit.kept()));
                    }
                    edits.add(edit.apply());
                }
            }
            for (var n : NucleusRules.toRelease(oursAfter, before, after)) {
                n.handle().getMetadata().remove(Markers.META_POINT_ID);
                released++;
            }
            edits.forEach(Runnable::run);
        }
        for (var n : replaced) {
            hierarchy.removeObjectWithoutUpdate(n.handle(), true);
        }
        for (var obj : created) {
            hierarchy.addObject(obj, false);
        }
        var summary = new RunSummary(created.size(), replaced.size(), skipped, repeated, notFound, reasons, removed,
                released, settings.output() == NuClickSettings.Output.ANNOTATIONS);
        if (!summary.changedNothing()) {
            hierarchy.fireHierarchyChangedEvent(NucleusObjects.class);
        }
        return summary;
    }

    /**
     * The object for one found nucleus: a detection (or an annotation, as the settings say) with the polygon's
     * ROI on {@code plane}, in {@code pathClass} (its point's class), named with our marker ({@code runId} and the
     * point's {@code key}) and carrying the marker's metadata ({@code annotationId}: the point annotation's id)
     * and the measurements (area in px^2, in µm^2 on calibrated images, and the NuClick probability).
     */
    static PathObject nucleus(NucleusResult r, PathClass pathClass, ImagePlane plane, String annotationId, String key,
                              String runId, NuClickSettings settings, PixelCalibration cal) {
        ROI roi = toRoi(r.polygon(), plane);
        PathObject obj = settings.output() == NuClickSettings.Output.ANNOTATIONS
                ? PathObjects.createAnnotationObject(roi, pathClass)
                : PathObjects.createDetectionObject(roi, pathClass);
        obj.setName(new Markers.Marker(runId, key).name());
        var metadata = obj.getMetadata();
        metadata.put(Markers.META_RUN, runId);
        metadata.put(Markers.META_POINT_ID, annotationId);
        metadata.put(Markers.META_POINT, key);
        var ml = obj.getMeasurementList();
        ml.put(AREA_PX, r.areaPx());
        if (cal.hasPixelSizeMicrons()) {
            ml.put(AREA_UM, r.areaPx() * cal.getPixelWidthMicrons() * cal.getPixelHeightMicrons());
        }
        ml.put(PROBABILITY, r.score());
        return obj;
    }

    /** Removing some points of one point annotation: how many, which stay, and the change itself. */
    private record PointRemoval(int count, List<Point2> kept, Runnable apply) {
    }

    /**
     * The removal of the given points (all of one annotation): the whole annotation when none stays, else
     * its ROI without them.  Null when the user edited those points while the server worked: left alone.
     */
    private static PointRemoval pointRemoval(PathObjectHierarchy hierarchy, List<PointRef> refs) {
        PathObject annotation = refs.get(0).annotation();
        ROI collected = refs.get(0).roi();
        if (annotation.getROI() != collected || annotation.getParent() == null) {
            return null;
        }
        Set<Integer> indices = new HashSet<>();
        for (var r : refs) {
            indices.add(r.index());
        }
        List<Point2> all = collected.getAllPoints();
        List<Point2> kept = new ArrayList<>();
        for (int i = 0; i < all.size(); i++) {
            if (!indices.contains(i)) {
                kept.add(all.get(i));
            }
        }
        if (kept.isEmpty()) {
            return new PointRemoval(all.size(), kept, () -> hierarchy.removeObjectWithoutUpdate(annotation, true));
        }
        if (!(annotation instanceof PathROIObject roiObject)) {
            return null;
        }
        ROI smaller = ROIs.createPointsROI(kept, collected.getImagePlane());
        return new PointRemoval(all.size() - kept.size(), kept, () -> roiObject.setROI(smaller));
    }

    static ROI toRoi(Polygon polygon, ImagePlane plane) {
        if (polygon.holes().isEmpty()) {
            return ROIs.createPolygonROI(polygon.exterior().xs(), polygon.exterior().ys(), plane);
        }
        var factory = GeometryTools.getDefaultFactory();
        LinearRing shell = factory.createLinearRing(closed(polygon.exterior()));
        LinearRing[] holes = new LinearRing[polygon.holes().size()];
        for (int i = 0; i < holes.length; i++) {
            holes[i] = factory.createLinearRing(closed(polygon.holes().get(i)));
        }
        return GeometryTools.geometryToROI(factory.createPolygon(shell, holes), plane);
    }

    private static Coordinate[] closed(Ring ring) {
        int n = ring.size();
        Coordinate[] c = new Coordinate[n + 1];
        for (int i = 0; i < n; i++) {
            c[i] = new Coordinate(ring.x(i), ring.y(i));
        }
        c[n] = new Coordinate(ring.x(0), ring.y(0));
        return c;
    }
}
