package qupath.ext.nuclick;

import java.awt.image.BufferedImage;
import java.io.IOException;
import qupath.ext.nuclick.core.SegmentJob;
import qupath.ext.nuclick.core.TileData;
import qupath.lib.images.servers.ImageServer;
import qupath.lib.regions.RegionRequest;

/**
 * Raw pixels from the image's {@link ImageServer} (not the viewer's display rendering), for one z-slice
 * and time point.  Only 8-bit RGB servers are used (checked by the caller), whose images hold the raw
 * values as packed RGB.
 */
final class ImageServerPixels implements SegmentJob.PixelSource {

    private final ImageServer<BufferedImage> server;
    private final int z;
    private final int t;

    ImageServerPixels(ImageServer<BufferedImage> server, int z, int t) {
        this.server = server;
        this.z = z;
        this.t = t;
    }

    @Override
    public TileData read(int x, int y, int width, int height, double downsample) throws IOException {
        var request = RegionRequest.createInstance(server.getPath(), downsample, x, y, width, height, z, t);
        BufferedImage img = server.readRegion(request);
        if (img == null) {
            throw new IOException("the image server returned no pixels for " + request);
        }
        int w = img.getWidth();
        int h = img.getHeight();
        int[] rgb = img.getRGB(0, 0, w, h, null, 0, w);
        return TileData.fromPackedRgb(rgb, w, h);
    }
}
