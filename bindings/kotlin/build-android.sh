#!/usr/bin/env bash
# Builds libroost_ffi.so for the Android ABIs into bindings/kotlin/roost/src/main/jniLibs and
# generates the Kotlin API; then `gradle -p bindings/kotlin :roost:assembleRelease` makes the
# AAR (bindings/kotlin/roost/build/outputs/aar/). Needs the Android NDK (ANDROID_NDK_HOME)
# and cargo-ndk (`cargo install cargo-ndk`).
set -euo pipefail
cd "$(dirname "$0")/../.."

rustup target add aarch64-linux-android armv7-linux-androideabi x86_64-linux-android i686-linux-android
cargo ndk --platform 24 -t arm64-v8a -t armeabi-v7a -t x86_64 -t x86 \
  -o bindings/kotlin/roost/src/main/jniLibs build --release --locked -p roost-ffi --lib
bindings/generate.sh --release
echo "now: gradle -p bindings/kotlin :roost:assembleRelease"
