//! The command line: every command, option and argument of `roost-cli` (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use roost_protocol::{DeviceName, UserId};

/// A terminal client for roost homeservers: end-to-end encrypted MLS groups over QUIC.
///
/// Each identity (one device of one user) lives in its own profile directory: its keys and
/// group state, the server it belongs to, the pinned certificate and local group names.
#[derive(Debug, Parser)]
#[command(name = "roost-cli", version)]
pub(crate) struct Cli {
    /// Profile directory [default: <data dir>/roost/default, e.g. ~/.local/share/roost/default]
    #[arg(long, global = true, env = "ROOST_PROFILE", value_name = "DIR")]
    pub(crate) profile: Option<PathBuf>,
    /// Print results as JSON, one object per line on stdout.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Seconds to wait for the server's handshake (at each of its addresses) before giving up.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 5)]
    pub(crate) timeout: u64,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Register a new user with this profile as its first device.
    Register {
        /// The new user, e.g. alice@localhost (the domain is the homeserver's).
        user: UserId,
        #[command(flatten)]
        server: ServerArgs,
        /// This device's name.
        #[arg(long, default_value = "cli")]
        device: DeviceName,
        /// Registration token, for homeservers that require one.
        #[arg(long, value_name = "TOKEN")]
        token: Option<String>,
    },
    /// Devices of your user.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Show who this profile is and which server it uses.
    Whoami,
    /// Create, inspect and change groups.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Send a text message, or a file (--file), to a group. A text message is queued in the
    /// profile first: if the server is unreachable, it says so and exits 0, and the next
    /// command that reaches the server (or `recv --follow` once it is back) sends it. A file
    /// is uploaded first, so it needs the server.
    Send {
        /// The group: its id or its local name.
        group: String,
        /// The message.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        text: Option<String>,
        /// Send this file instead, encrypted (a progress bar on a terminal for large files).
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
    },
    /// List the messages waiting to be sent (and those that failed) as
    /// ID<TAB>GROUP<TAB>STATE<TAB>QUEUED (seconds since the Unix epoch).
    Outbox,
    /// Print received messages as GROUP<TAB>SENDER<TAB>TEXT, one per line; join groups you
    /// are invited to. Other events go to stderr (to stdout with --json).
    Recv {
        /// If no message is waiting, wait up to this many seconds for one.
        #[arg(long, value_name = "SECS", conflicts_with = "follow")]
        wait: Option<u64>,
        /// Keep printing messages as they arrive, until Ctrl-C.
        #[arg(long)]
        follow: bool,
        /// Save received files into this directory and print each saved path.
        #[arg(long, value_name = "DIR")]
        download_dir: Option<PathBuf>,
    },
    /// Chat interactively in a group: lines you type are sent, messages appear as they arrive.
    Chat {
        /// The group: its id or its local name.
        group: String,
        /// Save received files into this directory and print each saved path.
        #[arg(long, value_name = "DIR")]
        download_dir: Option<PathBuf>,
    },
    /// Where the homeserver sends wake-ups while this device is not listening (push
    /// notifications of an app; the terminal client only registers them).
    Push {
        #[command(subcommand)]
        command: PushCommand,
    },
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to stdout: `roost-cli man > roost-cli.1`.
    Man,
}

/// Where the homeserver is and how to trust it (for register and device add).
#[derive(Debug, Args)]
pub(crate) struct ServerArgs {
    /// The homeserver's UDP address [default: the user's domain, port 4433]. A homeserver
    /// that runs as several nodes has several: repeat the option or separate them with commas
    /// (`--server a.example:4433,b.example:4433`); they are tried in order and the client moves
    /// to the next one when a node does not answer.
    #[arg(long, value_name = "HOST:PORT", value_delimiter = ',')]
    pub(crate) server: Vec<String>,
    #[command(flatten)]
    pub(crate) trust: TrustArgs,
}

/// Exactly one way to trust the homeserver's certificate.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub(crate) struct TrustArgs {
    /// Pin this certificate (PEM), e.g. the homeserver's <data_dir>/server-cert.pem.
    #[arg(long, value_name = "FILE")]
    pub(crate) server_cert: Option<PathBuf>,
    /// Trust the CA certificates of this PEM file (the certificate must name the domain).
    #[arg(long, value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum DeviceCommand {
    /// Enroll this profile as another device of an existing user, with the user key exported
    /// from one of the user's devices (`device export-user-key`).
    Add {
        /// The existing user.
        user: UserId,
        /// The file written by `device export-user-key` (`-` reads standard input).
        #[arg(long, value_name = "FILE")]
        user_key: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
        /// The new device's name (must differ from the user's other devices).
        #[arg(long)]
        device: DeviceName,
    },
    /// List your user's devices as DEVICE<TAB>CLIENT (this one marked `*` after its name).
    List,
    /// Remove one of your user's devices: the server cuts it off, deletes its queue and
    /// KeyPackages and never accepts its name again. Needs the user key on this device.
    Remove {
        /// The device to remove (not this one).
        device: DeviceName,
    },
    /// Write the user key (which authorises adding devices) to a new file with mode 0600.
    ExportUserKey {
        /// The file to create (`-` writes to standard output).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum GroupCommand {
    /// Create a group with you as its only member; prints its id.
    Create {
        /// A local name for the group (only this profile knows it).
        #[arg(long, value_name = "TEXT")]
        name: Option<String>,
    },
    /// Add every device of these users to the group.
    Invite {
        /// The group: its id or its local name.
        group: String,
        /// The users to add.
        #[arg(required = true)]
        users: Vec<UserId>,
    },
    /// Remove every device of these users from the group.
    Remove {
        /// The group: its id or its local name.
        group: String,
        /// The users to remove.
        #[arg(required = true)]
        users: Vec<UserId>,
    },
    /// Update your keys in the group (a self-update commit: a copy of this profile taken
    /// before cannot read what is sent after); prints the group's new epoch.
    Update {
        /// The group: its id or its local name.
        group: String,
    },
    /// Leave the group (another member's client completes it).
    Leave {
        /// The group: its id or its local name.
        group: String,
    },
    /// List your groups as ID<TAB>NAME.
    List,
    /// List the members (devices) of a group.
    Members {
        /// The group: its id or its local name.
        group: String,
    },
    /// Give a group a local name (e.g. one you were invited to).
    Name {
        /// The group: its id or its current local name.
        group: String,
        /// The new name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum PushCommand {
    /// Register this device's push endpoint (replacing an earlier one): exactly one of
    /// --web-push, --apns, --fcm.
    Register {
        /// A Web Push subscription as JSON (`PushSubscription.toJSON()`: endpoint and keys),
        /// from this file (`-` reads standard input).
        #[arg(long, value_name = "FILE", group = "target")]
        web_push: Option<PathBuf>,
        /// An APNs device token, in hex (needs --topic).
        #[arg(long, value_name = "HEX", group = "target", requires = "topic")]
        apns: Option<String>,
        /// The app's bundle id, for --apns.
        #[arg(long, value_name = "BUNDLE_ID")]
        topic: Option<String>,
        /// An FCM registration token.
        #[arg(long, value_name = "TOKEN", group = "target")]
        fcm: Option<String>,
    },
    /// Delete this device's push endpoint.
    Unregister,
    /// Show which push services the homeserver sends to, and its VAPID key (base64url) for
    /// making Web Push subscriptions.
    Info,
}
