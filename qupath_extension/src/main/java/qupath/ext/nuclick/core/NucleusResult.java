package qupath.ext.nuclick.core;

/**
 * The answer for one click: a polygon in level-0 coordinates when found, else the reason.
 *
 * @param index   position of the click in the list given to {@link SegmentJob#run}
 * @param click   the click
 * @param found   whether a nucleus was found
 * @param polygon the outline (null when not found)
 * @param areaPx  polygon area in level-0 pixels^2
 * @param score   mean NuClick probability inside the nucleus, in [0, 1]
 * @param reason  why there is no nucleus ("" when found)
 */
public record NucleusResult(int index, Click click, boolean found, Polygon polygon, double areaPx, double score,
                            String reason) {

    public static NucleusResult notFound(int index, Click click, String reason) {
        return new NucleusResult(index, click, false, null, 0, 0, reason);
    }
}
