package qupath.ext.nuclick.core;

import java.net.URI;
import java.net.URISyntaxException;
import java.util.Locale;

/**
 * What the user sets in Extensions &gt; NuClick &gt; Settings.
 *
 * @param serverUrl           base URL of {@code nuclick-bridge serve}'s HTTP/JSON port, e.g. {@code http://127.0.0.1:8080}
 * @param token               bearer token (the content of the server's {@code --token-file}); empty for none
 * @param output              whether nuclei become detections (default) or annotations
 * @param removePoints        whether the points that got a nucleus are removed
 * @param maxClicksPerRequest most clicks (with context clicks) in one request; the server's own limit also applies
 * @param timeoutSeconds      how long one request may take
 * @param modelName           which of the server's models segments, by the name it serves it under
 *                            ({@code serve --weights NAME=FILE}, a file stem in {@code --models-dir}); empty for the
 *                            server's default model
 */
public record NuClickSettings(
        String serverUrl,
        String token,
        Output output,
        boolean removePoints,
        int maxClicksPerRequest,
        int timeoutSeconds,
        String modelName) {

    /** Settings that use the server's default model. */
    public NuClickSettings(String serverUrl, String token, Output output, boolean removePoints, int maxClicksPerRequest,
                           int timeoutSeconds) {
        this(serverUrl, token, output, removePoints, maxClicksPerRequest, timeoutSeconds, "");
    }

    /** What the nuclei become in QuPath. */
    public enum Output {
        DETECTIONS,
        ANNOTATIONS
    }

    public static final String DEFAULT_URL = "http://127.0.0.1:8080";
    public static final int DEFAULT_MAX_CLICKS = 1000;
    public static final int DEFAULT_TIMEOUT_S = 120;
    public static final int MAX_CLICKS_LIMIT = 100_000;
    public static final int MAX_TIMEOUT_S = 3600;
    public static final int MAX_MODEL_NAME = 128;

    private static final String WHERE = "Extensions > NuClick > Settings";

    public static NuClickSettings defaults() {
        return new NuClickSettings(DEFAULT_URL, "", Output.DETECTIONS, false, DEFAULT_MAX_CLICKS, DEFAULT_TIMEOUT_S, "");
    }

    /**
     * The same settings checked and normalised (scheme added when missing, trailing slashes and
     * blanks removed), or a {@link NuClickException} of kind SETTINGS that says what to fix.
     */
    public NuClickSettings validated() throws NuClickException {
        String url = normaliseUrl(serverUrl);
        String tok = token == null ? "" : token.strip();
        for (int i = 0; i < tok.length(); i++) {
            char ch = tok.charAt(i);
            if (ch <= ' ' || ch > '~') {
                throw invalid("The token may only hold printable ASCII characters without spaces"
                        + " (the content of the server's --token-file).");
            }
        }
        if (output == null) {
            throw invalid("Choose whether nuclei become detections or annotations.");
        }
        if (maxClicksPerRequest < 1 || maxClicksPerRequest > MAX_CLICKS_LIMIT) {
            throw invalid("Max clicks per request must be between 1 and " + MAX_CLICKS_LIMIT + ", not "
                    + maxClicksPerRequest + ".");
        }
        if (timeoutSeconds < 1 || timeoutSeconds > MAX_TIMEOUT_S) {
            throw invalid("The timeout must be between 1 and " + MAX_TIMEOUT_S + " seconds, not " + timeoutSeconds + ".");
        }
        String model = modelName == null ? "" : modelName.strip();
        if (model.length() > MAX_MODEL_NAME) {
            throw invalid("The model name is longer than " + MAX_MODEL_NAME + " characters.");
        }
        for (int i = 0; i < model.length(); i++) {
            char ch = model.charAt(i);
            if (ch <= ' ' || ch > '~') {
                throw invalid("The model name may only hold printable ASCII characters without spaces (a name the"
                        + " server lists; empty for its default model).");
            }
        }
        return new NuClickSettings(url, tok, output, removePoints, maxClicksPerRequest, timeoutSeconds, model);
    }

    /** The base URI of validated settings (no trailing slash). */
    public URI baseUri() throws NuClickException {
        return URI.create(normaliseUrl(serverUrl));
    }

    /** {@code base + path}, e.g. {@code endpoint("/v1/model")}. */
    public URI endpoint(String path) throws NuClickException {
        return URI.create(normaliseUrl(serverUrl) + path);
    }

    private static String normaliseUrl(String raw) throws NuClickException {
        String url = raw == null ? "" : raw.strip();
        if (url.isEmpty()) {
            throw invalid("Set the NuClick server URL, e.g. " + DEFAULT_URL
                    + " for 'nuclick-bridge serve --http-port 8080' on this computer.");
        }
        if (!url.contains("://")) {
            url = "http://" + url;
        }
        while (url.endsWith("/")) {
            url = url.substring(0, url.length() - 1);
        }
        URI uri;
        try {
            uri = new URI(url);
        } catch (URISyntaxException e) {
            throw invalid("The server URL '" + raw.strip() + "' is not a valid URL (" + e.getReason() + ").");
        }
        String scheme = uri.getScheme() == null ? "" : uri.getScheme().toLowerCase(Locale.ROOT);
        if (!scheme.equals("http") && !scheme.equals("https")) {
            throw invalid("The server URL must start with http:// or https://, not '" + uri.getScheme() + "://'.");
        }
        if (uri.getRawUserInfo() != null) {
            throw invalid("Put the token in the Token field, not in the server URL.");
        }
        if (uri.getHost() == null || uri.getHost().isEmpty()) {
            throw invalid("The server URL '" + raw.strip() + "' has no host name; use e.g. " + DEFAULT_URL + ".");
        }
        if (uri.getPort() == 0 || uri.getPort() > 65535 || (uri.getPort() < 0 && uri.getRawAuthority().endsWith(":"))) {
            throw invalid("The port in the server URL '" + raw.strip() + "' must be between 1 and 65535.");
        }
        if (uri.getRawQuery() != null || uri.getRawFragment() != null) {
            throw invalid("The server URL must not contain '?' or '#': give the base URL, e.g. " + DEFAULT_URL + ".");
        }
        return url;
    }

    private static NuClickException invalid(String message) {
        return new NuClickException(NuClickException.Kind.SETTINGS, message + " (" + WHERE + ")");
    }
}
