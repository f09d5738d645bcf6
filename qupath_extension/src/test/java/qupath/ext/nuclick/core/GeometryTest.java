package qupath.ext.nuclick.core;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.time.ZoneOffset;
import java.time.ZonedDateTime;
import java.util.Random;
import org.junit.jupiter.api.Test;

/** Coordinate transforms, the choice of downsample, object names. */
class GeometryTest {

    @Test
    void level0AndTileCoordinatesRoundTripWithOriginAndDownsample() {
        assertEquals(5.25, Coords.toTile(5010.5, 5000, 2.0));
        assertEquals(5010.5, Coords.toLevel0(5.25, 5000, 2.0));
        assertEquals(10.5, Coords.toTile(10.5, 0, 1.0));
        for (double v : new double[] {0, 0.5, 123.456, 99999.75}) {
            for (double d : new double[] {1, 2, 1.7, 4}) {
                assertEquals(v, Coords.toLevel0(Coords.toTile(v, 300, d), 300, d), 1e-9);
            }
        }
        // QuPath's convention: the centre of pixel (c, r) is (c + 0.5, r + 0.5), no half-pixel shift anywhere.
        assertEquals(3, Coords.pixelOf(3.5));
        assertEquals(3, Coords.pixelOf(3.0));
        assertEquals(-1, Coords.pixelOf(-0.5));
    }

    @Test
    void patchOriginPutsTheClickPixelAtTheCentreIndex() {
        assertEquals(0, Coords.patchOrigin(64.5, 128));
        assertEquals(0, Coords.patchOrigin(64.99, 128));
        assertEquals(-64, Coords.patchOrigin(0.2, 128));
        assertEquals(-3, Coords.patchOrigin(0.0, 7));
    }

    @Test
    void gridBoxesScaleToWholeLevel0PixelsClippedToTheImage() {
        assertArrayEquals(new int[] {10, 20, 30, 40}, Coords.level0Box(10, 20, 30, 40, 1.0, 1000, 1000));
        assertArrayEquals(new int[] {20, 40, 60, 80}, Coords.level0Box(10, 20, 30, 40, 2.0, 1000, 1000));
        assertArrayEquals(new int[] {15, 30, 45, 60}, Coords.level0Box(10, 20, 30, 40, 1.5, 1000, 1000));
        assertArrayEquals(new int[] {900, 0, 101, 50}, Coords.level0Box(450, 0, 60, 25, 2.0, 1001, 1000));
        assertEquals(501, Coords.gridSize(1001, 2.0));
        assertEquals(500, Coords.gridSize(1000, 2.0));
        assertEquals(1000, Coords.gridSize(1000, 1.0));
        assertEquals(1, Coords.gridSize(1, 8.0));
    }

    @Test
    void clampIntoKeepsPointsInsideHalfOpenBoxes() {
        assertEquals(5.0, Coords.clampInto(5.0, 0, 10));
        assertEquals(Math.nextDown(10.0), Coords.clampInto(10.0, 0, 10));
        assertEquals(0.0, Coords.clampInto(-1, 0, 10));
        assertTrue(Coords.onImage(0, 0, 1, 1));
        assertTrue(!Coords.onImage(1, 0.5, 1, 1));
        assertTrue(!Coords.onImage(-0.001, 0.5, 1, 1));
    }

    @Test
    void downsampleMatchesTheModelPixelSize() throws Exception {
        assertEquals(Scale.IDENTITY, Scale.choose(0.25, 0.25));
        assertEquals(Scale.IDENTITY, Scale.choose(0.2428, 0.25)); // within 10%: read as is, the server won't resample
        assertEquals(Scale.IDENTITY, Scale.choose(0.27, 0.25));
        assertEquals(new Scale(2.0, 1.0), Scale.choose(0.125, 0.25)); // 80x scan: read at downsample 2
        assertEquals(new Scale(2.5, 1.0), Scale.choose(0.1, 0.25));
        assertEquals(new Scale(1.0, 2.0), Scale.choose(0.5, 0.25)); // 20x scan: full resolution, server enlarges 2x
        assertEquals(Scale.IDENTITY, Scale.choose(Double.NaN, 0)); // the model does not say: send as is
        assertEquals(Scale.IDENTITY, Scale.choose(0.5, Double.NaN));
    }

    @Test
    void anUncalibratedImageIsAClearError() {
        for (double px : new double[] {Double.NaN, 0, -1, Double.POSITIVE_INFINITY}) {
            NuClickException e = assertThrows(NuClickException.class, () -> Scale.choose(px, 0.25));
            assertEquals(NuClickException.Kind.INPUT, e.kind());
            assertTrue(e.getMessage().contains("The image has no pixel size"), e.getMessage());
            assertTrue(e.getMessage().contains("0.25 µm"), e.getMessage());
        }
    }

    @Test
    void markersMatchThePaquoConnectorsNames() {
        assertEquals("nuclick-bridge 20240102-030405-00ff @120.500,80.062",
                Markers.name("20240102-030405-00ff", 120.5, 80.0625)); // half-even on the exact value, as Python
        assertEquals("nuclick-bridge r1 @0.001,-0.000", Markers.name("r1", 0.0005000000000000001, -0.0001));
        String id = Markers.runId(ZonedDateTime.of(2024, 1, 2, 3, 4, 5, 0, ZoneOffset.UTC), new Random(1));
        assertTrue(id.matches("20240102-030405-[0-9a-f]{4}"), id);
        assertThrows(IllegalArgumentException.class, () -> Markers.name("bad id", 0, 0));
    }

    @Test
    void formatting() {
        assertEquals("0.25", Format.number(0.25));
        assertEquals("2", Format.number(2.0));
        assertEquals("1.0", Format.coord(0.96));
        assertEquals("0.9", Format.coord(0.95)); // 0.95 is 0.94999... in binary, as Python rounds it
        assertEquals("-0.0", Format.coord(-0.04));
    }
}
