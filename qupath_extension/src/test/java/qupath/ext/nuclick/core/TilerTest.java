package qupath.ext.nuclick.core;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashSet;
import java.util.List;
import java.util.Random;
import java.util.Set;
import org.junit.jupiter.api.Test;

class TilerTest {

    static final int P = 128;
    static final double S = 2.0;
    static final double REACH = P / 2.0 + 4 * S + 1; // 73

    static List<TilePlan> plan(double[][] xy, int w, int h, int maxTile, int maxClicks) throws NuClickException {
        double[] xs = new double[xy.length];
        double[] ys = new double[xy.length];
        boolean[] inside = new boolean[xy.length];
        for (int k = 0; k < xy.length; k++) {
            xs[k] = xy[k][0];
            ys[k] = xy[k][1];
            inside[k] = Coords.onImage(xs[k], ys[k], w, h);
        }
        return Tiler.plan(xs, ys, inside, w, h, P, S, maxTile, maxClicks);
    }

    @Test
    void zeroClicksZeroTiles() throws Exception {
        assertTrue(plan(new double[0][], 100, 100, 2048, 1000).isEmpty());
    }

    @Test
    void aPlanForSomeClicksAnswersOnlyThemAndCoversThePatchesOfTheOthersThatTakePart() throws Exception {
        double[] xs = {500.5, 600.5, 670.5, 900.5, 2000.5};
        double[] ys = {500.5, 500.5, 500.5, 500.5, 500.5};
        boolean[] inside = {true, true, true, true, true};
        // Only click 0 is wanted: 1 overlaps its patch (ring 1), 2 is in 1's guidance reach (ring 2), 3 and 4 are
        // out of reach.  The tile covers the patches of 0 and 1, whose raw masks take part.
        List<TilePlan> plans = Tiler.plan(xs, ys, inside, new boolean[] {true, false, false, false, false}, 4000, 1000,
                P, S, 2048, 1000);
        assertEquals(List.of(new TilePlan(436, 436, 228, 128, new int[] {0}, new int[] {1, 2})), plans);
        // Nothing wanted: nothing to send.
        assertTrue(Tiler.plan(xs, ys, inside, new boolean[5], 4000, 1000, P, S, 2048, 1000).isEmpty());
        // Everything wanted: the plan of all clicks.
        assertEquals(Tiler.plan(xs, ys, inside, 4000, 1000, P, S, 2048, 1000),
                Tiler.plan(xs, ys, inside, new boolean[] {true, true, true, true, true}, 4000, 1000, P, S, 2048, 1000));
        assertThrows(IllegalArgumentException.class,
                () -> Tiler.plan(xs, ys, inside, new boolean[2], 4000, 1000, P, S, 2048, 1000));
    }

    @Test
    void oneClickGetsItsPatchClippedToTheImage() throws Exception {
        List<TilePlan> plans = plan(new double[][] {{500.5, 40.5}}, 1000, 1000, 2048, 1000);
        assertEquals(List.of(new TilePlan(436, 0, 128, 104, new int[] {0}, new int[0])), plans);
    }

    @Test
    void neighboursOverlappingAMembersPatchAndTheirGuidanceNeighboursAreContext() throws Exception {
        // Bins are (2048 - 2*(128+64+2)) = 1660 px wide: clicks 0 and 1 fall in different bins.
        double[][] xy = {
            {1650.5, 500.5}, // 0: bin (0, 0)
            {1700.5, 500.5}, // 1: bin (1, 0), within 128 of 0 -> 0 and 1 are each other's context (ring 1)
            {1770.5, 500.5}, // 2: 120 from 0 (ring 1 of tile 0); 70 from 1
            {1840.5, 500.5}, // 3: 190 from 0, 70 (< reach 73) from 2 -> ring 2 of tile 0
            {1920.5, 500.5}, // 4: 80 from 3, > reach of 2 -> not in tile 0
        };
        List<TilePlan> plans = plan(xy, 4000, 1000, 2048, 1000);
        assertEquals(2, plans.size());
        TilePlan a = plans.get(0);
        assertArrayEquals(new int[] {0}, a.members());
        assertArrayEquals(new int[] {1, 2, 3}, a.context());
        // The tile covers the patches of the member and of the overlapping neighbours (0, 1, 2), not of 3.
        assertEquals(1650 - 64, a.x());
        assertEquals(1770 - 64 + 128 - a.x(), a.width());
        TilePlan b = plans.get(1);
        assertArrayEquals(new int[] {1, 2, 3, 4}, b.members());
        assertArrayEquals(new int[] {0}, b.context());
    }

    @Test
    void clicksOffTheImageAreNeverMembersButMayBeContext() throws Exception {
        double[][] xy = {{5.5, 5.5}, {-3.0, 5.5}, {50.0, 2000.0}};
        List<TilePlan> plans = plan(xy, 100, 100, 2048, 1000);
        assertEquals(1, plans.size());
        assertArrayEquals(new int[] {0}, plans.get(0).members());
        assertArrayEquals(new int[] {1}, plans.get(0).context());
        assertEquals(0, plans.get(0).x());
        assertEquals(69, plans.get(0).width()); // patch [-59, 69) clipped at 0; click 1 adds nothing to the box
    }

    @Test
    void crowdedBinsAreSplitUntilEachRequestFits() throws Exception {
        Random rnd = new Random(7);
        double[][] xy = new double[300][];
        for (int k = 0; k < xy.length; k++) {
            xy[k] = new double[] {rnd.nextDouble() * 1500, rnd.nextDouble() * 1500};
        }
        List<TilePlan> plans = plan(xy, 1500, 1500, 2048, 60);
        assertTrue(plans.size() > 1);
        checkInvariants(xy, 1500, 1500, plans, 60);
    }

    @Test
    void tooManyClicksInOnePatchIsAClearError() {
        double[][] xy = {{50.5, 50.5}, {51.5, 50.5}, {52.5, 50.5}};
        NuClickException e = assertThrows(NuClickException.class, () -> plan(xy, 100, 100, 512, 2));
        assertEquals(NuClickException.Kind.INPUT, e.kind());
        assertTrue(e.getMessage().contains("3 clicks crowd one 128 px patch near (50, 50)"), e.getMessage());
        assertTrue(e.getMessage().contains("Max clicks per request"), e.getMessage());
    }

    @Test
    void tilesMustHoldFourPatches() {
        NuClickException e = assertThrows(NuClickException.class, () -> plan(new double[][] {{1, 1}}, 10, 10, 511, 9));
        assertTrue(e.getMessage().contains("at least 512 px"), e.getMessage());
    }

    @Test
    void randomLayoutsKeepTheInvariants() throws Exception {
        Random rnd = new Random(42);
        for (int trial = 0; trial < 20; trial++) {
            int w = 300 + rnd.nextInt(3000);
            int h = 300 + rnd.nextInt(3000);
            int n = rnd.nextInt(400);
            double[][] xy = new double[n][];
            for (int k = 0; k < n; k++) {
                // Some clusters, some off the image.
                double cx = rnd.nextDouble() * (w + 100) - 50;
                double cy = rnd.nextDouble() * (h + 100) - 50;
                xy[k] = rnd.nextInt(4) == 0 && k > 0
                        ? new double[] {xy[k - 1][0] + rnd.nextGaussian() * 10, xy[k - 1][1] + rnd.nextGaussian() * 10}
                        : new double[] {cx, cy};
            }
            int maxTile = 512 + rnd.nextInt(1600);
            int maxClicks = 40 + rnd.nextInt(200);
            checkInvariants(xy, w, h, plan(xy, w, h, maxTile, maxClicks), maxClicks);
        }
    }

    private static void checkInvariants(double[][] xy, int w, int h, List<TilePlan> plans, int maxClicks) {
        Set<Integer> seen = new HashSet<>();
        for (TilePlan p : plans) {
            assertTrue(p.clickCount() <= maxClicks, p.toString());
            assertTrue(p.width() > 0 && p.height() > 0 && p.x() >= 0 && p.y() >= 0);
            assertTrue(p.x() + p.width() <= w && p.y() + p.height() <= h);
            Set<Integer> mine = new HashSet<>();
            for (int m : p.members()) {
                assertTrue(seen.add(m), "click " + m + " is a member twice");
                mine.add(m);
                assertTrue(Coords.onImage(xy[m][0], xy[m][1], w, h));
                // The member's patch (clipped to the image) lies inside the tile.
                int ox = Coords.patchOrigin(xy[m][0], P);
                int oy = Coords.patchOrigin(xy[m][1], P);
                assertTrue(Math.max(0, ox) >= p.x() && Math.min(w, ox + P) <= p.x() + p.width(), p.toString());
                assertTrue(Math.max(0, oy) >= p.y() && Math.min(h, oy + P) <= p.y() + p.height(), p.toString());
            }
            Set<Integer> context = new HashSet<>();
            for (int c : p.context()) {
                assertFalse(mine.contains(c));
                context.add(c);
            }
            // Every click near a member is in the request.
            for (int m : p.members()) {
                for (int k = 0; k < xy.length; k++) {
                    double dist = Math.max(Math.abs(xy[k][0] - xy[m][0]), Math.abs(xy[k][1] - xy[m][1]));
                    if (dist <= P) {
                        assertTrue(mine.contains(k) || context.contains(k), "click " + k + " near member " + m);
                    }
                }
            }
            int[] sorted = p.context();
            int[] copy = sorted.clone();
            Arrays.sort(copy);
            assertArrayEquals(copy, sorted);
        }
        List<Integer> expected = new ArrayList<>();
        for (int k = 0; k < xy.length; k++) {
            if (Coords.onImage(xy[k][0], xy[k][1], w, h)) {
                expected.add(k);
            }
        }
        assertEquals(new HashSet<>(expected), seen);
    }
}
