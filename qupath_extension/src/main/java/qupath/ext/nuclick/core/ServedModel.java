package qupath.ext.nuclick.core;

/**
 * One of the models a server holds ({@code GetModelInfoResponse.models}): {@code name} is what a request asks for
 * it by (the extension's "Model" setting); the rest is the weights file's own name, version and settings.
 */
public record ServedModel(
        String name,
        String modelName,
        String version,
        String sha256,
        String arch,
        int patchSize,
        double sigma,
        double threshold,
        double pixelSizeUm) {

    /** The name a server of one model serves it under, and what a request that names no model gets. */
    public static final String DEFAULT = "default";

    /** One line for a list, e.g. "lung: nuclick 1.0 (effunet-lite0), pixel size 0.25 µm". */
    public String describe() {
        StringBuilder sb = new StringBuilder(name).append(": ").append(modelName.isEmpty() ? "(unnamed)" : modelName);
        if (!version.isEmpty()) {
            sb.append(' ').append(version);
        }
        if (!arch.isEmpty()) {
            sb.append(" (").append(arch).append(')');
        }
        if (pixelSizeUm > 0) {
            sb.append(", pixel size ").append(Format.number(pixelSizeUm)).append(" µm");
        }
        return sb.toString();
    }
}
