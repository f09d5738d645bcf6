plugins {
    // Optional fat jar; the extension has no dependencies beyond what QuPath ships, so the plain jar is enough.
    id("com.gradleup.shadow") version "8.3.5"
    // QuPath's conventions: Java toolchain from QuPath's catalog (21 for 0.6), JavaFX modules, jar manifest.
    id("qupath-conventions")
}

qupathExtension {
    name = "qupath-extension-nuclick"
    group = "io.github.nuclick-bridge"
    version = "0.1.0"
    description = "NuClick nucleus outlines from points, through a nuclick-bridge server"
    automaticModule = "io.github.nuclickbridge.extension.nuclick"
}

dependencies {
    // Everything comes from QuPath at run time (java.net.http is in the JDK; Gson ships with QuPath).
    shadow(libs.bundles.qupath)
    shadow(libs.bundles.logging)
    shadow(libs.qupath.fxtras)
    shadow(libs.gson)

    testImplementation(libs.gson)
    testImplementation(libs.junit)
    testRuntimeOnly(libs.junit.platform)
}
