package qupath.ext.nuclick;

import java.awt.image.BufferedImage;
import java.time.ZonedDateTime;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.function.Consumer;
import java.util.random.RandomGenerator;
import javafx.application.Platform;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import qupath.ext.nuclick.core.LiveController;
import qupath.ext.nuclick.core.LivePoints;
import qupath.ext.nuclick.core.Markers;
import qupath.ext.nuclick.core.NuClickException;
import qupath.ext.nuclick.core.NuClickHttpClient;
import qupath.ext.nuclick.core.NuClickSettings;
import qupath.ext.nuclick.core.SegmentJob;
import qupath.lib.images.ImageData;
import qupath.lib.objects.PathObject;
import qupath.lib.objects.hierarchy.PathObjectHierarchy;
import qupath.lib.objects.hierarchy.events.PathObjectHierarchyEvent;
import qupath.lib.objects.hierarchy.events.PathObjectHierarchyListener;
import qupath.lib.regions.ImagePlane;
import qupath.lib.roi.interfaces.ROI;

/**
 * Live mode on one open image: a hierarchy listener that turns changes of the point annotations into
 * {@link LiveController} events ({@link LivePoints} gives the points their ids), and applies each edit the
 * controllers hand back on the FX thread as one hierarchy change (one undo step), creating nuclei as
 * {@link NucleusObjects} does for <i>Segment points</i>.  One controller per image plane.  Points are only read,
 * never changed.  Points already in the image when live mode starts are neighbours of the ones that change (and
 * their nuclei of ours, if any, are replaced when a change reaches them); after a <i>Segment points</i> run the
 * points are taken as they are again.
 */
final class LiveImage implements PathObjectHierarchyListener {

    private static final Logger logger = LoggerFactory.getLogger(LiveImage.class);

    private final ImageData<BufferedImage> imageData;
    private final PathObjectHierarchy hierarchy;
    private final NuClickSettings settings;
    private final SegmentJob job;
    private final Consumer<String> onStopped;
    private final String runId;
    private final int width;
    private final int height;
    private final double pixelSizeUm;

    private LivePoints points = new LivePoints();
    private final Map<String, LiveController> controllers = new HashMap<>();
    private final Map<String, ImagePlane> planes = new HashMap<>();
    /** The point annotations by object id, as last seen (kept after they go, for edits still on their way). */
    private final Map<String, PathObject> annotations = new HashMap<>();
    /** Our nuclei by live point id. */
    private final Map<String, List<PathObject>> nuclei = new HashMap<>();
    private final AtomicBoolean lookScheduled = new AtomicBoolean();
    private boolean closed;

    private LiveImage(ImageData<BufferedImage> imageData, NuClickSettings settings, Consumer<String> onStopped)
            throws NuClickException {
        this.imageData = imageData;
        this.hierarchy = imageData.getHierarchy();
        this.settings = settings;
        this.job = new SegmentJob(new NuClickHttpClient(settings));
        this.onStopped = onStopped;
        this.runId = "live-" + Markers.runId(ZonedDateTime.now(), RandomGenerator.getDefault());
        var server = imageData.getServer();
        var cal = server.getPixelCalibration();
        this.pixelSizeUm = cal.hasPixelSizeMicrons() ? cal.getAveragedPixelSizeMicrons() : Double.NaN;
        this.width = server.getWidth();
        this.height = server.getHeight();
    }

    /**
     * On the FX thread: live mode on {@code imageData} from now on.  {@code onStopped} gets, on the FX thread, the
     * message of a controller that stopped itself (the server went away, ...); live mode is then closed.
     */
    static LiveImage start(ImageData<BufferedImage> imageData, NuClickSettings settings, Consumer<String> onStopped)
            throws NuClickException {
        var live = new LiveImage(imageData, settings.validated(), onStopped);
        live.takeAsTheyAre();
        live.hierarchy.addListener(live);
        return live;
    }

    /** On the FX thread: stop following the image; edits still on their way are dropped. */
    void close() {
        if (closed) {
            return;
        }
        closed = true;
        hierarchy.removeListener(this);
        controllers.values().forEach(LiveController::close);
        controllers.clear();
    }

    ImageData<BufferedImage> imageData() {
        return imageData;
    }

    /** Every point of the image as a known neighbour; our nuclei at their places as theirs. */
    private void takeAsTheyAre() {
        controllers.values().forEach(LiveController::close);
        controllers.clear();
        nuclei.clear();
        points = new LivePoints();
        Map<String, List<PathObject>> oursByKey = new HashMap<>();
        for (var n : NucleusObjects.ours(hierarchy)) {
            oursByKey.computeIfAbsent(n.key(), k -> new ArrayList<>()).add(n.handle());
        }
        for (var event : points.update(groups())) {
            if (event instanceof LivePoints.Added added) {
                var p = added.point();
                List<PathObject> own = oursByKey.getOrDefault(Markers.pointKey(p.x(), p.y()), List.of());
                nuclei.put(p.id(), new ArrayList<>(own));
                controller(p.plane()).known(p.id(), p.x(), p.y(), p.className(), !own.isEmpty());
            }
        }
        logger.info("NuClick live mode on {} points", points.size());
    }

    /** The point annotations now, grouped for {@link LivePoints}. */
    private List<LivePoints.Group> groups() {
        List<LivePoints.Group> out = new ArrayList<>();
        for (PathObject a : hierarchy.getAllPointAnnotations()) {
            ROI roi = a.getROI();
            var pts = roi.getAllPoints();
            double[] xs = new double[pts.size()];
            double[] ys = new double[pts.size()];
            for (int i = 0; i < xs.length; i++) {
                xs[i] = pts.get(i).getX();
                ys[i] = pts.get(i).getY();
            }
            String plane = roi.getZ() + "," + roi.getT();
            planes.putIfAbsent(plane, roi.getImagePlane());
            String id = a.getID().toString();
            annotations.put(id, a);
            var pathClass = a.getPathClass();
            out.add(new LivePoints.Group(id, plane, pathClass == null ? null : pathClass.toString(), xs, ys));
        }
        return out;
    }

    private LiveController controller(String plane) {
        var existing = controllers.get(plane);
        if (existing != null) {
            return existing;
        }
        ImagePlane p = planes.get(plane);
        var pixels = new ImageServerPixels(imageData.getServer(), p.getZ(), p.getT());
        LiveController[] self = new LiveController[1];
        // Callbacks run later on the FX thread, where this is called: self[0] is set by then.
        self[0] = new LiveController(job, width, height, pixelSizeUm, pixels, Platform::runLater,
                new LiveController.Listener() {
                    @Override
                    public void edit(LiveController.Edit edit) {
                        apply(self[0], plane, edit);
                    }

                    @Override
                    public void stopped(String message) {
                        if (!closed && controllers.get(plane) == self[0]) {
                            onStopped.accept(message);
                        }
                    }
                });
        controllers.put(plane, self[0]);
        return self[0];
    }

    /** Any thread: the points may have changed; look at them once the event is over, on the FX thread. */
    @Override
    public void hierarchyChanged(PathObjectHierarchyEvent event) {
        if (event.isChanging() || event.getSource() == LiveImage.class) {
            return; // a point still being dragged, or our own edit
        }
        boolean batchRun = event.getSource() == NucleusObjects.class;
        if (batchRun || lookScheduled.compareAndSet(false, true)) {
            Platform.runLater(batchRun ? this::afterBatchRun : this::look);
        }
    }

    /** Segment points may have added nuclei and removed points: take everything as it is now. */
    private void afterBatchRun() {
        if (!closed) {
            takeAsTheyAre();
        }
    }

    /** On the FX thread: the point events since the last look, to the controllers. */
    private void look() {
        lookScheduled.set(false);
        if (closed) {
            return;
        }
        for (var event : points.update(groups())) {
            if (event instanceof LivePoints.Added a) {
                var p = a.point();
                controller(p.plane()).add(p.id(), p.x(), p.y(), p.className());
            } else if (event instanceof LivePoints.Moved m) {
                var p = m.after();
                controller(p.plane()).move(p.id(), p.x(), p.y(), p.className());
            } else if (event instanceof LivePoints.Deleted d) {
                var p = d.point();
                controller(p.plane()).delete(p.id());
            }
        }
    }

    /** On the FX thread: one edit of one plane's controller, as one hierarchy change. */
    private void apply(LiveController source, String plane, LiveController.Edit edit) {
        if (closed || controllers.get(plane) != source) {
            return; // live mode ended, or the points were taken anew after a Segment points run
        }
        boolean changed = false;
        for (String id : edit.removed()) {
            changed |= removeNuclei(id);
        }
        var cal = imageData.getServer().getPixelCalibration();
        for (var put : edit.put()) {
            String id = put.pointId();
            if (!put.changed() && present(nuclei.get(id))) {
                continue; // the same outline, still there
            }
            changed |= removeNuclei(id);
            var r = put.result();
            LivePoints.Point p = points.get(id);
            PathObject annotation = p == null ? null : annotations.get(p.annotationId());
            if (!r.found() || annotation == null) {
                continue; // no nucleus here, or the point is gone (its removal follows)
            }
            PathObject obj = NucleusObjects.nucleus(r, annotation.getPathClass(), planes.get(plane), p.annotationId(),
                    Markers.pointKey(r.click().x(), r.click().y()), runId, settings, cal);
            hierarchy.addObject(obj, false);
            nuclei.put(id, new ArrayList<>(List.of(obj)));
            changed = true;
        }
        if (changed) {
            hierarchy.fireHierarchyChangedEvent(LiveImage.class);
        }
    }

    private boolean present(List<PathObject> objects) {
        if (objects == null || objects.isEmpty()) {
            return false;
        }
        for (PathObject o : objects) {
            if (!inHierarchy(o)) {
                return false;
            }
        }
        return true;
    }

    /**
     * Removes the nuclei of a point, without an event.  After an undo or redo QuPath's objects are new copies:
     * then ours are found again by name and point id.
     */
    private boolean removeNuclei(String id) {
        List<PathObject> objects = nuclei.remove(id);
        if (objects == null) {
            return false;
        }
        boolean changed = false;
        for (PathObject o : objects) {
            if (inHierarchy(o)) {
                hierarchy.removeObjectWithoutUpdate(o, true);
                changed = true;
                continue;
            }
            String name = o.getName();
            String pointId = o.getMetadata().get(Markers.META_POINT_ID);
            for (var n : NucleusObjects.ours(hierarchy)) {
                PathObject copy = n.handle();
                if (name != null && name.equals(copy.getName())
                        && (pointId == null || pointId.equals(copy.getMetadata().get(Markers.META_POINT_ID)))) {
                    hierarchy.removeObjectWithoutUpdate(copy, true);
                    changed = true;
                }
            }
        }
        return changed;
    }

    private boolean inHierarchy(PathObject o) {
        PathObject top = o;
        while (top.getParent() != null) {
            top = top.getParent();
        }
        return top == hierarchy.getRootObject();
    }
}
