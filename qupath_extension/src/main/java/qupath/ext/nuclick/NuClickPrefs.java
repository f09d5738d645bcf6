package qupath.ext.nuclick;

import java.util.List;
import javafx.beans.property.BooleanProperty;
import javafx.beans.property.IntegerProperty;
import javafx.beans.property.StringProperty;
import javafx.scene.control.Button;
import javafx.scene.control.CheckBox;
import javafx.scene.control.ChoiceBox;
import javafx.scene.control.ComboBox;
import javafx.scene.control.Label;
import javafx.scene.control.PasswordField;
import javafx.scene.control.Spinner;
import javafx.scene.control.TextField;
import javafx.scene.control.Tooltip;
import javafx.scene.layout.GridPane;
import javafx.scene.layout.HBox;
import qupath.ext.nuclick.core.NuClickException;
import qupath.ext.nuclick.core.NuClickHttpClient;
import qupath.ext.nuclick.core.NuClickSettings;
import qupath.ext.nuclick.core.ServedModel;
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
    /** The server's model to segment with, by name; empty for its default. */
    private static final StringProperty MODEL = PathPrefs.createPersistentPreference("nuclick.modelName", "");
    /** Whether the user has ever saved the settings or accepted the default server (first-run message). */
    private static final BooleanProperty SERVER_SET_UP = PathPrefs.createPersistentPreference("nuclick.serverSetUp",
            false);

    /** Whether live mode is on (Extensions > NuClick > Live mode); kept across QuPath restarts. */
    private static final BooleanProperty LIVE_MODE = PathPrefs.createPersistentPreference("nuclick.liveMode", false);

    static BooleanProperty liveModeProperty() {
        return LIVE_MODE;
    }

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
                REMOVE_POINTS.get(), MAX_CLICKS.get(), TIMEOUT.get(), MODEL.get());
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
        // The model: typed, or picked from the list the server gives (GET /v1/model) with "List models".
        var model = new ComboBox<String>();
        model.setEditable(true);
        model.setPromptText("the server's default");
        model.getEditor().setText(now.modelName());
        model.setPrefWidth(220);
        var listModels = new Button("List models");
        listModels.setTooltip(new Tooltip("Ask the server above for the models it holds"));
        var modelHelp = new Label();
        modelHelp.setWrapText(true);
        modelHelp.setMaxWidth(420);
        listModels.setOnAction(e -> {
            var asked = new NuClickSettings(url.getText(), token.getText(), NuClickSettings.Output.DETECTIONS, false,
                    NuClickSettings.DEFAULT_MAX_CLICKS, Math.min(30, Math.max(1, typed(timeout))), "");
            listModels.setDisable(true);
            modelHelp.setText("Asking the server for its models...");
            var thread = new Thread(() -> {
                String text;
                List<ServedModel> models = List.of();
                try {
                    models = new NuClickHttpClient(asked).models(null);
                    text = models.isEmpty()
                            ? "This server serves one model (it is older than named models): leave the model empty."
                            : "Models on the server:\n" + String.join("\n",
                                    models.stream().map(ServedModel::describe).toList());
                } catch (NuClickException ex) {
                    text = ex.getMessage();
                }
                var found = models;
                var message = text;
                Notify.onFx(() -> {
                    String typedName = model.getEditor().getText();
                    model.getItems().setAll(found.stream().map(ServedModel::name).toList());
                    model.getEditor().setText(typedName);
                    modelHelp.setText(message);
                    listModels.setDisable(false);
                });
            }, "nuclick-list-models");
            thread.setDaemon(true);
            thread.start();
        });

        var grid = new GridPane();
        grid.setHgap(8);
        grid.setVgap(8);
        int row = 0;
        grid.addRow(row++, new Label("Server URL"), url);
        grid.addRow(row++, new Label("Token"), token);
        grid.addRow(row++, new Label("Create nuclei as"), output);
        grid.add(remove, 1, row++);
        grid.addRow(row++, new Label("Max clicks per request"), maxClicks);
        grid.addRow(row++, new Label("Timeout (s)"), timeout);
        grid.addRow(row++, new Label("Model"), new HBox(8, model, listModels));
        grid.add(modelHelp, 1, row);
        var help = new Label("The HTTP port of 'nuclick-bridge serve' (--http-port, default 8080). The token is the"
                + " content of the server's --token-file; leave it empty when the server has none. The model is one"
                + " of the server's models by name (serve --weights NAME=FILE, or --models-dir); leave it empty for"
                + " the server's default.");
        help.setWrapText(true);
        help.setMaxWidth(420);
        grid.add(help, 0, row + 1, 2, 1);

        if (!Dialogs.showConfirmDialog("NuClick settings", grid)) {
            return false;
        }
        var edited = new NuClickSettings(url.getText(), token.getText(),
                "Annotations".equals(output.getValue()) ? NuClickSettings.Output.ANNOTATIONS
                        : NuClickSettings.Output.DETECTIONS,
                remove.isSelected(), typed(maxClicks), typed(timeout), model.getEditor().getText());
        try {
            var valid = edited.validated();
            URL.set(valid.serverUrl());
            TOKEN.set(valid.token());
            ANNOTATIONS.set(valid.output() == NuClickSettings.Output.ANNOTATIONS);
            REMOVE_POINTS.set(valid.removePoints());
            MAX_CLICKS.set(valid.maxClicksPerRequest());
            TIMEOUT.set(valid.timeoutSeconds());
            MODEL.set(valid.modelName());
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
