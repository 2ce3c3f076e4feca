#!/usr/bin/env bash
# Builds bindings/swift/RoostFFI.xcframework (static libraries of roost-ffi for iOS devices,
# the iOS simulator and macOS, with the generated C header and module map) and the Swift
# sources, for the Swift package next to this script. Needs macOS with Xcode and rustup.
# Usage: bindings/swift/build-xcframework.sh   (release build)
set -euo pipefail
cd "$(dirname "$0")/../.."

targets=(aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios aarch64-apple-darwin x86_64-apple-darwin)
rustup target add "${targets[@]}"
for target in "${targets[@]}"; do
  cargo build --release --locked -p roost-ffi --lib --target "$target"
done

# The Swift API and the C header: the same for every target.
bindings/generate.sh --release

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/headers" "$work/ios-sim" "$work/macos"
cp bindings/swift/Sources/RoostFFI/include/RoostFFI.h "$work/headers/"
cp bindings/swift/Sources/RoostFFI/include/module.modulemap "$work/headers/"
# One library per platform: the simulator's and the Mac's two architectures are merged.
lipo -create target/aarch64-apple-ios-sim/release/libroost_ffi.a \
  target/x86_64-apple-ios/release/libroost_ffi.a -output "$work/ios-sim/libroost_ffi.a"
lipo -create target/aarch64-apple-darwin/release/libroost_ffi.a \
  target/x86_64-apple-darwin/release/libroost_ffi.a -output "$work/macos/libroost_ffi.a"

rm -rf bindings/swift/RoostFFI.xcframework
xcodebuild -create-xcframework \
  -library target/aarch64-apple-ios/release/libroost_ffi.a -headers "$work/headers" \
  -library "$work/ios-sim/libroost_ffi.a" -headers "$work/headers" \
  -library "$work/macos/libroost_ffi.a" -headers "$work/headers" \
  -output bindings/swift/RoostFFI.xcframework
# The package compiles only the generated Swift file; the C module comes from the framework.
rm -rf bindings/swift/Sources/RoostFFI
echo "built bindings/swift/RoostFFI.xcframework; the package is bindings/swift/Package.swift"
