package qupath.ext.nuclick;

import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import qupath.ext.nuclick.core.NuClickException;
import qupath.ext.nuclick.core.NuClickHttpClient;
import qupath.fx.dialogs.Dialogs;

/**
 * Extensions &gt; NuClick &gt; Check server: {@code GET /v1/model}, off the UI thread: the model the settings name
 * (else the server's default) and every model the server holds.
 */
final class CheckServerCommand {

    private static final Logger logger = LoggerFactory.getLogger(CheckServerCommand.class);

    private CheckServerCommand() {
    }

    static void run() {
        var settings = NuClickPrefs.current();
        var thread = new Thread(() -> {
            try {
                var client = new NuClickHttpClient(settings);
                var info = client.modelInfo(null);
                String models = info.models().isEmpty() ? ""
                        : "\n\nModels on the server (Extensions > NuClick > Settings > Model):\n" + String.join("\n",
                                info.models().stream().map(m -> "  " + m.describe()).toList());
                String text = client.settings().serverUrl() + "\n\n" + info.describe() + models;
                logger.info("NuClick server: {}", text.replace('\n', ' '));
                Notify.onFx(() -> Dialogs.showPlainMessage("NuClick server", text));
            } catch (NuClickException e) {
                logger.warn("NuClick server check failed: {}", e.getMessage());
                Notify.error("NuClick server", e.getMessage());
            } catch (RuntimeException e) {
                logger.error("NuClick server check failed", e);
                Notify.error("NuClick server", "Unexpected error: " + e);
            }
        }, "nuclick-check-server");
        thread.setDaemon(true);
        thread.start();
    }
}
