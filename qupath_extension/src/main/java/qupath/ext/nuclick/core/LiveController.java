package qupath.ext.nuclick.core;

import java.util.ArrayList;
import java.util.BitSet;
import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.Executor;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.locks.Condition;
import java.util.concurrent.locks.ReentrantLock;

/**
 * Live mode for one image plane: point events go in (add, move, delete, each with a point id), edits come out,
 * and the nuclei the edits leave are those that {@link SegmentJob#run} gives for the same points (in the order
 * they were first added), one per point that has a nucleus.
 * <p>
 * A point's nucleus depends on its neighbours: those whose guidance reaches its patch, and those whose patches
 * overlap its own (their raw masks compete for pixels), and through them on their own guidance neighbours, as
 * {@link Tiler} spells out.  So a new, moved or deleted point also has its neighbours within that reach
 * segmented again; the point's new nucleus, its neighbours' replacements and the removal of a deleted point's
 * nucleus come out in the same {@link Edit}, which the caller applies as one undoable change.
 * <p>
 * Calls never wait for the server: events are recorded under a short lock and one worker thread does the
 * rest, one round at a time.  Events that arrive while a round is at the server are coalesced into the next
 * round (the latest position of a point supersedes earlier ones).  A result for a point that has since moved,
 * changed class or been deleted is dropped (and the point, if still there, segmented again); a result for a
 * point whose neighbours changed meanwhile is shown and replaced in the next round, so that fast clicking
 * shows nuclei as they come.  Once the worker is idle, the edits have left exactly one nucleus per point that
 * has one, each for the point's latest place and class and the latest neighbours.  Edits and the stop message
 * are handed to the {@code callbacks} executor in order, from the worker thread.
 * <p>
 * On any failure (server unreachable, refused, timeout, bad reply, pixels) the controller stops itself and
 * reports one message; it never touches points, only says which nuclei to show.
 */
public final class LiveController implements AutoCloseable {

    /** Receives edits and the stop message, on the callbacks executor. */
    public interface Listener {
        /** Apply this edit as one change: the nuclei of {@code removed} go, then each put replaces its point's. */
        void edit(Edit edit);

        /** The controller stopped itself: {@code message} says why (shown once). */
        void stopped(String message);
    }

    /**
     * The new answer for a point.
     *
     * @param pointId the point
     * @param result  its nucleus (found), or why it has none (its earlier nucleus, if any, goes)
     * @param changed false when the same outline, place and class as the last one given for this point (nothing
     *                to redraw)
     */
    public record Put(String pointId, NucleusResult result, boolean changed) {
    }

    /**
     * One change of the image's nuclei.
     *
     * @param number  1, 2, ... in the order they are handed out
     * @param removed points whose nucleus goes (deleted points)
     * @param put     points whose nucleus is replaced by the result's (or removed, when not found)
     */
    public record Edit(long number, List<String> removed, List<Put> put) {

        public Edit {
            removed = List.copyOf(removed);
            put = List.copyOf(put);
        }

        /** How many nuclei this edit adds, removes or replaces. */
        public int changes() {
            int n = removed.size();
            for (Put p : put) {
                n += p.changed() ? 1 : 0;
            }
            return n;
        }
    }

    /** Counters for logs and benchmarks. */
    public record Stats(long rounds, long segmented, long dropped, long edits) {
    }

    private final SegmentJob job;
    private final int width;
    private final int height;
    private final double pixelSizeUm;
    private final SegmentJob.PixelSource pixels;
    private final Executor callbacks;
    private final Listener listener;

    private final ReentrantLock lock = new ReentrantLock();
    private final Condition changed = lock.newCondition();

    /** The image's points, in the order they were first added (the order of the clicks sent). */
    private final LinkedHashMap<String, Pt> points = new LinkedHashMap<>();
    /** Points to segment in the next round. */
    private final Set<String> dirty = new LinkedHashSet<>();
    /** Level-0 places where points appeared or disappeared since the last look: their neighbours are redone. */
    private final List<double[]> touched = new ArrayList<>();
    /** Points deleted since the last look. */
    private final Set<String> deleted = new LinkedHashSet<>();
    /** Deleted points whose nucleus goes in the next edit. */
    private final Set<String> removals = new LinkedHashSet<>();
    /** What the edits handed out show: the found nucleus of each point that has one. */
    private final Map<String, NucleusResult> shown = new HashMap<>();
    /** Points given by {@link #known} with a nucleus from before: it is removed with them. */
    private final Set<String> foreign = new HashSet<>();

    private SegmentJob.Geometry geometry;
    private boolean running = true;
    private boolean busy = true; // until the model is known, then while a round is out
    private boolean done; // the worker has ended and handed out its last callback
    private volatile boolean closed;
    private long generation;
    private long edits;
    private long rounds;
    private long segmented;
    private long dropped;
    private final Thread worker;

    private static final class Pt {
        Click click;
        long clickGen; // a new value whenever the point itself is added, moves or changes class

        Pt(Click click) {
            this.click = click;
        }
    }

    /**
     * Starts the worker, which first asks the server for its model.
     *
     * @param job         segments through the server (its client's settings apply)
     * @param width       level-0 image width
     * @param height      level-0 image height
     * @param pixelSizeUm level-0 pixel size in µm (NaN when unknown)
     * @param pixels      the plane's pixels
     * @param callbacks   where edits and the stop message are delivered (e.g. the UI thread), in order
     * @param listener    receives them
     */
    public LiveController(SegmentJob job, int width, int height, double pixelSizeUm, SegmentJob.PixelSource pixels,
                          Executor callbacks, Listener listener) {
        this.job = job;
        this.width = width;
        this.height = height;
        this.pixelSizeUm = pixelSizeUm;
        this.pixels = pixels;
        this.callbacks = callbacks;
        this.listener = listener;
        this.worker = new Thread(this::work, "nuclick-live");
        this.worker.setDaemon(true);
        this.worker.start();
    }

    // ------------------------------------------------------------------ events (any thread, never wait)

    /**
     * A point that was there before live mode started: a neighbour of the points that change, segmented again
     * only when one of them reaches it.  {@code hasNucleus}: it has a nucleus from before (which goes when the
     * point is deleted, and is replaced when the point is segmented again).
     */
    public void known(String id, double x, double y, String className, boolean hasNucleus) {
        Click c = new Click(x, y, className);
        if (!c.isFinite()) {
            return;
        }
        lock.lock();
        try {
            if (!running || points.containsKey(id)) {
                return;
            }
            points.put(id, new Pt(c));
            if (hasNucleus) {
                foreign.add(id);
            }
        } finally {
            lock.unlock();
        }
    }

    /** A new point. */
    public void add(String id, double x, double y, String className) {
        put(id, new Click(x, y, className));
    }

    /** A point moved, or its class changed; an unknown id is a new point. */
    public void move(String id, double x, double y, String className) {
        put(id, new Click(x, y, className));
    }

    /** A point was deleted; its nucleus goes and its neighbours are segmented again. */
    public void delete(String id) {
        lock.lock();
        try {
            if (!running) {
                return;
            }
            Pt p = points.remove(id);
            if (p == null) {
                return;
            }
            dirty.remove(id);
            touched.add(new double[] {p.click.x(), p.click.y()});
            deleted.add(id);
            changed.signalAll();
        } finally {
            lock.unlock();
        }
    }

    private void put(String id, Click c) {
        if (!c.isFinite()) {
            delete(id);
            return;
        }
        lock.lock();
        try {
            if (!running) {
                return;
            }
            Pt p = points.get(id);
            if (p == null) {
                p = new Pt(c);
                points.put(id, p);
                touched.add(new double[] {c.x(), c.y()});
            } else {
                if (p.click.x() != c.x() || p.click.y() != c.y()) {
                    touched.add(new double[] {p.click.x(), p.click.y()});
                    touched.add(new double[] {c.x(), c.y()});
                }
                p.click = c; // a class change alone redoes only this point
            }
            p.clickGen = ++generation;
            dirty.add(id);
            changed.signalAll();
        } finally {
            lock.unlock();
        }
    }

    // ------------------------------------------------------------------ state

    /** False once stopped, by {@link #close} or by a failure. */
    public boolean isRunning() {
        lock.lock();
        try {
            return running;
        } finally {
            lock.unlock();
        }
    }

    /**
     * Waits until every event so far has been answered and its edit handed to the callbacks executor (or the
     * controller stopped).  For tests and benchmarks; true when idle within the time.
     */
    public boolean awaitIdle(long timeout, TimeUnit unit) throws InterruptedException {
        long deadline = System.nanoTime() + unit.toNanos(timeout);
        lock.lock();
        try {
            while (!done && (!running || busy || hasWork())) {
                long left = deadline - System.nanoTime();
                if (left <= 0) {
                    return false;
                }
                changed.awaitNanos(left);
            }
            return true;
        } finally {
            lock.unlock();
        }
    }

    public Stats stats() {
        lock.lock();
        try {
            return new Stats(rounds, segmented, dropped, edits);
        } finally {
            lock.unlock();
        }
    }

    /** Stops without a message; a request at the server is abandoned and nothing more is handed out. */
    @Override
    public void close() {
        closed = true;
        lock.lock();
        try {
            running = false;
            changed.signalAll();
        } finally {
            lock.unlock();
        }
    }

    // ------------------------------------------------------------------ the worker

    private boolean hasWork() {
        return !dirty.isEmpty() || !touched.isEmpty() || !deleted.isEmpty() || !removals.isEmpty();
    }

    /** One round's snapshot: every point (context) and the ones to segment, with the generation of each click. */
    private record Round(List<String> ids, List<Click> clicks, boolean[] wanted, long[] clickGens,
                         List<String> removals, boolean anyWanted) {
    }

    private void work() {
        try {
            segmentUntilStopped();
        } finally {
            lock.lock();
            try {
                running = false;
                busy = false;
                done = true;
                changed.signalAll();
            } finally {
                lock.unlock();
            }
        }
    }

    private void segmentUntilStopped() {
        try {
            var info = job.client().modelInfo(() -> closed);
            var g = job.geometry(info, pixelSizeUm);
            lock.lock();
            try {
                geometry = g;
                busy = false;
                changed.signalAll();
            } finally {
                lock.unlock();
            }
            while (true) {
                Round round;
                lock.lock();
                try {
                    while (running && !hasWork()) {
                        changed.await();
                    }
                    if (!running) {
                        return;
                    }
                    busy = true;
                    absorb();
                    round = snapshot();
                    rounds++;
                } finally {
                    lock.unlock();
                }
                List<NucleusResult> results = round.anyWanted()
                        ? job.runSome(round.clicks(), round.wanted(), width, height, pixelSizeUm, pixels, geometry,
                                () -> closed)
                        : List.of();
                Edit edit;
                lock.lock();
                try {
                    if (!running) {
                        return;
                    }
                    absorb();
                    edit = accept(round, results);
                } finally {
                    lock.unlock();
                }
                if (edit != null && !closed) {
                    callbacks.execute(() -> listener.edit(edit));
                }
                lock.lock();
                try {
                    busy = false;
                    changed.signalAll();
                } finally {
                    lock.unlock();
                }
            }
        } catch (NuClickException e) {
            fail(e.kind() == NuClickException.Kind.CANCELLED ? null : e.getMessage());
        } catch (InterruptedException e) {
            fail(null);
        } catch (RuntimeException e) {
            fail("Live mode stopped on an unexpected error: " + e);
        }
    }

    private void fail(String message) {
        lock.lock();
        try {
            boolean wasRunning = running && !closed;
            running = false; // no more events; awaitIdle waits for the message below
            if (!wasRunning || message == null) {
                return;
            }
        } finally {
            lock.unlock();
        }
        callbacks.execute(() -> listener.stopped(message));
    }

    /**
     * Under the lock: the neighbours of every place touched since the last look become dirty (segmented again
     * in the next round, even when a result for them is at the server now), and deleted points' nuclei are
     * queued for removal.
     */
    private void absorb() {
        if (!touched.isEmpty() && geometry != null) {
            double overlap = geometry.overlapLevel0() + 1e-3;
            double reach = geometry.reachLevel0() + 1e-3;
            List<String> ids = new ArrayList<>(points.keySet());
            double[] xs = new double[ids.size()];
            double[] ys = new double[ids.size()];
            for (int k = 0; k < xs.length; k++) {
                Click c = points.get(ids.get(k)).click;
                xs[k] = c.x();
                ys[k] = c.y();
            }
            var grid = new PointGrid(xs, ys, Math.max(overlap, reach));
            // Centres: the touched places and the points their guidance reaches (whose raw masks change);
            // affected: every point whose patch overlaps a centre's.
            BitSet centres = new BitSet(xs.length);
            for (double[] t : touched) {
                grid.collect(t[0], t[1], reach, centres);
            }
            BitSet affected = new BitSet(xs.length);
            for (double[] t : touched) {
                grid.collect(t[0], t[1], overlap, affected);
            }
            for (int k = centres.nextSetBit(0); k >= 0; k = centres.nextSetBit(k + 1)) {
                grid.collect(xs[k], ys[k], overlap, affected);
            }
            for (int k = affected.nextSetBit(0); k >= 0; k = affected.nextSetBit(k + 1)) {
                dirty.add(ids.get(k));
            }
            touched.clear();
        }
        for (String id : deleted) {
            if (shown.containsKey(id) || foreign.contains(id)) {
                removals.add(id);
            }
        }
        deleted.clear();
    }

    private Round snapshot() {
        int n = points.size();
        List<String> ids = new ArrayList<>(n);
        List<Click> clicks = new ArrayList<>(n);
        boolean[] wanted = new boolean[n];
        long[] clickGens = new long[n];
        boolean any = false;
        int k = 0;
        for (var e : points.entrySet()) {
            ids.add(e.getKey());
            clicks.add(e.getValue().click);
            wanted[k] = dirty.contains(e.getKey());
            clickGens[k] = e.getValue().clickGen;
            any |= wanted[k];
            k++;
        }
        dirty.clear();
        List<String> gone = new ArrayList<>(removals);
        removals.clear();
        return new Round(ids, clicks, wanted, clickGens, gone, any);
    }

    /** Under the lock: the round's results that are still current, and its removals, as the next edit. */
    private Edit accept(Round round, List<NucleusResult> results) {
        List<Put> puts = new ArrayList<>();
        for (NucleusResult r : results) {
            int k = r.index();
            String id = round.ids().get(k);
            Pt p = points.get(id);
            segmented++;
            if (p == null || p.clickGen != round.clickGens()[k]) {
                dropped++; // moved, deleted or reclassified since: never shown, segmented again if still there
                continue;
            }
            // A neighbour that changed since has made the point dirty again: shown now, replaced next round.
            NucleusResult before = shown.get(id);
            boolean same = before == null ? !r.found() && !foreign.contains(id)
                    : r.found() && before.polygon().equals(r.polygon()) && before.click().equals(r.click());
            puts.add(new Put(id, r, !same));
            foreign.remove(id);
            if (r.found()) {
                shown.put(id, r);
            } else {
                shown.remove(id);
            }
        }
        List<String> gone = new ArrayList<>();
        for (String id : round.removals()) {
            shown.remove(id);
            foreign.remove(id);
            gone.add(id);
        }
        if (puts.isEmpty() && gone.isEmpty()) {
            return null;
        }
        return new Edit(++edits, gone, puts);
    }

    /** A uniform bucket grid for Chebyshev radius queries over the points. */
    private static final class PointGrid {
        final double[] xs;
        final double[] ys;
        final double size;
        final Map<Long, List<Integer>> buckets = new HashMap<>();

        PointGrid(double[] xs, double[] ys, double size) {
            this.xs = xs;
            this.ys = ys;
            this.size = Math.max(size, 1e-9);
            for (int k = 0; k < xs.length; k++) {
                buckets.computeIfAbsent(key(cell(xs[k]), cell(ys[k])), z -> new ArrayList<>()).add(k);
            }
        }

        long cell(double v) {
            return (long) Math.floor(v / size);
        }

        static long key(long cx, long cy) {
            return (cx << 32) ^ (cy & 0xffffffffL);
        }

        void collect(double x, double y, double r, BitSet out) {
            for (long cx = cell(x - r); cx <= cell(x + r); cx++) {
                for (long cy = cell(y - r); cy <= cell(y + r); cy++) {
                    List<Integer> bucket = buckets.get(key(cx, cy));
                    if (bucket == null) {
                        continue;
                    }
                    for (int j : bucket) {
                        if (Math.abs(xs[j] - x) <= r && Math.abs(ys[j] - y) <= r) {
                            out.set(j);
                        }
                    }
                }
            }
        }
    }
}
