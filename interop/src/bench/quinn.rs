//! A bare quinn server in a process of its own: the same-run baseline of what quinn alone
//! costs per idle connection (its RSS is read from `/proc` like a homeserver's) and per echo
//! request (counted with callgrind like a homeserver's instructions).
//!
//! The process is this program's hidden `roost-interop bench-quinn-server` subcommand
//! ([`serve`]): a [`bare_endpoint`] answering every request stream with a fixed-size frame and
//! holding every connection until its peer closes it (with `--fanout`, the fan-out baseline's
//! listen and broadcast requests instead: [`super::baseline::fanout_accept_loop`]). It writes
//! its certificate to a file, prints its address on stdout and exits when its stdin closes (so
//! it never outlives the bench).

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use roost_client::transport::{ConnectConfig, TrustConfig};
use rustls::pki_types::CertificateDer;

use super::baseline::{ECHO_NAME, accept_loop, bare_endpoint, fanout_accept_loop};

/// How long the child may take to print its address (longer under valgrind).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long it may take to exit once its stdin closed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the bare server until stdin closes: writes the certificate (DER) to `cert_out`, then
/// prints the address on stdout. The body of `roost-interop bench-quinn-server`.
pub fn serve(response_len: usize, cert_out: &Path, fanout: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (endpoint, cert) = bare_endpoint()?;
        std::fs::write(cert_out, cert.as_ref())
            .with_context(|| format!("cannot write {}", cert_out.display()))?;
        println!("{}", endpoint.local_addr()?);
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        });
        let serving = async {
            if fanout {
                fanout_accept_loop(endpoint.clone()).await;
            } else {
                accept_loop(endpoint.clone(), response_len).await;
            }
        };
        tokio::select! {
            _ = stdin_closed => {}
            () = serving => {}
        }
        endpoint.close(quinn::VarInt::from_u32(0), b"done");
        Ok(())
    })
}

/// A running `bench-quinn-server` process.
pub struct QuinnProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    addr: SocketAddr,
    cert: CertificateDer<'static>,
}

impl QuinnProcess {
    /// Starts `exe bench-quinn-server` (with `wrapper` before it, e.g. valgrind's command
    /// line), its certificate in `dir`, answering with `response_len`-byte frames.
    pub fn spawn(
        exe: &Path,
        wrapper: &[String],
        dir: &Path,
        response_len: usize,
    ) -> anyhow::Result<Self> {
        Self::spawn_with(exe, wrapper, dir, response_len, false)
    }

    /// Starts it as the fan-out baseline's server ([`fanout_accept_loop`]).
    pub fn spawn_fanout(exe: &Path, dir: &Path) -> anyhow::Result<Self> {
        Self::spawn_with(exe, &[], dir, 0, true)
    }

    fn spawn_with(
        exe: &Path,
        wrapper: &[String],
        dir: &Path,
        response_len: usize,
        fanout: bool,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let cert_file: PathBuf = dir.join(format!("quinn-{}.der", std::process::id()));
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(exe);
                command
            }
            None => Command::new(exe),
        };
        command
            .arg("bench-quinn-server")
            .arg("--response-len")
            .arg(response_len.to_string())
            .arg("--cert-out")
            .arg(&cert_file)
            .args(fanout.then_some("--fanout"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("bench-quinn-server did not start within {START_TIMEOUT:?}");
            }
        };
        let addr: SocketAddr = match line.trim().parse() {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait()?;
                bail!("bench-quinn-server printed {line:?} ({status})");
            }
        };
        let cert = CertificateDer::from(std::fs::read(&cert_file)?);
        let _ = std::fs::remove_file(&cert_file);
        Ok(Self {
            child,
            stdin,
            addr,
            cert,
        })
    }

    /// How the bench's transport reaches it.
    pub fn connect_config(&self) -> ConnectConfig {
        let trust = TrustConfig::PinnedCertificates(vec![self.cert.clone()]);
        ConnectConfig::new(self.addr, ECHO_NAME, trust)
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        Some(self.child.id())
    }

    /// Closes its stdin and waits for it to exit (killing it after a while).
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        self.child.wait()?;
        bail!("bench-quinn-server did not exit within {STOP_TIMEOUT:?}")
    }
}

impl Drop for QuinnProcess {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.shutdown();
        }
    }
}
