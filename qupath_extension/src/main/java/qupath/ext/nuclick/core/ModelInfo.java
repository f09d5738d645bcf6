package qupath.ext.nuclick.core;

/**
 * What {@code GET /v1/model} says: the model, the device it runs on and the server's limits.
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
        boolean authRequired) {

    /** One line for the user, e.g. "nuclick 1.0 on cuda (NVIDIA H100), server 0.3.0, model pixel size 0.25 µm". */
    public String describe() {
        StringBuilder sb = new StringBuilder();
        sb.append("Model ").append(name.isEmpty() ? "(unnamed)" : name);
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
        return sb.toString();
    }
}
