//! The profile directory: one identity (one device of one user) per directory.
//!
//! | file | content |
//! |---|---|
//! | `profile.redb` | the SDK's database: keys, MLS state of every group, pending events |
//! | `settings.json` | this device's ClientId, the server's addresses and domain, the trust kind |
//! | `server-cert.pem` or `ca.pem` | the pinned server certificate, or the trusted CA bundle |
//! | `groups.json` | local group names (labels only this profile knows) |
//!
//! The directory is created with mode 0700: it holds the device's secret keys.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use roost_client::transport::TrustConfig;
use roost_protocol::GroupId;
use serde::{Deserialize, Serialize};

const DATABASE_FILE: &str = "profile.redb";
const SETTINGS_FILE: &str = "settings.json";
const NAMES_FILE: &str = "groups.json";
const PINNED_FILE: &str = "server-cert.pem";
const CA_FILE: &str = "ca.pem";

/// Where the profile lives.
#[derive(Debug, Clone)]
pub(crate) struct ProfileDir {
    dir: PathBuf,
}

/// How the homeserver's certificate is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TrustKind {
    /// The exact certificate is pinned (self-signed homeserver certificates).
    Pinned,
    /// A CA vouches for the domain.
    Ca,
}

/// The contents of `settings.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StoredSettings")]
pub(crate) struct Settings {
    /// This device, `user@domain/device`.
    pub(crate) client: String,
    /// The homeserver's addresses as given (`host:port`, one per node), resolved at every
    /// start and tried in order. Never empty.
    pub(crate) servers: Vec<String>,
    /// The homeserver's domain (TLS server name).
    pub(crate) domain: String,
    /// How the certificate is trusted.
    pub(crate) trust: TrustKind,
}

impl Settings {
    /// The addresses as one string, for messages.
    pub(crate) fn servers_text(&self) -> String {
        self.servers.join(",")
    }
}

/// `settings.json` as read: profiles made before homeservers could have several addresses hold
/// one `server` string instead of the `servers` list.
#[derive(Deserialize)]
struct StoredSettings {
    client: String,
    #[serde(default)]
    servers: Vec<String>,
    #[serde(default)]
    server: Option<String>,
    domain: String,
    trust: TrustKind,
}

impl TryFrom<StoredSettings> for Settings {
    type Error = &'static str;

    fn try_from(stored: StoredSettings) -> Result<Self, Self::Error> {
        let servers = match (stored.servers, stored.server) {
            (servers, _) if !servers.is_empty() => servers,
            (_, Some(server)) => vec![server],
            (_, None) => return Err("no server address"),
        };
        Ok(Self {
            client: stored.client,
            servers,
            domain: stored.domain,
            trust: stored.trust,
        })
    }
}

impl ProfileDir {
    /// `dir`, or the default profile under the user's data directory.
    pub(crate) fn new(dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let dir = match dir {
            Some(dir) => dir,
            None => dirs::data_dir()
                .ok_or_else(|| anyhow!("no data directory for this user: pass --profile DIR"))?
                .join("roost")
                .join("default"),
        };
        Ok(Self { dir })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.dir
    }

    /// The SDK database file.
    pub(crate) fn database(&self) -> PathBuf {
        self.dir.join(DATABASE_FILE)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn trust_file(&self, kind: TrustKind) -> PathBuf {
        self.file(match kind {
            TrustKind::Pinned => PINNED_FILE,
            TrustKind::Ca => CA_FILE,
        })
    }

    /// Whether the directory already holds an enrolled profile.
    pub(crate) fn is_enrolled(&self) -> bool {
        self.file(SETTINGS_FILE).exists()
    }

    /// Creates the directory (mode 0700 on Unix) if it does not exist.
    pub(crate) fn create(&self) -> anyhow::Result<()> {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(&self.dir)
            .with_context(|| format!("cannot create profile directory {}", self.dir.display()))
    }

    /// The settings, or an error telling how to make a profile.
    pub(crate) fn settings(&self) -> anyhow::Result<Settings> {
        let path = self.file(SETTINGS_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => bail!(
                "no profile at {}: register first (roost-cli register USER@DOMAIN ...) or pass \
                 --profile DIR",
                self.dir.display()
            ),
            Err(err) => return Err(err).context(format!("cannot read {}", path.display())),
        };
        serde_json::from_str(&text).with_context(|| format!("damaged {}", path.display()))
    }

    pub(crate) fn save_settings(&self, settings: &Settings) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(settings)?;
        self.write_atomically(SETTINGS_FILE, text.as_bytes())
    }

    /// Copies the certificate or CA file the user named into the profile.
    pub(crate) fn install_trust(&self, source: &Path, kind: TrustKind) -> anyhow::Result<()> {
        let pem = fs::read(source).with_context(|| format!("cannot read {}", source.display()))?;
        let name = match kind {
            TrustKind::Pinned => PINNED_FILE,
            TrustKind::Ca => CA_FILE,
        };
        self.write_atomically(name, &pem)
    }

    /// The trust configuration stored in the profile.
    pub(crate) fn trust(&self, settings: &Settings) -> anyhow::Result<TrustConfig> {
        load_trust(&self.trust_file(settings.trust), settings.trust)
    }

    /// The local group names.
    pub(crate) fn names(&self) -> anyhow::Result<Names> {
        let path = self.file(NAMES_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => {
                let stored: StoredNames = serde_json::from_str(&text)
                    .with_context(|| format!("damaged {}", path.display()))?;
                let mut names = BTreeMap::new();
                for (name, group) in stored.groups {
                    // An entry that no longer parses is dropped rather than blocking every
                    // command.
                    if let Ok(group) = group.parse::<GroupId>() {
                        names.insert(name, group);
                    }
                }
                Ok(Names { names })
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Names::default()),
            Err(err) => Err(err).context(format!("cannot read {}", path.display())),
        }
    }

    pub(crate) fn save_names(&self, names: &Names) -> anyhow::Result<()> {
        let stored = StoredNames {
            groups: names
                .names
                .iter()
                .map(|(name, group)| (name.clone(), group.to_string()))
                .collect(),
        };
        let text = serde_json::to_string_pretty(&stored)?;
        self.write_atomically(NAMES_FILE, text.as_bytes())
    }

    /// Writes `name` through a temporary file and a rename, so a crash leaves the old or the
    /// new content, never half of it.
    fn write_atomically(&self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let path = self.file(name);
        let tmp = self.file(&format!(".{name}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut options = fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().with_context(|| format!("cannot write {}", path.display()))
    }
}

/// Loads a PEM file as pinned certificate(s) or as CA roots.
pub(crate) fn load_trust(path: &Path, kind: TrustKind) -> anyhow::Result<TrustConfig> {
    let trust = match kind {
        TrustKind::Pinned => TrustConfig::pinned_from_pem_file(path),
        TrustKind::Ca => TrustConfig::roots_from_pem_file(path),
    };
    trust.map_err(|err| anyhow!("bad certificate file {}: {err}", path.display()))
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StoredNames {
    groups: BTreeMap<String, String>,
}

/// Local names of groups (labels, never sent anywhere).
#[derive(Debug, Default)]
pub(crate) struct Names {
    names: BTreeMap<String, GroupId>,
}

impl Names {
    /// The group `text` designates: a group id, or a local name.
    pub(crate) fn resolve(&self, text: &str) -> anyhow::Result<GroupId> {
        if let Ok(group) = text.parse::<GroupId>() {
            return Ok(group);
        }
        self.names.get(text).cloned().ok_or_else(|| {
            anyhow!("no group named {text:?} (see roost-cli group list; GROUP is an id or a name)")
        })
    }

    /// The local name of `group`, if it has one.
    pub(crate) fn name_of(&self, group: &GroupId) -> Option<&str> {
        self.names
            .iter()
            .find(|(_, g)| *g == group)
            .map(|(name, _)| name.as_str())
    }

    /// The name if the group has one, else its id.
    pub(crate) fn label(&self, group: &GroupId) -> String {
        self.name_of(group)
            .map(str::to_owned)
            .unwrap_or_else(|| group.to_string())
    }

    /// Fails if `name` is not acceptable or names a group in `current` other than `group`.
    pub(crate) fn check_available(
        &self,
        name: &str,
        group: Option<&GroupId>,
        current: &[GroupId],
    ) -> anyhow::Result<()> {
        check_name(name)?;
        if let Some(existing) = self.names.get(name)
            && Some(existing) != group
            && current.contains(existing)
        {
            bail!("a group named {name:?} exists already ({existing})");
        }
        Ok(())
    }

    /// Names `group` `name`, replacing the group's previous name. Fails if the name is not
    /// acceptable or belongs to another group in `current` (the groups this client is in);
    /// a name left over from a group the client is no longer in is reused.
    pub(crate) fn set(
        &mut self,
        name: &str,
        group: &GroupId,
        current: &[GroupId],
    ) -> anyhow::Result<()> {
        self.check_available(name, Some(group), current)?;
        self.names.retain(|_, g| g != group);
        self.names.insert(name.to_owned(), group.clone());
        Ok(())
    }
}

/// A name must be printable on one line and must not look like a group id.
pub(crate) fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.chars().count() > 64 {
        bail!("a group name has 1 to 64 characters");
    }
    if name.chars().any(char::is_control) || name.trim() != name {
        bail!("a group name has no control characters and no leading or trailing spaces");
    }
    if name.contains('@') {
        bail!("a group name cannot contain '@' (group ids do)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(n: u8) -> GroupId {
        GroupId::new([n; 16], "localhost".parse().unwrap())
    }

    #[test]
    fn names_resolve_and_stay_unique() {
        let mut names = Names::default();
        names.set("team", &group(1), &[group(1)]).unwrap();
        assert_eq!(names.resolve("team").unwrap(), group(1));
        assert_eq!(names.resolve(&group(2).to_string()).unwrap(), group(2));
        assert!(names.resolve("other").is_err());
        // Taken by a current group.
        assert!(names.set("team", &group(2), &[group(1), group(2)]).is_err());
        // Renaming moves the label.
        names.set("crew", &group(1), &[group(1)]).unwrap();
        assert!(names.resolve("team").is_err());
        assert_eq!(names.label(&group(1)), "crew");
        // A stale name (group left) is reused.
        names.set("crew", &group(2), &[group(2)]).unwrap();
        assert_eq!(names.resolve("crew").unwrap(), group(2));
        assert_eq!(names.label(&group(1)), group(1).to_string());
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in ["", " x", "a\tb", "x@y", &"n".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name("the team").is_ok());
    }

    fn settings(servers: &[&str]) -> Settings {
        Settings {
            client: "alice@example.org/cli".into(),
            servers: servers.iter().map(|s| s.to_string()).collect(),
            domain: "example.org".into(),
            trust: TrustKind::Pinned,
        }
    }

    #[test]
    fn settings_with_several_servers_survive_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let profile = ProfileDir::new(Some(dir.path().join("p"))).unwrap();
        profile.create().unwrap();
        let written = settings(&["node-a.example.org:4433", "[::1]:4433", "10.0.0.3:4433"]);
        profile.save_settings(&written).unwrap();
        assert_eq!(profile.settings().unwrap(), written);
        let text = fs::read_to_string(dir.path().join("p").join(SETTINGS_FILE)).unwrap();
        assert!(text.contains("\"servers\""), "{text}");
    }

    #[test]
    fn settings_of_a_single_address_profile_still_load() {
        // As written before homeservers could have several addresses.
        let old = r#"{
  "client": "alice@example.org/cli",
  "server": "127.0.0.1:4433",
  "domain": "example.org",
  "trust": "pinned"
}"#;
        let dir = tempfile::tempdir().unwrap();
        let profile = ProfileDir::new(Some(dir.path().to_owned())).unwrap();
        fs::write(dir.path().join(SETTINGS_FILE), old).unwrap();
        assert_eq!(profile.settings().unwrap(), settings(&["127.0.0.1:4433"]));
        // A list wins over a stray single address; neither is an error.
        let both = r#"{"client": "alice@example.org/cli", "server": "a:1", "servers": ["b:2", "c:3"],
            "domain": "example.org", "trust": "pinned"}"#;
        fs::write(dir.path().join(SETTINGS_FILE), both).unwrap();
        assert_eq!(profile.settings().unwrap().servers, ["b:2", "c:3"]);
        let none = r#"{"client": "alice@example.org/cli", "servers": [], "domain": "example.org",
            "trust": "pinned"}"#;
        fs::write(dir.path().join(SETTINGS_FILE), none).unwrap();
        let err = profile.settings().unwrap_err();
        assert!(format!("{err:#}").contains("no server address"), "{err:#}");
    }

    #[test]
    fn names_survive_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let profile = ProfileDir::new(Some(dir.path().join("p"))).unwrap();
        profile.create().unwrap();
        let mut names = profile.names().unwrap();
        names.set("team", &group(3), &[]).unwrap();
        profile.save_names(&names).unwrap();
        assert_eq!(profile.names().unwrap().resolve("team").unwrap(), group(3));
    }
}
