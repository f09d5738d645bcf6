package qupath.ext.nuclick.core;

import java.io.IOException;
import java.net.ConnectException;
import java.net.URI;
import java.net.UnknownHostException;
import java.net.http.HttpClient;
import java.net.http.HttpConnectTimeoutException;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.net.http.HttpTimeoutException;
import java.nio.channels.UnresolvedAddressException;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.List;
import java.util.concurrent.CancellationException;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.concurrent.atomic.AtomicLong;
import java.util.function.BooleanSupplier;
import javax.net.ssl.SSLException;

/**
 * Talks to {@code nuclick-bridge serve}'s HTTP/JSON gateway with {@code java.net.http}:
 * {@code GET /v1/model} and {@code POST /v1/segment}, with the bearer token when one is set.
 * Every failure becomes a {@link NuClickException} whose message says what happened and what to check.
 * Thread-safe; calls can be cancelled through the {@code cancelled} supplier.
 */
public final class NuClickHttpClient {

    /** How often a waiting call looks at its cancel flag. */
    private static final long POLL_MS = 100;
    /** The pauses before asking a busy server again, when it gives no Retry-After. */
    private static final double MIN_PAUSE_S = 0.5;
    private static final double MAX_PAUSE_S = 5.0;

    private final AtomicLong busyRetries = new AtomicLong();

    private final NuClickSettings settings;
    private final HttpClient http;

    /** @param settings the settings; validated here */
    public NuClickHttpClient(NuClickSettings settings) throws NuClickException {
        this.settings = settings.validated();
        this.http = HttpClient.newBuilder()
                .version(HttpClient.Version.HTTP_1_1)
                .connectTimeout(Duration.ofSeconds(Math.min(10, this.settings.timeoutSeconds())))
                .followRedirects(HttpClient.Redirect.NEVER)
                .build();
    }

    public NuClickSettings settings() {
        return settings;
    }

    /**
     * {@code GET /v1/model}, describing the model the settings name (else the server's default); a name the server
     * does not hold is a SETTINGS error that lists the ones it has.
     */
    public ModelInfo modelInfo(BooleanSupplier cancelled) throws NuClickException {
        String body = call("GET", "/v1/model", null, cancelled);
        try {
            return Protocol.parseModelInfo(body, settings.modelName());
        } catch (NuClickException e) {
            if (e.kind() == NuClickException.Kind.SETTINGS || e.kind() == NuClickException.Kind.SERVER) {
                throw new NuClickException(e.kind(), e.getMessage().replace("The NuClick server ",
                        "The NuClick server at " + server() + " "), e.httpStatus(), e.code(), null);
            }
            throw e;
        }
    }

    /** Every model the server holds, default first, from {@code GET /v1/model} (empty from an older server). */
    public List<ServedModel> models(BooleanSupplier cancelled) throws NuClickException {
        return Protocol.parseModelInfo(call("GET", "/v1/model", null, cancelled)).models();
    }

    /** {@code POST /v1/segment} with a SegmentRequest's JSON. */
    public Protocol.SegmentReply segment(String requestJson, BooleanSupplier cancelled) throws NuClickException {
        String body = call("POST", "/v1/segment", requestJson, cancelled);
        return Protocol.parseSegmentResponse(body);
    }

    /**
     * A SERVER error when a reply came from another model than the settings name (a server older than named models
     * ignores the name and answers with its only one): its polygons are not the ones asked for.
     */
    void checkModel(Protocol.SegmentReply reply) throws NuClickException {
        String wanted = settings.modelName();
        if (!wanted.isEmpty() && !wanted.equals(reply.modelName())) {
            throw new NuClickException(NuClickException.Kind.SERVER, "The NuClick server at " + server()
                    + " answered with model '" + (reply.modelName().isEmpty() ? reply.model() : reply.modelName())
                    + "', not '" + wanted + "': it cannot choose models. Upgrade it, or clear the model in"
                    + " Extensions > NuClick > Settings.");
        }
    }

    /**
     * One HTTP call; the body of a 200 reply, else a NuClickException. A busy server (429 RESOURCE_EXHAUSTED, its
     * queue full) or one shutting down or restarting (503 UNAVAILABLE) is asked again after its {@code Retry-After}
     * (else a doubling pause from 0.5 s to 5 s, with jitter), until the call's timeout has passed since the first try.
     */
    String call(String method, String path, String body, BooleanSupplier cancelled) throws NuClickException {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(settings.timeoutSeconds());
        double pauseS = MIN_PAUSE_S;
        while (true) {
            HttpResponse<String> response = send(method, path, body, cancelled);
            int status = response.statusCode();
            if (status == 200) {
                return response.body();
            }
            NuClickException error = httpError(response.uri(), method, status, response.body());
            if (!retryable(status, error.code())) {
                throw error;
            }
            double waitS = response.headers().firstValue("Retry-After").map(NuClickHttpClient::seconds).orElse(pauseS);
            waitS = Math.max(waitS, MIN_PAUSE_S) * (1 + 0.25 * Math.random());
            pauseS = Math.min(MAX_PAUSE_S, pauseS * 2);
            if (System.nanoTime() + (long) (waitS * 1e9) > deadline) {
                throw error;
            }
            busyRetries.incrementAndGet();
            pause(waitS, cancelled);
        }
    }

    /** Calls asked again because the server was busy or restarting, over this client's life. */
    public long busyRetries() {
        return busyRetries.get();
    }

    static boolean retryable(int status, String code) {
        return (status == 429 && "RESOURCE_EXHAUSTED".equals(code)) || (status == 503 && "UNAVAILABLE".equals(code));
    }

    /** {@code Retry-After} in seconds (the HTTP-date form is not used by our server: treated as absent). */
    static double seconds(String value) {
        try {
            return Math.max(0, Double.parseDouble(value.trim()));
        } catch (NumberFormatException e) {
            return MIN_PAUSE_S;
        }
    }

    private static void pause(double seconds, BooleanSupplier cancelled) throws NuClickException {
        long end = System.nanoTime() + (long) (seconds * 1e9);
        try {
            while (System.nanoTime() < end) {
                if (cancelled != null && cancelled.getAsBoolean()) {
                    throw cancelledError();
                }
                Thread.sleep(Math.max(1, Math.min(POLL_MS, (end - System.nanoTime()) / 1_000_000)));
            }
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw cancelledError();
        }
    }

    private HttpResponse<String> send(String method, String path, String body, BooleanSupplier cancelled)
            throws NuClickException {
        URI uri = settings.endpoint(path);
        HttpRequest.Builder b = HttpRequest.newBuilder(uri)
                .timeout(Duration.ofSeconds(settings.timeoutSeconds()))
                .header("Accept", "application/json");
        if (!settings.token().isEmpty()) {
            b.header("Authorization", "Bearer " + settings.token());
        }
        if (body == null) {
            b.GET();
        } else {
            b.header("Content-Type", "application/json");
            b.POST(HttpRequest.BodyPublishers.ofByteArray(body.getBytes(StandardCharsets.UTF_8)));
        }
        return await(http.sendAsync(b.build(), HttpResponse.BodyHandlers.ofString(StandardCharsets.UTF_8)), uri, cancelled);
    }

    private HttpResponse<String> await(CompletableFuture<HttpResponse<String>> future, URI uri, BooleanSupplier cancelled)
            throws NuClickException {
        try {
            while (true) {
                if (cancelled != null && cancelled.getAsBoolean()) {
                    future.cancel(true);
                    throw cancelledError();
                }
                try {
                    return future.get(POLL_MS, TimeUnit.MILLISECONDS);
                } catch (TimeoutException e) {
                    // still waiting: look at the cancel flag again
                }
            }
        } catch (InterruptedException e) {
            future.cancel(true);
            Thread.currentThread().interrupt();
            throw cancelledError();
        } catch (CancellationException e) {
            throw cancelledError();
        } catch (ExecutionException e) {
            throw transportError(uri, e.getCause() == null ? e : e.getCause());
        }
    }

    private static NuClickException cancelledError() {
        return new NuClickException(NuClickException.Kind.CANCELLED, "Cancelled.");
    }

    private String server() {
        try {
            return settings.baseUri().toString();
        } catch (NuClickException e) {
            return settings.serverUrl();
        }
    }

    /** A failure before any HTTP status came back. */
    NuClickException transportError(URI uri, Throwable cause) {
        String where = server();
        String hint = hint(uri);
        Throwable root = cause;
        while (root.getCause() != null && root.getCause() != root) {
            if (root instanceof UnknownHostException || root instanceof UnresolvedAddressException
                    || root instanceof SSLException) {
                break;
            }
            root = root.getCause();
        }
        if (cause instanceof HttpConnectTimeoutException) {
            return new NuClickException(NuClickException.Kind.UNREACHABLE, "Cannot reach the NuClick server at " + where
                    + ": no connection within " + Math.min(10, settings.timeoutSeconds())
                    + " s. Check the URL and that the server's host is reachable from here." + hint, cause);
        }
        if (cause instanceof HttpTimeoutException) {
            return new NuClickException(NuClickException.Kind.TIMEOUT, "The NuClick server at " + where
                    + " did not answer within " + settings.timeoutSeconds()
                    + " s. It may be busy or slow (a CPU server with many points): try fewer points, or raise the"
                    + " timeout.", cause);
        }
        if (hasCause(cause, UnknownHostException.class) || hasCause(cause, UnresolvedAddressException.class)) {
            return new NuClickException(NuClickException.Kind.UNREACHABLE, "Cannot reach the NuClick server at " + where
                    + ": unknown host '" + uri.getHost() + "'. Check the server URL in Extensions > NuClick > Settings.",
                    cause);
        }
        if (hasCause(cause, SSLException.class)) {
            return new NuClickException(NuClickException.Kind.UNREACHABLE, "Cannot reach the NuClick server at " + where
                    + ": the TLS handshake failed (" + message(root) + "). Use http:// for a server started without"
                    + " --tls-cert, or make Java trust the server's certificate.", cause);
        }
        if (hasCause(cause, ConnectException.class)) {
            return new NuClickException(NuClickException.Kind.UNREACHABLE, "Cannot reach the NuClick server at " + where
                    + " (connection refused). Is 'nuclick-bridge serve' running there, with its HTTP port (--http-port,"
                    + " default 8080) in the URL?" + hint, cause);
        }
        return new NuClickException(NuClickException.Kind.UNREACHABLE, "The connection to the NuClick server at " + where
                + " failed (" + message(root) + "). Is the URL that of nuclick-bridge's HTTP port?" + hint, cause);
    }

    private static String hint(URI uri) {
        if (uri.getPort() == 50051) {
            return " Port 50051 is the server's gRPC port; the extension talks to its HTTP port (--http-port, default"
                    + " 8080).";
        }
        return "";
    }

    private static boolean hasCause(Throwable t, Class<? extends Throwable> type) {
        for (Throwable c = t; c != null; c = c.getCause() == c ? null : c.getCause()) {
            if (type.isInstance(c)) {
                return true;
            }
        }
        return false;
    }

    private static String message(Throwable t) {
        String m = t.getMessage();
        return m == null || m.isBlank() ? t.getClass().getSimpleName() : m;
    }

    /** A reply with a status other than 200. */
    NuClickException httpError(URI uri, String method, int status, String body) {
        String where = server();
        Protocol.ServerError err = Protocol.parseError(body);
        String code = err == null ? "" : err.code();
        String detail = err == null ? "" : err.message();
        if (status == 401 || "UNAUTHENTICATED".equals(code)) {
            String what = settings.token().isEmpty()
                    ? "The NuClick server at " + where + " needs a token (" + detail + ")."
                    : "The NuClick server at " + where + " refused the token (" + detail + ").";
            return new NuClickException(NuClickException.Kind.AUTH, what + " Set the token of 'nuclick-bridge serve"
                    + " --token-file' in Extensions > NuClick > Settings.", status, code, null);
        }
        if (err == null) {
            String what = status == 404 || status == 405
                    ? " Is " + where + " the address of a nuclick-bridge server (its HTTP port, --http-port)?"
                    : "";
            return new NuClickException(NuClickException.Kind.SERVER, "The NuClick server at " + where + " answered "
                    + method + " " + uri.getPath() + " with HTTP " + status + " and a body that is not a nuclick-bridge"
                    + " error: " + Protocol.excerpt(body) + "." + what + hint(uri), status, "", null);
        }
        String advice = switch (code) {
            case "NOT_FOUND", "UNIMPLEMENTED" -> " Is " + where + " the base URL of the server, without a path?";
            case "RESOURCE_EXHAUSTED" -> status == 413
                    ? " Lower 'Max clicks per request', or start the server with a larger --max-message-mb."
                    : " The server stayed busy for the whole timeout; try again later, raise the timeout in"
                    + " Extensions > NuClick > Settings, or ask for more replicas.";
            case "UNAVAILABLE" -> " The server stayed unavailable (shutting down or restarting) for the whole timeout;"
                    + " try again in a moment.";
            case "PERMISSION_DENIED" -> " Check the token in Extensions > NuClick > Settings.";
            default -> "";
        };
        return new NuClickException(NuClickException.Kind.SERVER, "The NuClick server at " + where + " refused the request: " + code + ": "
                + detail + " (HTTP " + status + ")." + advice, status, code, null);
    }
}
