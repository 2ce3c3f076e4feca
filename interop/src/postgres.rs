//! A throwaway PostgreSQL cluster for tests, the harness and the bench: `initdb` into a
//! directory of its own, a free port on 127.0.0.1, trust authentication for the user `roost`,
//! stopped (and its directory removed, if it made it) when dropped.
//!
//! The server binaries come from the installed PostgreSQL (`pg_config --bindir`, else `initdb`
//! on PATH, else the newest `/usr/lib/postgresql/*/bin`). PostgreSQL refuses to run as root,
//! so when invoked as root the cluster runs as the unprivileged user `postgres`.
//! Durability settings are PostgreSQL's defaults (fsync and synchronous_commit on): what runs
//! on it may be tested for crash behaviour and benchmarked.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, bail};

/// What to install when the binaries are missing.
pub const PACKAGE_HINT: &str = "PostgreSQL server binaries not found: install the Debian package postgresql-15 \
     (apt-get install postgresql-15), or put initdb and pg_ctl on PATH";

/// The user tests connect as.
pub const USER: &str = "roost";

/// A running cluster. See the module docs.
pub struct Cluster {
    bindir: PathBuf,
    dir: PathBuf,
    port: u16,
    as_user: Option<String>,
    _temp: Option<tempfile::TempDir>,
    stopped: bool,
}

fn bindir() -> anyhow::Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").exists() && dir.join("pg_ctl").exists() {
                return Ok(dir);
            }
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|bin| bin.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().context(PACKAGE_HINT)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

impl Cluster {
    /// Starts a cluster in a new temporary directory.
    pub fn start() -> anyhow::Result<Self> {
        let temp = tempfile::Builder::new().prefix("roost-pg").tempdir()?;
        let dir = temp.path().to_owned();
        let mut cluster = Self::start_in(&dir)?;
        cluster._temp = Some(temp);
        Ok(cluster)
    }

    /// Starts a cluster whose files live in `dir` (created by `initdb` on first use, reused
    /// after).
    pub fn start_in(dir: &Path) -> anyhow::Result<Self> {
        let bindir = bindir()?;
        std::fs::create_dir_all(dir)?;
        let as_user = is_root().then(|| "postgres".to_owned());
        if let Some(user) = &as_user {
            // The unprivileged user needs to reach and own the directory.
            let status = Command::new("chown")
                .args(["-R", user])
                .arg(dir)
                .status()
                .context("chown")?;
            if !status.success() {
                bail!("cannot hand {} to the user {user}", dir.display());
            }
            let reachable = Command::new("runuser")
                .args(["-u", user, "--", "test", "-w"])
                .arg(dir)
                .status()
                .is_ok_and(|s| s.success());
            if !reachable {
                bail!(
                    "PostgreSQL runs as the user {user}, which cannot reach {}: use a directory \
                     whose parents it may enter (e.g. under /tmp), or make them searchable",
                    dir.display()
                );
            }
        }
        let cluster = Self {
            bindir,
            dir: dir.to_owned(),
            port: free_port()?,
            as_user,
            _temp: None,
            stopped: false,
        };
        if !cluster.data().join("PG_VERSION").exists() {
            let data = cluster.data();
            cluster
                .run("initdb", |c| {
                    c.arg("-D").arg(&data).args([
                        "-A",
                        "trust",
                        "-U",
                        USER,
                        "-E",
                        "UTF8",
                        "--no-locale",
                    ]);
                })
                .context("initdb")?;
        }
        let (data, log, sockets) = (cluster.data(), cluster.dir.join("log"), cluster.dir.clone());
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300",
            cluster.port,
            sockets.display()
        );
        cluster
            .run("pg_ctl", |c| {
                c.arg("-D")
                    .arg(&data)
                    .arg("-o")
                    .arg(&options)
                    .arg("-l")
                    .arg(&log)
                    .args(["-w", "-t", "60", "start"]);
            })
            .with_context(|| {
                format!(
                    "pg_ctl start ({})",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })?;
        Ok(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("pg")
    }

    fn run(&self, tool: &str, args: impl FnOnce(&mut Command)) -> anyhow::Result<Output> {
        let program = self.bindir.join(tool);
        let mut command = match &self.as_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        args(&mut command);
        let out = command
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", program.display()))?;
        if !out.status.success() {
            bail!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The connection string of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgresql://{USER}@127.0.0.1:{}/{name}?connect_timeout=10",
            self.port
        )
    }

    /// Creates database `name` and returns its connection string.
    pub fn create_database(&self, name: &str) -> anyhow::Result<String> {
        let port = self.port.to_string();
        self.run("createdb", |c| {
            c.args(["-h", "127.0.0.1", "-p", &port, "-U", USER, name]);
        })
        .with_context(|| format!("createdb {name}"))?;
        Ok(self.url(name))
    }

    /// Runs SQL as the superuser (psql), returning its output.
    pub fn psql(&self, database: &str, sql: &str) -> anyhow::Result<String> {
        let port = self.port.to_string();
        let out = self.run("psql", |c| {
            c.args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                USER,
                "-d",
                database,
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ]);
        })?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops the server at once (as a crash would: `immediate` mode, no checkpoint).
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.stop_mode("immediate")
    }

    /// Starts the server again on the same port and files (after [`Cluster::kill`]).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let (data, log) = (self.data(), self.dir.join("log"));
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300",
            self.port,
            self.dir.display()
        );
        self.run("pg_ctl", |c| {
            c.arg("-D")
                .arg(&data)
                .arg("-o")
                .arg(&options)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "start"]);
        })?;
        self.stopped = false;
        Ok(())
    }

    fn stop_mode(&mut self, mode: &str) -> anyhow::Result<()> {
        if self.stopped {
            return Ok(());
        }
        let data = self.data();
        self.run("pg_ctl", |c| {
            c.arg("-D")
                .arg(&data)
                .args(["-m", mode, "-w", "-t", "30", "stop"]);
        })?;
        self.stopped = true;
        Ok(())
    }

    /// Stops the server cleanly.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.stop_mode("fast")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(err) = self.stop_mode("immediate") {
            eprintln!("stopping PostgreSQL in {}: {err:#}", self.dir.display());
        }
    }
}
