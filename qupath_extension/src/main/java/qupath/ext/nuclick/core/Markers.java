package qupath.ext.nuclick.core;

import java.time.ZonedDateTime;
import java.time.format.DateTimeFormatter;
import java.util.Locale;
import java.util.Optional;
import java.util.random.RandomGenerator;
import java.util.regex.Pattern;

/**
 * The names of the objects we create: {@code nuclick-bridge <run id> @<x>,<y>}, the click's
 * coordinates to 1/1000 px, exactly as the paquo connector ({@code bridge.connectors.qupath.objects})
 * writes them, so that {@code nuclick-bridge qupath} recognises nuclei made here and the script that
 * removes our objects removes these too.  A nucleus is ours by this name alone, whether it is a detection
 * or an annotation; where QuPath keeps object metadata, it also carries {@link #META_RUN},
 * {@link #META_POINT_ID} (the QuPath id of the point annotation the click came from) and
 * {@link #META_POINT} (the click's key), the keys the paquo connector writes.
 */
public final class Markers {

    private Markers() {
    }

    public static final String PREFIX = "nuclick-bridge";

    /** Metadata key: the run that made the nucleus. */
    public static final String META_RUN = "nuclick_run";
    /** Metadata key: the QuPath object id (UUID) of the point annotation the click came from. */
    public static final String META_POINT_ID = "nuclick_point_id";
    /** Metadata key: the click's key, {@code <x>,<y>} to 1/1000 px. */
    public static final String META_POINT = "nuclick_point";

    private static final Pattern NAME = Pattern.compile(
            "^" + PREFIX + " ([A-Za-z0-9_.:-]+) @(-?\\d+\\.\\d+),(-?\\d+\\.\\d+)$");

    /** What an object's name tells: the run that wrote it and the key of its source point. */
    public record Marker(String runId, String key) {

        public String name() {
            return PREFIX + " " + runId + " @" + key;
        }
    }

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
        return PREFIX + " " + runId + " @" + pointKey(x, y);
    }

    /** A point's identity across runs and tools: its coordinates to 1/1000 px, {@code <x>,<y>}. */
    public static String pointKey(double x, double y) {
        return Format.fixed(x, 3) + "," + Format.fixed(y, 3);
    }

    /** The marker in an object's name; empty for objects that are not ours (they are never touched). */
    public static Optional<Marker> parse(String name) {
        if (name == null) {
            return Optional.empty();
        }
        var m = NAME.matcher(name);
        if (!m.matches()) {
            return Optional.empty();
        }
        return Optional.of(new Marker(m.group(1), m.group(2) + "," + m.group(3)));
    }
}
