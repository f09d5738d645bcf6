package qupath.ext.nuclick.core;

/**
 * A failure with a message meant for the user: what went wrong and what to do about it.
 * The QuPath layer shows {@link #getMessage()} as a notification as it is.
 */
public final class NuClickException extends Exception {

    private static final long serialVersionUID = 1L;

    /** What kind of failure, so that callers can react (e.g. open the settings on {@link #SETTINGS}). */
    public enum Kind {
        /** The extension's settings are invalid. */
        SETTINGS,
        /** The server could not be reached (refused, unknown host, TLS, not HTTP). */
        UNREACHABLE,
        /** The server did not answer in time. */
        TIMEOUT,
        /** The server refused the bearer token (HTTP 401). */
        AUTH,
        /** The server answered with an error status. */
        SERVER,
        /** The server's reply is not what the protocol says (malformed JSON, missing results). */
        PROTOCOL,
        /** The points or the image cannot be segmented (no points, all outside, no pixel size, ...). */
        INPUT,
        /** The pixels could not be read from the image. */
        PIXELS,
        /** The user cancelled. */
        CANCELLED
    }

    private final Kind kind;
    private final int httpStatus;
    private final String code;

    public NuClickException(Kind kind, String message) {
        this(kind, message, 0, "", null);
    }

    public NuClickException(Kind kind, String message, Throwable cause) {
        this(kind, message, 0, "", cause);
    }

    public NuClickException(Kind kind, String message, int httpStatus, String code, Throwable cause) {
        super(message, cause);
        this.kind = kind;
        this.httpStatus = httpStatus;
        this.code = code == null ? "" : code;
    }

    public Kind kind() {
        return kind;
    }

    /** The HTTP status of the server's reply, or 0 when there was none. */
    public int httpStatus() {
        return httpStatus;
    }

    /** The server's status name (a gRPC code name such as {@code UNAUTHENTICATED}), or "". */
    public String code() {
        return code;
    }
}
