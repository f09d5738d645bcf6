// QuPath extension build, laid out like qupath/qupath-extension-template.
pluginManagement {
    repositories {
        gradlePluginPortal()
        maven {
            url = uri("https://maven.scijava.org/content/repositories/releases")
        }
    }
}

// The QuPath version the extension targets; the settings plugin builds the `libs` version catalog from it.
qupath {
    version = "0.6.0"
}

plugins {
    id("io.github.qupath.qupath-extension-settings") version "0.2.1"
}

rootProject.name = "qupath-extension-nuclick"
