package qupath.ext.nuclick;

import javafx.scene.control.CheckMenuItem;
import javafx.scene.control.MenuItem;
import javafx.scene.control.SeparatorMenuItem;
import javafx.scene.input.KeyCode;
import javafx.scene.input.KeyCodeCombination;
import javafx.scene.input.KeyCombination;
import qupath.ext.nuclick.core.Help;
import qupath.lib.common.Version;
import qupath.lib.gui.QuPathGUI;
import qupath.lib.gui.extensions.QuPathExtension;

/**
 * Extensions &gt; NuClick: click once inside each nucleus, get one polygon per click from a
 * {@code nuclick-bridge serve} server.  The menu and nothing else; the work is in
 * {@link SegmentPointsCommand}, {@link LiveMode}, {@link CheckServerCommand} and {@link NuClickPrefs}, over the
 * plain-Java core in {@code qupath.ext.nuclick.core}.  Help opens the README's section on the extension.
 */
public class NuClickExtension implements QuPathExtension {

    private boolean installed;

    @Override
    public void installExtension(QuPathGUI qupath) {
        if (installed) {
            return;
        }
        installed = true;
        var menu = qupath.getMenu("Extensions>NuClick", true);

        var segment = new MenuItem("Segment points");
        segment.setAccelerator(new KeyCodeCombination(KeyCode.N, KeyCombination.SHORTCUT_DOWN, KeyCombination.ALT_DOWN));
        var command = new SegmentPointsCommand(qupath);
        segment.setOnAction(e -> command.run());
        segment.disableProperty().bind(command.runningProperty());

        var live = new CheckMenuItem("Live mode");
        live.setAccelerator(new KeyCodeCombination(KeyCode.N, KeyCombination.SHORTCUT_DOWN, KeyCombination.ALT_DOWN,
                KeyCombination.SHIFT_DOWN));
        var liveMode = new LiveMode(qupath);
        live.selectedProperty().bindBidirectional(liveMode.onProperty());

        var settings = new MenuItem("Settings...");
        settings.setOnAction(e -> NuClickPrefs.showDialog());

        var check = new MenuItem("Check server");
        check.setOnAction(e -> CheckServerCommand.run());

        var help = new MenuItem("Help (opens the web page)");
        help.setOnAction(e -> QuPathGUI.openInBrowser(Help.README_SECTION));

        menu.getItems().addAll(segment, live, new SeparatorMenuItem(), settings, check, new SeparatorMenuItem(), help);
    }

    @Override
    public String getName() {
        return "NuClick";
    }

    @Override
    public String getDescription() {
        return "Click once inside each nucleus, get one outline per click from a nuclick-bridge server"
                + " (NuClick, Koohbanani et al. 2020).";
    }

    @Override
    public Version getQuPathVersion() {
        return Version.parse("0.6.0");
    }
}
