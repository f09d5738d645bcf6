package qupath.ext.nuclick.core;

import java.util.Arrays;

/**
 * One server request: a window of the (possibly downsampled) image grid, the clicks it answers for
 * ({@code members}) and the neighbours sent along as context (indices into the clicks, ascending).
 * x, y, width and height are in grid pixels (level-0 pixels at downsample 1).
 */
public record TilePlan(int x, int y, int width, int height, int[] members, int[] context) {

    public TilePlan {
        members = members.clone();
        context = context.clone();
    }

    @Override
    public int[] members() {
        return members.clone();
    }

    @Override
    public int[] context() {
        return context.clone();
    }

    public int memberCount() {
        return members.length;
    }

    public int clickCount() {
        return members.length + context.length;
    }

    @Override
    public boolean equals(Object o) {
        return o instanceof TilePlan p && x == p.x && y == p.y && width == p.width && height == p.height
                && Arrays.equals(members, p.members) && Arrays.equals(context, p.context);
    }

    @Override
    public int hashCode() {
        return Arrays.hashCode(new int[] {x, y, width, height}) * 31 + Arrays.hashCode(members) * 7
                + Arrays.hashCode(context);
    }

    @Override
    public String toString() {
        return "TilePlan(" + x + ", " + y + ", " + width + " x " + height + ", members=" + Arrays.toString(members)
                + ", context=" + Arrays.toString(context) + ")";
    }
}
