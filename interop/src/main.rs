//! `roost-interop`: start local federating homeservers (`up`), run the federation scenario
//! suite (`run`), a short demo (`demo`), the load generator (`bench`) or the kill -9 test
//! (`chaos`).
//!
//! The `roost` binary is `--roost PATH` (or `$ROOST_BIN`); without it, it is built with
//! `cargo build -p roost-server --bin roost` in the same profile as this program (see
//! `roost_interop::binary`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use roost_interop::binary::{Profile, locate_roost};
use roost_interop::harness::{Harness, HarnessConfig, Storage};
use roost_interop::scenarios::{self, Topology};

#[derive(Parser)]
#[command(
    name = "roost-interop",
    version,
    about = "Local federating roost homeservers: start them, run the scenario suite, or a demo"
)]
struct Cli {
    /// The roost homeserver binary (default: build it with cargo).
    #[arg(long, env = "ROOST_BIN", global = true)]
    roost: Option<PathBuf>,
    /// Build the homeserver in release mode (when --roost is not given).
    #[arg(long, global = true)]
    release: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start N homeservers (alpha.test, beta.test, ...), write DIR/servers.json and run until
    /// Ctrl-C (or SIGTERM), which stops them.
    Up {
        /// How many homeservers.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
        servers: u16,
        /// Directory for the CA, configurations, data and logs.
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        topology: TopologyArgs,
    },
    /// Run the scenario suite against fresh homeservers; prints one line per scenario and
    /// `N passed, M failed`. Exits non-zero if any failed.
    Run {
        /// Run only this scenario.
        #[arg(long)]
        scenario: Option<String>,
        /// List the scenarios and exit.
        #[arg(long)]
        list: bool,
        #[command(flatten)]
        topology: TopologyArgs,
    },
    /// Two homeservers, two users, a short conversation printed as it happens.
    Demo,
    /// Load generator: starts two release homeservers, runs the workloads and prints a table
    /// (or JSON lines) of results beside same-run baselines. See docs/BENCHMARKS.md.
    Bench(BenchArgs),
    /// Kill -9 and restart homeservers at random while clients send numbered messages and
    /// commit membership changes; then check every acknowledged message arrived exactly once,
    /// in order, nothing phantom, every server reopened, every member can still send. Exits
    /// non-zero when a check fails. See docs/RELIABILITY.md.
    Chaos(ChaosArgs),
    /// A bare quinn server for the bench's same-run baselines (idle connections, echo
    /// instructions, fan-out pushes with --fanout): writes its certificate to --cert-out,
    /// prints its address, answers every request stream with a --response-len frame and exits
    /// when stdin closes.
    #[command(hide = true)]
    BenchQuinnServer {
        /// Bytes of each response frame's body.
        #[arg(long, default_value_t = 50)]
        response_len: usize,
        /// Where to write the server's certificate (DER).
        #[arg(long)]
        cert_out: PathBuf,
        /// Serve the fan-out baseline's listen and broadcast requests instead of echoes.
        #[arg(long)]
        fanout: bool,
    },
}

#[derive(clap::Args)]
struct ChaosArgs {
    /// Kill cycles (each: SIGKILL one homeserver process, restart it, wait until it answers).
    #[arg(long, default_value_t = 200)]
    cycles: usize,
    /// Sending members (one more, the rover, is removed and re-added by membership commits).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(2..=64))]
    clients: u16,
    /// Seed of the kill schedule (default: random, printed in the report).
    #[arg(long)]
    seed: Option<u64>,
    /// Domains: 1, or 2 (federation; the hub is also killed while draining to the other).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=2))]
    domains: u16,
    /// Longest time between kills (ms); each wait is random between a seventh of it and it.
    #[arg(long, default_value_t = 2_000)]
    max_up_ms: u64,
    /// Longest time a killed server stays down (ms).
    #[arg(long, default_value_t = 500)]
    max_down_ms: u64,
    /// The report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Directory for the servers' data and logs and the profiles (default: temporary, kept
    /// when the run fails).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long)]
    no_progress: bool,
    /// `RUST_LOG` filter of the homeservers (their logs are kept in the directory's
    /// `servers/<domain>/roost.log`), e.g. `roost_server=debug`.
    #[arg(long, default_value = "info")]
    server_log: String,
    /// Members run as `roost-cli --json chat` processes and killed with SIGKILL at random
    /// (on top of --clients), each restarted on its profile a little later.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=16))]
    killed_clients: u16,
    /// The `roost-cli` binary for --killed-clients (default: built like the homeserver).
    #[arg(long, env = "ROOST_CLI_BIN")]
    roost_cli: Option<PathBuf>,
    /// Longest time a killed member's process lives before its kill (ms); each is random
    /// between a tenth of it and it.
    #[arg(long, default_value_t = 3_000)]
    max_client_up_ms: u64,
    /// The chance (0 to 1) that a killed member types `/update` (a self-update commit of its
    /// keys) instead of its next message.
    #[arg(long, default_value_t = 0.1)]
    killed_client_updates: f64,
    /// The chance (0 to 1) that a killed member types `/invite ROVER` or `/remove ROVER`
    /// (half each; the rover m0 also removes and invites back) instead of its next message.
    #[arg(long, default_value_t = 0.05)]
    killed_client_membership: f64,
    /// With --backend postgres: the chance (0 to 1) that a cycle kills the PostgreSQL server
    /// (immediate stop, as a crash) instead of a homeserver; the homeservers must recover by
    /// themselves once it is back.
    #[arg(long, default_value_t = 0.1)]
    database_kills: f64,
    /// The chance (0 to 1) that a member sends its next message as an attachment (a file of
    /// up to 200 kB whose bytes follow from its number; in-process members download every
    /// attachment they receive and compare it byte for byte). 0: text only.
    #[arg(long, default_value_t = 0.02)]
    files: f64,
    #[command(flatten)]
    topology: TopologyArgs,
}

/// Where the servers keep their data, and how many nodes each domain runs.
#[derive(clap::Args, Clone, Copy)]
struct TopologyArgs {
    /// Storage engine of every homeserver: `redb` or `postgres` (a PostgreSQL cluster started
    /// in the directory, on a free port, a database per domain).
    #[arg(long, default_value = "redb")]
    backend: Storage,
    /// Nodes per domain (several need --backend postgres).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=8))]
    nodes: u16,
}

impl TopologyArgs {
    fn topology(self) -> anyhow::Result<Topology> {
        if self.nodes > 1 && self.backend != Storage::Postgres {
            anyhow::bail!("--nodes {} needs --backend postgres", self.nodes);
        }
        Ok(Topology {
            storage: self.backend,
            nodes: usize::from(self.nodes),
        })
    }
}

#[derive(clap::Args)]
struct BenchArgs {
    /// One JSON object per line per result on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Run only these workloads (repeatable): keypackages, send-1to1, federated-send,
    /// busy-group, blob, idle-connections, commit, fanout, join-large, reconnect-storm,
    /// cold-start; and, only when named, instructions (the homeserver under valgrind's
    /// callgrind).
    #[arg(long = "workload")]
    workloads: Vec<String>,
    /// Concurrent pairs of send-1to1 and federated-send.
    #[arg(long, default_value_t = 100)]
    pairs: usize,
    /// Seconds each send phase runs.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Fanout group sizes (members, the sender included).
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000,10000")]
    members: Vec<usize>,
    /// Messages per fanout group size.
    #[arg(long, default_value_t = 10)]
    fanout_rounds: usize,
    /// Plaintext bytes of each fanout message (at least 6).
    #[arg(long, default_value_t = 6)]
    fanout_message_bytes: usize,
    /// Commit workload group sizes.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    commit_sizes: Vec<usize>,
    /// Commits per commit-workload group size.
    #[arg(long, default_value_t = 20)]
    commits: usize,
    /// Clients whose KeyPackages are claimed, and KeyPackages each (≤ 1000).
    #[arg(long, default_value_t = 20)]
    kp_targets: usize,
    #[arg(long, default_value_t = 1000)]
    kp_per_target: usize,
    /// Concurrent claiming clients.
    #[arg(long, default_value_t = 32)]
    claimers: usize,
    /// Idle listening connections (also the clients of reconnect-storm).
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// Members of busy-group, all sending into one group at once.
    #[arg(long, default_value_t = 50)]
    busy_members: usize,
    /// Members of the group join-large adds one to.
    #[arg(long, default_value_t = 10_000)]
    join_members: usize,
    /// Groups in cold-start's database.
    #[arg(long, default_value_t = 10_000)]
    cold_groups: usize,
    /// Queued messages (queue entries) in cold-start's database, at least.
    #[arg(long, default_value_t = 1_000_000)]
    cold_queued: usize,
    /// Blobs of 1 KiB in cold-start's blob store.
    #[arg(long, default_value_t = 20_000)]
    cold_blobs: usize,
    /// Messages (and echo requests) counted by the instructions workload.
    #[arg(long, default_value_t = 2_000)]
    callgrind_messages: usize,
    /// Pairs (and echo connections) of the instructions workload.
    #[arg(long, default_value_t = 10)]
    callgrind_pairs: usize,
    /// Size of the large blobs of `blob`, MiB.
    #[arg(long, default_value_t = 64)]
    blob_mib: usize,
    /// Concurrent large uploads of `blob`.
    #[arg(long, default_value_t = 16)]
    blob_concurrent: usize,
    /// Directory for the servers' data and logs (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    #[command(flatten)]
    topology: TopologyArgs,
}

fn bench(roost: Option<PathBuf>, args: BenchArgs) -> anyhow::Result<ExitCode> {
    use roost_interop::bench;
    let topology = args.topology.topology()?;
    let config = bench::BenchConfig {
        storage: topology.storage,
        nodes: topology.nodes,
        roost,
        workloads: args.workloads,
        pairs: args.pairs,
        duration: std::time::Duration::from_secs_f64(args.duration.clamp(0.1, 600.0)),
        members: args.members,
        fanout_rounds: args.fanout_rounds,
        fanout_message_bytes: args.fanout_message_bytes,
        commit_sizes: args.commit_sizes,
        commits: args.commits,
        kp_targets: args.kp_targets,
        kp_per_target: args.kp_per_target,
        claimers: args.claimers,
        idle: args.idle,
        busy_members: args.busy_members,
        join_members: args.join_members,
        cold_groups: args.cold_groups,
        cold_queued: args.cold_queued,
        cold_blobs: args.cold_blobs,
        callgrind_messages: args.callgrind_messages,
        callgrind_pairs: args.callgrind_pairs,
        blob_large: args.blob_mib.max(1) << 20,
        blob_concurrent: args.blob_concurrent,
        progress: !args.no_progress,
        dir: args.dir,
    };
    let results = bench::run(config)?;
    let mut stdout = std::io::stdout();
    if args.json {
        bench::print_json(&results, &mut stdout)?;
    } else {
        bench::print_table(&results, &mut stdout)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The SDK clients' own logs (e.g. RUST_LOG=roost_client=debug), on stderr; none without
    // RUST_LOG.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init();
    }
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("roost-interop: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Bench(args) = cli.command {
        return bench(cli.roost, args);
    }
    if let Command::BenchQuinnServer {
        response_len,
        cert_out,
        fanout,
    } = &cli.command
    {
        roost_interop::bench::quinn::serve(*response_len, cert_out, *fanout)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Run { list: true, .. } = cli.command {
        for scenario in scenarios::SCENARIOS {
            let needs = if scenario.min_nodes > 1 {
                format!(" [--backend postgres --nodes {}]", scenario.min_nodes)
            } else {
                String::new()
            };
            println!("{:<20} {}{needs}", scenario.name, scenario.about);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let profile = if cli.release {
        Profile::Release
    } else {
        Profile::of_current_exe()
    };
    let roost = locate_roost(cli.roost.as_deref(), &profile)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Up {
                servers,
                dir,
                topology,
            } => up(roost, usize::from(servers), dir, topology.topology()?).await,
            Command::Run {
                scenario, topology, ..
            } => {
                let mut stdout = std::io::stdout();
                let outcomes = scenarios::run_suite(
                    &roost,
                    scenario.as_deref(),
                    topology.topology()?,
                    &mut stdout,
                )
                .await?;
                Ok(if outcomes.iter().all(|o| o.passed) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Command::Demo => {
                roost_interop::demo::run(&roost, &mut std::io::stdout()).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Bench(_) | Command::BenchQuinnServer { .. } => Ok(ExitCode::SUCCESS),
            Command::Chaos(args) => chaos(roost, args).await,
        }
    })
}

/// `value` if it is a chance (0 to 1), else an error naming `flag`.
fn chance(value: f64, flag: &str) -> anyhow::Result<f64> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&value),
        "{flag} is a chance between 0 and 1"
    );
    Ok(value)
}

async fn chaos(roost: PathBuf, args: ChaosArgs) -> anyhow::Result<ExitCode> {
    use roost_interop::chaos::{self, ChaosConfig};
    use std::time::Duration;
    let topology = args.topology.topology()?;
    let mut config = ChaosConfig::new(roost);
    config.cycles = args.cycles;
    config.clients = usize::from(args.clients);
    if let Some(seed) = args.seed {
        config.seed = seed;
    }
    config.domains = usize::from(args.domains);
    config.storage = topology.storage;
    config.nodes = topology.nodes;
    config.up = (
        Duration::from_millis(args.max_up_ms / 7),
        Duration::from_millis(args.max_up_ms),
    );
    config.down = (Duration::ZERO, Duration::from_millis(args.max_down_ms));
    config.dir = args.dir;
    config.progress = !args.no_progress;
    config.server_log = args.server_log;
    config.killed_clients = usize::from(args.killed_clients);
    config.roost_cli = args.roost_cli;
    config.client_up = (
        Duration::from_millis(args.max_client_up_ms / 10),
        Duration::from_millis(args.max_client_up_ms),
    );
    config.client_updates = chance(args.killed_client_updates, "--killed-client-updates")?;
    config.client_membership = chance(args.killed_client_membership, "--killed-client-membership")?;
    config.database_kills = chance(args.database_kills, "--database-kills")?;
    config.files = chance(args.files, "--files")?;
    let report = chaos::run(config).await?;
    let mut stdout = std::io::stdout();
    if args.json {
        serde_json::to_writer(&mut stdout, &report)?;
        println!();
    } else {
        report.write_text(&mut stdout)?;
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn up(
    roost: PathBuf,
    count: usize,
    dir: PathBuf,
    topology: Topology,
) -> anyhow::Result<ExitCode> {
    let dir =
        std::path::absolute(&dir).with_context(|| format!("bad directory {}", dir.display()))?;
    let mut config = HarnessConfig::new(roost, &dir, count);
    config.storage = topology.storage;
    config.nodes = topology.nodes;
    // A person's servers retry federation like production ones (up to 30 s).
    config.retry_max_ms = 30_000;
    let harness = Harness::start(config).await?;
    let file = harness.write_servers_json()?;
    for index in 0..harness.servers().len() {
        for server in harness.nodes(index)? {
            println!(
                "{:<14} node {} {}  data {}  log {}",
                server.domain,
                server.node,
                server.addr,
                server.data_dir.display(),
                server.log_file.display()
            );
        }
    }
    if let Some(cluster) = harness.cluster() {
        println!("PostgreSQL: 127.0.0.1:{} (user roost)", cluster.port());
    }
    println!("CA certificate: {}", harness.ca_file().display());
    println!("servers: {}", file.display());
    println!(
        "users are name@<domain>; clients trust the CA certificate (or pin a server's cert.pem)"
    );
    println!("Ctrl-C stops the servers");
    wait_for_signal().await?;
    println!("stopping");
    harness.shutdown().await?;
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = term.recv() => {}
    }
    Ok(())
}
