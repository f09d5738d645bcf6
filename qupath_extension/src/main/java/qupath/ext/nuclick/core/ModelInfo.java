package qupath.ext.nuclick.core;

import java.util.List;
import java.util.stream.Collectors;

/**
 * What {@code GET /v1/model} says: the model the extension uses (the one its "Model" setting names, else the
 * server's default), the device it runs on, the server's limits and every model the server holds ({@code models};
 * empty from a server older than named models).
 * Sizes are in model pixels; {@code pixelSizeUm} is 0 when the model's training pixel size is unknown.
 */
public record ModelInfo(
        String name,
        String version,
        int patchSize,
        double sigma,
        double threshold,
        double pixelSizeUm,
        String device,
        String deviceName,
        String serverVersion,
        long maxMessageBytes,
        int maxTileSide,
        int maxClicksPerRequest,
        boolean authRequired,
        String servedName,
        List<ServedModel> models) {

    public ModelInfo {
        servedName = servedName == null || servedName.isEmpty() ? ServedModel.DEFAULT : servedName;
        models = models == null ? List.of() : List.copyOf(models);
    }

    /** The names of the server's models, default first (empty from an older server). */
    public List<String> modelNames() {
        return models.stream().map(ServedModel::name).collect(Collectors.toList());
    }

    /** One line for the user, e.g. "nuclick 1.0 on cuda (NVIDIA H100), server 0.3.0, model pixel size 0.25 µm". */
    public String describe() {
        StringBuilder sb = new StringBuilder();
        sb.append("Model ");
        if (!servedName.equals(ServedModel.DEFAULT)) {
            sb.append(servedName).append(": ");
        }
        sb.append(name.isEmpty() ? "(unnamed)" : name);
        if (!version.isEmpty()) {
            sb.append(' ').append(version);
        }
        sb.append(" on ").append(device.isEmpty() ? "an unknown device" : device);
        if (!deviceName.isEmpty()) {
            sb.append(" (").append(deviceName).append(')');
        }
        if (pixelSizeUm > 0) {
            sb.append(", pixel size ").append(Format.number(pixelSizeUm)).append(" µm");
        }
        sb.append(", patch ").append(patchSize).append(" px");
        if (!serverVersion.isEmpty()) {
            sb.append("; nuclick-bridge ").append(serverVersion);
        }
        sb.append(authRequired ? "; token required" : "; no token required");
        if (models.size() > 1) {
            sb.append("; models on the server: ").append(String.join(", ", modelNames()));
        }
        return sb.toString();
    }
}
