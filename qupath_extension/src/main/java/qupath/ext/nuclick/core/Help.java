package qupath.ext.nuclick.core;

/**
 * Where a user finds help, and what the extension tells them the first time it runs: plain text so that
 * the wording is tested here, and one place for the URLs that the menu and the extension catalog
 * ({@code qupath_extension/catalog/catalog.json}, checked by {@code tests/test_qupath_catalog.py}) share.
 */
public final class Help {

    private Help() {
    }

    /** The project's GitHub repository: the catalog's homepage, and where its release jars live. */
    public static final String HOMEPAGE = "https://github.com/nuclickbridge/nuclick-bridge";

    /** The README section about this extension (GitHub's anchor for the heading "QuPath extension"). */
    public static final String README_SECTION = HOMEPAGE + "#qupath-extension";

    /** Where the server address is set. */
    public static final String SETTINGS_MENU = "Extensions > NuClick > Settings...";

    /** The dialog text shown the first time "Segment points" runs and no server has been set up. */
    public static String firstRunMessage(String defaultUrl) {
        return "No NuClick server has been set up yet.\n\n"
                + "NuClick outlines nuclei on a 'nuclick-bridge serve' server. Its address is set in "
                + SETTINGS_MENU + " (Server URL, and the Token if the server has one).\n\n"
                + "The default, " + defaultUrl + ", is a server started on this computer with\n"
                + "    nuclick-bridge serve --http-port 8080\n\n"
                + "Help: Extensions > NuClick > Help (opens " + README_SECTION + ").";
    }

    /** The choices of the first-run dialog, the default first. */
    public static String useDefaultChoice(String defaultUrl) {
        return "Use " + defaultUrl + " (a server on this computer)";
    }

    public static final String OPEN_SETTINGS_CHOICE = "Open the NuClick settings";

    /** The question asked when some points already have a nucleus of ours. */
    public static String alreadyDoneQuestion(int alreadyDone, int total) {
        String which = alreadyDone == total
                ? (total == 1 ? "This point already has" : "All " + total + " points already have")
                : alreadyDone + " of " + total + " points already have";
        return which + " a nucleus from NuClick (this extension or 'nuclick-bridge qupath').\n"
                + "Skip them, or segment them again and replace their nuclei? A replaced nucleus is removed only"
                + " when the new run finds one for its point; one Undo restores the old ones.";
    }

    public static String skipChoice(int newPoints) {
        return newPoints == 0 ? "Skip them (nothing to add)"
                : "Skip them: segment only the " + newPoints + " new point" + (newPoints == 1 ? "" : "s");
    }

    public static String replaceChoice(int alreadyDone) {
        return "Replace the " + alreadyDone + " nucle" + (alreadyDone == 1 ? "us" : "i");
    }
}
