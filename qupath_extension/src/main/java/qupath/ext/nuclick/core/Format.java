package qupath.ext.nuclick.core;

import java.math.BigDecimal;
import java.math.RoundingMode;

/** Locale-independent number formatting for messages and object names. */
final class Format {

    private Format() {
    }

    /** Shortest plain form, e.g. 0.25, 2, 1e-05 -&gt; "0.00001". */
    static String number(double v) {
        if (!Double.isFinite(v)) {
            return Double.toString(v);
        }
        return BigDecimal.valueOf(v).stripTrailingZeros().toPlainString();
    }

    /**
     * Fixed decimals, rounding the exact binary value half-to-even, as Python's {@code f"{v:.3f}"} does.
     */
    static String fixed(double v, int decimals) {
        if (!Double.isFinite(v)) {
            return Double.toString(v);
        }
        String s = new BigDecimal(v).setScale(decimals, RoundingMode.HALF_EVEN).toPlainString();
        if (v < 0 && !s.startsWith("-")) {
            s = "-" + s; // -0.0001 -> "-0.000", as Python writes it
        } else if (Double.doubleToRawLongBits(v) == Long.MIN_VALUE) {
            s = "-" + s; // -0.0
        }
        return s;
    }

    /** One decimal, for coordinates in messages. */
    static String coord(double v) {
        return fixed(v, 1);
    }
}
