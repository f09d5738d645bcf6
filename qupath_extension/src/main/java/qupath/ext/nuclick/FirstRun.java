package qupath.ext.nuclick;

import java.util.List;
import qupath.ext.nuclick.core.Help;
import qupath.ext.nuclick.core.NuClickSettings;
import qupath.fx.dialogs.Dialogs;

/**
 * The first time "Segment points" runs and no server was ever set up: say where the server address is
 * set and what the default means, and let the user take the default or open the settings.
 */
final class FirstRun {

    private FirstRun() {
    }

    /** On the FX thread.  True when the run may go on (the default accepted, or the settings saved). */
    static boolean confirmServer() {
        String useDefault = Help.useDefaultChoice(NuClickSettings.DEFAULT_URL);
        String choice = Dialogs.showChoiceDialog("NuClick: set up the server",
                Help.firstRunMessage(NuClickSettings.DEFAULT_URL), List.of(useDefault, Help.OPEN_SETTINGS_CHOICE),
                useDefault);
        if (choice == null) {
            return false;
        }
        if (choice.equals(useDefault)) {
            NuClickPrefs.markServerSetUp();
            return true;
        }
        return NuClickPrefs.showDialog();
    }
}
