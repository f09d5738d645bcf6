package qupath.ext.nuclick;

import java.util.ArrayList;
import java.util.IdentityHashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeSet;
import org.locationtech.jts.geom.Coordinate;
import org.locationtech.jts.geom.LinearRing;
import qupath.ext.nuclick.core.Markers;
import qupath.ext.nuclick.core.NuClickSettings;
import qupath.ext.nuclick.core.NucleusResult;
import qupath.ext.nuclick.core.Polygon;
import qupath.ext.nuclick.core.Ring;
import qupath.lib.geom.Point2;
import qupath.lib.images.servers.PixelCalibration;
import qupath.lib.objects.PathObject;
import qupath.lib.objects.PathObjects;
import qupath.lib.objects.PathROIObject;
import qupath.lib.objects.hierarchy.PathObjectHierarchy;
import qupath.lib.regions.ImagePlane;
import qupath.lib.roi.GeometryTools;
import qupath.lib.roi.ROIs;
import qupath.lib.roi.interfaces.ROI;

/** Results to QuPath objects, added (and consumed points removed) in one hierarchy update. */
final class NucleusObjects {

    static final String AREA_PX = "Area px^2";
    static final String AREA_UM = "Area µm^2";
    static final String PROBABILITY = "NuClick probability";

    private NucleusObjects() {
    }

    record Summary(int added, int notFound, int pointsRemoved, String message) {
    }

    /**
     * Add one detection (or annotation) per found nucleus, in its point's class, named with our marker,
     * with area and probability; optionally remove the points that got a nucleus.  One hierarchy event.
     */
    static Summary add(PathObjectHierarchy hierarchy, PixelCalibration cal, NuClickSettings settings, String runId,
                       List<SegmentPointsCommand.PointRef> points, List<NucleusResult> results) {
        boolean micrometres = cal.hasPixelSizeMicrons();
        double umPerPx2 = micrometres ? cal.getPixelWidthMicrons() * cal.getPixelHeightMicrons() : Double.NaN;
        List<PathObject> created = new ArrayList<>();
        Map<PathObject, Set<Integer>> consumed = new IdentityHashMap<>();
        Map<String, Integer> reasons = new LinkedHashMap<>();
        int notFound = 0;
        for (int k = 0; k < results.size(); k++) {
            var r = results.get(k);
            var p = points.get(k);
            if (!r.found()) {
                notFound++;
                reasons.merge(r.reason(), 1, Integer::sum);
                continue;
            }
            ROI roi = toRoi(r.polygon(), p.roi().getImagePlane());
            var pathClass = p.annotation().getPathClass();
            PathObject obj = settings.output() == NuClickSettings.Output.ANNOTATIONS
                    ? PathObjects.createAnnotationObject(roi, pathClass)
                    : PathObjects.createDetectionObject(roi, pathClass);
            obj.setName(Markers.name(runId, p.x(), p.y()));
            var ml = obj.getMeasurementList();
            ml.put(AREA_PX, r.areaPx());
            if (micrometres) {
                ml.put(AREA_UM, r.areaPx() * umPerPx2);
            }
            ml.put(PROBABILITY, r.score());
            created.add(obj);
            consumed.computeIfAbsent(p.annotation(), a -> new TreeSet<>()).add(p.index());
        }

        int removed = 0;
        for (var obj : created) {
            hierarchy.addObject(obj, false);
        }
        if (settings.removePoints()) {
            for (var entry : consumed.entrySet()) {
                removed += removePoints(hierarchy, entry.getKey(), entry.getValue(), points);
            }
        }
        if (!created.isEmpty() || removed > 0) {
            hierarchy.fireHierarchyChangedEvent(NucleusObjects.class);
        }
        return new Summary(created.size(), notFound, removed, message(created.size(), notFound, removed, reasons, settings));
    }

    /** Remove the consumed points of one annotation: the whole annotation or some of its points. */
    private static int removePoints(PathObjectHierarchy hierarchy, PathObject annotation, Set<Integer> indices,
                                    List<SegmentPointsCommand.PointRef> points) {
        ROI collected = null;
        for (var p : points) {
            if (p.annotation() == annotation) {
                collected = p.roi();
                break;
            }
        }
        if (collected == null || annotation.getROI() != collected) {
            return 0; // the user edited these points while we worked: leave them alone
        }
        List<Point2> all = collected.getAllPoints();
        if (indices.size() >= all.size()) {
            hierarchy.removeObjectWithoutUpdate(annotation, true);
            return all.size();
        }
        if (!(annotation instanceof PathROIObject roiObject)) {
            return 0;
        }
        List<Point2> kept = new ArrayList<>();
        for (int i = 0; i < all.size(); i++) {
            if (!indices.contains(i)) {
                kept.add(all.get(i));
            }
        }
        roiObject.setROI(ROIs.createPointsROI(kept, collected.getImagePlane()));
        return all.size() - kept.size();
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

    private static String message(int added, int notFound, int removed, Map<String, Integer> reasons,
                                  NuClickSettings settings) {
        String kind = settings.output() == NuClickSettings.Output.ANNOTATIONS ? "annotation" : "detection";
        var sb = new StringBuilder();
        sb.append(added).append(' ').append(kind).append(added == 1 ? "" : "s").append(" added");
        if (removed > 0) {
            sb.append(", ").append(removed).append(" point").append(removed == 1 ? "" : "s").append(" removed");
        }
        if (notFound > 0) {
            sb.append("; no nucleus for ").append(notFound).append(" point").append(notFound == 1 ? "" : "s").append(':');
            int shown = 0;
            for (var e : reasons.entrySet()) {
                if (shown++ == 3) {
                    sb.append("\n...");
                    break;
                }
                sb.append("\n").append(e.getKey());
                if (e.getValue() > 1) {
                    sb.append(" (x").append(e.getValue()).append(')');
                }
            }
        }
        return sb.toString();
    }
}
