//! What the chaos run sent and what each member received, and the checks between the two.
//!
//! Every send is numbered per sender (1, 2, 3, ...; a number is never reused, also not for a
//! retry) and recorded with how it ended ([`SendOutcome`]): acknowledged by the homeserver,
//! refused by it with an error code, or unknown (the answer was lost: the server may or may
//! not have accepted it). Each member records the messages it receives, in order
//! ([`Receipt`]). [`analyze`] then counts, per receiver and sender:
//!
//! - **lost**: an acknowledged message the receiver had to get and never got;
//! - **duplicated**: a message received more than once (acknowledged or unknown alike);
//! - **out of order**: a message received after a later message of the same sender;
//! - **phantom**: a message nobody sent, a refused send that was delivered anyway, a text that
//!   does not parse, or a message whose MLS sender is not the member it claims to be from
//!   (the run adds those that came with another message id than their sender's `send`
//!   returned);
//! - **partial**: an unknown send that reached some but not all of the members that had to
//!   get it (the server either accepted it, then everyone gets it, or it did not).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// How one numbered send ended, as the sender saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// The homeserver answered OK: it must be delivered exactly once.
    Acknowledged,
    /// The homeserver answered with an error code: it must not be delivered.
    Refused,
    /// No answer (connection lost, timeout): delivered at most once.
    Unknown,
}

/// One application message as a member received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Receipt {
    /// A chaos message: the index of the member it says it is from (checked against the MLS
    /// sender when it was received) and its number.
    Numbered {
        /// The sending member's index.
        sender: usize,
        /// Its number.
        seq: u64,
    },
    /// Anything else (a text that does not parse, or whose MLS sender is someone else).
    Garbage(String),
}

/// The text of message `seq` of member `sender`.
pub fn message_text(sender: usize, seq: u64) -> String {
    format!("chaos {sender} {seq}")
}

/// Parses a [`message_text`].
pub fn parse_message(bytes: &[u8]) -> Option<(usize, u64)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut parts = text.split(' ');
    if parts.next()? != "chaos" {
        return None;
    }
    let sender = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((sender, seq))
}

/// The file name of message `seq` of member `sender` when it is sent as an attachment.
pub fn file_name(sender: usize, seq: u64) -> String {
    format!("chaos-{sender}-{seq}.bin")
}

/// Parses a [`file_name`].
pub fn parse_file_name(name: &str) -> Option<(usize, u64)> {
    let rest = name.strip_prefix("chaos-")?.strip_suffix(".bin")?;
    let (sender, seq) = rest.split_once('-')?;
    Some((sender.parse().ok()?, seq.parse().ok()?))
}

/// Largest attachment a chaos member sends (three and a bit of the SDK's 64 KiB chunks).
pub const MAX_FILE_LEN: usize = 200_000;

/// The content of attachment `seq` of member `sender`: its length (0 for one in eight, else up
/// to [`MAX_FILE_LEN`]) and bytes both follow from the pair, so a receiver can check what it
/// downloaded without being told.
pub fn file_bytes(sender: usize, seq: u64) -> Vec<u8> {
    use rand::{Rng as _, SeedableRng as _};
    let mut rng = rand::rngs::StdRng::seed_from_u64((sender as u64) << 40 ^ seq);
    let len = if rng.random_ratio(1, 8) {
        0
    } else {
        rng.random_range(1..=MAX_FILE_LEN)
    };
    let mut bytes = vec![0; len];
    rng.fill(&mut bytes[..]);
    bytes
}

/// The figures of a run's deliveries (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Sends the homeserver acknowledged.
    pub acknowledged: u64,
    /// Sends whose answer was lost.
    pub unknown: u64,
    /// Sends the homeserver refused with an error code.
    pub refused: u64,
    /// Messages received, over all members.
    pub received: u64,
    /// Acknowledged messages a member had to get and did not.
    pub lost: u64,
    /// Messages received more than once by the same member (each extra copy counts).
    pub duplicated: u64,
    /// Messages received after a later message of the same sender.
    pub out_of_order: u64,
    /// Messages received that were never sent, were refused, or do not parse.
    pub phantom: u64,
    /// Unknown sends received by at least one member.
    pub unknown_delivered: u64,
    /// Unknown sends received by some but not all of the members that had to get them.
    pub partial: u64,
    /// The first problems found, in words (at most [`MAX_FINDINGS`]).
    pub findings: Vec<String>,
}

/// Most problems described in words (the counts are always complete).
pub const MAX_FINDINGS: usize = 50;

impl Tally {
    /// Whether nothing was lost, duplicated, reordered, invented or half-delivered.
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.out_of_order == 0
            && self.phantom == 0
            && self.partial == 0
    }

    fn finding(&mut self, text: impl FnOnce() -> String) {
        if self.findings.len() < MAX_FINDINGS {
            self.findings.push(text());
        }
    }
}

/// Checks the receipts against the sends.
///
/// `sent[s]` maps each number member `s` used to its outcome; `received[r]` is what member
/// `r` received, in order; `must[r][s]` says from which of `s`'s numbers on `r` had to get
/// every acknowledged message (`None`: `r` need not get any, e.g. while it was not a member,
/// but what it got is still checked for duplicates, order and phantoms). `names[i]` names
/// member `i` in findings.
pub fn analyze(
    sent: &[BTreeMap<u64, SendOutcome>],
    received: &[Vec<Receipt>],
    must: &[Vec<Option<u64>>],
    names: &[String],
) -> Tally {
    let name = |i: usize| names.get(i).cloned().unwrap_or_else(|| format!("#{i}"));
    let mut tally = Tally::default();
    for outcomes in sent {
        for outcome in outcomes.values() {
            match outcome {
                SendOutcome::Acknowledged => tally.acknowledged += 1,
                SendOutcome::Refused => tally.refused += 1,
                SendOutcome::Unknown => tally.unknown += 1,
            }
        }
    }
    // (sender, seq) of unknown sends → receivers that got them.
    let mut unknown_got: BTreeMap<(usize, u64), BTreeSet<usize>> = BTreeMap::new();
    for (r, receipts) in received.iter().enumerate() {
        let mut seen: BTreeSet<(usize, u64)> = BTreeSet::new();
        let mut last: BTreeMap<usize, u64> = BTreeMap::new();
        for receipt in receipts {
            tally.received += 1;
            let (s, seq) = match receipt {
                Receipt::Numbered { sender, seq } => (*sender, *seq),
                Receipt::Garbage(text) => {
                    tally.phantom += 1;
                    tally.finding(|| format!("{} received a message nobody sent: {text}", name(r)));
                    continue;
                }
            };
            let outcome = sent.get(s).and_then(|o| o.get(&seq)).copied();
            match outcome {
                None => {
                    tally.phantom += 1;
                    tally.finding(|| {
                        format!(
                            "{} received {} #{seq}, which was never sent",
                            name(r),
                            name(s)
                        )
                    });
                    continue;
                }
                Some(SendOutcome::Refused) => {
                    tally.phantom += 1;
                    tally.finding(|| {
                        format!(
                            "{} received {} #{seq}, which the server refused",
                            name(r),
                            name(s)
                        )
                    });
                }
                Some(_) if s == r => {
                    tally.phantom += 1;
                    tally.finding(|| format!("{} received its own #{seq}", name(r)));
                }
                Some(SendOutcome::Unknown) => {
                    unknown_got.entry((s, seq)).or_default().insert(r);
                }
                Some(SendOutcome::Acknowledged) => {}
            }
            if !seen.insert((s, seq)) {
                tally.duplicated += 1;
                tally.finding(|| format!("{} received {} #{seq} again", name(r), name(s)));
                continue;
            }
            let previous = last.entry(s).or_insert(0);
            if seq < *previous {
                tally.out_of_order += 1;
                tally.finding(|| {
                    format!(
                        "{} received {} #{seq} after #{}",
                        name(r),
                        name(s),
                        *previous
                    )
                });
            } else {
                *previous = seq;
            }
        }
        for (s, outcomes) in sent.iter().enumerate() {
            let Some(Some(from)) = must.get(r).and_then(|m| m.get(s)) else {
                continue;
            };
            if s == r {
                continue;
            }
            for (&seq, outcome) in outcomes.range(from..) {
                if *outcome == SendOutcome::Acknowledged && !seen.contains(&(s, seq)) {
                    tally.lost += 1;
                    tally.finding(|| {
                        format!(
                            "{} never received {} #{seq} (acknowledged)",
                            name(r),
                            name(s)
                        )
                    });
                }
            }
        }
    }
    tally.unknown_delivered = unknown_got.len() as u64;
    for ((s, seq), got) in &unknown_got {
        let required: Vec<usize> = (0..received.len())
            .filter(|&r| {
                r != *s
                    && must
                        .get(r)
                        .and_then(|m| m.get(*s))
                        .copied()
                        .flatten()
                        .is_some_and(|from| *seq >= from)
            })
            .collect();
        let missing: Vec<String> = required
            .iter()
            .filter(|r| !got.contains(r))
            .map(|&r| name(r))
            .collect();
        if !missing.is_empty() {
            tally.partial += 1;
            tally.finding(|| {
                format!(
                    "{} #{seq} (answer lost) reached some members but not {}",
                    name(*s),
                    missing.join(", ")
                )
            });
        }
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;
    use SendOutcome::{Acknowledged as A, Refused as R, Unknown as U};

    fn sent(outcomes: &[&[SendOutcome]]) -> Vec<BTreeMap<u64, SendOutcome>> {
        outcomes
            .iter()
            .map(|o| (1..).zip(o.iter().copied()).collect())
            .collect()
    }

    fn got(list: &[(usize, u64)]) -> Vec<Receipt> {
        list.iter()
            .map(|&(sender, seq)| Receipt::Numbered { sender, seq })
            .collect()
    }

    fn names() -> Vec<String> {
        vec!["m0".into(), "m1".into(), "m2".into()]
    }

    /// m0 and m1 send, everyone must get everything.
    fn all_must(n: usize) -> Vec<Vec<Option<u64>>> {
        vec![vec![Some(1); n]; n]
    }

    #[test]
    fn file_names_round_trip_and_contents_follow_from_them() {
        assert_eq!(parse_file_name(&file_name(3, 77)), Some((3, 77)));
        for bad in [
            "chaos-3-77",
            "chaos-3.bin",
            "x-3-77.bin",
            "chaos-a-1.bin",
            "chaos-1-2-3.bin",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
        assert_eq!(file_bytes(1, 2), file_bytes(1, 2));
        assert_ne!(file_bytes(1, 2), file_bytes(2, 1));
        let lens: Vec<usize> = (1..200).map(|seq| file_bytes(0, seq).len()).collect();
        assert!(lens.contains(&0), "{lens:?}");
        assert!(lens.iter().any(|&len| len > 3 * 65_536), "{lens:?}");
        assert!(lens.iter().all(|&len| len <= MAX_FILE_LEN));
    }

    #[test]
    fn texts_round_trip_and_garbage_does_not_parse() {
        assert_eq!(parse_message(message_text(3, 41).as_bytes()), Some((3, 41)));
        assert_eq!(parse_message(b"chaos 3"), None);
        assert_eq!(parse_message(b"chaos 3 4 5"), None);
        assert_eq!(parse_message(b"hello 1 2"), None);
        assert_eq!(parse_message(&[0xff, 0xfe]), None);
    }

    #[test]
    fn a_clean_run_is_clean() {
        let sent = sent(&[&[A, A, U, A], &[A, R, A], &[]]);
        let everything = got(&[(0, 1), (1, 1), (0, 2), (0, 3), (0, 4), (1, 3)]);
        let received = vec![
            got(&[(1, 1), (1, 3)]),
            got(&[(0, 1), (0, 2), (0, 3), (0, 4)]),
            everything,
        ];
        let tally = analyze(&sent, &received, &all_must(3), &names());
        assert!(tally.clean(), "{tally:?}");
        assert_eq!(
            (tally.acknowledged, tally.unknown, tally.refused),
            (5, 1, 1)
        );
        assert_eq!(tally.received, 12);
        // m0 #3 (answer lost) reached both members that had to get it.
        assert_eq!(tally.unknown_delivered, 1);
        assert_eq!(tally.partial, 0, "{tally:?}");
    }

    #[test]
    fn each_fault_is_counted() {
        let sent = sent(&[&[A, A, A, U], &[A], &[]]);
        let received = vec![
            // Lost m1 #1.
            vec![],
            // Duplicate #1, #3 before #2 (out of order), m0 #4 (unknown) only here.
            got(&[(0, 1), (0, 1), (0, 3), (0, 2), (0, 4)]),
            // Never sent (#9), refused-free but garbage too.
            vec![
                Receipt::Numbered { sender: 0, seq: 1 },
                Receipt::Numbered { sender: 0, seq: 2 },
                Receipt::Numbered { sender: 0, seq: 3 },
                Receipt::Numbered { sender: 0, seq: 9 },
                Receipt::Numbered { sender: 1, seq: 1 },
                Receipt::Garbage("hello".into()),
            ],
        ];
        let tally = analyze(&sent, &received, &all_must(3), &names());
        assert_eq!(tally.lost, 1, "{tally:?}");
        assert_eq!(tally.duplicated, 1, "{tally:?}");
        assert_eq!(tally.out_of_order, 1, "{tally:?}");
        assert_eq!(tally.phantom, 2, "{tally:?}");
        assert_eq!(tally.partial, 1, "{tally:?}");
        assert!(!tally.clean());
        assert!(
            tally
                .findings
                .iter()
                .any(|f| f == "m0 never received m1 #1 (acknowledged)"),
            "{:?}",
            tally.findings
        );
    }

    #[test]
    fn refused_or_own_messages_delivered_are_phantoms() {
        let sent = sent(&[&[R, A], &[]]);
        let received = vec![got(&[(0, 2)]), got(&[(0, 1), (0, 2)])];
        let tally = analyze(&sent, &received, &all_must(2), &names());
        assert_eq!(tally.phantom, 2, "{tally:?}");
        assert_eq!(tally.lost, 0);
    }

    #[test]
    fn only_required_messages_can_be_lost() {
        let sent = sent(&[&[A, A, A], &[]]);
        // m1 joined at m0's #3: #1 and #2 are not its to get; nor is anything with None.
        let must = vec![vec![None, None], vec![Some(3), None]];
        let tally = analyze(&sent, &[vec![], got(&[(0, 3)])], &must, &names());
        assert!(tally.clean(), "{tally:?}");
        let tally = analyze(&sent, &[vec![], vec![]], &must, &names());
        assert_eq!(tally.lost, 1);
        let tally = analyze(&sent, &[vec![], got(&[(0, 3), (0, 1)])], &must, &names());
        assert_eq!(tally.out_of_order, 1);
    }
}
