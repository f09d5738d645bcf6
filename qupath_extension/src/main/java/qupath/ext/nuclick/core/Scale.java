package qupath.ext.nuclick.core;

/**
 * At which downsample to read an image for a model, and how much the server will still resample.
 *
 * @param downsample   level-0 pixels per tile pixel (QuPath's downsample), at least 1
 * @param serverFactor tile pixels per model pixel after the server's own resampling (1 = none)
 */
public record Scale(double downsample, double serverFactor) {

    /** The server resamples a tile when its pixel size differs from the model's by more than this. */
    public static final double TOLERANCE = 0.10;

    public static final Scale IDENTITY = new Scale(1.0, 1.0);

    /**
     * The downsample whose pixels match the model's pixel size.  Images finer than the model are read
     * at a downsample above 1 (from the pyramid); images coarser than the model are read at full
     * resolution and the server enlarges them (its {@code resample_factor}).  Within 10% of the model's
     * pixel size the image is read as it is, as the server would not resample it either.
     *
     * @param imagePixelUm level-0 pixel size of the image in µm (NaN or &lt;= 0: unknown)
     * @param modelPixelUm the model's training pixel size in µm (&lt;= 0: unknown)
     */
    public static Scale choose(double imagePixelUm, double modelPixelUm) throws NuClickException {
        if (!(modelPixelUm > 0) || !Double.isFinite(modelPixelUm)) {
            return IDENTITY; // the server says nothing about scale: send the image as it is
        }
        if (!(imagePixelUm > 0) || !Double.isFinite(imagePixelUm)) {
            throw new NuClickException(NuClickException.Kind.INPUT,
                    "The image has no pixel size, so NuClick cannot read it at the model's scale ("
                            + Format.number(modelPixelUm) + " µm per pixel). Set the pixel size in QuPath's Image tab"
                            + " (double-click 'Pixel width' and 'Pixel height'), then try again.");
        }
        if (Math.abs(imagePixelUm - modelPixelUm) <= TOLERANCE * modelPixelUm) {
            return IDENTITY;
        }
        double d = modelPixelUm / imagePixelUm;
        if (d > 1) {
            return new Scale(d, serverFactor(imagePixelUm * d, modelPixelUm));
        }
        return new Scale(1.0, serverFactor(imagePixelUm, modelPixelUm));
    }

    /** The server's rule (bridge.service.core): resample when more than 10% off. */
    static double serverFactor(double tilePixelUm, double modelPixelUm) {
        if (Math.abs(tilePixelUm - modelPixelUm) > TOLERANCE * modelPixelUm) {
            return tilePixelUm / modelPixelUm;
        }
        return 1.0;
    }
}
