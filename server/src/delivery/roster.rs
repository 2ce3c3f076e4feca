//! The recipients of a hosted group's current epoch, resolved once per epoch instead of once
//! per message: each member's ClientId decoded from its credential and, for members of this
//! domain, the client number that keys their queue. Built when a group is created or loaded
//! and advanced by every accepted commit (the only thing that changes membership) by what the
//! commit removed and added: members that stay keep their resolution, and a commit to a group
//! of N members costs the size of its change, not N.
//!
//! A client removed after the roster was built keeps its number here; its queue is gone, so
//! the store skips it. Client numbers are never reused, so the number cannot reach anyone else.

use std::collections::{BTreeMap, HashMap};

use roost_protocol::{ClientId, Domain};
use tls_codec::DeserializeBytes;

use crate::mls::Member;

/// Where a member's messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// A client of this domain: its client number, or `None` if it was not an active client
    /// when resolved (removed clients never come back: device names are never reused).
    Local(Option<u64>),
    /// A client of another domain.
    Remote(ClientId),
    /// A leaf whose identity is not a ClientId: nobody to deliver to.
    Nobody,
}

/// One fan-out's recipients: local client numbers (ascending) and remote clients by domain
/// (in leaf order).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Recipients {
    pub(crate) local: Vec<u64>,
    pub(crate) remote: BTreeMap<Domain, Vec<ClientId>>,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Roster {
    epoch: u64,
    /// Every member, by credential identity (identities are unique within a group).
    members: HashMap<Vec<u8>, Target>,
    /// Resolved local members' client numbers, ascending (B-tree order of their queues).
    local: Vec<u64>,
    /// Members of other domains, by domain, in leaf order (with their leaf index).
    remote: BTreeMap<Domain, Vec<(u32, ClientId)>>,
}

impl Roster {
    /// Resolves `members` (in leaf order) of `epoch`. Identities known to `previous` keep
    /// their resolution; the others are decoded, and those of `domain` looked up with
    /// `lookup` (client number of an active client).
    pub(crate) fn build<E>(
        epoch: u64,
        members: &[Member],
        domain: &Domain,
        mut previous: Option<Roster>,
        mut lookup: impl FnMut(&ClientId) -> Result<Option<u64>, E>,
    ) -> Result<Roster, E> {
        let mut roster = Roster {
            epoch,
            members: HashMap::with_capacity(members.len()),
            local: Vec::with_capacity(members.len()),
            remote: BTreeMap::new(),
        };
        for member in members {
            let known = previous
                .as_mut()
                .and_then(|p| p.members.remove_entry(member.identity.as_slice()));
            let (identity, target) = match known {
                Some(entry) => entry,
                None => {
                    let target = match ClientId::tls_deserialize_bytes(&member.identity) {
                        Ok((client, [])) if client.domain() == domain => {
                            Target::Local(lookup(&client)?)
                        }
                        Ok((client, [])) => Target::Remote(client),
                        _ => Target::Nobody,
                    };
                    (member.identity.clone(), target)
                }
            };
            match &target {
                Target::Local(Some(num)) => roster.local.push(*num),
                Target::Remote(client) => roster
                    .remote
                    .entry(client.domain().clone())
                    .or_default()
                    .push((member.leaf_index, client.clone())),
                Target::Local(None) | Target::Nobody => {}
            }
            roster.members.insert(identity, target);
        }
        roster.local.sort_unstable();
        Ok(roster)
    }

    /// The roster of `epoch`, reached from this one by a commit that removed `removed` and
    /// added `added` (members in leaf order): the same as [`Roster::build`] over the new
    /// epoch's members, at a cost that grows with the change rather than the group. Members
    /// that stay keep their resolution, and so does a removed identity that comes back (a
    /// rejoin); the other added members of `domain` are looked up with `lookup`, which is
    /// given all of them at once.
    pub(crate) fn advance<E>(
        mut self,
        epoch: u64,
        (removed, added): (&[Member], &[Member]),
        domain: &Domain,
        lookup: impl FnOnce(Vec<ClientId>) -> Result<Vec<Option<u64>>, E>,
    ) -> Result<Roster, E> {
        let mut gone: HashMap<Vec<u8>, Target> = HashMap::with_capacity(removed.len());
        for member in removed {
            let Some((identity, target)) = self.members.remove_entry(member.identity.as_slice())
            else {
                continue;
            };
            match &target {
                Target::Local(Some(num)) => {
                    if let Ok(at) = self.local.binary_search(num) {
                        self.local.remove(at);
                    }
                }
                Target::Remote(client) => {
                    if let Some(clients) = self.remote.get_mut(client.domain()) {
                        clients.retain(|(_, c)| c != client);
                        if clients.is_empty() {
                            self.remote.remove(client.domain());
                        }
                    }
                }
                Target::Local(None) | Target::Nobody => {}
            }
            gone.insert(identity, target);
        }
        let mut decoded = Vec::with_capacity(added.len());
        let mut unknown = Vec::new();
        for member in added {
            let target = match gone.remove(member.identity.as_slice()) {
                Some(target) => Some(target),
                None => match ClientId::tls_deserialize_bytes(&member.identity) {
                    Ok((client, [])) if client.domain() == domain => {
                        unknown.push(client);
                        None
                    }
                    Ok((client, [])) => Some(Target::Remote(client)),
                    _ => Some(Target::Nobody),
                },
            };
            decoded.push(target);
        }
        let mut nums = if unknown.is_empty() {
            Vec::new()
        } else {
            lookup(unknown)?
        }
        .into_iter();
        for (member, target) in added.iter().zip(decoded) {
            let target = target.unwrap_or_else(|| Target::Local(nums.next().flatten()));
            match &target {
                Target::Local(Some(num)) => {
                    if let Err(at) = self.local.binary_search(num) {
                        self.local.insert(at, *num);
                    }
                }
                Target::Remote(client) => {
                    let clients = self.remote.entry(client.domain().clone()).or_default();
                    let at = clients.partition_point(|(leaf, _)| *leaf < member.leaf_index);
                    clients.insert(at, (member.leaf_index, client.clone()));
                }
                Target::Local(None) | Target::Nobody => {}
            }
            self.members.insert(member.identity.clone(), target);
        }
        self.epoch = epoch;
        Ok(self)
    }

    /// The members of `domain` among `members` that `previous` does not know: the clients
    /// [`Roster::build`] will look up.
    pub(crate) fn unresolved(
        members: &[Member],
        domain: &Domain,
        previous: Option<&Roster>,
    ) -> Vec<ClientId> {
        members
            .iter()
            .filter(|m| previous.is_none_or(|p| !p.members.contains_key(m.identity.as_slice())))
            .filter_map(|m| match ClientId::tls_deserialize_bytes(&m.identity) {
                Ok((client, [])) if client.domain() == domain => Some(client),
                _ => None,
            })
            .collect()
    }

    /// The epoch this roster is of.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether a leaf has this credential identity.
    pub(crate) fn contains(&self, identity: &[u8]) -> bool {
        self.members.contains_key(identity)
    }

    /// Every member but the one with credential identity `except`.
    pub(crate) fn all_but(&self, except: &[u8]) -> Recipients {
        let skipped = self.members.get(except);
        let local = match skipped {
            Some(Target::Local(Some(me))) => {
                self.local.iter().copied().filter(|n| n != me).collect()
            }
            _ => self.local.clone(),
        };
        let me = match skipped {
            Some(Target::Remote(me)) => Some(me),
            _ => None,
        };
        let remote = self
            .remote
            .iter()
            .map(|(domain, clients)| {
                let clients: Vec<ClientId> = clients
                    .iter()
                    .filter(|(_, c)| Some(c) != me)
                    .map(|(_, c)| c.clone())
                    .collect();
                (domain, clients)
            })
            .filter(|(_, clients)| !clients.is_empty())
            .map(|(domain, clients)| (domain.clone(), clients))
            .collect();
        Recipients { local, remote }
    }

    /// Every member but the one with credential identity `except` and those with the
    /// identities `excluded` (e.g. members that joined after a message's epoch).
    pub(crate) fn all_but_these(&self, except: &[u8], excluded: &[&[u8]]) -> Recipients {
        let mut out = self.all_but(except);
        for identity in excluded {
            match self.members.get(*identity) {
                Some(Target::Local(Some(num))) => out.local.retain(|n| n != num),
                Some(Target::Remote(client)) => {
                    if let Some(clients) = out.remote.get_mut(client.domain()) {
                        clients.retain(|c| c != client);
                        if clients.is_empty() {
                            out.remote.remove(client.domain());
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// The given members (all of this roster), e.g. those a commit added.
    pub(crate) fn subset(&self, members: &[Member]) -> Recipients {
        let mut out = Recipients::default();
        for member in members {
            match self.members.get(member.identity.as_slice()) {
                Some(Target::Local(Some(num))) => out.local.push(*num),
                Some(Target::Remote(client)) => out
                    .remote
                    .entry(client.domain().clone())
                    .or_default()
                    .push(client.clone()),
                _ => {}
            }
        }
        out.local.sort_unstable();
        out
    }

    /// Fails with the first domain of a member that `allowed` refuses.
    pub(crate) fn check_domains(&self, allowed: impl Fn(&Domain) -> bool) -> Result<(), Domain> {
        first_refused(self.remote.keys(), allowed)
    }
}

impl Recipients {
    /// Fails with the first recipient domain that `allowed` refuses.
    pub(crate) fn check_domains(&self, allowed: impl Fn(&Domain) -> bool) -> Result<(), Domain> {
        first_refused(self.remote.keys(), allowed)
    }
}

fn first_refused<'a>(
    mut domains: impl Iterator<Item = &'a Domain>,
    allowed: impl Fn(&Domain) -> bool,
) -> Result<(), Domain> {
    match domains.find(|d| !allowed(d)) {
        Some(domain) => Err(domain.clone()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tls_codec::Serialize as _;

    fn member(leaf: u32, client: &str) -> Member {
        let id: ClientId = client.parse().unwrap();
        Member {
            leaf_index: leaf,
            identity: id.tls_serialize_detached().unwrap(),
            signature_key: vec![leaf as u8],
        }
    }

    fn nums<'a>(
        table: &'a [(&'a str, u64)],
    ) -> impl FnMut(&ClientId) -> Result<Option<u64>, ()> + 'a {
        move |client| {
            Ok(table
                .iter()
                .find(|(name, _)| client.to_string() == *name)
                .map(|(_, n)| *n))
        }
    }

    #[test]
    fn members_resolve_to_sorted_queues_and_remote_domains() {
        let domain: Domain = "example.org".parse().unwrap();
        let members = vec![
            member(0, "carol@example.org/phone"),
            member(1, "rita@beta.test/phone"),
            member(2, "alice@example.org/phone"),
            member(3, "gone@example.org/phone"),
            Member {
                leaf_index: 4,
                identity: b"not a client id".to_vec(),
                signature_key: vec![4],
            },
            member(5, "rob@beta.test/laptop"),
        ];
        let table = [
            ("carol@example.org/phone", 9),
            ("alice@example.org/phone", 2),
        ];
        let roster = Roster::build(3, &members, &domain, None, nums(&table)).unwrap();
        assert_eq!(roster.epoch(), 3);
        assert!(roster.contains(&members[3].identity));
        let beta: Domain = "beta.test".parse().unwrap();
        let rita: ClientId = "rita@beta.test/phone".parse().unwrap();
        let rob: ClientId = "rob@beta.test/laptop".parse().unwrap();

        let all = roster.all_but(b"");
        assert_eq!(all.local, vec![2, 9]);
        assert_eq!(
            all.remote.get(&beta),
            Some(&vec![rita.clone(), rob.clone()])
        );
        // The sender is left out, local or remote.
        let to = roster.all_but(&members[2].identity);
        assert_eq!(to.local, vec![9]);
        let to = roster.all_but(&members[1].identity);
        assert_eq!(to.remote.get(&beta), Some(&vec![rob]));
        assert_eq!(to.check_domains(|_| true), Ok(()));
        // A domain not federated with refuses the whole fan-out.
        assert_eq!(to.check_domains(|d| d == &domain), Err(beta.clone()));
        assert_eq!(roster.check_domains(|d| d == &domain), Err(beta.clone()));
        let added = roster.subset(&members[..2]);
        assert_eq!(added.local, vec![9]);
        assert_eq!(added.remote.get(&beta), Some(&vec![rita]));
    }

    /// Remote members by domain, with their leaves.
    type Remote = Vec<(Domain, Vec<(u32, ClientId)>)>;

    /// What a roster resolves, comparable.
    fn view(roster: &Roster) -> (u64, Vec<u64>, Remote, usize) {
        let remote = roster
            .remote
            .iter()
            .map(|(d, c)| (d.clone(), c.clone()))
            .collect();
        (
            roster.epoch,
            roster.local.clone(),
            remote,
            roster.members.len(),
        )
    }

    #[test]
    fn advancing_by_a_commit_resolves_as_building_the_new_epoch_afresh() {
        let domain: Domain = "example.org".parse().unwrap();
        let table = [
            ("alice@example.org/phone", 5),
            ("bob@example.org/phone", 2),
            ("carol@example.org/phone", 9),
            ("dave@example.org/phone", 3),
        ];
        let before = vec![
            member(0, "alice@example.org/phone"),
            member(1, "bob@example.org/phone"),
            member(2, "rita@beta.test/phone"),
            member(3, "carol@example.org/phone"),
            member(5, "rob@beta.test/laptop"),
        ];
        let old = Roster::build(4, &before, &domain, None, nums(&table)).unwrap();
        // Bob and rob leave; dave takes bob's leaf, sam (remote) a blank one between rita and
        // carol, and carol rejoins on a new leaf.
        let removed = vec![before[1].clone(), before[3].clone(), before[4].clone()];
        let added = vec![
            member(1, "dave@example.org/phone"),
            member(3, "sam@beta.test/phone"),
            member(6, "carol@example.org/phone"),
        ];
        let after = vec![
            before[0].clone(),
            added[0].clone(),
            before[2].clone(),
            added[1].clone(),
            added[2].clone(),
        ];
        let mut asked = Vec::new();
        let advanced = old
            .advance(5, (&removed, &added), &domain, |clients: Vec<ClientId>| {
                asked.extend(clients.iter().map(ToString::to_string));
                let mut lookup = nums(&table);
                clients.iter().map(&mut lookup).collect()
            })
            .unwrap();
        // Only the new local member was looked up: carol's resolution came back with her.
        assert_eq!(asked, vec!["dave@example.org/phone".to_string()]);
        let fresh = Roster::build(5, &after, &domain, None, nums(&table)).unwrap();
        assert_eq!(view(&advanced), view(&fresh));
        assert_eq!(advanced.all_but(b""), fresh.all_but(b""));
        assert_eq!(advanced.all_but(b"").local, vec![3, 5, 9]);
        assert!(!advanced.contains(&before[1].identity));
    }

    #[test]
    fn a_new_epoch_reuses_known_members_and_looks_up_only_new_ones() {
        let domain: Domain = "example.org".parse().unwrap();
        let before = vec![
            member(0, "alice@example.org/phone"),
            member(1, "bob@example.org/phone"),
        ];
        let roster = Roster::build(
            1,
            &before,
            &domain,
            None,
            nums(&[("alice@example.org/phone", 1), ("bob@example.org/phone", 2)]),
        )
        .unwrap();
        // Bob leaves, dave joins; only dave is looked up.
        let after = vec![before[0].clone(), member(1, "dave@example.org/phone")];
        let mut looked_up = Vec::new();
        let next = Roster::build(2, &after, &domain, Some(roster), |c: &ClientId| {
            looked_up.push(c.to_string());
            Ok::<_, ()>(Some(7))
        })
        .unwrap();
        assert_eq!(looked_up, vec!["dave@example.org/phone".to_string()]);
        // `unresolved` names the same clients before the lookup.
        let previous = Roster::build(1, &before, &domain, None, |_: &ClientId| {
            Ok::<_, ()>(Some(1))
        })
        .unwrap();
        let names: Vec<String> = Roster::unresolved(&after, &domain, Some(&previous))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(names, looked_up);
        assert_eq!(next.all_but(b"").local, vec![1, 7]);
        assert!(!next.contains(&before[1].identity));
    }
}
