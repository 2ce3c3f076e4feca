//! The bounded in-memory cache of hosted groups: one async lock per group (serialising that
//! group's operations) holding its MLS state once loaded. When the cache is over capacity,
//! groups nobody is using are dropped; they reload from the store on next use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use roost_protocol::GroupId;

use super::GroupSlot;

/// See the module docs.
pub(crate) struct GroupCache {
    capacity: usize,
    slots: Mutex<HashMap<GroupId, (GroupSlot, u64)>>,
    tick: std::sync::atomic::AtomicU64,
}

impl GroupCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            slots: Mutex::new(HashMap::new()),
            tick: Default::default(),
        }
    }

    /// The slot of a group (created empty if absent). Lock it to use the group.
    pub(crate) fn entry(&self, group: &GroupId) -> GroupSlot {
        let now = self.tick.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut slots = match self.slots.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((slot, used)) = slots.get_mut(group) {
            *used = now;
            return slot.clone();
        }
        if slots.len() >= self.capacity {
            evict(&mut slots, self.capacity);
        }
        let slot: GroupSlot = Arc::new(tokio::sync::Mutex::new(None));
        slots.insert(group.clone(), (slot.clone(), now));
        slot
    }
}

impl GroupCache {
    /// Forgets the slot of a group that did not load (e.g. an id no group has), unless someone
    /// holds it: ids that name no group must not take room from hosted ones.
    pub(crate) fn forget_empty(&self, group: &GroupId) {
        let mut slots = match self.slots.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let unused = slots.get(group).is_some_and(|(slot, _)| {
            Arc::strong_count(slot) == 1 && slot.try_lock().is_ok_and(|state| state.is_none())
        });
        if unused {
            slots.remove(group);
        }
    }
}

/// Drops the least recently used idle quarter of the cache (idle: nobody holds its slot).
fn evict(slots: &mut HashMap<GroupId, (GroupSlot, u64)>, capacity: usize) {
    let mut idle: Vec<(u64, GroupId)> = slots
        .iter()
        .filter(|(_, (slot, _))| Arc::strong_count(slot) == 1)
        .map(|(id, (_, used))| (*used, id.clone()))
        .collect();
    idle.sort_unstable();
    for (_, id) in idle.into_iter().take(capacity.div_ceil(4)) {
        slots.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(n: u8) -> GroupId {
        GroupId::new([n; 16], "example.org".parse().unwrap())
    }

    #[test]
    fn same_group_same_slot_and_idle_groups_are_evicted() {
        let cache = GroupCache::new(4);
        let held = cache.entry(&group(0));
        assert!(Arc::ptr_eq(&held, &cache.entry(&group(0))));
        for n in 1..20 {
            cache.entry(&group(n));
        }
        // The group in use survived eviction; the map stayed bounded.
        assert!(Arc::ptr_eq(&held, &cache.entry(&group(0))));
        assert!(cache.slots.lock().unwrap().len() <= 5);
    }

    #[test]
    fn ids_of_no_group_leave_no_slot_behind() {
        let cache = GroupCache::new(4);
        let held = cache.entry(&group(0));
        for n in 1..200 {
            let slot = cache.entry(&group(n));
            drop(slot);
            cache.forget_empty(&group(n));
        }
        let slots = cache.slots.lock().unwrap();
        assert_eq!(slots.len(), 1, "only the group in use is left");
        assert!(Arc::ptr_eq(&held, &slots[&group(0)].0));
        drop(slots);
        // A slot in use is never forgotten.
        cache.forget_empty(&group(0));
        assert!(Arc::ptr_eq(&held, &cache.entry(&group(0))));
    }
}
