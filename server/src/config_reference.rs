//! The reference of every configuration field: one table, from which `roost config default`
//! writes a commented TOML file and README.md's configuration tables are checked
//! (server/tests/docs.rs), so the three cannot drift. Defaults are read from
//! [`Config::default`], never written twice.

use std::fmt::Write as _;

use crate::config::Config;

/// One row: the fields it names (several share a row when they go together, e.g. a rate and
/// its burst), what they mean, and what to show when the default is "absent".
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// The TOML table the fields live in: `""` (top level), `storage`, `limits`, `federation`.
    pub section: &'static str,
    /// The field names, as written in the file.
    pub names: &'static [&'static str],
    /// What the field does (one sentence or two; README's "meaning" column).
    pub meaning: &'static str,
    /// For a field that is absent by default: the text of the default column, and an example
    /// value for the commented line of `roost config default`.
    pub absent: Option<(&'static str, &'static str)>,
}

const fn f(section: &'static str, names: &'static [&'static str], meaning: &'static str) -> Field {
    Field {
        section,
        names,
        meaning,
        absent: None,
    }
}

const fn opt(
    section: &'static str,
    name: &'static [&'static str],
    meaning: &'static str,
    default: &'static str,
    example: &'static str,
) -> Field {
    Field {
        section,
        names: name,
        meaning,
        absent: Some((default, example)),
    }
}

/// The tables, in the order README.md and `roost config default` show them.
pub const SECTIONS: &[&str] = &["", "storage", "limits", "federation", "blobs", "push"];

/// Every field of [`Config`].
pub const FIELDS: &[Field] = &[
    opt(
        "blobs",
        &["dir"],
        "directory of the blob files (temporary files under `tmp/`, removed at start; expiry markers under `expiry/`; the usage count in `tmp/usage.json` between a clean shutdown and the next start); redb only: with PostgreSQL blobs are stored in the database and setting it is an error",
        "`blobs` in `data_dir`",
        "\"/srv/roost/blobs\"",
    ),
    f(
        "blobs",
        &["max_blob_size"],
        "largest blob accepted, bytes (BLOB_TOO_LARGE beyond)",
    ),
    f(
        "blobs",
        &["quota_per_user"],
        "bytes of unexpired blobs one user may store (BLOB_QUOTA_EXCEEDED beyond)",
    ),
    f(
        "blobs",
        &["upload_rate_per_minute", "upload_burst"],
        "blob uploads per minute per user, and their burst",
    ),
    f(
        "blobs",
        &["download_rate_per_minute", "download_burst"],
        "blob downloads per minute per client (per peer for proxied downloads), and their burst",
    ),
    f(
        "blobs",
        &["expiry_secs"],
        "a blob is no longer served this long after its upload, and deleted soon after (redb: within 1/64 of this, at most an hour)",
    ),
    f(
        "blobs",
        &["stall_timeout_ms"],
        "an upload whose bytes stop arriving for this long is cut off and discarded",
    ),
    f(
        "",
        &["domain"],
        "the domain this server serves: the part after `@` in its user ids",
    ),
    f("", &["listen"], "UDP address of the QUIC endpoint"),
    f(
        "",
        &["data_dir"],
        "directory of the redb database and, unless `identity_dir` is set, the identity files",
    ),
    opt(
        "",
        &["identity_dir"],
        "directory of the AS signing key, stateless-reset key, self-signed certificate and registration tokens; every node of a domain uses the same one",
        "`data_dir`",
        "\"/srv/roost/identity\"",
    ),
    opt(
        "",
        &["tls_cert"],
        "PEM certificate chain to present instead of the self-signed certificate (with `tls_key`)",
        "none",
        "\"/etc/roost/cert.pem\"",
    ),
    opt(
        "",
        &["tls_key"],
        "PEM private key of `tls_cert`",
        "none",
        "\"/etc/roost/key.pem\"",
    ),
    f(
        "",
        &["require_registration_token"],
        "registration needs a token made with `roost admin token create`",
    ),
    opt(
        "",
        &["metrics_listen"],
        "TCP address serving /metrics (Prometheus text) and /health over HTTP; off when absent",
        "none",
        "\"127.0.0.1:9090\"",
    ),
    f(
        "",
        &["log_format"],
        "log lines on stderr: `text`, or `json` (one object per line)",
    ),
    f(
        "storage",
        &["backend"],
        "`redb`: `roost.redb` in `data_dir`, one process per domain; `postgres`: a PostgreSQL database shared by every node of the domain",
    ),
    opt(
        "storage",
        &["url"],
        "PostgreSQL connection string (required with `postgres`; may hold a password, never logged)",
        "none",
        "\"postgresql://roost@db.internal:5432/roost\"",
    ),
    f(
        "storage",
        &["pool_size"],
        "database connections per node (plus one for wake-ups)",
    ),
    f(
        "storage",
        &["timeout_ms"],
        "longest wait for a database connection, a statement or a lock; past it the request fails with UNAVAILABLE (retryable) and nothing is written",
    ),
    f(
        "storage",
        &["cache_size_mib"],
        "memory redb may use for its page cache and write buffer (MiB; redb only). Bounds the database's share of the server's memory: see docs/BENCHMARKS.md for RSS under a large backlog",
    ),
    f(
        "limits",
        &["max_frame_len"],
        "largest request frame body (bytes); checked before reading the body",
    ),
    f(
        "limits",
        &["request_read_timeout_ms"],
        "a request must arrive completely within this time (slow senders are cut off); on `metrics_listen`, the HTTP request head must, and the whole exchange ends within twice this time",
    ),
    f("limits", &["idle_timeout_ms"], "QUIC idle timeout"),
    f(
        "limits",
        &["max_concurrent_streams"],
        "concurrent requests (bidirectional streams) per client connection; more wait for a free stream. quinn keeps a slot per stream it grants, so each connection costs memory in proportion (32: about 2.7 KB, 128: about 10.8 KB)",
    ),
    f(
        "limits",
        &["stream_receive_window"],
        "per-stream receive window (bytes)",
    ),
    f(
        "limits",
        &["connection_receive_window"],
        "per-connection receive window (bytes)",
    ),
    f(
        "limits",
        &["max_connections"],
        "concurrent connections, handshakes included; more are refused",
    ),
    f(
        "limits",
        &["retry_threshold"],
        "above this many handshakes in progress, new clients must prove their address (QUIC Retry)",
    ),
    f(
        "limits",
        &["shutdown_grace_ms"],
        "how long shutdown waits for in-flight requests",
    ),
    f(
        "limits",
        &["max_key_packages_per_upload"],
        "KeyPackages in one upload",
    ),
    f(
        "limits",
        &["max_key_packages_per_client"],
        "ordinary KeyPackages held per client",
    ),
    f(
        "limits",
        &["key_package_clock_skew_secs"],
        "tolerated clock skew of a KeyPackage's `not_before`",
    ),
    f(
        "limits",
        &["key_package_max_lifetime_secs"],
        "longest accepted KeyPackage lifetime (366 days)",
    ),
    f(
        "limits",
        &["claim_rate_per_minute", "claim_burst"],
        "KeyPackage claims per (claiming user, target client); a user's devices share one bucket",
    ),
    f(
        "limits",
        &["add_client_rate_per_hour", "add_client_burst"],
        "AddClient requests per user (with a valid user signature)",
    ),
    f(
        "limits",
        &["max_clients_per_user"],
        "current (not removed) clients per user; AddClient beyond it is refused",
    ),
    f(
        "limits",
        &["registration_rate_per_minute", "registration_burst"],
        "registrations per source IP address (IPv6: per network, below)",
    ),
    f(
        "limits",
        &["registration_ipv6_prefix"],
        "IPv6 sources share one registration budget per network of this prefix length (a host usually holds a whole /64); IPv4 per address",
    ),
    f(
        "limits",
        &["send_rate_per_sec", "send_burst"],
        "messages, commits and proposals per client",
    ),
    f(
        "limits",
        &["max_queue_depth"],
        "messages held per queue; a full queue refuses more",
    ),
    f(
        "limits",
        &["max_message_age_secs"],
        "queued messages older than this (14 days) are dropped",
    ),
    f(
        "limits",
        &["max_fetch_messages", "max_fetch_bytes"],
        "most returned by one fetch",
    ),
    f("limits", &["max_group_size"], "members per group"),
    f(
        "limits",
        &["past_epochs"],
        "past epochs whose application messages are still accepted",
    ),
    f(
        "limits",
        &["credential_validity_secs"],
        "validity of an issued client credential (365 days)",
    ),
    f(
        "limits",
        &["max_write_batch"],
        "most write operations coalesced into one durable transaction",
    ),
    f(
        "limits",
        &["max_cached_groups"],
        "groups whose MLS state stays in memory",
    ),
    f(
        "limits",
        &["receipt_window_secs"],
        "how long an accepted SendMessage, Commit, ExternalJoin or LeaveGroup is remembered: a repeat of the same bytes by the same client within it gets the original answer and enqueues nothing",
    ),
    f(
        "limits",
        &["max_receipts"],
        "most such receipts stored (about 100 bytes each); beyond it the oldest are dropped early",
    ),
    f(
        "limits",
        &["metrics_max_connections"],
        "HTTP connections to `metrics_listen` served at once; more are closed at once",
    ),
    f(
        "federation",
        &["enabled"],
        "accept federation connections and forward requests for other domains",
    ),
    opt(
        "federation",
        &["ca_file"],
        "PEM bundle of the CAs that identify peer homeservers (a peer's certificate must be valid for the domain it speaks for)",
        "none",
        "\"/etc/roost/federation-ca.pem\"",
    ),
    f(
        "federation",
        &["allow_domains"],
        "if not empty, only these domains are federated with",
    ),
    f(
        "federation",
        &["deny_domains"],
        "never federate with these domains",
    ),
    opt(
        "federation",
        &["peers.DOMAIN.address", "peers.DOMAIN.addresses"],
        "`host:port` of the peer's nodes, tried in order (see above)",
        "the domain, port 4433",
        "\"beta.example.net:4433\"",
    ),
    opt(
        "federation",
        &["peers.DOMAIN.certificate"],
        "PEM certificate of the peer, pinned instead of (or besides) the CA",
        "none",
        "\"/etc/roost/beta.pem\"",
    ),
    f(
        "federation",
        &["max_in_flight_per_peer"],
        "concurrent requests towards one peer",
    ),
    f(
        "federation",
        &["max_concurrent_streams"],
        "concurrent requests (bidirectional streams) one peer homeserver may have open on its connection to us (its requests carry many clients' operations)",
    ),
    f(
        "federation",
        &["outbox_batch"],
        "deliveries per batch to a peer (a delivery is one message for up to 1,024 of that peer's clients)",
    ),
    f(
        "federation",
        &["outbox_batch_bytes"],
        "bytes of deliveries per batch to a peer (a single larger one goes alone); keep it below the peers' `max_frame_len`",
    ),
    f(
        "federation",
        &["retry_initial_ms", "retry_max_ms"],
        "backoff while a peer is unreachable",
    ),
    f(
        "federation",
        &["outbox_rescan_ms"],
        "how often each node looks for outbox entries it was not told about (with several nodes: another node's, left when it stopped); one node at a time sends to a given peer, holding a lease of 3 × `storage.timeout_ms` that it renews with every batch; a node that stopped (no connection to the database left) loses its leases at once",
    ),
    f(
        "federation",
        &["peer_rate_per_sec", "peer_burst"],
        "requests one peer may send us",
    ),
    f(
        "federation",
        &["credential_timeout_ms"],
        "how long a commit waits for another domain's AS to certify the credentials it adds (asked outside the group's lock: the group's other operations go on meanwhile); then PEER_UNREACHABLE",
    ),
    f(
        "federation",
        &["connect_timeout_ms"],
        "how long a handshake with one address of a peer may take; then the next address is tried, and once all failed the outbox retries with backoff (a request to a peer whose addresses all stay silent waits this long for each, so keep it well below the clients' request timeout, 30 s in the SDK, divided by the peer's addresses)",
    ),
    f(
        "federation",
        &["request_timeout_ms"],
        "how long one request to a peer waits for its answer; then the connection is dropped and the next request (an outbox retry) connects afresh",
    ),
    f(
        "federation",
        &["certified_keys_cached", "certified_keys_ttl_ms"],
        "certified keys of other domains' clients kept in memory, and for how long (a revocation there is seen here at most this late; 0 entries: ask every time)",
    ),
    f(
        "push",
        &["web_push"],
        "accept Web Push subscriptions (RFC 8030; UnifiedPush distributors included); the VAPID key is made on first start in the identity directory",
    ),
    opt(
        "push",
        &["vapid_subject"],
        "the VAPID `sub` claim push services may use to contact the operator (`mailto:` or `https:`)",
        "`mailto:postmaster@` + domain",
        "\"mailto:ops@example.org\"",
    ),
    f(
        "push",
        &["coalesce_ms"],
        "at most one wake-up per client per this interval; messages in between share it",
    ),
    f(
        "push",
        &["delay_ms"],
        "how long after a message lands its wake-up waits; a client that has fetched or acknowledged everything by then is not woken",
    ),
    f(
        "push",
        &["retry_initial_ms", "retry_max_ms", "max_attempts"],
        "retries of a wake-up a push service did not take (network error, 429, 5xx): first delay, doubling up to the maximum, then given up (the registration stays)",
    ),
    f(
        "push",
        &["request_timeout_ms"],
        "time limit of one request to a push service: resolving, connecting, TLS and the answer",
    ),
    f(
        "push",
        &["max_in_flight"],
        "wake-ups one node sends at once",
    ),
    f(
        "push",
        &["poll_ms"],
        "how often each node looks for due wake-ups it was not told about (retries, or scheduled by another node)",
    ),
    f(
        "push",
        &["recover_ms"],
        "how often (and at start) each node schedules wake-ups lost by a node that stopped between a queue commit and the push outbox; it looks at messages at least this old (at start, at every message)",
    ),
    f(
        "push",
        &["retry_after_max_ms"],
        "longest wait a push service may ask for with `Retry-After` (429 or 503, in seconds or as an HTTP date) before the wake-up is tried again; longer ones are cut to this",
    ),
    f(
        "push",
        &["ttl_secs"],
        "how long a push service keeps an undelivered wake-up (Web Push `TTL`, APNs expiration, FCM `ttl`)",
    ),
    f(
        "push",
        &["forbidden_ranges"],
        "address ranges (CIDR) a push endpoint must not resolve to, checked at registration and before every connection (SSRF protection); the default covers loopback, private, shared, link-local, multicast and reserved ranges",
    ),
    opt(
        "push",
        &["ca_file"],
        "PEM bundle of the CAs push services' certificates must chain to, instead of the built-in Mozilla roots",
        "built-in roots",
        "\"/etc/roost/push-ca.pem\"",
    ),
    opt(
        "push",
        &["apns_key_file", "apns_key_id", "apns_team_id"],
        "APNs: the `.p8` token signing key from the Apple developer account, its key id and the team id; APNs is off without them",
        "none (APNs off)",
        "\"/etc/roost/AuthKey_ABC123.p8\"",
    ),
    f(
        "push",
        &["apns_url"],
        "APNs base URL (`https://api.sandbox.push.apple.com` for development builds)",
    ),
    opt(
        "push",
        &["fcm_project_id", "fcm_access_token_file"],
        "FCM: the Firebase project id, and a file holding a current OAuth 2 access token of a service account with the `firebase.messaging` scope, read before every send (kept fresh by the operator, see docs/SECURITY.md); FCM is off without them",
        "none (FCM off)",
        "\"my-project\"",
    ),
    f("push", &["fcm_url"], "FCM HTTP v1 API base URL"),
];

/// The default configuration as a TOML table.
fn defaults() -> toml::Table {
    toml::Table::try_from(Config::default()).unwrap_or_default()
}

fn value_of<'t>(table: &'t toml::Table, section: &str, name: &str) -> Option<&'t toml::Value> {
    let table = if section.is_empty() {
        table
    } else {
        table.get(section)?.as_table()?
    };
    table.get(name)
}

/// The default column of README.md for a value: strings in backticks, the rest as TOML.
fn shown(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("`{s}`"),
        other => other.to_string(),
    }
}

/// README.md's table for `section`, header included, one row per [`Field`].
pub fn markdown_table(section: &str) -> String {
    let defaults = defaults();
    let mut out = String::from("| field | default | meaning |\n|---|---|---|\n");
    for field in FIELDS.iter().filter(|field| field.section == section) {
        let names: Vec<String> = field.names.iter().map(|n| format!("`{n}`")).collect();
        let default = match field.absent {
            Some((default, _)) => default.to_owned(),
            None => field
                .names
                .iter()
                .map(|name| {
                    value_of(&defaults, section, name).map_or_else(|| "none".to_owned(), shown)
                })
                .collect::<Vec<_>>()
                .join(" / "),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            names.join(" / "),
            default,
            field.meaning
        );
    }
    out
}

/// Every field name of the default configuration as `section.name` (nested tables flattened),
/// for checking that [`FIELDS`] covers them all.
pub fn default_field_names() -> Vec<String> {
    let mut names = Vec::new();
    for (key, value) in defaults() {
        match value {
            toml::Value::Table(table) => names.extend(
                table
                    .keys()
                    .filter(|name| *name != "peers")
                    .map(|name| format!("{key}.{name}")),
            ),
            _ => names.push(key),
        }
    }
    names
}

/// `roost config default`: every field with its meaning and default, as a TOML file that
/// loads as [`Config::default`] (fields absent by default are commented out, with an example).
pub fn default_toml() -> String {
    let defaults = defaults();
    let mut out = String::from(
        "# roost homeserver configuration: every field, with its default.\n\
         # Every field is optional; remove the ones you do not change.\n",
    );
    for section in SECTIONS {
        if !section.is_empty() {
            let _ = write!(out, "\n[{section}]\n");
        }
        for field in FIELDS.iter().filter(|field| field.section == *section) {
            out.push('\n');
            for line in wrap(field.meaning, 92) {
                let _ = writeln!(out, "# {line}");
            }
            for name in field.names {
                if name.starts_with("peers.") {
                    continue;
                }
                match (value_of(&defaults, section, name), field.absent) {
                    (Some(value), _) => {
                        let _ = writeln!(out, "{name} = {value}");
                    }
                    (None, Some((_, example))) => {
                        let _ = writeln!(out, "# {name} = {example}");
                    }
                    (None, None) => {}
                }
            }
        }
    }
    out.push_str(
        "\n# One table per peer; `address` defaults to the domain itself, port 4433.\n\
         # [federation.peers.\"beta.test\"]\n\
         # address = \"beta.example.net:4433\"\n\
         # addresses = [\"beta-2.example.net:4433\"]\n\
         # certificate = \"/etc/roost/beta.pem\"\n",
    );
    out
}

/// `roost config check`: the effective configuration as TOML, with a database password
/// replaced by `***`.
pub fn effective_toml(config: &Config) -> String {
    let mut config = config.clone();
    if let Some(url) = config.storage.url.as_mut() {
        *url = redact_password(url);
    }
    toml::to_string(&config).unwrap_or_else(|e| format!("# cannot show the configuration: {e}\n"))
}

/// A PostgreSQL URL or key-value string with its password replaced.
fn redact_password(url: &str) -> String {
    // URL form: scheme://user:password@host...
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((userinfo, host)) = rest.split_once('@')
            && let Some((user, _)) = userinfo.split_once(':')
        {
            return format!("{scheme}://{user}:***@{host}");
        }
        return url.to_owned();
    }
    // key=value form.
    url.split_whitespace()
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Splits `text` into lines of at most `width` characters at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_file_loads_as_the_defaults() {
        let text = default_toml();
        let loaded = Config::from_toml(&text).unwrap();
        assert_eq!(
            toml::Table::try_from(&loaded).unwrap(),
            toml::Table::try_from(Config::default()).unwrap()
        );
        // Every field appears, set or commented out.
        for name in default_field_names() {
            let name = name.rsplit('.').next().unwrap();
            assert!(text.contains(&format!("\n{name} = ")), "{name} missing");
        }
        for field in FIELDS.iter().filter(|f| f.absent.is_some()) {
            let name = field.names[0];
            if !name.starts_with("peers.") {
                assert!(text.contains(&format!("\n# {name} = ")), "{name} missing");
            }
        }
    }

    #[test]
    fn every_field_has_a_row_and_every_row_a_field() {
        let documented: Vec<String> = FIELDS
            .iter()
            .flat_map(|field| {
                field.names.iter().map(|name| {
                    if field.section.is_empty() {
                        (*name).to_owned()
                    } else {
                        format!("{}.{name}", field.section)
                    }
                })
            })
            .collect();
        let mut existing = default_field_names();
        // Absent by default: not in the serialised defaults.
        for field in FIELDS.iter().filter(|f| f.absent.is_some()) {
            for name in field.names {
                let full = if field.section.is_empty() {
                    (*name).to_owned()
                } else {
                    format!("{}.{name}", field.section)
                };
                existing.push(full);
            }
        }
        existing.sort();
        existing.dedup();
        let mut documented_sorted = documented.clone();
        documented_sorted.sort();
        assert_eq!(documented_sorted, existing);
        for name in default_field_names() {
            assert!(documented.contains(&name), "{name} has no row in FIELDS");
        }
    }

    #[test]
    fn passwords_are_not_shown() {
        let mut config = Config::default();
        config.storage.url = Some("postgresql://roost:s3cret@db:5432/roost".into());
        let text = effective_toml(&config);
        assert!(!text.contains("s3cret"), "{text}");
        assert!(
            text.contains("postgresql://roost:***@db:5432/roost"),
            "{text}"
        );
        assert_eq!(
            redact_password("host=db user=roost password=s3cret"),
            "host=db user=roost password=***"
        );
    }
}
