package qupath.ext.nuclick;

import java.awt.image.BufferedImage;
import java.time.ZonedDateTime;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.random.RandomGenerator;
import javafx.beans.property.ReadOnlyBooleanProperty;
import javafx.beans.property.ReadOnlyBooleanWrapper;
import javafx.concurrent.Task;
import javafx.geometry.Insets;
import javafx.scene.Scene;
import javafx.scene.control.Button;
import javafx.scene.control.Label;
import javafx.scene.control.ProgressBar;
import javafx.scene.layout.VBox;
import javafx.stage.Stage;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import qupath.ext.nuclick.core.Click;
import qupath.ext.nuclick.core.Help;
import qupath.ext.nuclick.core.Markers;
import qupath.ext.nuclick.core.ModelInfo;
import qupath.ext.nuclick.core.NuClickException;
import qupath.ext.nuclick.core.NuClickHttpClient;
import qupath.ext.nuclick.core.NuClickSettings;
import qupath.ext.nuclick.core.NucleusResult;
import qupath.ext.nuclick.core.NucleusRules;
import qupath.ext.nuclick.core.RunSummary;
import qupath.ext.nuclick.core.SegmentJob;
import qupath.fx.dialogs.Dialogs;
import qupath.lib.gui.QuPathGUI;
import qupath.lib.images.ImageData;
import qupath.lib.objects.PathObject;
import qupath.lib.objects.hierarchy.PathObjectHierarchy;
import qupath.lib.regions.ImagePlane;
import qupath.lib.roi.interfaces.ROI;

/**
 * Extensions &gt; NuClick &gt; Segment points: the selected point annotations, or the points inside the
 * selected area, or all points of the image, segmented on the server in a background task (progress,
 * cancel).  Points that already have a nucleus of ours (from here or from {@code nuclick-bridge qupath})
 * are skipped, or, if the user says so, segmented again and their nuclei replaced; the changes are applied
 * as one edit, so that one undo reverts them.  On any failure the hierarchy is left as it was and a
 * notification says why.
 */
final class SegmentPointsCommand {

    private static final Logger logger = LoggerFactory.getLogger(SegmentPointsCommand.class);
    private static final String TITLE = "NuClick";

    private final QuPathGUI qupath;
    private final ReadOnlyBooleanWrapper running = new ReadOnlyBooleanWrapper(false);
    private final ExecutorService pool = Executors.newSingleThreadExecutor(r -> {
        var thread = new Thread(r, "nuclick-segment");
        thread.setDaemon(true);
        return thread;
    });

    SegmentPointsCommand(QuPathGUI qupath) {
        this.qupath = qupath;
    }

    ReadOnlyBooleanProperty runningProperty() {
        return running.getReadOnlyProperty();
    }

    /** A point to segment: where it came from, so that it can be removed afterwards. */
    record PointRef(PathObject annotation, ROI roi, int index, double x, double y) {

        /** The point's identity across runs and tools (coordinates to 1/1000 px). */
        String key() {
            return Markers.pointKey(x, y);
        }

        /** The QuPath object id of its point annotation, as our nuclei record it. */
        String annotationId() {
            return annotation.getID().toString();
        }

        NucleusRules.Point<PointRef> asRulePoint() {
            return new NucleusRules.Point<>(this, annotationId(), key());
        }
    }

    /** What the background task hands back to the UI thread. */
    record Done(List<PointRef> points, List<NucleusResult> results, ModelInfo model) {
    }

    /** What the user chose before the run: which points, and what to do with those that have a nucleus. */
    record Request(NucleusRules.Mode mode, List<PointRef> runPoints, int skipped, int repeated,
                   Map<ImagePlane, List<PointRef>> toSegment) {
    }

    /** Called on the FX thread. */
    void run() {
        ImageData<BufferedImage> imageData = qupath.getImageData();
        if (imageData == null) {
            Notify.error(TITLE, "No image is open: open an image and place points inside nuclei first.");
            return;
        }
        if (!NuClickPrefs.isServerSetUp() && !FirstRun.confirmServer()) {
            return;
        }
        NuClickSettings settings;
        try {
            settings = NuClickPrefs.current().validated();
        } catch (NuClickException e) {
            Notify.error(TITLE, e.getMessage());
            return;
        }
        var server = imageData.getServer();
        if (!server.isRGB()) {
            Notify.error(TITLE, "NuClick segments 8-bit RGB (brightfield) images; this image has " + server.nChannels()
                    + " channel(s) of type " + server.getPixelType() + ".");
            return;
        }
        var hierarchy = imageData.getHierarchy();
        Map<ImagePlane, List<PointRef>> collected = PointSelection.collect(hierarchy);
        if (collected.isEmpty()) {
            Notify.error(TITLE, SegmentJob.noPointsMessage());
            return;
        }
        Request request = ask(collected, NucleusObjects.ours(hierarchy));
        if (request == null) {
            return;
        }
        if (request.toSegment().isEmpty()) {
            // Pressing the key again: every point has its nucleus; nothing to send, nothing to add.
            Notify.info(TITLE, new RunSummary(0, 0, request.skipped(), request.repeated(), 0, Map.of(), 0, 0,
                    settings.output() == NuClickSettings.Output.ANNOTATIONS).message());
            return;
        }
        Map<ImagePlane, List<PointRef>> byPlane = request.toSegment();
        var cal = server.getPixelCalibration();
        double pixelSize = cal.hasPixelSizeMicrons() ? cal.getAveragedPixelSizeMicrons() : Double.NaN;
        int width = server.getWidth();
        int height = server.getHeight();

        Task<Done> task = new Task<>() {
            @Override
            protected Done call() throws Exception {
                var client = new NuClickHttpClient(settings);
                var job = new SegmentJob(client);
                List<PointRef> points = new ArrayList<>();
                List<NucleusResult> results = new ArrayList<>();
                ModelInfo model = null;
                int plane = 0;
                for (var entry : byPlane.entrySet()) {
                    plane++;
                    String where = byPlane.size() > 1 ? "Plane " + plane + " of " + byPlane.size() + ": " : "";
                    List<Click> clicks = new ArrayList<>();
                    for (PointRef p : entry.getValue()) {
                        var pathClass = p.annotation().getPathClass();
                        clicks.add(new Click(p.x(), p.y(), pathClass == null ? null : pathClass.toString()));
                    }
                    var pixels = new ImageServerPixels(server, entry.getKey().getZ(), entry.getKey().getT());
                    var outcome = job.run(clicks, width, height, pixelSize, pixels, model, (done, total, message) -> {
                        updateMessage(where + message);
                        if (total > 0) {
                            updateProgress(done, total);
                        } else {
                            updateProgress(-1, 1);
                        }
                    }, this::isCancelled);
                    model = outcome.model();
                    points.addAll(entry.getValue());
                    results.addAll(outcome.results());
                }
                return new Done(points, results, model);
            }
        };
        var window = progressWindow(task);
        task.setOnSucceeded(e -> {
            window.close();
            running.set(false);
            apply(imageData, settings, request, task.getValue());
        });
        task.setOnFailed(e -> {
            window.close();
            running.set(false);
            Throwable err = task.getException();
            if (err instanceof NuClickException nce) {
                if (nce.kind() == NuClickException.Kind.CANCELLED) {
                    Notify.info(TITLE, "Cancelled: nothing was added.");
                } else {
                    logger.warn("NuClick failed: {}", nce.getMessage());
                    Notify.error(TITLE, nce.getMessage() + "\nNothing was added.");
                }
            } else {
                logger.error("NuClick failed", err);
                Notify.error(TITLE, "Unexpected error: " + err + "\nNothing was added.");
            }
        });
        task.setOnCancelled(e -> {
            window.close();
            running.set(false);
            Notify.info(TITLE, "Cancelled: nothing was added.");
        });
        running.set(true);
        window.show();
        pool.submit(task);
    }

    /**
     * On the FX thread, before any work: the run's points, and whether to skip or replace those that
     * already have a nucleus of ours (asked only when some do).  Null when the user cancels.
     */
    private static Request ask(Map<ImagePlane, List<PointRef>> collected,
                               List<NucleusRules.Nucleus<PathObject>> ours) {
        List<PointRef> runPoints = new ArrayList<>();
        List<NucleusRules.Point<PointRef>> rulePoints = new ArrayList<>();
        for (var list : collected.values()) {
            for (var p : list) {
                runPoints.add(p);
                rulePoints.add(p.asRulePoint());
            }
        }
        var mode = NucleusRules.Mode.SKIP;
        var plan = NucleusRules.plan(rulePoints, ours, mode);
        int done = plan.alreadyDone().size();
        if (done > 0) {
            String skip = Help.skipChoice(plan.toSegment().size());
            String replace = Help.replaceChoice(done);
            String choice = Dialogs.showChoiceDialog(TITLE, Help.alreadyDoneQuestion(done, done
                    + plan.toSegment().size()), List.of(skip, replace), skip);
            if (choice == null) {
                return null;
            }
            if (choice.equals(replace)) {
                mode = NucleusRules.Mode.REPLACE;
                plan = NucleusRules.plan(rulePoints, ours, mode);
            }
        }
        Map<ImagePlane, List<PointRef>> toSegment = new LinkedHashMap<>();
        for (var p : plan.toSegment()) {
            toSegment.computeIfAbsent(p.handle().roi().getImagePlane(), k -> new ArrayList<>()).add(p.handle());
        }
        int skipped = mode == NucleusRules.Mode.SKIP ? done : 0;
        return new Request(mode, runPoints, skipped, plan.repeated().size(), toSegment);
    }

    /** On the FX thread: the run's changes into the hierarchy, as one edit (one Undo). */
    private static void apply(ImageData<BufferedImage> imageData, NuClickSettings settings, Request request,
                              Done done) {
        PathObjectHierarchy hierarchy = imageData.getHierarchy();
        String runId = Markers.runId(ZonedDateTime.now(), RandomGenerator.getDefault());
        var summary = NucleusObjects.apply(hierarchy, imageData.getServer().getPixelCalibration(), settings, runId,
                request.mode(), request.runPoints(), request.skipped(), request.repeated(), done.points(),
                done.results());
        String text = summary.message();
        logger.info("NuClick run {}: {}", runId, text.replace('\n', ' '));
        if (summary.added() == 0) {
            Notify.warning(TITLE, text);
        } else {
            Notify.info(TITLE, text);
        }
    }

    private Stage progressWindow(Task<?> task) {
        var label = new Label("Starting...");
        label.textProperty().bind(task.messageProperty());
        var bar = new ProgressBar();
        bar.setPrefWidth(320);
        bar.progressProperty().bind(task.progressProperty());
        var cancel = new Button("Cancel");
        cancel.setOnAction(e -> task.cancel());
        var box = new VBox(8, label, bar, cancel);
        box.setPadding(new Insets(12));
        var stage = new Stage();
        stage.initOwner(qupath.getStage());
        stage.setTitle("NuClick: segmenting points");
        stage.setScene(new Scene(box));
        stage.setOnCloseRequest(e -> task.cancel());
        return stage;
    }

    /** Which points a run takes. */
    static final class PointSelection {

        private PointSelection() {
        }

        /**
         * The points of the selected point annotations; else those of all point annotations inside the
         * selected area ROIs (same plane); else all points of the image.  Grouped by image plane.
         */
        static Map<ImagePlane, List<PointRef>> collect(PathObjectHierarchy hierarchy) {
            var selected = hierarchy.getSelectionModel().getSelectedObjects();
            List<PathObject> pointObjects = new ArrayList<>();
            List<ROI> areas = new ArrayList<>();
            for (PathObject p : selected) {
                if (!p.hasROI()) {
                    continue;
                }
                if (p.isAnnotation() && p.getROI().isPoint()) {
                    pointObjects.add(p);
                } else if (p.getROI().isArea()) {
                    areas.add(p.getROI());
                }
            }
            boolean inAreas = pointObjects.isEmpty() && !areas.isEmpty();
            if (pointObjects.isEmpty()) {
                pointObjects.addAll(hierarchy.getAllPointAnnotations());
            }
            Map<ImagePlane, List<PointRef>> out = new LinkedHashMap<>();
            for (PathObject p : pointObjects) {
                ROI roi = p.getROI();
                var pts = roi.getAllPoints();
                for (int i = 0; i < pts.size(); i++) {
                    double x = pts.get(i).getX();
                    double y = pts.get(i).getY();
                    if (inAreas && !insideAny(areas, roi, x, y)) {
                        continue;
                    }
                    out.computeIfAbsent(roi.getImagePlane(), k -> new ArrayList<>()).add(new PointRef(p, roi, i, x, y));
                }
            }
            return out;
        }

        private static boolean insideAny(List<ROI> areas, ROI pointRoi, double x, double y) {
            for (ROI a : areas) {
                if (a.getZ() == pointRoi.getZ() && a.getT() == pointRoi.getT() && a.contains(x, y)) {
                    return true;
                }
            }
            return false;
        }
    }
}
