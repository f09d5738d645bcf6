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

// QuPath 0.6 runs on Java 21 (its catalog's jdk version, which qupath-conventions applies too); said here so
// that the compiler, the check below and the jar all agree whatever the catalog says.
java {
    toolchain {
        languageVersion = JavaLanguageVersion.of(21)
    }
}

// Every Java source set (main, test, qupathCheck) compiles with every lint warning as an error.
tasks.withType<JavaCompile>().configureEach {
    options.encoding = "UTF-8"
    options.compilerArgs.addAll(listOf("-Xlint:all", "-Werror"))
}

// The QuPath 0.6 check (not part of `build`; see `make qupath-check`): src/qupathCheck/java runs the
// extension's non-GUI path on QuPath's own classes (ImageServer, PathObjectHierarchy, ROIs) against a live
// `nuclick-bridge serve`.  Its own source set so that javatest.sh (plain javac, no QuPath) never sees it.
val qupathCheckSources: SourceSet = sourceSets.create("qupathCheck") {
    compileClasspath += sourceSets.main.get().output
    runtimeClasspath += sourceSets.main.get().output
}
configurations[qupathCheckSources.implementationConfigurationName].extendsFrom(configurations.shadow.get())

tasks.register<JavaExec>("qupathCheck") {
    description = "Runs the extension's non-GUI path on QuPath 0.6 against a live server (needs NUCLICK_E2E_URL," +
        " -PcheckImage, -PcheckPoints, optional -PcheckExpected); scripts/qupath_check.sh sets them all"
    group = "verification"
    classpath = qupathCheckSources.runtimeClasspath
    mainClass = "qupath.ext.nuclick.QuPathCheck"
    javaLauncher = javaToolchains.launcherFor(java.toolchain)
    jvmArgs("-Djava.awt.headless=true")
    args(listOfNotNull(
        providers.gradleProperty("checkImage").orNull,
        providers.gradleProperty("checkPoints").orNull,
        providers.gradleProperty("checkExpected").orNull,
    ))
}

// The release jar, named as the catalog says: build/libs/qupath-extension-nuclick-<version>.jar (the
// conventions plugin derives the same name from qupathExtension; set here so that it cannot drift).
tasks.jar {
    archiveFileName = "$extensionName-$extensionVersion.jar"
}
