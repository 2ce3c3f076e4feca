// swift-tools-version:5.9
// The Swift package of the roost client SDK. Before building it, run
//   bindings/swift/build-xcframework.sh
// on a Mac with Xcode: it builds roost-ffi for iOS, the iOS simulator and macOS, packs the
// static libraries and the C header into RoostFFI.xcframework, and generates
// Sources/Roost/Roost.swift (docs/BINDINGS.md).
import PackageDescription

let package = Package(
    name: "Roost",
    platforms: [.iOS(.v15), .macOS(.v12)],
    products: [
        .library(name: "Roost", targets: ["Roost"]),
    ],
    targets: [
        // The Rust library and its C header (module RoostFFI).
        .binaryTarget(name: "RoostFFI", path: "RoostFFI.xcframework"),
        // The generated Swift API over it.
        .target(name: "Roost", dependencies: ["RoostFFI"], path: "Sources/Roost"),
    ]
)
