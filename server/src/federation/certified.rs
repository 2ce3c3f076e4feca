//! The signature keys other domains' ASes certified for their clients, as the hub last heard
//! them: bounded in number and trusted only for a while, so that a commit that adds a member
//! of another domain usually needs no round trip, and a revocation there is seen here at the
//! latest when the entry expires.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use roost_protocol::ClientId;

/// See the module docs.
pub(crate) struct CertifiedKeys {
    capacity: usize,
    ttl: Duration,
    /// Client → (certified signature key, when the entry expires).
    entries: Mutex<HashMap<ClientId, (Vec<u8>, Instant)>>,
}

impl CertifiedKeys {
    pub(crate) fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            capacity,
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<ClientId, (Vec<u8>, Instant)>> {
        match self.entries.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The key certified for `client`, unless unknown or expired.
    pub(crate) fn get(&self, client: &ClientId) -> Option<Vec<u8>> {
        self.get_at(client, Instant::now())
    }

    fn get_at(&self, client: &ClientId, now: Instant) -> Option<Vec<u8>> {
        let mut entries = self.entries();
        match entries.get(client) {
            Some((key, expires)) if *expires > now => Some(key.clone()),
            Some(_) => {
                entries.remove(client);
                None
            }
            None => None,
        }
    }

    /// Remembers the key `client`'s AS certified. When full, expired entries go first, then
    /// those closest to expiring.
    pub(crate) fn insert(&self, client: ClientId, key: Vec<u8>) {
        self.insert_at(client, key, Instant::now());
    }

    fn insert_at(&self, client: ClientId, key: Vec<u8>, now: Instant) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.entries();
        if entries.len() >= self.capacity && !entries.contains_key(&client) {
            entries.retain(|_, (_, expires)| *expires > now);
            if entries.len() >= self.capacity {
                // Room for a quarter of the capacity at once, so this scan stays rare.
                let mut by_expiry: Vec<(Instant, ClientId)> = entries
                    .iter()
                    .map(|(c, (_, expires))| (*expires, c.clone()))
                    .collect();
                by_expiry.sort_unstable_by_key(|(expires, _)| *expires);
                let drop = entries.len() + 1 - self.capacity + self.capacity / 4;
                for (_, c) in by_expiry.into_iter().take(drop) {
                    entries.remove(&c);
                }
            }
        }
        entries.insert(client, (key, now + self.ttl));
    }

    /// Forgets `client`'s key (its AS no longer certifies it).
    pub(crate) fn remove(&self, client: &ClientId) {
        self.entries().remove(client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(n: u32) -> ClientId {
        format!("user{n}@beta.test/phone").parse().unwrap()
    }

    #[test]
    fn entries_expire_and_the_cache_stays_bounded() {
        let cache = CertifiedKeys::new(8, Duration::from_secs(60));
        let start = Instant::now();
        cache.insert_at(client(0), vec![0], start);
        assert_eq!(cache.get_at(&client(0), start), Some(vec![0]));
        assert_eq!(
            cache.get_at(&client(0), start + Duration::from_secs(61)),
            None
        );
        for n in 0..100 {
            cache.insert_at(
                client(n),
                vec![n as u8],
                start + Duration::from_secs(n.into()),
            );
            assert!(cache.entries().len() <= 8);
        }
        // The newest entry is always kept; the oldest went first.
        let late = start + Duration::from_secs(99);
        assert_eq!(cache.get_at(&client(99), late), Some(vec![99]));
        assert_eq!(cache.get_at(&client(0), late), None);
        cache.remove(&client(99));
        assert_eq!(cache.get_at(&client(99), late), None);
        // Capacity 0 keeps nothing.
        let none = CertifiedKeys::new(0, Duration::from_secs(60));
        none.insert(client(1), vec![1]);
        assert_eq!(none.get(&client(1)), None);
    }
}
