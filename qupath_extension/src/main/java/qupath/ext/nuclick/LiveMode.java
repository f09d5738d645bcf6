package qupath.ext.nuclick;

import java.awt.image.BufferedImage;
import javafx.application.Platform;
import javafx.beans.property.BooleanProperty;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import qupath.ext.nuclick.core.NuClickException;
import qupath.ext.nuclick.core.NuClickSettings;
import qupath.lib.gui.QuPathGUI;
import qupath.lib.images.ImageData;

/**
 * Extensions &gt; NuClick &gt; Live mode: the toggle (kept in QuPath's preferences) and the {@link LiveImage} of the
 * image open in the active viewer while it is on.  Opening another image moves live mode to it.  When the server
 * cannot be used (unreachable, refused, ...), live mode turns itself off with one notification.
 */
final class LiveMode {

    private static final Logger logger = LoggerFactory.getLogger(LiveMode.class);
    private static final String TITLE = "NuClick live mode";

    private final QuPathGUI qupath;
    private final BooleanProperty on = NuClickPrefs.liveModeProperty();
    private LiveImage current;

    LiveMode(QuPathGUI qupath) {
        this.qupath = qupath;
        qupath.imageDataProperty().addListener((obs, before, now) -> Platform.runLater(() -> follow(false)));
        on.addListener((obs, was, now) -> Platform.runLater(() -> follow(now)));
        Platform.runLater(() -> follow(false));
    }

    /** The toggle, for the menu item. */
    BooleanProperty onProperty() {
        return on;
    }

    /** On the FX thread: live mode on the open image when on, else nowhere.  {@code turnedOn}: the user just did. */
    private void follow(boolean turnedOn) {
        ImageData<BufferedImage> imageData = qupath.getImageData();
        if (current != null && (!on.get() || current.imageData() != imageData)) {
            current.close();
            current = null;
        }
        if (!on.get() || current != null) {
            return;
        }
        if (imageData == null) {
            if (turnedOn) {
                Notify.info(TITLE, "Live mode is on: it starts when you open an image.");
            }
            return;
        }
        if (!NuClickPrefs.isServerSetUp() && !FirstRun.confirmServer()) {
            on.set(false);
            return;
        }
        var server = imageData.getServer();
        if (!server.isRGB()) {
            refuse("NuClick segments 8-bit RGB (brightfield) images; this image has " + server.nChannels()
                    + " channel(s) of type " + server.getPixelType() + ".");
            return;
        }
        NuClickSettings settings;
        try {
            settings = NuClickPrefs.current().validated();
            LiveImage[] started = new LiveImage[1];
            started[0] = LiveImage.start(imageData, settings, message -> stopped(started[0], message));
            current = started[0];
        } catch (NuClickException e) {
            refuse(e.getMessage());
            return;
        }
        if (turnedOn) {
            Notify.info(TITLE, "Live mode is on: each point you add, move or delete is segmented at once, with"
                    + " its neighbours (" + settings.serverUrl() + ").");
        }
    }

    private void refuse(String message) {
        on.set(false);
        Notify.error(TITLE, message + "\nLive mode is off.");
    }

    /** On the FX thread: a controller of {@code which} stopped itself. */
    private void stopped(LiveImage which, String message) {
        if (which == null || which != current) {
            return;
        }
        logger.warn("NuClick live mode stopped: {}", message);
        current.close();
        current = null;
        on.set(false);
        Notify.error(TITLE, message + "\nLive mode is off; turn it on again (Extensions > NuClick > Live mode) once"
                + " this is fixed. The points are as you left them.");
    }
}
