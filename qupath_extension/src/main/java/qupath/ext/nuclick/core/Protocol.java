package qupath.ext.nuclick.core;

import com.google.gson.Gson;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonPrimitive;
import com.google.gson.stream.JsonReader;
import com.google.gson.stream.JsonToken;

import java.io.IOException;
import java.io.StringReader;
import java.util.ArrayList;
import java.util.Base64;
import java.util.List;

/**
 * The HTTP/JSON messages of {@code proto/nuclick/v1/nuclick.proto} in the proto3 JSON mapping
 * (lowerCamelCase field names, bytes as base64, enums by name), built and parsed with Gson.
 * Replies are parsed strictly: anything that is not the documented shape is a PROTOCOL error
 * naming the offending field.
 */
public final class Protocol {

    private Protocol() {
    }

    private static final Gson GSON = new GsonBuilder().disableHtmlEscaping().create();

    /** A click as sent: level-0 coordinates, its id, class and whether it is only context. */
    public record WireClick(double x, double y, String id, String className, boolean contextOnly) {
    }

    /** Where a tile lies: level-0 origin of its top-left corner, its downsample, the image's level-0 pixel size (0 = unknown). */
    public record TilePlacement(double originX, double originY, double downsample, double pixelSizeUm) {
    }

    /** One NucleusResult as received. */
    public record WireResult(String clickId, String className, boolean found, Polygon polygon, double areaPx,
                             double score, String reason) {
    }

    /**
     * A SegmentResponse as received: {@code model} is the weights file's name and version, {@code modelName} the
     * name the server serves it under (empty from a server older than named models).
     */
    public record SegmentReply(String requestId, String model, double resampleFactor, List<WireResult> results,
                               String modelName) {
    }

    /** An error body, {@code {"code": "...", "message": "..."}}. */
    public record ServerError(String code, String message) {
    }

    // ------------------------------------------------------------------ requests

    /** The JSON of a SegmentRequest for the server's default model. {@code simplifyTolerance} null: the server's default. */
    public static String segmentRequest(TileData tile, TilePlacement where, List<WireClick> clicks, String requestId,
                                        Double simplifyTolerance) {
        return segmentRequest(tile, where, clicks, requestId, simplifyTolerance, null);
    }

    /**
     * The JSON of a SegmentRequest for the server's model {@code modelName} (null or empty: its default).
     * {@code simplifyTolerance} null: the server's default.
     */
    public static String segmentRequest(TileData tile, TilePlacement where, List<WireClick> clicks, String requestId,
                                        Double simplifyTolerance, String modelName) {
        JsonObject t = new JsonObject();
        t.addProperty("encoding", tile.encoding().name());
        t.addProperty("data", Base64.getEncoder().encodeToString(tile.data()));
        t.addProperty("width", tile.width());
        t.addProperty("height", tile.height());
        t.addProperty("originX", finite(where.originX(), "tile originX"));
        t.addProperty("originY", finite(where.originY(), "tile originY"));
        t.addProperty("downsample", finite(where.downsample(), "tile downsample"));
        if (where.pixelSizeUm() > 0) {
            t.addProperty("pixelSizeUm", finite(where.pixelSizeUm(), "pixel size"));
        }
        JsonArray cs = new JsonArray();
        for (WireClick c : clicks) {
            JsonObject o = new JsonObject();
            o.addProperty("x", finite(c.x(), "click x"));
            o.addProperty("y", finite(c.y(), "click y"));
            o.addProperty("id", c.id());
            if (c.className() != null && !c.className().isEmpty()) {
                o.addProperty("className", c.className());
            }
            if (c.contextOnly()) {
                o.addProperty("contextOnly", true);
            }
            cs.add(o);
        }
        JsonObject req = new JsonObject();
        req.add("tile", t);
        req.add("clicks", cs);
        if (requestId != null && !requestId.isEmpty()) {
            req.addProperty("requestId", requestId);
        }
        if (simplifyTolerance != null) {
            req.addProperty("simplifyTolerance", finite(simplifyTolerance, "simplify tolerance"));
        }
        if (modelName != null && !modelName.isEmpty()) {
            req.addProperty("modelName", modelName);
        }
        return GSON.toJson(req);
    }

    private static double finite(double v, String what) {
        if (!Double.isFinite(v)) {
            throw new IllegalArgumentException(what + " is not finite: " + v);
        }
        return v;
    }

    // ------------------------------------------------------------------- replies

    /** Parse a SegmentResponse. */
    public static SegmentReply parseSegmentResponse(String body) throws NuClickException {
        JsonObject root = parseObject(body, "SegmentResponse");
        Fields f = new Fields(root, "");
        List<WireResult> results = new ArrayList<>();
        JsonArray arr = f.array("results");
        for (int i = 0; i < arr.size(); i++) {
            String path = "results[" + i + "]";
            Fields r = new Fields(asObject(arr.get(i), path), path + ".");
            boolean found = r.bool("found");
            String id = r.string("clickId");
            Polygon polygon = null;
            if (found) {
                JsonObject p = r.object("polygon");
                if (p == null) {
                    throw malformed(path + " is found but has no polygon");
                }
                polygon = polygon(p, path + ".polygon");
            }
            results.add(new WireResult(id, r.string("className"), found, polygon, r.number("areaPx"), r.number("score"),
                    r.string("reason")));
        }
        JsonObject error = f.object("error");
        if (error != null) {
            Fields e = new Fields(error, "error.");
            throw new NuClickException(NuClickException.Kind.SERVER,
                    "The NuClick server refused the tile: " + e.string("code") + ": " + e.string("message"), 0,
                    e.string("code"), null);
        }
        return new SegmentReply(f.string("requestId"), f.string("model"), f.number("resampleFactor"), results,
                f.string("modelName"));
    }

    /** Parse a GetModelInfoResponse: the server's default model. */
    public static ModelInfo parseModelInfo(String body) throws NuClickException {
        return parseModelInfo(body, null);
    }

    /**
     * Parse a GetModelInfoResponse, describing the server's model {@code modelName} (null or empty: its default).
     * A name the server does not list is a SETTINGS error naming the ones it has; a server that lists none (older
     * than named models) cannot choose, which is a SERVER error.
     */
    public static ModelInfo parseModelInfo(String body, String modelName) throws NuClickException {
        JsonObject root = parseObject(body, "GetModelInfoResponse");
        Fields f = new Fields(root, "");
        JsonObject model = f.object("model");
        if (model == null) {
            throw malformed("the reply of GET /v1/model has no 'model'");
        }
        JsonObject limits = f.object("limits");
        Fields l = new Fields(limits == null ? new JsonObject() : limits, "limits.");
        ServedModel chosen = servedModel(ServedModel.DEFAULT, model, "model.");
        List<ServedModel> models = new ArrayList<>();
        JsonArray arr = f.array("models");
        for (int i = 0; i < arr.size(); i++) {
            String path = "models[" + i + "]";
            Fields s = new Fields(asObject(arr.get(i), path), path + ".");
            JsonObject inner = s.object("model");
            if (inner == null) {
                throw malformed(path + " has no 'model'");
            }
            models.add(servedModel(s.string("name"), inner, path + ".model."));
        }
        String wanted = modelName == null ? "" : modelName.strip();
        if (!wanted.isEmpty()) {
            if (models.isEmpty()) {
                throw new NuClickException(NuClickException.Kind.SERVER, "The NuClick server (nuclick-bridge "
                        + (f.string("serverVersion").isEmpty() ? "of an older version" : f.string("serverVersion"))
                        + ") serves one model and cannot choose '" + wanted + "'. Upgrade it, or clear the model in"
                        + " Extensions > NuClick > Settings.");
            }
            chosen = null;
            for (ServedModel s : models) {
                if (s.name().equals(wanted)) {
                    chosen = s;
                }
            }
            if (chosen == null) {
                List<String> names = new ArrayList<>();
                models.forEach(s -> names.add(s.name()));
                throw new NuClickException(NuClickException.Kind.SETTINGS, "The NuClick server has no model named '"
                        + wanted + "'; its models are: " + String.join(", ", names)
                        + ". Pick one in Extensions > NuClick > Settings.");
            }
        }
        return new ModelInfo(chosen.modelName(), chosen.version(), chosen.patchSize(), chosen.sigma(),
                chosen.threshold(), chosen.pixelSizeUm(), f.string("device"), f.string("deviceName"),
                f.string("serverVersion"), l.uint("maxMessageBytes"), clampInt(l.uint("maxTileSide")),
                clampInt(l.uint("maxClicksPerRequest")), l.bool("authRequired"), chosen.name(), models);
    }

    private static ServedModel servedModel(String name, JsonObject model, String prefix) throws NuClickException {
        Fields m = new Fields(model, prefix);
        long patch = m.uint("patchSize");
        if (patch < 1 || patch > 1 << 16) {
            throw malformed(prefix + "patchSize is " + patch);
        }
        double sigma = m.number("sigma");
        double px = m.number("pixelSizeUm");
        if (!Double.isFinite(sigma) || sigma < 0 || !Double.isFinite(px) || px < 0) {
            throw malformed(prefix + "sigma or " + prefix + "pixelSizeUm is not a non-negative number");
        }
        return new ServedModel(name, m.string("name"), m.string("version"), m.string("sha256"), m.string("arch"),
                (int) patch, sigma, m.number("threshold"), px);
    }

    /** The {@code {"code", "message"}} of an error body, or null when the body is not one. */
    public static ServerError parseError(String body) {
        try {
            JsonObject root = parseObject(body, "error");
            Fields f = new Fields(root, "");
            String code = f.string("code");
            String message = f.string("message");
            if (code.isEmpty() && message.isEmpty()) {
                return null;
            }
            return new ServerError(code, message);
        } catch (NuClickException e) {
            return null;
        }
    }

    private static int clampInt(long v) {
        return (int) Math.min(Integer.MAX_VALUE, v);
    }

    private static Polygon polygon(JsonObject p, String path) throws NuClickException {
        Fields f = new Fields(p, path + ".");
        JsonObject ext = f.object("exterior");
        if (ext == null) {
            throw malformed(path + " has no exterior");
        }
        Ring exterior = ring(ext, path + ".exterior");
        if (exterior.size() < 3) {
            throw malformed(path + ".exterior has " + exterior.size() + " points; a polygon needs at least 3");
        }
        List<Ring> holes = new ArrayList<>();
        JsonArray hs = f.array("holes");
        for (int i = 0; i < hs.size(); i++) {
            String hp = path + ".holes[" + i + "]";
            holes.add(ring(asObject(hs.get(i), hp), hp));
        }
        return new Polygon(exterior, holes);
    }

    private static Ring ring(JsonObject r, String path) throws NuClickException {
        JsonArray pts = new Fields(r, path + ".").array("points");
        double[] xs = new double[pts.size()];
        double[] ys = new double[pts.size()];
        for (int i = 0; i < pts.size(); i++) {
            String pp = path + ".points[" + i + "]";
            Fields q = new Fields(asObject(pts.get(i), pp), pp + ".");
            xs[i] = q.number("x");
            ys[i] = q.number("y");
            if (!Double.isFinite(xs[i]) || !Double.isFinite(ys[i])) {
                throw malformed(pp + " is not finite");
            }
        }
        return new Ring(xs, ys);
    }

    // -------------------------------------------------------------- strict JSON

    static JsonObject parseObject(String body, String what) throws NuClickException {
        if (body == null || body.isBlank()) {
            throw malformed("the reply is empty (expected a " + what + " in JSON)");
        }
        JsonElement el;
        try (JsonReader reader = new JsonReader(new StringReader(body))) {
            // A fresh JsonReader is strict (not lenient); read through the adapter so Gson keeps it so.
            el = GSON.getAdapter(JsonElement.class).read(reader);
            if (reader.peek() != JsonToken.END_DOCUMENT) {
                throw malformed("the reply has data after its JSON object");
            }
        } catch (IOException | JsonParseException | IllegalStateException e) {
            throw malformed("the reply is not valid JSON (" + e.getMessage() + "); starts with: " + excerpt(body));
        }
        if (el == null || !el.isJsonObject()) {
            throw malformed("the reply is not a JSON object (expected a " + what + "); starts with: " + excerpt(body));
        }
        return el.getAsJsonObject();
    }

    /** The first 120 characters of a body, on one line. */
    public static String excerpt(String body) {
        String s = body == null ? "" : body.strip().replaceAll("\\s+", " ");
        return "'" + (s.length() > 120 ? s.substring(0, 120) + "..." : s) + "'";
    }

    static NuClickException malformed(String detail) {
        return new NuClickException(NuClickException.Kind.PROTOCOL,
                "Malformed reply from the NuClick server: " + detail + ". Is the URL that of a nuclick-bridge server"
                        + " of a matching version?");
    }

    private static JsonObject asObject(JsonElement el, String path) throws NuClickException {
        if (el == null || !el.isJsonObject()) {
            throw malformed(path + " is not an object");
        }
        return el.getAsJsonObject();
    }

    /** Typed, path-reporting access to the fields of one object; absent or null fields take proto3 defaults. */
    private static final class Fields {
        final JsonObject obj;
        final String prefix;

        Fields(JsonObject obj, String prefix) {
            this.obj = obj;
            this.prefix = prefix;
        }

        JsonElement get(String name) {
            JsonElement el = obj.get(name);
            return el == null || el.isJsonNull() ? null : el;
        }

        String string(String name) throws NuClickException {
            JsonElement el = get(name);
            if (el == null) {
                return "";
            }
            if (!el.isJsonPrimitive() || !el.getAsJsonPrimitive().isString()) {
                throw malformed(prefix + name + " is not a string");
            }
            return el.getAsString();
        }

        boolean bool(String name) throws NuClickException {
            JsonElement el = get(name);
            if (el == null) {
                return false;
            }
            if (!el.isJsonPrimitive() || !el.getAsJsonPrimitive().isBoolean()) {
                throw malformed(prefix + name + " is not true or false");
            }
            return el.getAsBoolean();
        }

        double number(String name) throws NuClickException {
            JsonElement el = get(name);
            if (el == null) {
                return 0;
            }
            if (el.isJsonPrimitive()) {
                JsonPrimitive p = el.getAsJsonPrimitive();
                if (p.isNumber()) {
                    return p.getAsDouble();
                }
                if (p.isString()) { // proto3 JSON writes NaN and infinities (and may write any number) as strings
                    String s = p.getAsString().strip();
                    switch (s) {
                        case "NaN":
                            return Double.NaN;
                        case "Infinity":
                            return Double.POSITIVE_INFINITY;
                        case "-Infinity":
                            return Double.NEGATIVE_INFINITY;
                        default:
                            try {
                                if (s.matches("-?[0-9.eE+-]+")) {
                                    return Double.parseDouble(s);
                                }
                            } catch (NumberFormatException e) {
                                // fall through
                            }
                    }
                }
            }
            throw malformed(prefix + name + " is not a number");
        }

        long uint(String name) throws NuClickException {
            double v = number(name);
            if (!(v >= 0) || v > 4294967295.0 || v != Math.rint(v)) {
                throw malformed(prefix + name + " is not an unsigned integer");
            }
            return (long) v;
        }

        JsonObject object(String name) throws NuClickException {
            JsonElement el = get(name);
            if (el == null) {
                return null;
            }
            if (!el.isJsonObject()) {
                throw malformed(prefix + name + " is not an object");
            }
            return el.getAsJsonObject();
        }

        JsonArray array(String name) throws NuClickException {
            JsonElement el = get(name);
            if (el == null) {
                return new JsonArray();
            }
            if (!el.isJsonArray()) {
                throw malformed(prefix + name + " is not a list");
            }
            return el.getAsJsonArray();
        }
    }
}
