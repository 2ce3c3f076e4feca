// The Android library (AAR) of the roost client SDK: module `roost`. See docs/BINDINGS.md.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositories {
        google()
        mavenCentral()
    }
}
rootProject.name = "roost-android"
include(":roost")
