//! How a hosted group's state is stored, for every engine: a full snapshot (the base) and a
//! chain of deltas on it, one per later write of the state. A commit in a large group changes
//! a few nodes of the ratchet tree, the group context and the GroupInfo; the rest of the
//! snapshot (≈ 176 KB at 1,000 members) stays byte for byte the same. Writing only what
//! changed makes the commit's durable write a few KB; a full snapshot is written again once
//! the chain holds [`MAX_DELTAS`] deltas or half the snapshot's size (so loading replays a
//! bounded chain and the stored state stays below 1.5 × the snapshot).
//!
//! A delta turns the previous snapshot into the next: copies of ranges of the previous one
//! and literal bytes, found by matching blocks of [`BLOCK`] bytes (a rolling hash over the
//! new snapshot, looked up in an index of the old one's aligned blocks; matches are extended
//! both ways). Every delta is checked by applying it before it is handed to the store.
//!
//! Format (after the version byte [`FORMAT`]): the target's length as a varint, then ops: `0`,
//! offset, length (a copy from the previous snapshot); `1`, length, bytes (literal). Varints
//! are LEB128. Deltas come only from the DS's own store, but a damaged one is refused with a
//! typed error, never a panic.

use super::StoreError;

/// The first byte of every delta.
const FORMAT: u8 = 1;
/// The matching granularity: a changed region costs up to about this many extra bytes.
const BLOCK: usize = 32;
/// A full snapshot is written once this many deltas are stored on the base.
pub(crate) const MAX_DELTAS: u32 = 64;
const OP_COPY: u8 = 0;
const OP_LITERAL: u8 = 1;
/// Multiplier of the rolling hash (odd, so powers of it never vanish modulo 2^64).
const PRIME: u64 = 0x0100_0000_01b3;

/// The deltas stored on a group's base: how many, and their bytes in all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Chain {
    pub(crate) deltas: u32,
    /// At most half a snapshot (snapshots stay far below 4 GiB; a larger one is always
    /// written in full).
    pub(crate) bytes: u32,
}

/// How one write stores the state: in full (a new base, the chain is dropped), or as a delta
/// on the state of the previous version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stored {
    Full(Vec<u8>),
    Delta(Vec<u8>),
}

impl Stored {
    /// The bytes the engine writes.
    pub(crate) fn into_bytes(self) -> Vec<u8> {
        match self {
            Stored::Full(bytes) | Stored::Delta(bytes) => bytes,
        }
    }
}

/// Decides how to store `new`, the snapshot following `previous` (stored with `chain` on its
/// base): a delta while the chain stays within its bounds, else in full. Returns the form and
/// the chain after the write.
pub(crate) fn next(previous: &[u8], new: &[u8], chain: Chain) -> (Stored, Chain) {
    if chain.deltas < MAX_DELTAS && !previous.is_empty() {
        let delta = diff(previous, new);
        let bytes = u64::from(chain.bytes) + delta.len() as u64;
        // Checked: the store must hold exactly the snapshot the group has in memory.
        if let Ok(bytes) = u32::try_from(bytes)
            && bytes as usize <= new.len() / 2
            && patch(previous, &delta).is_ok_and(|p| p == new)
        {
            let chain = Chain {
                deltas: chain.deltas + 1,
                bytes,
            };
            return (Stored::Delta(delta), chain);
        }
    }
    (Stored::Full(new.to_vec()), Chain::default())
}

/// A group's snapshot from its base and its deltas in write order, with the chain's size.
pub(crate) fn assemble<'a>(
    base: Vec<u8>,
    deltas: impl IntoIterator<Item = &'a [u8]>,
) -> Result<(Vec<u8>, Chain), StoreError> {
    let mut chain = Chain::default();
    let mut snapshot = base;
    for delta in deltas {
        snapshot = patch(&snapshot, delta)?;
        chain.deltas = chain.deltas.saturating_add(1);
        chain.bytes = chain
            .bytes
            .saturating_add(u32::try_from(delta.len()).unwrap_or(u32::MAX));
    }
    Ok((snapshot, chain))
}

/// Whether deltas stored for `versions` (in order) lead one at a time to the state of
/// `version`: none, or consecutive versions ending at it.
pub(crate) fn leads_to(versions: impl IntoIterator<Item = u64>, version: u64) -> bool {
    let mut last = None;
    for v in versions {
        if last.is_some_and(|last: u64| last.checked_add(1) != Some(v)) {
            return false;
        }
        last = Some(v);
    }
    last.is_none_or(|last| last == version)
}

/// Polynomial hash of `block` (the same as the rolling hash over a window of its length).
fn hash(block: &[u8]) -> u64 {
    block.iter().fold(0u64, |h, &b| {
        h.wrapping_mul(PRIME).wrapping_add(u64::from(b))
    })
}

/// Where each aligned block of `old` starts, by hash (open addressing; offset + 1, 0 free).
struct Index {
    slots: Vec<u32>,
    mask: usize,
}

impl Index {
    fn of(old: &[u8]) -> Index {
        let blocks = old.len() / BLOCK;
        let size = (blocks * 2).next_power_of_two().max(16);
        let mut index = Index {
            slots: vec![0; size],
            mask: size - 1,
        };
        for (n, block) in old.chunks_exact(BLOCK).enumerate() {
            let mut slot = index.slot(hash(block));
            // The first block with a hash wins; later equal ones probe on (bounded by size).
            for _ in 0..8 {
                if index.slots[slot] == 0 {
                    index.slots[slot] = (n * BLOCK) as u32 + 1;
                    break;
                }
                slot = (slot + 1) & index.mask;
            }
        }
        index
    }

    fn slot(&self, hash: u64) -> usize {
        (hash ^ (hash >> 29)) as usize & self.mask
    }

    /// An offset of `old` whose block equals `window`.
    fn find(&self, old: &[u8], hash: u64, window: &[u8]) -> Option<usize> {
        let mut slot = self.slot(hash);
        for _ in 0..8 {
            let entry = self.slots[slot] as usize;
            if entry == 0 {
                return None;
            }
            let offset = entry - 1;
            if old.get(offset..offset + BLOCK) == Some(window) {
                return Some(offset);
            }
            slot = (slot + 1) & self.mask;
        }
        None
    }
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Length of the common prefix of `a` and `b`, compared a word at a time.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n && a[i..i + 8] == b[i..i + 8] {
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// The delta that turns `old` into `new` (see the module docs).
pub(crate) fn diff(old: &[u8], new: &[u8]) -> Vec<u8> {
    let mut out = vec![FORMAT];
    varint(&mut out, new.len() as u64);
    // Snapshots are far below 4 GiB; past that (never), offsets would not fit the index.
    let index = (old.len() < u32::MAX as usize).then(|| Index::of(old));
    let mut literal_from = 0; // start of the bytes not yet emitted
    let mut p = 0;
    let mut out_power = 1u64; // PRIME^BLOCK, for removing the byte leaving the window
    for _ in 0..BLOCK {
        out_power = out_power.wrapping_mul(PRIME);
    }
    // The old offset aligned with `p` by the last copy: tried first after a change.
    let mut aligned: Option<usize> = Some(0);
    let mut rolling: Option<u64> = None;
    while p < new.len() {
        // A copy from where the previous one left off (same-size changes), else by the index.
        let mut found = aligned.filter(|&o| o < old.len() && old[o] == new[p]);
        if found.is_none()
            && let Some(index) = &index
            && p + BLOCK <= new.len()
        {
            let h = match rolling {
                Some(h) => h,
                None => hash(&new[p..p + BLOCK]),
            };
            rolling = Some(h);
            found = index.find(old, h, &new[p..p + BLOCK]);
        }
        let Some(mut o) = found else {
            // No match at `p`: it joins the literal; the window rolls on.
            if let Some(h) = rolling
                && p + BLOCK < new.len()
            {
                rolling = Some(
                    h.wrapping_mul(PRIME)
                        .wrapping_sub(u64::from(new[p]).wrapping_mul(out_power))
                        .wrapping_add(u64::from(new[p + BLOCK])),
                );
            } else {
                rolling = None;
            }
            if let Some(a) = aligned.as_mut() {
                *a += 1;
            }
            p += 1;
            continue;
        };
        let mut start = p;
        // Extend backwards into the pending literal.
        while start > literal_from && o > 0 && new[start - 1] == old[o - 1] {
            start -= 1;
            o -= 1;
        }
        let len = common_prefix(&old[o..], &new[start..]);
        // Short matches by alignment alone cost more than the literal bytes they save.
        if len < 8 && start + len < new.len() {
            if let Some(a) = aligned.as_mut() {
                *a += 1;
            }
            rolling = None;
            p += 1;
            continue;
        }
        if start > literal_from {
            out.push(OP_LITERAL);
            varint(&mut out, (start - literal_from) as u64);
            out.extend_from_slice(&new[literal_from..start]);
        }
        out.push(OP_COPY);
        varint(&mut out, o as u64);
        varint(&mut out, len as u64);
        p = start + len;
        literal_from = p;
        aligned = Some(o + len);
        rolling = None;
    }
    if literal_from < new.len() {
        out.push(OP_LITERAL);
        varint(&mut out, (new.len() - literal_from) as u64);
        out.extend_from_slice(&new[literal_from..]);
    }
    out
}

/// Reads a varint at `*at`.
fn read_varint(bytes: &[u8], at: &mut usize) -> Result<u64, StoreError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at).ok_or(StoreError::Corrupt("group delta"))?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(StoreError::Corrupt("group delta"))
}

/// Applies a delta from [`diff`] to `old`.
pub(crate) fn patch(old: &[u8], delta: &[u8]) -> Result<Vec<u8>, StoreError> {
    let corrupt = StoreError::Corrupt("group delta");
    if delta.first() != Some(&FORMAT) {
        return Err(corrupt);
    }
    let mut at = 1;
    let len = usize::try_from(read_varint(delta, &mut at)?).map_err(|_| corrupt.clone())?;
    // The length is checked as the pieces come; a damaged one must not reserve memory.
    let mut out = Vec::with_capacity(len.min(old.len().saturating_add(delta.len())));
    while at < delta.len() {
        let op = delta[at];
        at += 1;
        let piece = match op {
            OP_COPY => {
                let offset = read_varint(delta, &mut at)?;
                let n = read_varint(delta, &mut at)?;
                let range = usize::try_from(offset)
                    .ok()
                    .zip(usize::try_from(n).ok())
                    .and_then(|(o, n)| Some(o..o.checked_add(n)?));
                range.and_then(|r| old.get(r))
            }
            OP_LITERAL => {
                let n = usize::try_from(read_varint(delta, &mut at)?).ok();
                let piece = n.and_then(|n| delta.get(at..at.checked_add(n)?));
                at += piece.map_or(0, <[u8]>::len);
                piece
            }
            _ => None,
        };
        let piece = piece.ok_or(corrupt.clone())?;
        if out.len() + piece.len() > len {
            return Err(corrupt);
        }
        out.extend_from_slice(piece);
    }
    if out.len() != len {
        return Err(corrupt);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::suite::noise;

    fn round_trip(old: &[u8], new: &[u8]) -> usize {
        let delta = diff(old, new);
        assert_eq!(patch(old, &delta).unwrap(), new);
        delta.len()
    }

    #[test]
    fn deltas_rebuild_the_new_bytes_exactly() {
        let old = noise(1, 50_000);
        // Unchanged, emptied, from nothing, entirely different.
        assert!(round_trip(&old, &old) < 16);
        round_trip(&old, &[]);
        round_trip(&[], &old);
        round_trip(&old, &noise(2, 40_000));
        // Scattered same-size edits, insertions and deletions (everything after them shifts).
        let mut new = old.clone();
        for (n, at) in [100usize, 7_000, 23_456, 49_990].into_iter().enumerate() {
            new[at..at + 8].copy_from_slice(&noise(10 + n as u64, 8));
        }
        new.splice(30_000..30_000, noise(3, 77));
        new.drain(12_000..12_500);
        new.splice(0..0, noise(4, 5));
        new.extend_from_slice(&noise(5, 9));
        let len = round_trip(&old, &new);
        // What changed (≈ 130 bytes) plus block-sized margins, not the 50 KB.
        assert!(len < 1_000, "delta of {len} bytes");
    }

    #[test]
    fn repetitive_bytes_round_trip() {
        let old = vec![0u8; 10_000];
        let mut new = vec![0u8; 12_000];
        new[5_000] = 1;
        assert!(round_trip(&old, &new) < 64);
        let old: Vec<u8> = (0..20_000).map(|i| (i % 7) as u8).collect();
        let new: Vec<u8> = (0..20_003).map(|i| (i % 7) as u8).collect();
        round_trip(&old, &new);
    }

    #[test]
    fn damaged_deltas_are_refused_not_applied() {
        let old = noise(1, 5_000);
        let mut new = old.clone();
        new[2_000] ^= 1;
        let delta = diff(&old, &new);
        for cut in 0..delta.len() {
            assert!(patch(&old, &delta[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = delta.clone();
        trailing.extend_from_slice(&[OP_LITERAL, 1, 0]);
        assert!(patch(&old, &trailing).is_err());
        let mut unknown = delta.clone();
        unknown[0] = FORMAT + 1;
        assert!(patch(&old, &unknown).is_err());
        // Against another base the copies point past its end.
        assert!(patch(&old[..100], &delta).is_err());
        // Every single-byte change is refused or yields some other bytes, never a panic.
        for at in 0..delta.len() {
            let mut damaged = delta.clone();
            damaged[at] ^= 0x55;
            let _ = patch(&old, &damaged);
        }
    }

    #[test]
    fn the_chain_is_bounded_and_rebuilds_every_state() {
        let base = noise(7, 20_000);
        let mut stored_base = base.clone();
        let mut deltas: Vec<Vec<u8>> = Vec::new();
        let (mut previous, mut chain) = (base, Chain::default());
        let mut fulls = 0;
        for step in 0..200u64 {
            let mut new = previous.clone();
            let at = (step as usize * 997) % (new.len() - 64);
            new[at..at + 40].copy_from_slice(&noise(100 + step, 40));
            let (stored, after) = next(&previous, &new, chain);
            match stored {
                Stored::Full(bytes) => {
                    fulls += 1;
                    assert_eq!(after, Chain::default());
                    stored_base = bytes;
                    deltas.clear();
                }
                Stored::Delta(delta) => deltas.push(delta),
            }
            assert!(after.deltas <= MAX_DELTAS && after.bytes as usize <= new.len() / 2);
            let (loaded, loaded_chain) =
                assemble(stored_base.clone(), deltas.iter().map(Vec::as_slice)).unwrap();
            assert_eq!(loaded, new, "step {step}");
            assert_eq!(loaded_chain, after);
            (previous, chain) = (new, after);
        }
        // Mostly deltas; a full write at least every MAX_DELTAS.
        assert!(
            (200 / MAX_DELTAS as usize..20).contains(&fulls),
            "{fulls} full writes"
        );
    }
}
