package qupath.ext.nuclick.core;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assumptions.assumeTrue;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.awt.image.BufferedImage;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import javax.imageio.ImageIO;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/**
 * The extension against a real {@code nuclick-bridge serve} that holds two models, "default" and "other" (started
 * by {@code tests/test_qupath_extension.py}): the server's list of models as the settings dialog shows it, and
 * points segmented with the model the "Model" setting names, checked against Python's in-process answer of that
 * model's weights file.
 * <p>
 * Skipped unless {@code NUCLICK_MODELS_URL} is set.  Also reads {@code NUCLICK_MODELS_IMAGE} (an 8-bit RGB PNG)
 * and {@code NUCLICK_MODELS_CASE} (JSON: the models the server should list, the clicks, and each model's answer).
 */
class ModelsEndToEndTest {

    static String url;
    static BufferedImage image;
    static JsonObject cases;
    static List<Click> clicks;

    @BeforeAll
    static void load() throws IOException {
        url = System.getenv("NUCLICK_MODELS_URL");
        assumeTrue(url != null && !url.isBlank(), "NUCLICK_MODELS_URL is not set: no server to talk to");
        image = ImageIO.read(Path.of(System.getenv("NUCLICK_MODELS_IMAGE")).toFile());
        cases = JsonParser.parseString(Files.readString(Path.of(System.getenv("NUCLICK_MODELS_CASE")),
                StandardCharsets.UTF_8)).getAsJsonObject();
        clicks = new ArrayList<>();
        for (JsonElement el : cases.getAsJsonArray("clicks")) {
            JsonArray c = el.getAsJsonArray();
            clicks.add(new Click(c.get(0).getAsDouble(), c.get(1).getAsDouble(), null));
        }
    }

    static NuClickSettings settings(String modelName) {
        return new NuClickSettings(url, "", NuClickSettings.Output.DETECTIONS, false, 1000, 120, modelName);
    }

    /** Raw RGB of the PNG at downsample 1, as QuPath's ImageServer hands out an RGB region. */
    static final class PngPixels implements SegmentJob.PixelSource {
        @Override
        public TileData read(int x, int y, int w, int h, double d) {
            assertEquals(1.0, d);
            return TileData.fromPackedRgb(image.getRGB(x, y, w, h, null, 0, w), w, h);
        }
    }

    @Test
    void theServerListsItsModelsForTheSettingsDialog() throws Exception {
        List<ServedModel> models = new NuClickHttpClient(settings("")).models(null);
        JsonArray expected = cases.getAsJsonArray("models");
        assertEquals(expected.size(), models.size());
        for (int i = 0; i < models.size(); i++) {
            JsonObject e = expected.get(i).getAsJsonObject();
            ServedModel m = models.get(i);
            assertEquals(e.get("name").getAsString(), m.name());
            assertEquals(e.get("modelName").getAsString(), m.modelName());
            assertEquals(e.get("version").getAsString(), m.version());
            assertEquals(e.get("sha256").getAsString(), m.sha256());
            assertEquals(e.get("patchSize").getAsInt(), m.patchSize());
        }
        assertEquals(List.of("default", "other"), models.stream().map(ServedModel::name).toList());
    }

    @Test
    void checkServerDescribesTheModelTheSettingsName() throws Exception {
        ModelInfo plain = new NuClickHttpClient(settings("")).modelInfo(null);
        assertEquals("default", plain.servedName());
        assertEquals("tiny-d", plain.name());
        ModelInfo other = new NuClickHttpClient(settings("other")).modelInfo(null);
        assertEquals("other", other.servedName());
        assertEquals("tiny-o", other.name());
        assertEquals("o1", other.version());
        assertTrue(other.describe().startsWith("Model other: tiny-o o1 on cpu"), other.describe());
        assertTrue(other.describe().endsWith("; models on the server: default, other"), other.describe());
    }

    @Test
    void pointsAreSegmentedWithTheModelTheSettingsName() throws Exception {
        List<List<NucleusResult>> answers = new ArrayList<>();
        for (String name : List.of("default", "other")) {
            String setting = name.equals("default") ? "" : name;
            var job = new SegmentJob(new NuClickHttpClient(settings(setting)));
            var outcome = job.run(clicks, image.getWidth(), image.getHeight(), 0.25, new PngPixels(), null, null, null);
            assertEquals(name, outcome.model().servedName());
            JsonArray expected = cases.getAsJsonObject("expected").getAsJsonArray(name);
            assertEquals(clicks.size(), outcome.results().size());
            long found = 0;
            for (int i = 0; i < clicks.size(); i++) {
                NucleusResult r = outcome.results().get(i);
                JsonObject e = expected.get(i).getAsJsonObject();
                String what = name + ", click " + i;
                assertEquals(e.get("found").getAsBoolean(), r.found(), what + ": " + r.reason());
                if (r.found()) {
                    found++;
                    assertSameRing(e.getAsJsonArray("exterior"), r.polygon().exterior(), what);
                    JsonArray holes = e.getAsJsonArray("holes");
                    assertEquals(holes.size(), r.polygon().holes().size(), what);
                    for (int h = 0; h < holes.size(); h++) {
                        assertSameRing(holes.get(h).getAsJsonArray(), r.polygon().holes().get(h), what);
                    }
                    assertEquals(e.get("score").getAsDouble(), r.score(), 1e-6, what);
                }
            }
            assertTrue(found >= 5, name + " found " + found);
            answers.add(outcome.results());
        }
        // The two models answer differently: the name really chose the network.
        assertNotEquals(areas(answers.get(0)), areas(answers.get(1)));
    }

    @Test
    void anUnknownModelNameSaysWhichModelsTheServerHas() throws Exception {
        var client = new NuClickHttpClient(settings("lung"));
        NuClickException e = assertThrows(NuClickException.class, () -> client.modelInfo(null));
        assertEquals(NuClickException.Kind.SETTINGS, e.kind());
        assertEquals("The NuClick server at " + url + " has no model named 'lung'; its models are: default, other."
                + " Pick one in Extensions > NuClick > Settings.", e.getMessage());
        // A request that names it anyway gets the server's own refusal.
        String body = Protocol.segmentRequest(TileData.fromPackedRgb(image.getRGB(0, 0, 64, 64, null, 0, 64), 64, 64),
                new Protocol.TilePlacement(0, 0, 1, 0), List.of(new Protocol.WireClick(20.5, 20.5, "a", null, false)),
                "x", null, "lung");
        NuClickException refused = assertThrows(NuClickException.class, () -> client.segment(body, null));
        assertEquals("INVALID_ARGUMENT", refused.code());
        assertEquals(400, refused.httpStatus());
        assertTrue(refused.getMessage().contains("this server has no model named 'lung'; its models are: default,"
                + " other"), refused.getMessage());
    }

    private static List<Long> areas(List<NucleusResult> results) {
        return results.stream().map(r -> r.found() ? Math.round(r.polygon().area()) : 0L).toList();
    }

    private static void assertSameRing(JsonArray expected, Ring got, String what) {
        assertEquals(expected.size(), got.size(), what);
        for (int i = 0; i < got.size(); i++) {
            assertEquals(expected.get(i).getAsJsonArray().get(0).getAsDouble(), got.x(i), 1e-6, what);
            assertEquals(expected.get(i).getAsJsonArray().get(1).getAsDouble(), got.y(i), 1e-6, what);
        }
    }
}
