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

/// How many registrations the token with this hash allows, if it exists. A missing file
/// holds no token; a file that cannot be read is an error (not "no such token"), and a line
/// whose count is not a number allows nothing.
pub(crate) fn allowed_uses(data_dir: &Path, hash: &str) -> std::io::Result<Option<u64>> {
    let text = match std::fs::read_to_string(data_dir.join(TOKENS_FILE)) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    Ok(text.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        if parts.next()? != hash {
            return None;
        }
        match (parts.next().map(str::parse::<u64>), parts.next()) {
            (Some(Ok(uses)), None) => Some(uses),
            _ => {
                tracing::warn!(file = TOKENS_FILE, "a registration-token line is malformed");
                Some(0)
            }
        }
    }))
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
            allowed_uses(dir.path(), &hash_token(token.as_bytes())).unwrap(),
            Some(3)
        );
        assert_eq!(
            allowed_uses(dir.path(), &hash_token(b"guess")).unwrap(),
            None
        );
        let stored = std::fs::read_to_string(dir.path().join(TOKENS_FILE)).unwrap();
        assert!(!stored.contains(&token));
    }

    #[test]
    fn unreadable_files_and_malformed_counts_are_not_tokens() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            allowed_uses(dir.path(), "ab").unwrap(),
            None,
            "no file: no token"
        );
        let hash = hash_token(b"t");
        std::fs::write(dir.path().join(TOKENS_FILE), format!("{hash} lots\n")).unwrap();
        assert_eq!(allowed_uses(dir.path(), &hash).unwrap(), Some(0));
        std::fs::write(dir.path().join(TOKENS_FILE), format!("{hash}\n")).unwrap();
        assert_eq!(allowed_uses(dir.path(), &hash).unwrap(), Some(0));
        // A directory where the file should be: an I/O error, not "token required".
        std::fs::remove_file(dir.path().join(TOKENS_FILE)).unwrap();
        std::fs::create_dir(dir.path().join(TOKENS_FILE)).unwrap();
        assert!(allowed_uses(dir.path(), &hash).is_err());
    }
}
