//! Reaching the homeserver and opening the profile: address resolution, the SDK
//! configuration of a command-line client, a quick handshake that turns "unreachable" and
//! "bad certificate" into clear errors before anything else, and [`Session`], an opened
//! profile with its SDK [`Client`].

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use roost_client::transport::{ConnectConfig, Endpoint, TransportError, TrustConfig};
use roost_client::{Client, ClientConfig, ClientError};
use roost_protocol::GroupId;

use crate::errors;
use crate::output::Output;
use crate::profile::{Names, ProfileDir, Settings};

/// What every command gets from the command line.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    pub(crate) profile: ProfileDir,
    pub(crate) out: Output,
    /// Handshake timeout.
    pub(crate) timeout: Duration,
}

/// Resolves `host:port`. IPv4 addresses are preferred, since `localhost` often resolves to
/// `::1` first while homeservers commonly listen on 127.0.0.1.
pub(crate) async fn resolve(server: &str) -> anyhow::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("server unreachable: cannot resolve {server} (HOST:PORT)"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| anyhow!("server unreachable: {server} resolves to no address"))
}

/// Resolves each of `servers` (see [`resolve`]), in order: the addresses that resolved, and
/// the errors of those that did not.
pub(crate) async fn resolve_all(servers: &[String]) -> (Vec<SocketAddr>, Vec<anyhow::Error>) {
    let mut addrs = Vec::with_capacity(servers.len());
    let mut errors = Vec::new();
    for server in servers {
        match resolve(server).await {
            Ok(addr) => addrs.push(addr),
            Err(err) => errors.push(err),
        }
    }
    (addrs, errors)
}

/// The SDK configuration for this homeserver, tuned for short-lived commands: a bounded
/// handshake, few connection attempts, and a small KeyPackage stock.
pub(crate) fn client_config(
    addrs: Vec<SocketAddr>,
    domain: &str,
    trust: TrustConfig,
    timeout: Duration,
    listen: bool,
) -> ClientConfig {
    let mut connect = ConnectConfig::with_addrs(addrs, domain, trust);
    connect.connect_timeout = timeout;
    let mut config = ClientConfig::new(connect);
    config.connect_attempts = 2;
    config.listen = listen;
    config.key_package_target = 10;
    config.key_package_low_water = 5;
    config
}

/// One handshake with the server, so that a wrong address or certificate is reported at
/// once and in plain words. The address that answered moves to the front of
/// `config.server_addrs` (the others keep their order after it), so the client does not try
/// the ones that did not answer first again.
pub(crate) async fn probe(config: &mut ConnectConfig, server: &str) -> anyhow::Result<()> {
    probe_transport(config)
        .await
        .map_err(|err| anyhow!(errors::describe_transport(&err, server)))
}

/// [`probe`], with the transport's error.
async fn probe_transport(config: &mut ConnectConfig) -> Result<(), TransportError> {
    let endpoint = Endpoint::for_servers(&config.server_addrs)?;
    let result = endpoint.connect(config).await;
    endpoint.close();
    let connection = result?;
    connection.close();
    let answered = connection.server_addr();
    if let Some(index) = config.server_addrs.iter().position(|a| *a == answered) {
        config.server_addrs.rotate_left(index);
    }
    Ok(())
}

/// An opened profile: settings, local names and the SDK client.
pub(crate) struct Session {
    pub(crate) client: Client,
    pub(crate) settings: Settings,
    pub(crate) names: Names,
    /// Whether the server answered a probe when the session opened.
    pub(crate) online: bool,
}

/// Whether [`Session::open`] checks that the server answers first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// No probe (commands that are local, or report the server's errors themselves).
    Skip,
    /// Fail if it does not (every command that needs the server).
    Required,
    /// Go on without it if it is merely unreachable (`send` queues, `outbox` lists); a
    /// refused certificate still fails.
    Tolerant,
    /// Go on without it if it is merely unreachable, and keep trying to reach it as usual
    /// (`chat`, `recv --follow`: they run until the server is back); a refused certificate
    /// still fails.
    Waiting,
}

/// The connect timeout once a command knows the server is down: one more attempt only
/// costs this.
const OFFLINE_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

impl Session {
    /// Opens the profile of `ctx`. `listen` keeps a listen stream open (for waiting on
    /// messages); `check` says whether the server must answer a probe first. When it answers,
    /// the outgoing queue is delivered first.
    pub(crate) async fn open(ctx: &Context, listen: bool, check: Check) -> anyhow::Result<Self> {
        let settings = ctx.profile.settings()?;
        let names = ctx.profile.names()?;
        let trust = ctx.profile.trust(&settings)?;
        let servers = settings.servers_text();
        // A node whose name no longer resolves is skipped while another one does.
        let (addrs, mut unresolved) = resolve_all(&settings.servers).await;
        if addrs.is_empty()
            && let Some(err) = unresolved.pop()
        {
            return Err(err);
        }
        for err in unresolved {
            ctx.out.note(format!("warning: {err}"));
        }
        let mut config = client_config(addrs, &settings.domain, trust, ctx.timeout, listen);
        let mut online = check != Check::Skip;
        match check {
            Check::Skip => {}
            Check::Required => probe(&mut config.connect, &servers).await?,
            Check::Tolerant => {
                if let Err(err) = probe_transport(&mut config.connect).await {
                    if !err.is_transient() {
                        bail!(errors::describe_transport(&err, &servers));
                    }
                    // The server is down: work from the profile alone (e.g. queue a message).
                    // The SDK's own attempts give up at once instead of waiting again.
                    online = false;
                    config.connect_attempts = 1;
                    config.connect.connect_timeout = OFFLINE_CONNECT_TIMEOUT;
                }
            }
            Check::Waiting => {
                if let Err(err) = probe_transport(&mut config.connect).await {
                    if !err.is_transient() {
                        bail!(errors::describe_transport(&err, &servers));
                    }
                    ctx.out.note(format!(
                        "{}; waiting for it (what you send is queued and goes out once it is \
                         back)",
                        errors::describe_transport(&err, &servers)
                    ));
                    online = false;
                }
            }
        }
        let client = Client::open(config, ctx.profile.database())
            .await
            .map_err(|err| errors::coded_client_error(&err, &servers))?;
        // Messages an earlier command queued while the server was down go out now.
        if online && let Err(err) = client.flush().await {
            ctx.out.note(format!(
                "warning: queued messages not sent yet: {}",
                errors::coded_client_error(&err, &servers)
            ));
        }
        Ok(Self {
            client,
            settings,
            names,
            online,
        })
    }

    /// `err` as one line.
    pub(crate) fn fail(&self, err: &ClientError) -> anyhow::Error {
        errors::coded_client_error(err, &self.settings.servers_text())
    }

    /// Processes everything queued for this device (joins, messages, membership changes).
    pub(crate) async fn sync(&self) -> anyhow::Result<()> {
        self.client.sync().await.map_err(|err| self.fail(&err))
    }

    /// [`Session::sync`] for the commands that wait for the server (`chat`, `recv --follow`):
    /// offline, or when the server goes away meanwhile, a note says so and the SDK catches up
    /// once it is back.
    pub(crate) async fn sync_or_wait(&self, out: Output) -> anyhow::Result<()> {
        if !self.online {
            return Ok(());
        }
        match self.client.sync().await {
            Err(ClientError::Request(err)) if err.is_transient() => {
                let err = ClientError::Request(err);
                out.note(format!("{}; waiting for it", self.fail(&err)));
                Ok(())
            }
            other => other.map_err(|err| self.fail(&err)),
        }
    }

    /// The group `text` designates (id or local name).
    pub(crate) fn group(&self, text: &str) -> anyhow::Result<GroupId> {
        self.names.resolve(text)
    }

    /// The group `text` designates, which this device must be a member of.
    pub(crate) fn member_group(&self, text: &str) -> anyhow::Result<GroupId> {
        let group = self.group(text)?;
        let groups = self.client.groups().map_err(|err| self.fail(&err))?;
        if !groups.contains(&group) {
            bail!("not a member of {text}");
        }
        Ok(group)
    }

    /// Stops the listener and closes the connection.
    pub(crate) async fn close(self) {
        self.client.close().await;
    }
}
