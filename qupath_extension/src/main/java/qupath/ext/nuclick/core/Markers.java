package qupath.ext.nuclick.core;

import java.time.ZonedDateTime;
import java.time.format.DateTimeFormatter;
import java.util.Locale;
import java.util.random.RandomGenerator;

/**
 * The names of the objects we create: {@code nuclick-bridge <run id> @<x>,<y>}, the click's
 * coordinates to 1/1000 px, exactly as the paquo connector ({@code bridge.connectors.qupath.objects})
 * writes them, so that {@code nuclick-bridge qupath} recognises nuclei made here and the script that
 * removes our objects removes these too.
 */
public final class Markers {

    private Markers() {
    }

    public static final String PREFIX = "nuclick-bridge";

    private static final DateTimeFormatter STAMP = DateTimeFormatter.ofPattern("yyyyMMdd-HHmmss", Locale.ROOT);

    /** A short, sortable run id: {@code YYYYmmdd-HHMMSS-xxxx}. */
    public static String runId(ZonedDateTime when, RandomGenerator random) {
        return STAMP.format(when) + "-" + String.format(Locale.ROOT, "%04x", random.nextInt(1 << 16));
    }

    /** The name of the object made from a click. */
    public static String name(String runId, double x, double y) {
        if (!runId.matches("[A-Za-z0-9_.:-]+")) {
            throw new IllegalArgumentException("run id '" + runId + "' may only contain letters, digits and _.:-");
        }
        return PREFIX + " " + runId + " @" + Format.fixed(x, 3) + "," + Format.fixed(y, 3);
    }
}
