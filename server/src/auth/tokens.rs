//! Registration tokens. `roost admin token create` appends `sha256-hex uses` lines to
//! `registration-tokens` in the identity directory (`identity_dir`, by default the data
//! directory; shared by every node of a domain), which works while the server runs; the
//! server reads that file when a registration presents a token and counts uses in the
//! database.

use std::io::Write;
use std::path::Path;

/// File name in the identity directory.
pub(crate) const TOKENS_FILE: &str = "registration-tokens";

/// Hex SHA-256 of a token.
pub(crate) fn hash_token(token: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// How many registrations the token with this hash allows, if it exists.
pub(crate) fn allowed_uses(data_dir: &Path, hash: &str) -> Option<u64> {
    let text = std::fs::read_to_string(data_dir.join(TOKENS_FILE)).ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        (parts.next()? == hash).then(|| parts.next().and_then(|n| n.parse().ok()).unwrap_or(1))
    })
}

/// Makes a new random token allowing `uses` registrations and records its hash. Returns the
/// token text (shown once; only the hash is stored).
pub fn create(data_dir: &Path, uses: u64) -> std::io::Result<String> {
    use ring::rand::SecureRandom;
    let mut raw = [0u8; 18];
    ring::rand::SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| std::io::Error::other("no randomness"))?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::create_dir_all(data_dir)?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data_dir.join(TOKENS_FILE))?;
    writeln!(file, "{} {}", hash_token(token.as_bytes()), uses)?;
    file.sync_all()?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_tokens_are_found_by_hash_only() {
        let dir = tempfile::tempdir().unwrap();
        let token = create(dir.path(), 3).unwrap();
        assert_eq!(
            allowed_uses(dir.path(), &hash_token(token.as_bytes())),
            Some(3)
        );
        assert_eq!(allowed_uses(dir.path(), &hash_token(b"guess")), None);
        let stored = std::fs::read_to_string(dir.path().join(TOKENS_FILE)).unwrap();
        assert!(!stored.contains(&token));
    }
}
