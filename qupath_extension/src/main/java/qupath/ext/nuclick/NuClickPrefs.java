package qupath.ext.nuclick;

import javafx.beans.property.BooleanProperty;
import javafx.beans.property.IntegerProperty;
import javafx.beans.property.StringProperty;
import javafx.scene.control.CheckBox;
import javafx.scene.control.ChoiceBox;
import javafx.scene.control.Label;
import javafx.scene.control.PasswordField;
import javafx.scene.control.Spinner;
import javafx.scene.control.TextField;
import javafx.scene.layout.GridPane;
import qupath.ext.nuclick.core.NuClickException;
import qupath.ext.nuclick.core.NuClickSettings;
import qupath.fx.dialogs.Dialogs;
import qupath.lib.gui.prefs.PathPrefs;

/**
 * The settings, kept in QuPath's persistent preferences, and their dialog.  The token is stored in
 * the user's preferences in plain text, as QuPath stores its other preferences.
 */
final class NuClickPrefs {

    private NuClickPrefs() {
    }

    private static final NuClickSettings DEFAULTS = NuClickSettings.defaults();

    private static final StringProperty URL = PathPrefs.createPersistentPreference("nuclick.serverUrl",
            DEFAULTS.serverUrl());
    private static final StringProperty TOKEN = PathPrefs.createPersistentPreference("nuclick.token", "");
    private static final BooleanProperty ANNOTATIONS = PathPrefs.createPersistentPreference("nuclick.annotations",
            false);
    private static final BooleanProperty REMOVE_POINTS = PathPrefs.createPersistentPreference("nuclick.removePoints",
            false);
    private static final IntegerProperty MAX_CLICKS = PathPrefs.createPersistentPreference("nuclick.maxClicks",
            DEFAULTS.maxClicksPerRequest());
    private static final IntegerProperty TIMEOUT = PathPrefs.createPersistentPreference("nuclick.timeoutSeconds",
            DEFAULTS.timeoutSeconds());
    /** Whether the user has ever saved the settings or accepted the default server (first-run message). */
    private static final BooleanProperty SERVER_SET_UP = PathPrefs.createPersistentPreference("nuclick.serverSetUp",
            false);

    /** False until the user saves the settings or accepts the default server; set-ups older than this key count. */
    static boolean isServerSetUp() {
        return SERVER_SET_UP.get() || !DEFAULTS.serverUrl().equals(URL.get()) || !TOKEN.get().isEmpty();
    }

    static void markServerSetUp() {
        SERVER_SET_UP.set(true);
    }

    /** The current settings, not yet validated. */
    static NuClickSettings current() {
        return new NuClickSettings(URL.get(), TOKEN.get(),
                ANNOTATIONS.get() ? NuClickSettings.Output.ANNOTATIONS : NuClickSettings.Output.DETECTIONS,
                REMOVE_POINTS.get(), MAX_CLICKS.get(), TIMEOUT.get());
    }

    /** Show the settings dialog (on the FX thread); saves only valid settings.  True when saved. */
    static boolean showDialog() {
        NuClickSettings now = current();
        var url = new TextField(now.serverUrl());
        url.setPrefColumnCount(28);
        url.setPromptText(NuClickSettings.DEFAULT_URL);
        var token = new PasswordField();
        token.setText(now.token());
        token.setPromptText("none");
        var output = new ChoiceBox<String>();
        output.getItems().addAll("Detections", "Annotations");
        output.setValue(now.output() == NuClickSettings.Output.ANNOTATIONS ? "Annotations" : "Detections");
        var remove = new CheckBox("Remove the points that got a nucleus");
        remove.setSelected(now.removePoints());
        var maxClicks = new Spinner<Integer>(1, NuClickSettings.MAX_CLICKS_LIMIT, now.maxClicksPerRequest(), 50);
        maxClicks.setEditable(true);
        var timeout = new Spinner<Integer>(1, NuClickSettings.MAX_TIMEOUT_S, now.timeoutSeconds(), 10);
        timeout.setEditable(true);

        var grid = new GridPane();
        grid.setHgap(8);
        grid.setVgap(8);
        int row = 0;
        grid.addRow(row++, new Label("Server URL"), url);
        grid.addRow(row++, new Label("Token"), token);
        grid.addRow(row++, new Label("Create nuclei as"), output);
        grid.add(remove, 1, row++);
        grid.addRow(row++, new Label("Max clicks per request"), maxClicks);
        grid.addRow(row, new Label("Timeout (s)"), timeout);
        var help = new Label("The HTTP port of 'nuclick-bridge serve' (--http-port, default 8080). The token is the"
                + " content of the server's --token-file; leave it empty when the server has none.");
        help.setWrapText(true);
        help.setMaxWidth(420);
        grid.add(help, 0, row + 1, 2, 1);

        if (!Dialogs.showConfirmDialog("NuClick settings", grid)) {
            return false;
        }
        var edited = new NuClickSettings(url.getText(), token.getText(),
                "Annotations".equals(output.getValue()) ? NuClickSettings.Output.ANNOTATIONS
                        : NuClickSettings.Output.DETECTIONS,
                remove.isSelected(), typed(maxClicks), typed(timeout));
        try {
            var valid = edited.validated();
            URL.set(valid.serverUrl());
            TOKEN.set(valid.token());
            ANNOTATIONS.set(valid.output() == NuClickSettings.Output.ANNOTATIONS);
            REMOVE_POINTS.set(valid.removePoints());
            MAX_CLICKS.set(valid.maxClicksPerRequest());
            TIMEOUT.set(valid.timeoutSeconds());
            SERVER_SET_UP.set(true);
            return true;
        } catch (NuClickException e) {
            Notify.error("NuClick settings not saved", e.getMessage());
            return false;
        }
    }

    /** What is typed in a spinner (JavaFX commits typed text only on focus loss), or -1 when not a number. */
    private static int typed(Spinner<Integer> spinner) {
        String text = spinner.getEditor().getText().strip();
        try {
            return Integer.parseInt(text);
        } catch (NumberFormatException e) {
            return text.isEmpty() ? spinner.getValue() : -1;
        }
    }
}
