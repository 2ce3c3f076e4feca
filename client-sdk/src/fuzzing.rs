//! Entry points for the `sdk_incoming` fuzz target in `fuzz/` (cargo feature `fuzzing`, also
//! built for the unit test that writes and checks its seeds). Not an API: nothing here changes
//! what the SDK does. [`Receiver`] is a member of one group in a profile database; it processes
//! what other members send exactly as the inbox does (group messages and Welcomes through the
//! SDK's MLS layer, commits merged) and then drops every change, so each input starts from the
//! same state. Credential checks against the AS are not run (they need a server); the fuzzer
//! reaches the merge as if they passed.

use std::path::Path;
use std::sync::Arc;

use roost_protocol::GroupId;

use crate::mls::{Incoming, Mls};
use crate::store::Store;

/// One message from the network to the receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdkOp {
    /// A group message (commit, proposal or application message) of the receiver's group.
    Group(Vec<u8>),
    /// A Welcome from the receiver's queue.
    Welcome(Vec<u8>),
}

/// Encodes messages as a `sdk_incoming` input: per message a kind byte (even: group message,
/// odd: Welcome), a big-endian u16 length and the bytes.
pub fn encode_ops(ops: &[SdkOp]) -> Vec<u8> {
    let mut out = Vec::new();
    for op in ops {
        let (kind, bytes) = match op {
            SdkOp::Group(bytes) => (0, bytes),
            SdkOp::Welcome(bytes) => (1, bytes),
        };
        let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
        out.push(kind);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&bytes[..usize::from(len)]);
    }
    out
}

/// Decodes a `sdk_incoming` input; stops at the first incomplete message.
pub fn decode_ops(mut input: &[u8]) -> Vec<SdkOp> {
    let mut ops = Vec::new();
    while let [kind, hi, lo, rest @ ..] = input {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        let Some(bytes) = rest.get(..len) else { break };
        ops.push(if kind % 2 == 0 {
            SdkOp::Group(bytes.to_vec())
        } else {
            SdkOp::Welcome(bytes.to_vec())
        });
        input = &rest[len..];
    }
    ops
}

/// A group member whose state is in a profile database.
pub struct Receiver {
    mls: Mls,
    group: GroupId,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl Receiver {
    /// Opens the profile at `profile`, member of the group whose MLS group id is `group`.
    pub fn open(profile: &Path, group: &[u8]) -> Result<Self, String> {
        let store = Store::open(profile).map_err(|e| e.to_string())?;
        let group = GroupId::from_mls_bytes(group).map_err(|e| e.to_string())?;
        let mls = Mls::new(Arc::new(store));
        if !mls.has_group(&group).map_err(|e| e.to_string())? {
            return Err("the profile is not a member of the group".into());
        }
        Ok(Self { mls, group })
    }

    /// Processes the messages of `input` (see [`decode_ops`]) in order, then drops every
    /// change. Returns, per message, what it was or why it was refused.
    pub fn run(&self, input: &[u8]) -> Vec<Result<&'static str, String>> {
        let results = decode_ops(input)
            .into_iter()
            .map(|op| self.process(op))
            .collect();
        self.mls.store().discard();
        results
    }

    fn process(&self, op: SdkOp) -> Result<&'static str, String> {
        match op {
            SdkOp::Group(bytes) => match self.mls.process(&self.group, &bytes) {
                Ok(Incoming::Application { .. }) => Ok("application"),
                Ok(Incoming::Proposal { .. }) => Ok("proposal"),
                Ok(Incoming::Commit(commit)) => {
                    self.mls.merge_commit(commit).map_err(|e| e.to_string())?;
                    Ok("commit")
                }
                Err(e) => Err(e.to_string()),
            },
            SdkOp::Welcome(bytes) => {
                let join = self
                    .mls
                    .process_welcome(&bytes)
                    .map_err(|e| e.to_string())?;
                self.mls.finish_join(join).map_err(|e| e.to_string())?;
                Ok("welcome")
            }
        }
    }
}

#[cfg(test)]
#[path = "fuzz_seeds.rs"]
mod seeds;
