//! Registration tokens. `roost admin token create` appends `sha256-hex uses` lines to
//! `registration-tokens` in the identity directory (`identity_dir`, by default the data
//! directory; shared by every node of a domain), which works while the server runs; the
//! server reads that file when a registration presents a token and counts uses in the
//! database. `token list` reads this file; `token revoke` rewrites it without the line.

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

/// How many leading hex digits of a token's hash name it in `roost admin token list` and
/// `token revoke`.
pub(crate) const ID_LEN: usize = 16;

/// Every token line: (hash, allowed uses), in file order; a malformed count allows nothing.
pub(crate) fn list(dir: &Path) -> std::io::Result<Vec<(String, u64)>> {
    let text = match std::fs::read_to_string(dir.join(TOKENS_FILE)) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let hash = parts.next()?;
            let uses = match (parts.next().map(str::parse::<u64>), parts.next()) {
                (Some(Ok(uses)), None) => uses,
                _ => 0,
            };
            Some((hash.to_owned(), uses))
        })
        .collect())
}

/// Why a token could not be revoked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RevokeError {
    /// No token line matches.
    #[error("no registration token {0}: see `roost admin token list`")]
    NotFound(String),
    /// The id is too short to name one token safely.
    #[error(
        "token id {0:?} is too short: give at least {ID_LEN} hex digits (see `roost admin token list`) or the token itself"
    )]
    TooShort(String),
    /// Reading or writing the file.
    #[error("registration tokens: {0}")]
    Io(#[from] std::io::Error),
}

/// Removes the token named by `id` (its id as listed, a longer prefix of its hash, or the
/// token text itself) from the file, which is replaced atomically (written aside, synced,
/// renamed): a registration that reads it sees the old or the new file, never half of one.
pub(crate) fn revoke(dir: &Path, id: &str) -> Result<(), RevokeError> {
    let path = dir.join(TOKENS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(RevokeError::NotFound(id.to_owned()));
        }
        Err(err) => return Err(err.into()),
    };
    let by_text = hash_token(id.as_bytes());
    let prefix = id.to_ascii_lowercase();
    let matches =
        |hash: &str| hash == by_text || (prefix.len() >= ID_LEN && hash.starts_with(&prefix));
    if prefix.len() < ID_LEN
        && !text
            .lines()
            .any(|l| l.split_whitespace().next() == Some(by_text.as_str()))
    {
        return Err(RevokeError::TooShort(id.to_owned()));
    }
    let mut kept = String::new();
    let mut removed = 0;
    for line in text.lines() {
        if line.split_whitespace().next().is_some_and(matches) {
            removed += 1;
        } else {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    if removed == 0 {
        return Err(RevokeError::NotFound(id.to_owned()));
    }
    let aside = dir.join(format!("{TOKENS_FILE}.new"));
    {
        let mut file = std::fs::File::create(&aside)?;
        file.write_all(kept.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&aside, &path)?;
    Ok(())
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

    #[test]
    fn a_revoked_token_is_no_longer_allowed_and_the_others_stay() {
        let dir = tempfile::tempdir().unwrap();
        let first = create(dir.path(), 1).unwrap();
        let second = create(dir.path(), 2).unwrap();
        let third = create(dir.path(), 3).unwrap();
        let id = |token: &str| hash_token(token.as_bytes())[..ID_LEN].to_owned();
        assert!(matches!(
            revoke(dir.path(), "ab"),
            Err(RevokeError::TooShort(_))
        ));
        revoke(dir.path(), &id(&second)).unwrap();
        revoke(dir.path(), &third).unwrap();
        assert!(matches!(
            revoke(dir.path(), &third),
            Err(RevokeError::NotFound(_))
        ));
        let allowed =
            |token: &str| allowed_uses(dir.path(), &hash_token(token.as_bytes())).unwrap();
        assert_eq!(allowed(&first), Some(1));
        assert_eq!(allowed(&second), None);
        assert_eq!(allowed(&third), None);
        assert_eq!(list(dir.path()).unwrap().len(), 1);
    }
}
