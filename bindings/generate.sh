#!/usr/bin/env bash
# Generates the Kotlin and Swift sources of roost-ffi from the built library:
#   bindings/kotlin/roost/src/main/kotlin/roost/roost.kt
#   bindings/swift/Sources/Roost/Roost.swift, bindings/swift/Sources/RoostFFI/include/{RoostFFI.h,module.modulemap}
# Usage: bindings/generate.sh [--release]   (the library is built for the host; the sources
# are the same for every target). Python needs no step: maturin generates it (docs/BINDINGS.md).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=debug
cargo_args=()
if [ "${1:-}" = "--release" ]; then
  profile=release
  cargo_args=(--release)
fi
cargo build "${cargo_args[@]}" -p roost-ffi --lib --bin uniffi-bindgen
case "$(uname -s)" in
  Darwin) library="target/$profile/libroost_ffi.dylib" ;;
  *) library="target/$profile/libroost_ffi.so" ;;
esac
bindgen="target/$profile/uniffi-bindgen"

kotlin_out=bindings/kotlin/roost/src/main/kotlin
"$bindgen" generate --library "$library" --language kotlin --no-format --out-dir "$kotlin_out"

swift_tmp=$(mktemp -d)
trap 'rm -rf "$swift_tmp"' EXIT
"$bindgen" generate --library "$library" --language swift --no-format --out-dir "$swift_tmp"
mkdir -p bindings/swift/Sources/Roost bindings/swift/Sources/RoostFFI/include
cp "$swift_tmp/Roost.swift" bindings/swift/Sources/Roost/Roost.swift
cp "$swift_tmp/RoostFFI.h" bindings/swift/Sources/RoostFFI/include/RoostFFI.h
# SwiftPM and XCFramework headers expect the module map under this name.
cp "$swift_tmp/RoostFFI.modulemap" bindings/swift/Sources/RoostFFI/include/module.modulemap
echo "generated: $kotlin_out/roost/roost.kt, bindings/swift/Sources/{Roost,RoostFFI}"
