package qupath.ext.nuclick;

import javafx.application.Platform;
import qupath.fx.dialogs.Dialogs;

/** QuPath notifications from any thread. */
final class Notify {

    private Notify() {
    }

    static void error(String title, String message) {
        onFx(() -> Dialogs.showErrorNotification(title, message));
    }

    static void warning(String title, String message) {
        onFx(() -> Dialogs.showWarningNotification(title, message));
    }

    static void info(String title, String message) {
        onFx(() -> Dialogs.showInfoNotification(title, message));
    }

    static void onFx(Runnable r) {
        if (Platform.isFxApplicationThread()) {
            r.run();
        } else {
            Platform.runLater(r);
        }
    }
}
