package qupath.ext.nuclick.core;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.CsvSource;

class SettingsTest {

    private static NuClickSettings withUrl(String url) {
        return new NuClickSettings(url, "", NuClickSettings.Output.DETECTIONS, false, 1000, 120);
    }

    @Test
    void defaultsAreValidAndPointAtTheLocalHttpPort() throws Exception {
        NuClickSettings s = NuClickSettings.defaults().validated();
        assertEquals("http://127.0.0.1:8080", s.serverUrl());
        assertEquals("http://127.0.0.1:8080/v1/model", s.endpoint("/v1/model").toString());
        assertEquals(NuClickSettings.Output.DETECTIONS, s.output());
    }

    @ParameterizedTest
    @CsvSource({
        "localhost:8080, http://localhost:8080",
        "'  http://gpu-box:8080/  ', http://gpu-box:8080",
        "https://nuclick.example.org/api//, https://nuclick.example.org/api",
        "HTTP://[::1]:8080, HTTP://[::1]:8080",
    })
    void urlsAreNormalised(String given, String expected) throws Exception {
        assertEquals(expected, withUrl(given).validated().serverUrl());
    }

    @ParameterizedTest
    @CsvSource({
        "'', Set the NuClick server URL",
        "ftp://host:21, must start with http:// or https://",
        "http://user:pw@host:8080, Put the token in the Token field",
        "http://host:8080/?x=1, must not contain '?' or '#'",
        "http://host:99999, must be between 1 and 65535",
        "'http://exa mple:80', not a valid URL",
        "http://:8080, has no host name",
    })
    void badUrlsSayWhatToFix(String given, String words) {
        NuClickException e = assertThrows(NuClickException.class, () -> withUrl(given).validated());
        assertEquals(NuClickException.Kind.SETTINGS, e.kind());
        assertTrue(e.getMessage().contains(words), e.getMessage());
        assertTrue(e.getMessage().contains("Extensions > NuClick > Settings"), e.getMessage());
    }

    @Test
    void tokenIsTrimmedAndMustBeOnePrintableWord() throws Exception {
        var ok = new NuClickSettings("h:1", "  tok-123 \n", NuClickSettings.Output.DETECTIONS, false, 10, 10).validated();
        assertEquals("tok-123", ok.token());
        for (String bad : new String[] {"two words", "tab\there", "café"}) {
            var s = new NuClickSettings("h:1", bad, NuClickSettings.Output.DETECTIONS, false, 10, 10);
            NuClickException e = assertThrows(NuClickException.class, s::validated);
            assertTrue(e.getMessage().contains("printable ASCII"), e.getMessage());
        }
    }

    @Test
    void limitsAreChecked() {
        var zeroClicks = new NuClickSettings("h:1", "", NuClickSettings.Output.ANNOTATIONS, true, 0, 10);
        assertTrue(assertThrows(NuClickException.class, zeroClicks::validated).getMessage()
                .contains("Max clicks per request must be between 1 and"));
        var badTimeout = new NuClickSettings("h:1", "", NuClickSettings.Output.ANNOTATIONS, true, 5, 0);
        assertTrue(assertThrows(NuClickException.class, badTimeout::validated).getMessage().contains("timeout"));
        var noOutput = new NuClickSettings("h:1", "", null, true, 5, 5);
        assertTrue(assertThrows(NuClickException.class, noOutput::validated).getMessage().contains("detections or annotations"));
    }

    @Test
    void theModelNameIsTrimmedEmptyMeansTheServersDefaultAndSpacesAreRefused() throws Exception {
        assertEquals("", NuClickSettings.defaults().validated().modelName());
        assertEquals("", withUrl("h:1").validated().modelName()); // settings from before named models
        var lung = new NuClickSettings("h:1", "", NuClickSettings.Output.DETECTIONS, false, 10, 10, "  lung-v2 \n");
        assertEquals("lung-v2", lung.validated().modelName());
        var spaced = new NuClickSettings("h:1", "", NuClickSettings.Output.DETECTIONS, false, 10, 10, "my lung");
        NuClickException e = assertThrows(NuClickException.class, spaced::validated);
        assertEquals(NuClickException.Kind.SETTINGS, e.kind());
        assertTrue(e.getMessage().startsWith("The model name may only hold printable ASCII"), e.getMessage());
    }
}
