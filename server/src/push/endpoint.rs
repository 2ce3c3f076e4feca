//! Push endpoint URLs and the SSRF rules: an endpoint must be `https` and every address its
//! host resolves to must lie outside the configured forbidden ranges. The check runs when a
//! client registers and again before every connection, on the very addresses connected to
//! (so a name that resolves elsewhere later, DNS rebinding, is caught too).

use std::net::{IpAddr, SocketAddr};

/// A parsed `https://host[:port]/path` URL.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct HttpsUrl {
    /// Host name or IP literal (without brackets), lower case.
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Path and query, starting with `/`.
    pub(crate) path: String,
}

// Push URLs carry secrets in their path: never print them.
impl std::fmt::Debug for HttpsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "https://{}:{}/..", self.host, self.port)
    }
}

/// Longest endpoint URL accepted.
pub(crate) const MAX_URL_LEN: usize = 2048;

impl HttpsUrl {
    /// Parses an absolute `https` URL; anything else (another scheme, user info, a fragment,
    /// control characters) is refused.
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        if url.len() > MAX_URL_LEN {
            return Err("endpoint URL too long".into());
        }
        if url.bytes().any(|b| b <= b' ' || b == 0x7f || b == b'#') {
            return Err("endpoint URL has spaces, control characters or a fragment".into());
        }
        let rest = url
            .strip_prefix("https://")
            .ok_or("endpoint must be an https URL")?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        if authority.contains('@') {
            return Err("endpoint URL carries user info".into());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or("bad IPv6 literal")?;
            host.parse::<std::net::Ipv6Addr>()
                .map_err(|_| "bad IPv6 literal")?;
            (host, after.strip_prefix(':'))
        } else {
            let (host, port) = match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            };
            // An IPv6 address only in brackets: "https://::1:8443" is ambiguous.
            if host.contains(':') {
                return Err("bad host (IPv6 literals go in brackets)".into());
            }
            (host, port)
        };
        let port = match port {
            Some(port) => port.parse::<u16>().map_err(|_| "bad port")?,
            None => 443,
        };
        if host.is_empty()
            || port == 0
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b))
        {
            return Err("bad host".into());
        }
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
            path,
        })
    }

    /// `https://host[:port]`, the origin (the VAPID audience).
    pub(crate) fn origin(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 443 {
            format!("https://{host}")
        } else {
            format!("https://{host}:{}", self.port)
        }
    }

    /// The `Host` header / `:authority`.
    pub(crate) fn authority(&self) -> String {
        self.origin()["https://".len()..].to_owned()
    }
}

/// An address range in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, ""));
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address range"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?} has a bad prefix length"))?
        };
        Ok(Self { network, prefix })
    }
}

impl Cidr {
    /// Whether `ip` lies in the range (an IPv4-mapped IPv6 address counts as its IPv4
    /// address).
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Parses the configured ranges.
pub(crate) fn parse_ranges(ranges: &[String]) -> Result<Vec<Cidr>, String> {
    ranges.iter().map(|r| r.parse()).collect()
}

/// Resolves `url`'s host and returns its addresses, refusing if any lies in a forbidden
/// range (a name with one allowed and one forbidden address is refused: which one a
/// connection would use is not ours to pick safely).
pub(crate) async fn resolve_allowed(
    url: &HttpsUrl,
    forbidden: &[Cidr],
) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|_| "endpoint host does not resolve".to_owned())?
        .collect();
    if addrs.is_empty() {
        return Err("endpoint host does not resolve".into());
    }
    if let Some(bad) = addrs
        .iter()
        .find(|a| forbidden.iter().any(|r| r.contains(a.ip())))
    {
        return Err(format!(
            "endpoint address {} is in a forbidden range",
            bad.ip()
        ));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_address_outside_brackets_is_refused() {
        // Found by the `push` fuzz target: the host was taken up to the last colon, so this
        // parsed to a host its own origin could not name again.
        for url in [
            "https://1:lb8::1e:8443/p/(0",
            "https://::1:8443/",
            "https://::1/",
            "https://a:b:443/",
        ] {
            assert!(HttpsUrl::parse(url).is_err(), "{url}");
        }
        let url = HttpsUrl::parse("https://[::1]:8443/p").unwrap();
        assert_eq!(url.host, "::1");
        assert_eq!(url.origin(), "https://[::1]:8443");
        assert_eq!(
            HttpsUrl::parse(&format!("{}/p", url.origin())).unwrap(),
            url
        );
    }

    #[test]
    fn urls_are_https_only_and_parsed_strictly() {
        let url = HttpsUrl::parse("https://Push.Example.net/wpush/v2/abc?x=1").unwrap();
        assert_eq!(url.host, "push.example.net");
        assert_eq!(url.port, 443);
        assert_eq!(url.path, "/wpush/v2/abc?x=1");
        assert_eq!(url.origin(), "https://push.example.net");
        let url = HttpsUrl::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!((url.port, url.path.as_str()), (8443, "/"));
        assert_eq!(url.origin(), "https://127.0.0.1:8443");
        let url = HttpsUrl::parse("https://[::1]:9/p").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 9));
        assert_eq!(url.authority(), "[::1]:9");
        for bad in [
            "http://push.example.net/x",
            "ftp://x/y",
            "https://",
            "https://user@host/x",
            "https://host:0/x",
            "https://host:99999/x",
            "https://ho st/x",
            "https://host/x#frag",
            "https://host/\nx",
            "https://[zz]/x",
            "https://host_name/x",
        ] {
            assert!(HttpsUrl::parse(bad).is_err(), "{bad}");
        }
        assert!(HttpsUrl::parse(&format!("https://h/{}", "a".repeat(MAX_URL_LEN))).is_err());
        // The path (a secret) never shows in debug output.
        let shown = format!("{:?}", HttpsUrl::parse("https://h/secret-token").unwrap());
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn ranges_match_what_they_cover() {
        let r: Cidr = "127.0.0.2/32".parse().unwrap();
        assert!(r.contains("127.0.0.2".parse().unwrap()));
        assert!(!r.contains("127.0.0.1".parse().unwrap()));
        let r: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(r.contains("10.200.3.4".parse().unwrap()));
        assert!(!r.contains("11.0.0.1".parse().unwrap()));
        // IPv4-mapped IPv6 is judged as IPv4.
        assert!(r.contains("::ffff:10.1.2.3".parse().unwrap()));
        let r: Cidr = "fe80::/10".parse().unwrap();
        assert!(r.contains("fe80::1".parse().unwrap()));
        assert!(!r.contains("2001:db8::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
        let host: Cidr = "::1".parse().unwrap();
        assert!(host.contains("::1".parse().unwrap()));
    }

    #[tokio::test]
    async fn forbidden_addresses_are_refused_before_any_connection() {
        let forbidden = parse_ranges(&["127.0.0.2/32".into()]).unwrap();
        let bad = HttpsUrl::parse("https://127.0.0.2:9/x").unwrap();
        assert!(resolve_allowed(&bad, &forbidden).await.is_err());
        let good = HttpsUrl::parse("https://127.0.0.1:9/x").unwrap();
        assert_eq!(
            resolve_allowed(&good, &forbidden).await.unwrap(),
            vec![SocketAddr::from(([127, 0, 0, 1], 9))]
        );
    }
}
