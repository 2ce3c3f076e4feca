//! Finding the `roost` homeserver binary.
//!
//! `CARGO_BIN_EXE_roost` exists only for roost-server's own tests, so the harness builds the
//! binary itself: `cargo build -p roost-server --bin roost` in this workspace, with the same
//! cargo profile as the running program (the directory it runs from: `target/debug` → dev,
//! `target/release` → release, `target/<name>` → `--profile <name>`), or release when asked
//! (benchmarks). Cargo's JSON messages name the executable it produced, so the target
//! directory (`CARGO_TARGET_DIR`, `--target`) does not have to be guessed. Cargo is the
//! program in `$CARGO` (set when running under cargo), else `cargo` from `PATH`. When the
//! build is already up to date this takes well under a second.
//!
//! Callers may instead pass an explicit path (the CLI's `--roost`, the `ROOST_BIN`
//! environment variable that the binary and the tests read).

use std::io::{BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The longest a build of the homeserver may take (a cold release build on two cores).
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The cargo profile to build the homeserver with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    /// `dev` (target/debug).
    Dev,
    /// `release` (target/release).
    Release,
    /// Any other named profile.
    Named(String),
}

impl Profile {
    /// The profile the running executable was built with, from the directory it lives in
    /// (`<target>/<profile dir>/` or `<target>/<profile dir>/deps/` for test binaries).
    pub fn of_current_exe() -> Self {
        let dir_name = std::env::current_exe().ok().and_then(|exe| {
            let mut dir = exe.parent()?.to_owned();
            if dir
                .file_name()
                .is_some_and(|n| n == "deps" || n == "examples")
            {
                dir = dir.parent()?.to_owned();
            }
            dir.file_name().map(|n| n.to_string_lossy().into_owned())
        });
        match dir_name.as_deref() {
            Some("debug") => Profile::Dev,
            Some("release") => Profile::Release,
            Some(name) if !name.is_empty() && !name.contains(['/', ' ']) && name != "deps" => {
                Profile::Named(name.to_owned())
            }
            _ if cfg!(debug_assertions) => Profile::Dev,
            _ => Profile::Release,
        }
    }

    fn cargo_args(&self) -> Vec<String> {
        match self {
            Profile::Dev => vec![],
            Profile::Release => vec!["--release".into()],
            Profile::Named(name) => vec!["--profile".into(), name.clone()],
        }
    }
}

/// The workspace this crate belongs to (where `cargo build -p roost-server` works).
pub fn workspace_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map_or_else(|| manifest.to_owned(), Path::to_owned)
}

/// Builds the `roost` binary with `profile` (waiting for cargo's lock if another build holds
/// it) and returns its path.
pub fn build_roost(profile: &Profile) -> anyhow::Result<PathBuf> {
    build_binary("roost-server", "roost", profile)
}

/// Builds the `roost-cli` binary with `profile` and returns its path.
pub fn build_cli(profile: &Profile) -> anyhow::Result<PathBuf> {
    build_binary("roost-cli", "roost-cli", profile)
}

/// This program, `roost-interop` (the bench runs its hidden `bench-quinn-server` in a process of
/// its own): the running executable if it is that binary, else built with cargo in the
/// running executable's profile (tests link the library, not the binary).
pub fn locate_interop() -> anyhow::Result<PathBuf> {
    if let Ok(exe) = std::env::current_exe()
        && exe.file_stem().is_some_and(|stem| stem == "roost-interop")
    {
        return Ok(exe);
    }
    build_binary("roost-interop", "roost-interop", &Profile::of_current_exe())
}

/// Builds binary `bin` of workspace package `package` with `profile` and returns its path.
fn build_binary(package: &str, bin: &str, profile: &Profile) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .current_dir(workspace_dir())
        .args([
            "build",
            "-p",
            package,
            "--bin",
            bin,
            "--message-format=json",
        ])
        .args(profile.cargo_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run {}", Path::new(&cargo).display()))?;
    let stdout = child.stdout.take().context("no cargo stdout")?;
    let mut stderr = child.stderr.take().context("no cargo stderr")?;
    let name = bin.to_owned();
    let reader =
        std::thread::spawn(move || executable_from_messages(BufReader::new(stdout), &name));
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + BUILD_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("building {bin} took longer than {BUILD_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let executable = reader
        .join()
        .map_err(|_| anyhow::anyhow!("cargo output reader failed"))?;
    let errors = errors.join().unwrap_or_default();
    if !status.success() {
        bail!("cargo build -p {package} --bin {bin} failed ({status}):\n{errors}");
    }
    match executable {
        Some(path) if path.is_file() => Ok(path),
        _ => bail!("cargo did not report the {bin} executable:\n{errors}"),
    }
}

/// The `executable` of the binary artifact `bin` in cargo's JSON messages.
fn executable_from_messages(reader: impl std::io::BufRead, bin: &str) -> Option<PathBuf> {
    let mut found = None;
    // One line per message; a build of one binary prints a few hundred.
    for line in reader.lines().take(100_000) {
        let Ok(line) = line else { break };
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let is_it = message["reason"] == "compiler-artifact"
            && message["target"]["name"] == bin
            && message["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == "bin"));
        if let (true, Some(path)) = (is_it, message["executable"].as_str()) {
            found = Some(PathBuf::from(path));
        }
    }
    found
}

/// An explicit binary if given (checked to exist), else [`build_roost`] with `profile`.
pub fn locate_roost(explicit: Option<&Path>, profile: &Profile) -> anyhow::Result<PathBuf> {
    match explicit {
        Some(path) if path.is_file() => Ok(path.to_owned()),
        Some(path) => bail!("no roost binary at {}", path.display()),
        None => build_roost(profile),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_executable_is_read_from_cargo_messages() {
        let messages = concat!(
            "{\"reason\":\"compiler-artifact\",\"target\":{\"name\":\"roost_server\",\"kind\":[\"lib\"]},\"executable\":null}\n",
            "not json\n",
            "{\"reason\":\"compiler-artifact\",\"target\":{\"name\":\"roost\",\"kind\":[\"bin\"]},\"executable\":\"/t/debug/roost\"}\n",
            "{\"reason\":\"build-finished\",\"success\":true}\n",
        );
        assert_eq!(
            executable_from_messages(messages.as_bytes(), "roost"),
            Some(PathBuf::from("/t/debug/roost"))
        );
        assert_eq!(executable_from_messages(&b"{}\n"[..], "roost"), None);
        assert_eq!(executable_from_messages(messages.as_bytes(), "other"), None);
    }

    #[test]
    fn profiles_map_to_cargo_flags() {
        assert!(Profile::Dev.cargo_args().is_empty());
        assert_eq!(Profile::Release.cargo_args(), vec!["--release"]);
        assert_eq!(
            Profile::Named("bench".into()).cargo_args(),
            vec!["--profile", "bench"]
        );
        // Unit tests run from target/<profile>/deps: the profile is the directory above.
        assert_ne!(Profile::of_current_exe(), Profile::Named("deps".into()));
    }
}
