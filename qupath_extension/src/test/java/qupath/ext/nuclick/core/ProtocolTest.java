package qupath.ext.nuclick.core;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.util.Base64;
import java.util.List;
import java.util.Set;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

class ProtocolTest {

    private static final byte[] RGB = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, (byte) 255};

    @Test
    void segmentRequestHasTheProtoJsonNamesBase64PixelsAndContextFlags() {
        TileData tile = TileData.rawRgb(RGB, 2, 2);
        String json = Protocol.segmentRequest(tile, new Protocol.TilePlacement(5000, 7000, 2.0, 0.125),
                List.of(new Protocol.WireClick(5001.5, 7002.25, "0", "Tumor", false),
                        new Protocol.WireClick(4990.0, 7001.0, "3", null, true)),
                "tile-1", null);
        JsonObject req = JsonParser.parseString(json).getAsJsonObject();
        assertEquals(Set.of("tile", "clicks", "requestId"), req.keySet());
        JsonObject t = req.getAsJsonObject("tile");
        assertEquals(Set.of("encoding", "data", "width", "height", "originX", "originY", "downsample", "pixelSizeUm"),
                t.keySet());
        assertEquals("RAW_RGB8", t.get("encoding").getAsString());
        assertArrayEquals(RGB, Base64.getDecoder().decode(t.get("data").getAsString()));
        assertEquals(2, t.get("width").getAsInt());
        assertEquals(2, t.get("height").getAsInt());
        assertEquals(5000.0, t.get("originX").getAsDouble());
        assertEquals(7000.0, t.get("originY").getAsDouble());
        assertEquals(2.0, t.get("downsample").getAsDouble());
        assertEquals(0.125, t.get("pixelSizeUm").getAsDouble());
        var clicks = req.getAsJsonArray("clicks");
        JsonObject member = clicks.get(0).getAsJsonObject();
        assertEquals(Set.of("x", "y", "id", "className"), member.keySet()); // contextOnly=false is the default: omitted
        assertEquals(5001.5, member.get("x").getAsDouble());
        assertEquals(7002.25, member.get("y").getAsDouble());
        assertEquals("0", member.get("id").getAsString());
        assertEquals("Tumor", member.get("className").getAsString());
        JsonObject context = clicks.get(1).getAsJsonObject();
        assertEquals(Set.of("x", "y", "id", "contextOnly"), context.keySet());
        assertTrue(context.get("contextOnly").getAsBoolean());
        assertEquals("tile-1", req.get("requestId").getAsString());
    }

    @Test
    void unknownPixelSizeIsLeftOutAndToleranceIsSentWhenGiven() {
        String json = Protocol.segmentRequest(TileData.rawRgb(RGB, 2, 2), new Protocol.TilePlacement(0, 0, 1, 0),
                List.of(new Protocol.WireClick(0.5, 0.5, "0", "", false)), "", 0.25);
        JsonObject req = JsonParser.parseString(json).getAsJsonObject();
        assertFalse(req.getAsJsonObject("tile").has("pixelSizeUm"));
        assertFalse(req.has("requestId"));
        assertFalse(req.getAsJsonArray("clicks").get(0).getAsJsonObject().has("className"));
        assertEquals(0.25, req.get("simplifyTolerance").getAsDouble());
    }

    @Test
    void pngTilesKeepTheirBytes() {
        byte[] png = {(byte) 0x89, 'P', 'N', 'G', 13, 10, 26, 10, 0, 0};
        String json = Protocol.segmentRequest(TileData.encoded(TileData.Encoding.PNG, png, 7, 5),
                new Protocol.TilePlacement(0, 0, 1, 0), List.of(), "", null);
        JsonObject t = JsonParser.parseString(json).getAsJsonObject().getAsJsonObject("tile");
        assertEquals("PNG", t.get("encoding").getAsString());
        assertArrayEquals(png, Base64.getDecoder().decode(t.get("data").getAsString()));
        assertEquals(7, t.get("width").getAsInt());
    }

    @Test
    void packedRgbBecomesRawBytesWithoutAlpha() {
        TileData t = TileData.fromPackedRgb(new int[] {0xff102030, 0x00a0b0c0}, 2, 1);
        assertArrayEquals(new byte[] {0x10, 0x20, 0x30, (byte) 0xa0, (byte) 0xb0, (byte) 0xc0}, t.data());
        assertThrows(IllegalArgumentException.class, () -> TileData.rawRgb(new byte[5], 1, 2));
        assertThrows(IllegalArgumentException.class, () -> TileData.rawRgb(new byte[0], 0, 0));
    }

    @Test
    void nonFiniteCoordinatesAreRefusedBeforeSending() {
        assertThrows(IllegalArgumentException.class, () -> Protocol.segmentRequest(TileData.rawRgb(RGB, 2, 2),
                new Protocol.TilePlacement(0, 0, 1, 0), List.of(new Protocol.WireClick(Double.NaN, 0, "0", null, false)),
                "", null));
    }

    // ------------------------------------------------------------------ replies

    static final String REPLY = "{\"requestId\": \"tile-1\", \"results\": ["
            + "{\"clickId\": \"0\", \"className\": \"Tumor\", \"found\": true, \"polygon\": {\"exterior\": {\"points\": ["
            + "{\"x\": 10.0, \"y\": 10.0}, {\"x\": 20.0, \"y\": 10.0}, {\"x\": 20.0, \"y\": 20.0}, {\"x\": 10.0, \"y\": 20.0}]},"
            + " \"holes\": [{\"points\": [{\"x\": 12, \"y\": 12}, {\"x\": 13, \"y\": 12}, {\"x\": 13, \"y\": 13}]}]},"
            + " \"areaPx\": 99.5, \"score\": 0.87, \"reason\": \"\"},"
            + "{\"clickId\": \"2\", \"className\": \"\", \"found\": false, \"areaPx\": 0.0, \"score\": 0.0,"
            + " \"reason\": \"no nucleus under the click (probability below 0.4)\"}],"
            + " \"resampleFactor\": 1.0, \"model\": \"fake v1\"}";

    @Test
    void foundAndNotFoundResultsAreParsed() throws Exception {
        Protocol.SegmentReply r = Protocol.parseSegmentResponse(REPLY);
        assertEquals("tile-1", r.requestId());
        assertEquals("fake v1", r.model());
        assertEquals(1.0, r.resampleFactor());
        assertEquals(2, r.results().size());
        Protocol.WireResult a = r.results().get(0);
        assertTrue(a.found());
        assertEquals("0", a.clickId());
        assertEquals("Tumor", a.className());
        assertEquals(4, a.polygon().exterior().size());
        assertEquals(20.0, a.polygon().exterior().x(1));
        assertEquals(1, a.polygon().holes().size());
        assertEquals(100.0 - 0.5, a.polygon().area(), 1e-9);
        assertTrue(a.polygon().contains(15, 15));
        assertFalse(a.polygon().contains(12.8, 12.2)); // in the hole
        assertEquals(99.5, a.areaPx());
        assertEquals(0.87, a.score());
        Protocol.WireResult b = r.results().get(1);
        assertFalse(b.found());
        assertNull(b.polygon());
        assertTrue(b.reason().contains("no nucleus"));
    }

    @Test
    void defaultsMayBeOmittedAndNumbersMayBeStrings() throws Exception {
        Protocol.SegmentReply r = Protocol.parseSegmentResponse("{\"results\": [{\"clickId\": \"1\"},"
                + " {\"clickId\": \"2\", \"found\": true, \"score\": \"0.5\", \"polygon\": {\"exterior\": {\"points\":"
                + " [{\"x\": 0}, {\"x\": 1}, {\"y\": 1}]}}}], \"futureField\": {\"a\": 1}}");
        assertFalse(r.results().get(0).found());
        assertEquals("", r.results().get(0).reason());
        assertEquals(0.5, r.results().get(1).score());
        assertEquals(0.0, r.results().get(1).polygon().exterior().y(0));
        assertEquals(0.0, r.resampleFactor());
    }

    @ParameterizedTest
    @ValueSource(strings = {
        "",
        "   ",
        "<html><body>502 Bad Gateway</body></html>",
        "{\"results\": [",
        "{\"results\": []} trailing",
        "[1, 2]",
        "{results: []}",
        "{\"results\": {}}",
        "{\"results\": [5]}",
        "{\"results\": [{\"found\": \"yes\"}]}",
        "{\"results\": [{\"clickId\": 7}]}",
        "{\"results\": [{\"clickId\": \"0\", \"found\": true}]}",
        "{\"results\": [{\"clickId\": \"0\", \"found\": true, \"polygon\": {\"exterior\": {\"points\": [{\"x\": 1, \"y\": 1}]}}}]}",
        "{\"results\": [{\"clickId\": \"0\", \"found\": true, \"polygon\": {\"exterior\": {\"points\": [{\"x\": \"NaN\", \"y\": 1}, {\"x\": 1, \"y\": 1}, {\"x\": 2, \"y\": 2}]}}}]}",
        "{\"results\": [{\"clickId\": \"0\", \"found\": true, \"polygon\": {\"exterior\": {\"points\": [{\"x\": \"ten\", \"y\": 1}, {\"x\": 1, \"y\": 1}, {\"x\": 2, \"y\": 2}]}}}]}",
        "{\"results\": [], \"resampleFactor\": [1]}",
    })
    void malformedRepliesAreProtocolErrorsThatSayWhat(String body) {
        NuClickException e = assertThrows(NuClickException.class, () -> Protocol.parseSegmentResponse(body));
        assertEquals(NuClickException.Kind.PROTOCOL, e.kind());
        assertTrue(e.getMessage().startsWith("Malformed reply from the NuClick server: "), e.getMessage());
    }

    @Test
    void malformedMessagesNameTheField() {
        NuClickException e = assertThrows(NuClickException.class,
                () -> Protocol.parseSegmentResponse("{\"results\": [{}, {\"clickId\": \"1\", \"score\": true}]}"));
        assertTrue(e.getMessage().contains("results[1].score is not a number"), e.getMessage());
    }

    @Test
    void aStreamErrorInTheBodyIsAServerError() {
        NuClickException e = assertThrows(NuClickException.class, () -> Protocol.parseSegmentResponse(
                "{\"requestId\": \"\", \"error\": {\"code\": \"INVALID_ARGUMENT\", \"message\": \"tile is empty\"}}"));
        assertEquals(NuClickException.Kind.SERVER, e.kind());
        assertEquals("INVALID_ARGUMENT", e.code());
        assertTrue(e.getMessage().contains("tile is empty"));
    }

    @Test
    void modelInfoIsParsed() throws Exception {
        ModelInfo m = Protocol.parseModelInfo(FakeServer.modelJson(0.25, 4096, 50, true));
        assertEquals("fake", m.name());
        assertEquals("v1", m.version());
        assertEquals(128, m.patchSize());
        assertEquals(2.0, m.sigma());
        assertEquals(0.25, m.pixelSizeUm());
        assertEquals("cpu", m.device());
        assertEquals(67108864L, m.maxMessageBytes());
        assertEquals(4096, m.maxTileSide());
        assertEquals(50, m.maxClicksPerRequest());
        assertTrue(m.authRequired());
        assertEquals("Model fake v1 on cpu, pixel size 0.25 µm, patch 128 px; nuclick-bridge 0.0-test; token required",
                m.describe());
    }

    @Test
    void modelInfoWithoutModelOrWithABadPatchIsMalformed() {
        assertEquals(NuClickException.Kind.PROTOCOL,
                assertThrows(NuClickException.class, () -> Protocol.parseModelInfo("{\"device\": \"cpu\"}")).kind());
        assertThrows(NuClickException.class, () -> Protocol.parseModelInfo("{\"model\": {\"patchSize\": 0}}"));
        assertThrows(NuClickException.class, () -> Protocol.parseModelInfo("{\"model\": {\"patchSize\": 1.5}}"));
        assertThrows(NuClickException.class, () -> Protocol.parseModelInfo("{\"model\": {\"patchSize\": -3}}"));
    }

    @Test
    void errorBodiesAreRecognised() {
        Protocol.ServerError e = Protocol.parseError("{\"code\": \"UNAUTHENTICATED\", \"message\": \"wrong bearer token\"}");
        assertEquals("UNAUTHENTICATED", e.code());
        assertEquals("wrong bearer token", e.message());
        assertNull(Protocol.parseError("<html>404</html>"));
        assertNull(Protocol.parseError("{}"));
        assertNull(Protocol.parseError(null));
    }

    /** A GetModelInfoResponse of a server with two models, as the real server writes it. */
    static String twoModels() {
        String d = "{\"name\": \"fake\", \"version\": \"v1\", \"sha256\": \"ab\", \"width\": 1.0, \"patchSize\": 128,"
                + " \"sigma\": 2.0, \"threshold\": 0.4, \"pixelSizeUm\": 0.25, \"arch\": \"effunet-lite0\"}";
        String lung = "{\"name\": \"lung-net\", \"version\": \"l7\", \"sha256\": \"cd\", \"width\": 1.0,"
                + " \"patchSize\": 64, \"sigma\": 1.5, \"threshold\": 0.5, \"pixelSizeUm\": 0.5, \"arch\": \"nuclick-w0.25\"}";
        String one = FakeServer.modelJson(0.25, 4096, 50, false);
        return one.substring(0, one.length() - 1) + ", \"models\": [{\"name\": \"default\", \"model\": " + d
                + "}, {\"name\": \"lung\", \"model\": " + lung + "}]}";
    }

    @Test
    void theServersModelsAreListedAndTheNamedOneDescribed() throws Exception {
        ModelInfo plain = Protocol.parseModelInfo(twoModels());
        assertEquals("default", plain.servedName());
        assertEquals(List.of("default", "lung"), plain.modelNames());
        assertEquals("Model fake v1 on cpu, pixel size 0.25 µm, patch 128 px; nuclick-bridge 0.0-test; no token"
                + " required; models on the server: default, lung", plain.describe());
        ServedModel listed = plain.models().get(1);
        assertEquals(new ServedModel("lung", "lung-net", "l7", "cd", "nuclick-w0.25", 64, 1.5, 0.5, 0.5), listed);
        assertEquals("lung: lung-net l7 (nuclick-w0.25), pixel size 0.5 µm", listed.describe());
        ModelInfo lung = Protocol.parseModelInfo(twoModels(), "lung");
        assertEquals("lung", lung.servedName());
        assertEquals("lung-net", lung.name());
        assertEquals(64, lung.patchSize());
        assertEquals(1.5, lung.sigma());
        assertEquals(0.5, lung.pixelSizeUm());
        assertEquals(50, lung.maxClicksPerRequest()); // the server's limits, whichever model
        assertTrue(lung.describe().startsWith("Model lung: lung-net l7 on cpu"), lung.describe());
    }

    @Test
    void aModelTheServerDoesNotListOrAServerOfOneModelIsAClearError() {
        NuClickException unknown = assertThrows(NuClickException.class, () -> Protocol.parseModelInfo(twoModels(), "kidney"));
        assertEquals(NuClickException.Kind.SETTINGS, unknown.kind());
        assertEquals("The NuClick server has no model named 'kidney'; its models are: default, lung. Pick one in"
                + " Extensions > NuClick > Settings.", unknown.getMessage());
        NuClickException old = assertThrows(NuClickException.class,
                () -> Protocol.parseModelInfo(FakeServer.modelJson(0.25, 4096, 50, false), "lung"));
        assertEquals(NuClickException.Kind.SERVER, old.kind());
        assertTrue(old.getMessage().contains("serves one model and cannot choose 'lung'"), old.getMessage());
        assertThrows(NuClickException.class, () -> Protocol.parseModelInfo("{\"model\": {\"patchSize\": 128},"
                + " \"models\": [{\"name\": \"x\"}]}"));
    }

    @Test
    void theModelNameTravelsInTheRequestAndBackInTheReply() throws Exception {
        List<Protocol.WireClick> one = List.of(new Protocol.WireClick(0.5, 0.5, "0", "", false));
        JsonObject named = JsonParser.parseString(Protocol.segmentRequest(TileData.rawRgb(RGB, 2, 2),
                new Protocol.TilePlacement(0, 0, 1, 0), one, "", null, "lung")).getAsJsonObject();
        assertEquals("lung", named.get("modelName").getAsString());
        for (String none : new String[] {null, ""}) {
            JsonObject plain = JsonParser.parseString(Protocol.segmentRequest(TileData.rawRgb(RGB, 2, 2),
                    new Protocol.TilePlacement(0, 0, 1, 0), one, "", null, none)).getAsJsonObject();
            assertFalse(plain.has("modelName"));
        }
        var reply = Protocol.parseSegmentResponse("{\"requestId\": \"t\", \"results\": [], \"model\": \"lung-net l7\","
                + " \"modelName\": \"lung\"}");
        assertEquals("lung", reply.modelName());
        assertEquals("lung-net l7", reply.model());
    }
}
