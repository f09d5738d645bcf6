package qupath.ext.nuclick.core;

import java.util.LinkedHashMap;
import java.util.Map;

/**
 * What one run changed in the image, and the notification that says so.
 *
 * @param added       nuclei added
 * @param replaced    earlier nuclei of ours removed because their point got a new one
 * @param skipped     points left alone because they already had a nucleus of ours
 * @param repeated    points at the same place as another point of the run (segmented once)
 * @param notFound    points the server found no nucleus for
 * @param reasons     why, with how many points each
 * @param removed     points removed ("remove the points that got a nucleus")
 * @param released    nuclei whose point id was dropped because their point was removed
 * @param annotations whether nuclei are annotations (else detections)
 */
public record RunSummary(int added, int replaced, int skipped, int repeated, int notFound,
                         Map<String, Integer> reasons, int removed, int released, boolean annotations) {

    public RunSummary {
        reasons = new LinkedHashMap<>(reasons);
    }

    public boolean changedNothing() {
        return added == 0 && replaced == 0 && removed == 0 && released == 0;
    }

    public String message() {
        String kind = annotations ? "annotation" : "detection";
        var sb = new StringBuilder();
        sb.append(added).append(' ').append(kind).append(plural(added)).append(" added");
        if (replaced > 0) {
            sb.append(", ").append(replaced).append(" earlier nucle").append(replaced == 1 ? "us" : "i")
                    .append(" replaced");
        }
        if (removed > 0) {
            sb.append(", ").append(removed).append(" point").append(plural(removed)).append(" removed");
        }
        if (skipped > 0) {
            sb.append("; ").append(skipped).append(" point").append(plural(skipped))
                    .append(skipped == 1 ? " already has" : " already have").append(" a nucleus (skipped)");
        }
        if (repeated > 0) {
            sb.append("; ").append(repeated).append(" point").append(plural(repeated))
                    .append(" at the same place as another (used once)");
        }
        if (notFound > 0) {
            sb.append("; no nucleus for ").append(notFound).append(" point").append(plural(notFound)).append(':');
            int shown = 0;
            for (var e : reasons.entrySet()) {
                if (shown++ == 3) {
                    sb.append("\n...");
                    break;
                }
                sb.append('\n').append(e.getKey());
                if (e.getValue() > 1) {
                    sb.append(" (x").append(e.getValue()).append(')');
                }
            }
        }
        return sb.toString();
    }

    private static String plural(int n) {
        return n == 1 ? "" : "s";
    }
}
