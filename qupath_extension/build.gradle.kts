plugins {
    // Optional fat jar; the extension has no dependencies beyond what QuPath ships, so the plain jar is enough.
    id("com.gradleup.shadow") version "8.3.5"
    // QuPath's conventions: Java toolchain from QuPath's catalog (21 for 0.6), JavaFX modules, jar manifest.
    id("qupath-conventions")
}

// One name and version for the extension, its release jar and the extension catalog
// (catalog/catalog.json names .../releases/download/v<version>/<name>-<version>.jar;
// tests/test_qupath_catalog.py checks that they agree).  Raise the version here and add a release there.
val extensionName = "qupath-extension-nuclick"
val extensionVersion = "0.1.0"

qupathExtension {
    name = extensionName
    group = "io.github.nuclick-bridge"
    version = extensionVersion
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

// The release jar, named as the catalog says: build/libs/qupath-extension-nuclick-<version>.jar (the
// conventions plugin derives the same name from qupathExtension; set here so that it cannot drift).
tasks.jar {
    archiveFileName = "$extensionName-$extensionVersion.jar"
}
