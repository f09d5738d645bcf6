package qupath.ext.nuclick.core;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.net.ServerSocket;
import java.util.concurrent.atomic.AtomicBoolean;
import org.junit.jupiter.api.Test;

/** The HTTP client against scripted servers on 127.0.0.1: what each kind of failure tells the user. */
class HttpClientTest {

    private static final String MODEL = FakeServer.modelJson(0.25, 4096, 1000, false);

    @Test
    void modelInfoWithAndWithoutToken() throws Exception {
        try (var server = new FakeServer(r -> new FakeServer.Reply(200, MODEL))) {
            assertEquals("fake", new NuClickHttpClient(server.settings("")).modelInfo(null).name());
            assertNull(server.requests.get(0).authorization());
            assertEquals("GET", server.requests.get(0).method());
            assertEquals("/v1/model", server.requests.get(0).path());
            new NuClickHttpClient(server.settings("tok-1")).modelInfo(null);
            assertEquals("Bearer tok-1", server.requests.get(1).authorization());
        }
    }

    @Test
    void segmentPostsJson() throws Exception {
        try (var server = new FakeServer(r -> new FakeServer.Reply(200, ProtocolTest.REPLY))) {
            var reply = new NuClickHttpClient(server.settings("")).segment("{\"clicks\": []}", null);
            assertEquals(2, reply.results().size());
            var req = server.requests.get(0);
            assertEquals("POST", req.method());
            assertEquals("/v1/segment", req.path());
            assertEquals("application/json", req.contentType());
            assertEquals("{\"clicks\": []}", req.body());
        }
    }

    @Test
    void aBaseUrlWithAPathKeepsIt() throws Exception {
        try (var server = new FakeServer(r -> new FakeServer.Reply(200, MODEL))) {
            var s = new NuClickSettings(server.url() + "/nuclick/", "", NuClickSettings.Output.DETECTIONS, false, 10, 5);
            new NuClickHttpClient(s).modelInfo(null);
            assertEquals("/nuclick/v1/model", server.requests.get(0).path());
        }
    }

    @Test
    void wrongOrMissingTokenSaysSoAndWhereToSetIt() throws Exception {
        try (var server = new FakeServer(r -> r.authorization() == null
                ? new FakeServer.Reply(401, "{\"code\": \"UNAUTHENTICATED\", \"message\": \"missing bearer token: send the header 'authorization: Bearer <token>'\"}")
                : new FakeServer.Reply(401, "{\"code\": \"UNAUTHENTICATED\", \"message\": \"wrong bearer token\"}"))) {
            NuClickException wrong = assertThrows(NuClickException.class,
                    () -> new NuClickHttpClient(server.settings("nope")).modelInfo(null));
            assertEquals(NuClickException.Kind.AUTH, wrong.kind());
            assertEquals(401, wrong.httpStatus());
            assertTrue(wrong.getMessage().contains("refused the token (wrong bearer token)"), wrong.getMessage());
            assertTrue(wrong.getMessage().contains("Extensions > NuClick > Settings"), wrong.getMessage());
            NuClickException missing = assertThrows(NuClickException.class,
                    () -> new NuClickHttpClient(server.settings("")).modelInfo(null));
            assertTrue(missing.getMessage().contains("needs a token (missing bearer token"), missing.getMessage());
        }
    }

    @Test
    void serverErrorsCarryTheirCodeAndMessage() throws Exception {
        try (var server = new FakeServer(r -> new FakeServer.Reply(400,
                "{\"code\": \"INVALID_ARGUMENT\", \"message\": \"click '0' at (5, 5) is outside the tile\"}"))) {
            NuClickException e = assertThrows(NuClickException.class,
                    () -> new NuClickHttpClient(server.settings("")).segment("{}", null));
            assertEquals(NuClickException.Kind.SERVER, e.kind());
            assertEquals("INVALID_ARGUMENT", e.code());
            assertEquals(400, e.httpStatus());
            assertTrue(e.getMessage().contains("INVALID_ARGUMENT: click '0' at (5, 5) is outside the tile (HTTP 400)"),
                    e.getMessage());
        }
        try (var server = new FakeServer(r -> new FakeServer.Reply(413,
                "{\"code\": \"RESOURCE_EXHAUSTED\", \"message\": \"request body of 99 bytes is over the limit\"}"))) {
            NuClickException e = assertThrows(NuClickException.class,
                    () -> new NuClickHttpClient(server.settings("")).segment("{}", null));
            assertTrue(e.getMessage().contains("--max-message-mb"), e.getMessage());
        }
    }

    @Test
    void aServerThatIsNotNuclickBridgeIsNamedAsSuch() throws Exception {
        try (var server = new FakeServer(r -> new FakeServer.Reply(404, "<html><h1>Not Found</h1></html>"))) {
            NuClickException e = assertThrows(NuClickException.class,
                    () -> new NuClickHttpClient(server.settings("")).modelInfo(null));
            assertEquals(NuClickException.Kind.SERVER, e.kind());
            assertTrue(e.getMessage().contains("HTTP 404 and a body that is not a nuclick-bridge error: '<html><h1>Not Found</h1></html>'"),
                    e.getMessage());
            assertTrue(e.getMessage().contains("Is " + server.url() + " the address of a nuclick-bridge server"),
                    e.getMessage());
        }
        try (var server = new FakeServer(r -> new FakeServer.Reply(200, "<html>hello</html>"))) {
            NuClickException e = assertThrows(NuClickException.class,
                    () -> new NuClickHttpClient(server.settings("")).modelInfo(null));
            assertEquals(NuClickException.Kind.PROTOCOL, e.kind());
            assertTrue(e.getMessage().contains("not valid JSON"), e.getMessage());
        }
    }

    @Test
    void anUnreachableServerIsAClearError() throws Exception {
        int port;
        try (var socket = new ServerSocket(0)) {
            port = socket.getLocalPort(); // free once closed: nothing listens there
        }
        var s = new NuClickSettings("http://127.0.0.1:" + port, "", NuClickSettings.Output.DETECTIONS, false, 10, 5);
        NuClickException e = assertThrows(NuClickException.class, () -> new NuClickHttpClient(s).modelInfo(null));
        assertEquals(NuClickException.Kind.UNREACHABLE, e.kind());
        assertTrue(e.getMessage().contains("Cannot reach the NuClick server at http://127.0.0.1:" + port
                + " (connection refused). Is 'nuclick-bridge serve' running there"), e.getMessage());
    }

    @Test
    void anUnknownHostIsNamed() throws Exception {
        var s = new NuClickSettings("http://no-such-host.invalid:8080", "", NuClickSettings.Output.DETECTIONS, false, 10, 5);
        NuClickException e = assertThrows(NuClickException.class, () -> new NuClickHttpClient(s).modelInfo(null));
        assertEquals(NuClickException.Kind.UNREACHABLE, e.kind());
        assertTrue(e.getMessage().contains("unknown host 'no-such-host.invalid'"), e.getMessage());
    }

    @Test
    void theGrpcPortGetsAHint() throws Exception {
        // A port that answers HTTP/1.1 with HTTP/2 frames and hangs up, like a gRPC port.
        try (var socket = new ServerSocket(0)) {
            Thread t = new Thread(() -> {
                while (!socket.isClosed()) {
                    try (var c = socket.accept()) {
                        c.getInputStream().read(new byte[64]);
                        c.getOutputStream().write(new byte[] {0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 8, 7, 0, 0, 0, 0, 0});
                    } catch (Exception ignored) {
                        // closed
                    }
                }
            });
            t.setDaemon(true);
            t.start();
            var s = new NuClickSettings("http://127.0.0.1:" + socket.getLocalPort(), "",
                    NuClickSettings.Output.DETECTIONS, false, 10, 5);
            NuClickException e = assertThrows(NuClickException.class, () -> new NuClickHttpClient(s).modelInfo(null));
            assertEquals(NuClickException.Kind.UNREACHABLE, e.kind());
            assertTrue(e.getMessage().contains("failed ("), e.getMessage());
            assertTrue(e.getMessage().contains("Is the URL that of nuclick-bridge's HTTP port?"), e.getMessage());
            // no gRPC hint for another port (the scripted one is a free port, so 50051 only by chance)
            assertEquals(socket.getLocalPort() == 50051, e.getMessage().contains("Port 50051 is"), e.getMessage());

            // The same real failure, had the URL named port 50051 (gRPC's default): the hint says so.  The
            // failure comes from the scripted port above, never from whatever listens on this machine's 50051.
            var grpc = new NuClickSettings("http://127.0.0.1:50051", "", NuClickSettings.Output.DETECTIONS, false,
                    10, 5);
            NuClickException onGrpc = new NuClickHttpClient(grpc).transportError(grpc.endpoint("/v1/model"),
                    e.getCause());
            assertEquals(NuClickException.Kind.UNREACHABLE, onGrpc.kind());
            assertTrue(onGrpc.getMessage().endsWith(" Port 50051 is the server's gRPC port; the extension talks to its"
                    + " HTTP port (--http-port, default 8080)."), onGrpc.getMessage());
        }
    }

    @Test
    void aSlowServerTimesOutAndACallCanBeCancelled() throws Exception {
        try (var server = new FakeServer(r -> {
            Thread.sleep(3000);
            return new FakeServer.Reply(200, MODEL);
        })) {
            var s = new NuClickSettings(server.url(), "", NuClickSettings.Output.DETECTIONS, false, 10, 1);
            NuClickException e = assertThrows(NuClickException.class, () -> new NuClickHttpClient(s).modelInfo(null));
            assertEquals(NuClickException.Kind.TIMEOUT, e.kind());
            assertTrue(e.getMessage().contains("did not answer within 1 s"), e.getMessage());

            var cancel = new AtomicBoolean(false);
            var client = new NuClickHttpClient(server.settings(""));
            new Thread(() -> {
                try {
                    Thread.sleep(200);
                } catch (InterruptedException ignored) {
                    // no-op
                }
                cancel.set(true);
            }).start();
            long t0 = System.nanoTime();
            NuClickException c = assertThrows(NuClickException.class, () -> client.modelInfo(cancel::get));
            assertEquals(NuClickException.Kind.CANCELLED, c.kind());
            assertTrue((System.nanoTime() - t0) / 1e9 < 2.0, "cancel took too long");
        }
    }

    @Test
    void aBusyServerIsAskedAgainAfterItsRetryAfter() throws Exception {
        var busy = new java.util.concurrent.atomic.AtomicInteger(2);
        String full = "{\"code\": \"RESOURCE_EXHAUSTED\", \"message\": \"the server is busy: its queue is full\"}";
        try (var server = new FakeServer(r -> busy.getAndDecrement() > 0
                ? new FakeServer.Reply(429, full, java.util.Map.of("Retry-After", "1"))
                : new FakeServer.Reply(200, ProtocolTest.REPLY))) {
            var client = new NuClickHttpClient(server.settings(""));
            long t0 = System.nanoTime();
            var reply = client.segment("{\"clicks\": []}", null);
            double waited = (System.nanoTime() - t0) / 1e9;
            assertEquals(3, server.requests.size());
            assertEquals(2, client.busyRetries());
            assertFalse(reply.results().isEmpty());
            assertTrue(waited >= 2.0, "asked again before the Retry-After had passed: " + waited + " s");
        }
    }

    @Test
    void aServerBusyForTheWholeTimeoutIsOneClearError() throws Exception {
        String full = "{\"code\": \"RESOURCE_EXHAUSTED\", \"message\": \"the server is busy: its queue is full\"}";
        try (var server = new FakeServer(r -> new FakeServer.Reply(429, full, java.util.Map.of("Retry-After", "1")))) {
            var s = new NuClickSettings(server.url(), "", NuClickSettings.Output.DETECTIONS, false, 1000, 2);
            NuClickException e = assertThrows(NuClickException.class,
                    () -> new NuClickHttpClient(s).segment("{\"clicks\": []}", null));
            assertEquals("RESOURCE_EXHAUSTED", e.code());
            assertTrue(e.getMessage().contains("stayed busy for the whole timeout"), e.getMessage());
            assertTrue(server.requests.size() >= 2 && server.requests.size() <= 3, "requests: " + server.requests.size());
        }
    }

    @Test
    void tooLargeAndBadRequestsAreNotAskedAgain() throws Exception {
        try (var server = new FakeServer(r -> new FakeServer.Reply(413,
                "{\"code\": \"RESOURCE_EXHAUSTED\", \"message\": \"request body of 9 bytes is over the limit\"}"))) {
            assertThrows(NuClickException.class, () -> new NuClickHttpClient(server.settings("")).segment("{}", null));
            assertEquals(1, server.requests.size());
        }
    }

    @Test
    void aWaitForABusyServerCanBeCancelled() throws Exception {
        String full = "{\"code\": \"RESOURCE_EXHAUSTED\", \"message\": \"the server is busy\"}";
        try (var server = new FakeServer(r -> new FakeServer.Reply(429, full, java.util.Map.of("Retry-After", "30")))) {
            long t0 = System.nanoTime();
            var s = new NuClickSettings(server.url(), "", NuClickSettings.Output.DETECTIONS, false, 1000, 120);
            NuClickException e = assertThrows(NuClickException.class, () -> new NuClickHttpClient(s)
                    .segment("{}", () -> System.nanoTime() - t0 > 300_000_000L));
            assertEquals(NuClickException.Kind.CANCELLED, e.kind());
        }
    }
}
