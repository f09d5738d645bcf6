package qupath.ext.nuclick.core;

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;

import java.io.IOException;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.Executors;

/** A scripted HTTP server on 127.0.0.1 for the client's tests: real sockets, canned replies. */
final class FakeServer implements AutoCloseable {

    record Request(String method, String path, String authorization, String contentType, String body) {
    }

    record Reply(int status, String body, Map<String, String> headers) {
        Reply(int status, String body) {
            this(status, body, Map.of());
        }
    }

    interface Handler {
        Reply handle(Request request) throws Exception;
    }

    final List<Request> requests = new CopyOnWriteArrayList<>();
    private final HttpServer server;

    FakeServer(Handler handler) throws IOException {
        server = HttpServer.create(new InetSocketAddress(InetAddress.getLoopbackAddress(), 0), 0);
        server.setExecutor(Executors.newCachedThreadPool(r -> {
            Thread t = new Thread(r, "fake-nuclick");
            t.setDaemon(true);
            return t;
        }));
        server.createContext("/", exchange -> serve(exchange, handler));
        server.start();
    }

    private void serve(HttpExchange exchange, Handler handler) throws IOException {
        try (exchange) {
            String body = new String(exchange.getRequestBody().readAllBytes(), StandardCharsets.UTF_8);
            Request req = new Request(exchange.getRequestMethod(), exchange.getRequestURI().getPath(),
                    exchange.getRequestHeaders().getFirst("Authorization"),
                    exchange.getRequestHeaders().getFirst("Content-Type"), body);
            requests.add(req);
            Reply reply;
            try {
                reply = handler.handle(req);
            } catch (Exception e) {
                reply = new Reply(500, "{\"code\": \"INTERNAL\", \"message\": \"" + e + "\"}");
            }
            byte[] out = reply.body().getBytes(StandardCharsets.UTF_8);
            exchange.getResponseHeaders().set("Content-Type", "application/json");
            reply.headers().forEach((k, v) -> exchange.getResponseHeaders().set(k, v));
            exchange.sendResponseHeaders(reply.status(), out.length == 0 ? -1 : out.length);
            if (out.length > 0) {
                try (OutputStream os = exchange.getResponseBody()) {
                    os.write(out);
                }
            }
        }
    }

    String url() {
        return "http://127.0.0.1:" + server.getAddress().getPort();
    }

    NuClickSettings settings(String token) {
        return new NuClickSettings(url(), token, NuClickSettings.Output.DETECTIONS, false, 1000, 5);
    }

    @Override
    public void close() {
        server.stop(0);
    }

    /** A GetModelInfoResponse as the real server writes it. */
    static String modelJson(double pixelSizeUm, int maxTileSide, int maxClicks, boolean auth) {
        return "{\"model\": {\"name\": \"fake\", \"version\": \"v1\", \"sha256\": \"\", \"width\": 1.0, \"patchSize\": 128,"
                + " \"sigma\": 2.0, \"threshold\": 0.4, \"pixelSizeUm\": " + pixelSizeUm + "}, \"device\": \"cpu\","
                + " \"deviceName\": \"\", \"limits\": {\"maxMessageBytes\": 67108864, \"maxTileSide\": " + maxTileSide
                + ", \"maxClicksPerRequest\": " + maxClicks + ", \"maxConcurrentStreams\": 8, \"maxBatch\": 32,"
                + " \"batchWaitMs\": 2.0, \"streamWindow\": 4, \"authRequired\": " + auth + "},"
                + " \"serverVersion\": \"0.0-test\"}";
    }
}
