package qupath.ext.nuclick.core;

import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CopyOnWriteArrayList;

/**
 * What the QuPath layer does with a {@link LiveController}'s edits, as plain data: one nucleus object per point
 * that has one, replaced or removed by each edit in order.  Also records when each point first got its
 * nucleus after its last add or move, for latency figures.
 */
class LiveView implements LiveController.Listener {

    /** The "image": the nucleus of each point that has one. */
    final Map<String, NucleusResult> nuclei = new LinkedHashMap<>();
    final List<LiveController.Edit> edits = new CopyOnWriteArrayList<>();
    final List<String> stops = new CopyOnWriteArrayList<>();
    /** Edits delivered after a stop message (must stay empty). */
    final List<LiveController.Edit> afterStop = new CopyOnWriteArrayList<>();

    private final Map<String, Long> asked = new HashMap<>();
    private final List<Double> latenciesMs = new ArrayList<>();

    /** Call just before sending an add or move for {@code id}. */
    synchronized void asked(String id) {
        asked.put(id, System.nanoTime());
    }

    @Override
    public synchronized void edit(LiveController.Edit edit) {
        if (!stops.isEmpty()) {
            afterStop.add(edit);
        }
        edits.add(edit);
        for (String id : edit.removed()) {
            nuclei.remove(id);
        }
        for (LiveController.Put p : edit.put()) {
            if (p.result().found()) {
                nuclei.put(p.pointId(), p.result());
            } else {
                nuclei.remove(p.pointId());
            }
            Long t0 = asked.remove(p.pointId());
            if (t0 != null) {
                latenciesMs.add((System.nanoTime() - t0) / 1e6);
            }
        }
    }

    @Override
    public synchronized void stopped(String message) {
        stops.add(message);
    }

    synchronized Map<String, NucleusResult> snapshot() {
        return new LinkedHashMap<>(nuclei);
    }

    synchronized List<Double> latencies() {
        return new ArrayList<>(latenciesMs);
    }

    /** The latencies so far, forgotten here. */
    synchronized List<Double> takeLatencies() {
        List<Double> out = new ArrayList<>(latenciesMs);
        latenciesMs.clear();
        return out;
    }

    /** "n=12 p50=80 ms p95=140 ms max=150 ms" (information only). */
    static String describe(List<Double> ms) {
        if (ms.isEmpty()) {
            return "n=0";
        }
        List<Double> s = new ArrayList<>(ms);
        Collections.sort(s);
        return String.format(java.util.Locale.ROOT, "n=%d p50=%.0f ms p95=%.0f ms max=%.0f ms", s.size(),
                percentile(s, 50), percentile(s, 95), s.get(s.size() - 1));
    }

    /** Nearest-rank percentile of sorted values. */
    static double percentile(List<Double> sorted, double p) {
        int rank = (int) Math.ceil(p / 100.0 * sorted.size());
        return sorted.get(Math.max(0, Math.min(sorted.size() - 1, rank - 1)));
    }
}
