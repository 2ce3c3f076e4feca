//! The Kotlin and Swift sources come out of the built library with the documented command
//! (bindings/generate.sh runs the same `uniffi-bindgen generate`), and the SDK's async calls
//! are async there: `suspend` functions in Kotlin, `async throws` in Swift.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The cdylib next to the bindgen binary. `cargo test` builds the library only as the rlib
/// the tests link, so the cdylib is built here (same profile): on a fresh checkout it is
/// missing, and after a change it would be stale (an incremental no-op when it is current).
fn library(bindgen: &Path) -> PathBuf {
    let profile_dir = bindgen.parent().expect("the bin has a directory");
    let name = if cfg!(target_os = "macos") {
        "libroost_ffi.dylib"
    } else {
        "libroost_ffi.so"
    };
    let mut build = Command::new(env!("CARGO"));
    build.args(["build", "-p", "roost-ffi", "--lib"]);
    // Without the variables cargo sets for this test (package name, manifest dir, ...): build
    // scripts that watch them (ring's) would see a change and rerun, here and again in the
    // next ordinary build.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let set_for_tests = [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|prefix| key.starts_with(prefix))
            || ["CARGO_TARGET_TMPDIR", "CARGO_PRIMARY_PACKAGE", "OUT_DIR"].contains(&&*key);
        if set_for_tests {
            build.env_remove(&*key);
        }
    }
    if profile_dir.file_name().is_some_and(|d| d == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "building the roost-ffi cdylib failed");
    profile_dir.join(name)
}

fn generate(language: &str, out: &Path) {
    let bindgen = Path::new(env!("CARGO_BIN_EXE_uniffi-bindgen"));
    let output = Command::new(bindgen)
        // The crate's uniffi.toml (module and package names) is found through the library.
        .args(["generate", "--no-format", "--language", language])
        .arg("--library")
        .arg(library(bindgen))
        .arg("--out-dir")
        .arg(out)
        .output()
        .expect("uniffi-bindgen runs");
    assert!(
        output.status.success(),
        "uniffi-bindgen {language}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn out_dir(language: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "roost-ffi-generate-{language}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn kotlin_sources_have_suspend_functions_in_the_configured_package() {
    let dir = out_dir("kotlin");
    generate("kotlin", &dir);
    let source = std::fs::read_to_string(dir.join("roost/roost.kt")).expect("roost.kt");
    assert!(source.contains("package roost"));
    assert!(
        source.contains("suspend fun `register`("),
        "register is not suspend"
    );
    assert!(
        source.contains("suspend fun `sendText`("),
        "sendText is not suspend"
    );
    assert!(
        source.contains("suspend fun `nextEvent`("),
        "nextEvent is not suspend"
    );
    assert!(source.contains("interface EventListener"));
    for call in ["sendFile", "download", "registerPush", "pushInfo"] {
        assert!(
            source.contains(&format!("suspend fun `{call}`(")),
            "{call} is not suspend"
        );
    }
    assert!(source.contains("interface ProgressListener"));
    assert!(source.contains("\"roost_ffi\""), "loads another library");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn swift_sources_have_async_functions_and_the_ffi_module() {
    let dir = out_dir("swift");
    generate("swift", &dir);
    let source = std::fs::read_to_string(dir.join("Roost.swift")).expect("Roost.swift");
    assert!(source.contains("import RoostFFI"));
    assert!(source.contains("func sendText(group: String, text: String)async throws"));
    assert!(source.contains("func register(server: ServerConfig"));
    assert!(source.contains(
        "func sendFile(group: String, path: String, progress: ProgressListener? = nil)async throws"
    ));
    assert!(source.contains("func download(attachment: Attachment, destination: String"));
    assert!(source.contains("func registerPush(target: PushTarget)async throws"));
    assert!(source.contains("public protocol ProgressListener"));
    let header = std::fs::read_to_string(dir.join("RoostFFI.h")).expect("RoostFFI.h");
    assert!(header.contains("uniffi_roost_ffi_fn_func_register"));
    let modulemap = std::fs::read_to_string(dir.join("RoostFFI.modulemap")).expect("modulemap");
    assert!(modulemap.contains("module RoostFFI"));
    let _ = std::fs::remove_dir_all(&dir);
}
