//! Entry points for the fuzz targets in `fuzz/` (cargo feature `fuzzing`, also built for the
//! unit tests that write and check the seed corpus). Not an API: nothing here changes what the
//! server does. Each function calls the code the services run on bytes from the network, and
//! panics only when an invariant of that code breaks (a finding), never because the input is bad.

use openmls::prelude::{BasicCredential, KeyPackageIn, ProtocolVersion};
use openmls_rust_crypto::RustCrypto;
use tls_codec::DeserializeBytes as _;

use crate::mls::{DsGroup, KeyPackagePolicy, Member, key_package_lifetime, validate_key_package};

/// Group size limit the DS harness applies (the server's default `max_group_members` is larger;
/// the check is the same).
pub const DS_MAX_MEMBERS: usize = 100;

/// Runs the KeyPackage service's validation on `bytes` at `now`, as uploaded by the client its
/// own credential names (so the owner checks pass and everything after them is reached).
/// Checks that the server's own lifetime parser agrees with openmls: it reads the same lifetime
/// openmls reads from every KeyPackage openmls accepts. (It may refuse more: a KeyPackage whose
/// leaf is not of source `key_package`, for instance, which openmls decodes and then refuses.)
/// Returns the validation result.
pub fn key_package(bytes: &[u8], now: u64) -> Result<u64, String> {
    let lifetime = key_package_lifetime(bytes);
    let decoded = match KeyPackageIn::tls_deserialize_bytes(bytes) {
        Ok((kp, [])) => Some(kp),
        _ => None,
    };
    let (identity, signature_key) = match &decoded {
        Some(kp) => {
            let credential = kp.unverified_credential();
            let identity = BasicCredential::try_from(credential.credential)
                .map(|basic| basic.identity().to_vec());
            (
                identity.unwrap_or_default(),
                credential.signature_key.as_slice().to_vec(),
            )
        }
        None => (Vec::new(), Vec::new()),
    };
    if let Some(kp) = decoded
        && let Ok(valid) = kp.validate(&RustCrypto::default(), ProtocolVersion::Mls10)
    {
        let life = valid.life_time();
        assert_eq!(
            lifetime,
            Some((life.not_before(), life.not_after())),
            "the server's lifetime parser and openmls disagree"
        );
    }
    let policy = KeyPackagePolicy {
        identity: &identity,
        signature_key: &signature_key,
        now,
        clock_skew: 300,
        max_lifetime: 90 * 24 * 3600,
    };
    let result = validate_key_package(bytes, &policy);
    if let Ok(not_after) = result {
        assert_eq!(Some(not_after), lifetime.map(|(_, after)| after));
    }
    result
}

/// One operation of the DS harness: what a client request hands to the DS's group engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DsOp {
    /// CreateGroup: GroupInfo and ratchet tree of epoch 0, for the harness group's id.
    Create {
        creator: Vec<u8>,
        group_info: Vec<u8>,
        ratchet_tree: Vec<u8>,
    },
    /// Commit by the member at `sender` (any index past the last member is a non-member).
    Commit {
        sender: u8,
        commit: Vec<u8>,
        /// Empty: no Welcome.
        welcome: Vec<u8>,
        group_info: Vec<u8>,
    },
    /// ExternalJoin.
    External {
        joiner: Vec<u8>,
        commit: Vec<u8>,
        group_info: Vec<u8>,
    },
    /// LeaveGroup proposal by the member at `sender`.
    Leave { sender: u8, proposal: Vec<u8> },
    /// SendMessage: an application message, accepted up to `past_epochs` epochs back.
    Application { past_epochs: u8, message: Vec<u8> },
}

fn put_chunk(out: &mut Vec<u8>, chunk: &[u8]) {
    let len = u16::try_from(chunk.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&chunk[..usize::from(len)]);
}

fn take_u8(input: &mut &[u8]) -> Option<u8> {
    let (&first, rest) = input.split_first()?;
    *input = rest;
    Some(first)
}

fn take_chunk(input: &mut &[u8]) -> Option<Vec<u8>> {
    let len = usize::from(u16::from_be_bytes([take_u8(input)?, take_u8(input)?]));
    let chunk = input.get(..len)?.to_vec();
    *input = &input[len..];
    Some(chunk)
}

/// Encodes operations as a DS harness input: per operation a kind byte, then its fields (a
/// byte, or a chunk of a big-endian u16 length and that many bytes).
pub fn encode_ds_ops(ops: &[DsOp]) -> Vec<u8> {
    let mut out = Vec::new();
    for op in ops {
        match op {
            DsOp::Create {
                creator,
                group_info,
                ratchet_tree,
            } => {
                out.push(0);
                put_chunk(&mut out, creator);
                put_chunk(&mut out, group_info);
                put_chunk(&mut out, ratchet_tree);
            }
            DsOp::Commit {
                sender,
                commit,
                welcome,
                group_info,
            } => {
                out.push(1);
                out.push(*sender);
                put_chunk(&mut out, commit);
                put_chunk(&mut out, welcome);
                put_chunk(&mut out, group_info);
            }
            DsOp::External {
                joiner,
                commit,
                group_info,
            } => {
                out.push(2);
                put_chunk(&mut out, joiner);
                put_chunk(&mut out, commit);
                put_chunk(&mut out, group_info);
            }
            DsOp::Leave { sender, proposal } => {
                out.push(3);
                out.push(*sender);
                put_chunk(&mut out, proposal);
            }
            DsOp::Application {
                past_epochs,
                message,
            } => {
                out.push(4);
                out.push(*past_epochs);
                put_chunk(&mut out, message);
            }
        }
    }
    out
}

/// Decodes a DS harness input; stops at the first incomplete operation. Kind bytes are taken
/// modulo the number of kinds, so every input means something.
pub fn decode_ds_ops(mut input: &[u8]) -> Vec<DsOp> {
    let mut ops = Vec::new();
    let input = &mut input;
    while let Some(kind) = take_u8(input) {
        let op = match kind % 5 {
            0 => (|| {
                Some(DsOp::Create {
                    creator: take_chunk(input)?,
                    group_info: take_chunk(input)?,
                    ratchet_tree: take_chunk(input)?,
                })
            })(),
            1 => (|| {
                Some(DsOp::Commit {
                    sender: take_u8(input)?,
                    commit: take_chunk(input)?,
                    welcome: take_chunk(input)?,
                    group_info: take_chunk(input)?,
                })
            })(),
            2 => (|| {
                Some(DsOp::External {
                    joiner: take_chunk(input)?,
                    commit: take_chunk(input)?,
                    group_info: take_chunk(input)?,
                })
            })(),
            3 => (|| {
                Some(DsOp::Leave {
                    sender: take_u8(input)?,
                    proposal: take_chunk(input)?,
                })
            })(),
            _ => (|| {
                Some(DsOp::Application {
                    past_epochs: take_u8(input)?,
                    message: take_chunk(input)?,
                })
            })(),
        };
        match op {
            Some(op) => ops.push(op),
            None => break,
        }
    }
    ops
}

/// What a caller can see of a DS group; must not change when the DS refuses an input.
#[derive(Debug, PartialEq, Eq)]
struct Visible {
    epoch: u64,
    members: Vec<Member>,
    group_info: Vec<u8>,
    ratchet_tree: Vec<u8>,
}

fn visible(group: &DsGroup) -> Visible {
    Visible {
        epoch: group.epoch(),
        members: group.members(),
        group_info: group.group_info(),
        ratchet_tree: group.export_ratchet_tree(),
    }
}

/// A DS group loaded once from a snapshot (the form the server persists), fed operations.
pub struct DsHarness {
    snapshot: Vec<u8>,
    group: DsGroup,
}

impl std::fmt::Debug for DsHarness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DsHarness")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

/// How the operations of one input ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DsRun {
    /// Per operation: accepted or the DS's reason.
    pub results: Vec<Result<(), String>>,
}

impl DsHarness {
    /// Loads the group from a [`DsHarness::snapshot`] of a group.
    pub fn new(snapshot: &[u8]) -> Result<Self, String> {
        let group = DsGroup::from_snapshot(snapshot).map_err(|e| e.to_string())?;
        Ok(Self {
            snapshot: snapshot.to_vec(),
            group,
        })
    }

    /// Applies the operations of `input` (see [`decode_ds_ops`]) in order, then returns to the
    /// loaded state. Panics (a finding) if a refused operation changed the group, if an
    /// accepted one leaves a state that does not persist and load again, or if a commit's
    /// outcome disagrees with the group.
    pub fn run(&mut self, input: &[u8]) -> DsRun {
        let mut run = DsRun::default();
        let mut changed = false;
        for op in decode_ds_ops(input) {
            let before = visible(&self.group);
            let result = self.apply(op);
            match &result {
                Ok(true) => {
                    changed = true;
                    let snapshot = self
                        .group
                        .snapshot()
                        .expect("an accepted state must persist");
                    let reloaded =
                        DsGroup::from_snapshot(&snapshot).expect("a persisted state must load");
                    assert_eq!(visible(&reloaded), visible(&self.group));
                }
                Ok(false) => assert_eq!(visible(&self.group), before),
                Err(_) => assert_eq!(
                    visible(&self.group),
                    before,
                    "a refused input changed the group"
                ),
            }
            run.results.push(result.map(|_| ()));
        }
        if changed {
            // Only ever fails if loading the same snapshot stopped working.
            self.group =
                DsGroup::from_snapshot(&self.snapshot).expect("the snapshot loaded before");
        }
        run
    }

    fn identity(&self, index: u8) -> Vec<u8> {
        self.group
            .members()
            .get(usize::from(index))
            .map(|m| m.identity.clone())
            .unwrap_or_else(|| b"mallory".to_vec())
    }

    /// Ok(true) when the group changed.
    fn apply(&mut self, op: DsOp) -> Result<bool, String> {
        let accept = |_: &[u8], _: &[u8]| Some(true);
        match op {
            DsOp::Create {
                creator,
                group_info,
                ratchet_tree,
            } => {
                let created = DsGroup::create(
                    &self.group.group_id(),
                    &creator,
                    &group_info,
                    &ratchet_tree,
                    DS_MAX_MEMBERS,
                )
                .map_err(|e| e.to_string())?;
                assert_eq!(created.epoch(), 0);
                assert_eq!(created.members().len(), 1);
                Ok(false)
            }
            DsOp::Commit {
                sender,
                commit,
                welcome,
                group_info,
            } => {
                let identity = self.identity(sender);
                let welcome = (!welcome.is_empty()).then_some(welcome.as_slice());
                let before = self.group.members();
                let outcome = self
                    .group
                    .process_commit_checked(
                        &identity,
                        &commit,
                        welcome,
                        &group_info,
                        DS_MAX_MEMBERS,
                        &accept,
                    )
                    .map_err(|e| e.to_string())?;
                assert_eq!(outcome.new_epoch, self.group.epoch());
                let after = self.group.members();
                assert_eq!(leaves(&after), changed(&before, &outcome));
                assert!(after.len() <= DS_MAX_MEMBERS);
                Ok(true)
            }
            DsOp::External {
                joiner,
                commit,
                group_info,
            } => {
                let before = self.group.members();
                let outcome = self
                    .group
                    .process_external_commit_checked(
                        &joiner,
                        &commit,
                        &group_info,
                        DS_MAX_MEMBERS,
                        &accept,
                    )
                    .map_err(|e| e.to_string())?;
                assert_eq!(outcome.new_epoch, self.group.epoch());
                let after = self.group.members();
                assert_eq!(leaves(&after), changed(&before, &outcome));
                assert!(after.iter().any(|m| m.identity == joiner));
                Ok(true)
            }
            DsOp::Leave { sender, proposal } => {
                let identity = self.identity(sender);
                self.group
                    .add_leave_proposal(&identity, &proposal)
                    .map_err(|e| e.to_string())?;
                Ok(true)
            }
            DsOp::Application {
                past_epochs,
                message,
            } => {
                self.group
                    .check_application_message(&message, u64::from(past_epochs))
                    .map_err(|e| e.to_string())?;
                Ok(false)
            }
        }
    }
}

/// Push: one case of the parsers of what a client registers (endpoint URL, RegisterPush's
/// endpoint, sealing at rest) and what a push service answers (`Retry-After`, status and
/// body), and of the `forbidden_ranges` setting; format in `server/src/push/fuzz.rs`.
/// `Ok(true)`: accepted; `Err`: an invariant broke (a finding).
pub fn push(input: &[u8]) -> Result<bool, String> {
    crate::push::fuzz::run(input)
}

/// (leaf, identity) of members, in leaf order.
fn leaves(members: &[crate::mls::Member]) -> Vec<(u32, Vec<u8>)> {
    members
        .iter()
        .map(|m| (m.leaf_index, m.identity.clone()))
        .collect()
}

/// The members a commit's outcome says the group has now: those before it, less the removed
/// leaves, plus the added ones, in leaf order.
fn changed(
    before: &[crate::mls::Member],
    outcome: &crate::mls::CommitOutcome,
) -> Vec<(u32, Vec<u8>)> {
    let removed: Vec<u32> = outcome.removed.iter().map(|m| m.leaf_index).collect();
    let mut members: Vec<(u32, Vec<u8>)> = leaves(before)
        .into_iter()
        .filter(|(leaf, _)| !removed.contains(leaf))
        .chain(leaves(&outcome.added))
        .collect();
    members.sort();
    members
}
