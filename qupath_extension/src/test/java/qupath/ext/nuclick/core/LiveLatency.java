package qupath.ext.nuclick.core;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.awt.image.BufferedImage;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Collections;
import java.util.Comparator;
import java.util.List;
import java.util.Locale;
import java.util.concurrent.TimeUnit;
import javax.imageio.ImageIO;

/**
 * Click-to-nucleus latency of live mode against a running server: the time from a point event to the edit that
 * holds the point's nucleus, as QuPath would see it (the controller, real HTTP, real tiles of a real image).
 * <pre>
 * qupath_extension/javatest.sh build
 * NUCLICK_TOKEN=... java -cp qupath_extension/build/javatest/classes:/usr/share/java/gson.jar \
 *     qupath.ext.nuclick.core.LiveLatency URL IMAGE.png CLICKS.json [N] [PIXEL_UM]
 * </pre>
 * CLICKS.json: {@code [[x, y, class or null], ...]}, one click per nucleus of IMAGE.png (level-0 pixels); N: clicks
 * per scenario (default 40); PIXEL_UM: the image's pixel size (default 0.25).  Scenarios: one click at a time
 * (each waited for) on a crowded part of the image, the same points each moved by 3 px, and a click every 100 ms
 * on another part.  Prints p50/p95/max per scenario and one JSON line.  {@code benchmarks/live_latency.py} starts a
 * server and runs this.
 */
public final class LiveLatency {

    private LiveLatency() {
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 3) {
            System.err.println("usage: LiveLatency URL IMAGE.png CLICKS.json [N] [PIXEL_UM]");
            System.exit(2);
        }
        String url = args[0];
        BufferedImage image = ImageIO.read(Path.of(args[1]).toFile());
        List<Click> all = new ArrayList<>();
        for (JsonElement el : JsonParser.parseString(Files.readString(Path.of(args[2]), StandardCharsets.UTF_8))
                .getAsJsonArray()) {
            JsonArray c = el.getAsJsonArray();
            all.add(new Click(c.get(0).getAsDouble(), c.get(1).getAsDouble(),
                    c.size() > 2 && !c.get(2).isJsonNull() ? c.get(2).getAsString() : null));
        }
        int n = args.length > 3 ? Integer.parseInt(args[3]) : 40;
        double pixelUm = args.length > 4 ? Double.parseDouble(args[4]) : 0.25;
        var settings = new NuClickSettings(url, System.getenv().getOrDefault("NUCLICK_TOKEN", ""),
                NuClickSettings.Output.DETECTIONS, false, 1000, 120);
        SegmentJob.PixelSource pixels = (x, y, w, h, d) -> {
            if (d != 1.0) {
                throw new IllegalArgumentException("give the image's pixel size as the model's (read at downsample 1)");
            }
            return TileData.fromPackedRgb(image.getRGB(x, y, w, h, null, 0, w), w, h);
        };
        var model = new NuClickHttpClient(settings).modelInfo(null);
        System.out.println("live latency against " + url + ": " + model.describe() + "; image " + image.getWidth()
                + " x " + image.getHeight() + ", " + all.size() + " clicks available, " + n + " per scenario");

        JsonObject json = new JsonObject();
        var view = new LiveView();
        try (var live = new LiveController(new SegmentJob(new NuClickHttpClient(settings)), image.getWidth(),
                image.getHeight(), pixelUm, pixels, Runnable::run, view)) {
            live.awaitIdle(120, TimeUnit.SECONDS);
            List<Click> first = near(all, image.getWidth() * 0.3, image.getHeight() * 0.3, n);
            long segmented = live.stats().segmented();
            for (int k = 0; k < first.size(); k++) {
                Click c = first.get(k);
                view.asked("a" + k);
                live.add("a" + k, c.x(), c.y(), c.className());
                live.awaitIdle(300, TimeUnit.SECONDS);
            }
            report(json, "one_at_a_time", "one click at a time", view.takeLatencies(), String.format(Locale.ROOT,
                    "nuclei segmented per click (the new one and the neighbours it reaches): %.1f",
                    (double) (live.stats().segmented() - segmented) / first.size()));

            segmented = live.stats().segmented();
            for (int k = 0; k < first.size(); k++) {
                Click c = first.get(k);
                view.asked("a" + k);
                live.move("a" + k, c.x() + 3, c.y(), c.className());
                live.awaitIdle(300, TimeUnit.SECONDS);
            }
            report(json, "moves", "moves of 3 px among those points", view.takeLatencies(), String.format(
                    Locale.ROOT, "nuclei segmented per move: %.1f",
                    (double) (live.stats().segmented() - segmented) / first.size()));

            List<Click> second = near(all, image.getWidth() * 0.7, image.getHeight() * 0.7, n);
            int edits = view.edits.size();
            long t0 = System.nanoTime();
            for (int k = 0; k < second.size(); k++) {
                Click c = second.get(k);
                view.asked("b" + k);
                live.add("b" + k, c.x(), c.y(), c.className());
                long wait = t0 + (k + 1) * 100_000_000L - System.nanoTime();
                if (wait > 0) {
                    TimeUnit.NANOSECONDS.sleep(wait);
                }
            }
            live.awaitIdle(300, TimeUnit.SECONDS);
            report(json, "every_100ms", "a click every 100 ms elsewhere", view.takeLatencies(), "edits: "
                    + (view.edits.size() - edits) + " for " + second.size() + " clicks");
            if (!view.stops.isEmpty()) {
                System.out.println("live mode stopped: " + view.stops.get(0));
                System.exit(1);
            }
        }
        System.out.println(json);
    }

    private static List<Click> near(List<Click> all, double x, double y, int n) {
        List<Click> sorted = new ArrayList<>(all);
        sorted.sort(Comparator.comparingDouble(c -> Math.hypot(c.x() - x, c.y() - y)));
        return new ArrayList<>(sorted.subList(0, Math.min(n, sorted.size())));
    }

    private static void report(JsonObject json, String key, String what, List<Double> ms, String extra) {
        Collections.sort(ms);
        System.out.println("live latency, " + what + ": click to nucleus " + LiveView.describe(ms)
                + (extra.isEmpty() ? "" : "; " + extra));
        JsonObject o = new JsonObject();
        o.addProperty("n", ms.size());
        if (!ms.isEmpty()) {
            o.addProperty("p50_ms", Math.round(LiveView.percentile(ms, 50)));
            o.addProperty("p95_ms", Math.round(LiveView.percentile(ms, 95)));
            o.addProperty("max_ms", Math.round(ms.get(ms.size() - 1)));
        }
        json.add(key, o);
    }
}
