//! The slices a node holds, one per plan epoch, and the state machine each goes through:
//!
//! ```text
//!  put (PREPARE) ──> Prepared ──commit──> Serving ──a newer commit──> Retiring ──last session ends──> freed
//!                       │                    └──────retire_before────────┘
//!                       └──abort, a newer commit, or its lease released──> freed
//! ```
//!
//! A load outside a 2PC (`load_slice`) is a PREPARE and a COMMIT in one call. [`SliceTable`] is
//! generic over what a slice is, so that its transitions are tested without a model.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use proto_types::{LeaseId, PlanEpoch};

use super::error::{NodeError, Result};

/// Where a slice is in the two-phase commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceState {
    /// Loaded by PREPARE, waiting for the decision (since then).
    Prepared(Instant),
    /// Committed: new sessions open on it.
    Serving,
    /// Committed, then replaced by a newer epoch: sessions already on it finish on it, and
    /// it is freed once the last one has.
    Retiring,
}

impl SliceState {
    /// Whether the slice is prepared (not yet committed).
    pub fn is_prepared(self) -> bool {
        matches!(self, SliceState::Prepared(_))
    }
}

/// One slice with its owner and state.
#[derive(Debug)]
pub struct SliceEntry<S> {
    /// The slice.
    pub slice: Arc<S>,
    /// Its bytes (weights).
    pub bytes: u64,
    /// The lease that owns it.
    pub lease: LeaseId,
    /// Where it is in the 2PC.
    pub state: SliceState,
    /// The model it serves beside others' (see [`proto_types::LoadSlice::beside`]): its commit
    /// retires only older slices of this model. `None`: its commit retires every slice.
    pub beside: Option<String>,
}

impl<S> SliceEntry<S> {
    /// Whether a commit of `by` replaces this slice: an exclusive commit replaces every
    /// slice, one beside others only the slices of its model.
    fn replaced_by(&self, by: &Option<String>) -> bool {
        by.is_none() || *by == self.beside
    }
}

/// The slices by epoch. At most one is [`SliceState::Serving`] per model served beside
/// others, and at most one of the rest.
#[derive(Debug)]
pub struct SliceTable<S> {
    map: HashMap<PlanEpoch, SliceEntry<S>>,
}

impl<S> Default for SliceTable<S> {
    fn default() -> Self {
        SliceTable {
            map: HashMap::new(),
        }
    }
}

impl<S> SliceTable<S> {
    /// The entry of `epoch`, in any state.
    pub fn get(&self, epoch: PlanEpoch) -> Option<&SliceEntry<S>> {
        self.map.get(&epoch)
    }

    /// Every entry, in no order.
    pub fn entries(&self) -> impl Iterator<Item = (PlanEpoch, &SliceEntry<S>)> {
        self.map.iter().map(|(&e, s)| (e, s))
    }

    /// The newest served epoch and slice, if any.
    pub fn served(&self) -> Option<(PlanEpoch, &Arc<S>)> {
        self.served_among(&None)
    }

    /// The newest served epoch and slice among those a commit of `by` would replace.
    fn served_among(&self, by: &Option<String>) -> Option<(PlanEpoch, &Arc<S>)> {
        self.map
            .iter()
            .filter(|(_, s)| s.state == SliceState::Serving && s.replaced_by(by))
            .max_by_key(|(&e, _)| e)
            .map(|(&e, s)| (e, &s.slice))
    }

    /// Epochs and states, oldest first.
    pub fn states(&self) -> Vec<(PlanEpoch, SliceState)> {
        let mut v: Vec<_> = self.map.iter().map(|(&e, s)| (e, s.state)).collect();
        v.sort_by_key(|x| x.0);
        v
    }

    /// Bytes of every slice, in any state.
    pub fn bytes(&self) -> u64 {
        self.map.values().map(|s| s.bytes).sum()
    }

    /// Bytes of the served and retiring slices.
    pub fn committed_bytes(&self) -> u64 {
        self.map
            .values()
            .filter(|s| !s.state.is_prepared())
            .map(|s| s.bytes)
            .sum()
    }

    /// PREPARE: holds `slice` of `epoch` for `lease`, waiting for the decision. `newer` also
    /// requires the epoch to be newer than the served one it would replace (a load outside a
    /// 2PC, committed at once after, may replace any epoch). `beside`: the model it serves
    /// beside others (see [`SliceEntry::beside`]).
    pub fn prepare(
        &mut self,
        epoch: PlanEpoch,
        slice: Arc<S>,
        bytes: u64,
        lease: LeaseId,
        newer: bool,
        beside: Option<String>,
    ) -> Result<()> {
        if self.map.contains_key(&epoch) {
            return Err(NodeError::EpochTaken(epoch));
        }
        if newer {
            if let Some((served, _)) = self.served_among(&beside) {
                if served >= epoch {
                    return Err(NodeError::NotNewer { epoch, served });
                }
            }
        }
        let state = SliceState::Prepared(Instant::now());
        self.map.insert(
            epoch,
            SliceEntry {
                slice,
                bytes,
                lease,
                state,
                beside,
            },
        );
        Ok(())
    }

    /// COMMIT (idempotent): the prepared slice of `epoch` becomes the served one, owned by
    /// `owner` when given. The slice it replaces (any served so far, or with `beside` the
    /// served one of its model) retires; prepared slices of older epochs it would replace are
    /// dropped. Retiring slices no session runs on are left to [`SliceTable::collect`].
    pub fn commit(&mut self, epoch: PlanEpoch, owner: Option<LeaseId>) -> Result<()> {
        let by = match self.map.get(&epoch) {
            None => return Err(NodeError::NotPrepared(epoch)),
            Some(e) => match e.state {
                SliceState::Serving => return Ok(()),
                SliceState::Retiring => return Err(NodeError::Replaced(epoch)),
                SliceState::Prepared(_) => e.beside.clone(),
            },
        };
        if let Some((served, _)) = self.served_among(&by) {
            if served > epoch {
                return Err(NodeError::Behind { epoch, served });
            }
        }
        self.map
            .retain(|&e, s| e >= epoch || !s.state.is_prepared() || !s.replaced_by(&by));
        for (&e, s) in self.map.iter_mut() {
            if e == epoch {
                s.state = SliceState::Serving;
                if let Some(p) = owner {
                    s.lease = p;
                }
            } else if s.state == SliceState::Serving && s.replaced_by(&by) {
                s.state = SliceState::Retiring;
            }
        }
        Ok(())
    }

    /// ABORT: frees the prepared slice of `epoch`; its bytes (0 if none: idempotent).
    pub fn abort(&mut self, epoch: PlanEpoch) -> Result<u64> {
        match self.map.get(&epoch).map(|e| e.state) {
            None => Ok(0),
            Some(SliceState::Prepared(_)) => Ok(self.map.remove(&epoch).map_or(0, |e| e.bytes)),
            Some(_) => Err(NodeError::Committed(epoch)),
        }
    }

    /// Retires the served slices older than `epoch` that a commit of `model` replaces (those
    /// of that model, and any not served beside others); whether it did.
    pub fn retire_before(&mut self, epoch: PlanEpoch, model: &str) -> bool {
        let by = Some(model.to_string());
        let mut n = 0;
        for (&e, s) in self.map.iter_mut() {
            if e < epoch
                && s.state == SliceState::Serving
                && (s.beside.is_none() || s.replaced_by(&by))
            {
                s.state = SliceState::Retiring;
                n += 1;
            }
        }
        n > 0
    }

    /// Retires the served slice of `epoch` (its model was unloaded); whether it did.
    pub fn retire(&mut self, epoch: PlanEpoch) -> bool {
        match self.map.get_mut(&epoch) {
            Some(s) if s.state == SliceState::Serving => {
                s.state = SliceState::Retiring;
                true
            }
            _ => false,
        }
    }

    /// Frees retiring slices whose epoch no session runs on; their epochs and bytes.
    pub fn collect(&mut self, live: &HashSet<PlanEpoch>) -> Vec<(PlanEpoch, u64)> {
        let mut freed = Vec::new();
        self.map.retain(|&e, s| {
            let keep = s.state != SliceState::Retiring || live.contains(&e);
            if !keep {
                freed.push((e, s.bytes));
            }
            keep
        });
        freed
    }

    /// The committed slice of `epoch` (serving or retiring): what its sessions run on.
    pub fn committed(&self, epoch: PlanEpoch) -> Result<Arc<S>> {
        if let Some(e) = self.map.get(&epoch) {
            if !e.state.is_prepared() {
                return Ok(e.slice.clone());
            }
        }
        match self.served() {
            Some((served, _)) => Err(NodeError::ServesOther { epoch, served }),
            None => Err(NodeError::NotCommitted(epoch)),
        }
    }

    /// Frees the slices `lease` owns; their bytes. With an `owner` other than `lease`
    /// (the node is in a cluster), a prepared slice passes to it instead: etcd's decision, or
    /// the prepare timeout, resolves it.
    pub fn release(&mut self, lease: LeaseId, owner: Option<LeaseId>) -> (u64, Vec<PlanEpoch>) {
        let mut bytes = 0;
        let mut orphaned = Vec::new();
        self.map.retain(|&epoch, e| {
            if e.lease != lease {
                return true;
            }
            match (e.state, owner) {
                (SliceState::Prepared(_), Some(p)) if p != lease => {
                    e.lease = p;
                    orphaned.push(epoch);
                    true
                }
                _ => {
                    bytes += e.bytes;
                    false
                }
            }
        });
        (bytes, orphaned)
    }

    /// Committed slices pass to `owner`.
    pub fn pass_committed_to(&mut self, owner: LeaseId) {
        for e in self.map.values_mut() {
            if !e.state.is_prepared() {
                e.lease = owner;
            }
        }
    }

    /// Drops the slice of `epoch`, in any state; its bytes.
    pub fn remove(&mut self, epoch: PlanEpoch) -> Result<u64> {
        self.map
            .remove(&epoch)
            .map(|e| e.bytes)
            .ok_or(NodeError::NoSuchEpoch(epoch))
    }

    /// Drops every slice; their bytes.
    pub fn clear(&mut self) -> u64 {
        self.map.drain().map(|(_, e)| e.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: LeaseId = LeaseId(1);
    const OWNER: LeaseId = LeaseId(9);

    fn ep(n: u64) -> PlanEpoch {
        PlanEpoch(n)
    }

    fn table(epochs: &[u64]) -> SliceTable<&'static str> {
        let mut t = SliceTable::default();
        for &e in epochs {
            t.prepare(ep(e), Arc::new("slice"), 100 * e, A, true, None)
                .expect("prepare");
        }
        t
    }

    fn state(t: &SliceTable<&'static str>, e: u64) -> Option<SliceState> {
        t.get(ep(e)).map(|s| s.state)
    }

    #[test]
    fn prepare_then_commit_serves_and_owner_takes_it() {
        let mut t = table(&[1]);
        assert!(state(&t, 1).is_some_and(SliceState::is_prepared));
        assert_eq!(
            t.committed(ep(1)).err(),
            Some(NodeError::NotCommitted(ep(1)))
        );
        t.commit(ep(1), Some(OWNER)).expect("commit");
        assert_eq!(state(&t, 1), Some(SliceState::Serving));
        assert_eq!(t.get(ep(1)).map(|s| s.lease), Some(OWNER));
        assert_eq!(t.served().map(|(e, _)| e), Some(ep(1)));
        // COMMIT is idempotent
        t.commit(ep(1), None).expect("again");
        assert_eq!(t.committed_bytes(), 100);
    }

    #[test]
    fn a_newer_commit_retires_the_served_slice_until_its_sessions_end() {
        let mut t = table(&[1]);
        t.commit(ep(1), None).expect("commit 1");
        t.prepare(ep(2), Arc::new("two"), 200, A, true, None)
            .expect("prepare 2");
        t.commit(ep(2), None).expect("commit 2");
        assert_eq!(state(&t, 1), Some(SliceState::Retiring));
        assert_eq!(state(&t, 2), Some(SliceState::Serving));
        // sessions still run on the retiring slice
        assert!(t.committed(ep(1)).is_ok());
        let live: HashSet<_> = [ep(1)].into();
        assert!(t.collect(&live).is_empty());
        assert_eq!(t.collect(&HashSet::new()), vec![(ep(1), 100)]);
        assert_eq!(state(&t, 1), None);
        assert_eq!(t.commit(ep(1), None), Err(NodeError::NotPrepared(ep(1))));
    }

    #[test]
    fn slices_beside_others_retire_only_their_models_slices() {
        let mut t: SliceTable<&'static str> = SliceTable::default();
        let beside = |m: &str| Some(m.to_string());
        for (e, m) in [(1, "a"), (2, "b")] {
            t.prepare(ep(e), Arc::new(m), 10, A, true, beside(m))
                .expect("prepare");
            t.commit(ep(e), None).expect("commit");
        }
        // two models served at once
        assert_eq!(state(&t, 1), Some(SliceState::Serving));
        assert_eq!(state(&t, 2), Some(SliceState::Serving));
        // a newer slice of `a` replaces only `a`'s
        t.prepare(ep(3), Arc::new("a2"), 10, A, true, beside("a"))
            .expect("prepare 3");
        t.commit(ep(3), None).expect("commit 3");
        assert_eq!(state(&t, 1), Some(SliceState::Retiring));
        assert_eq!(state(&t, 2), Some(SliceState::Serving));
        // `b`'s served epoch is older than 3, yet a new `b` slice at 4 is newer than it only
        assert!(t
            .prepare(ep(4), Arc::new("b2"), 10, A, true, beside("b"))
            .is_ok());
        // an exclusive commit replaces every model's slice
        t.prepare(ep(5), Arc::new("x"), 10, A, true, None)
            .expect("prepare 5");
        t.commit(ep(5), None).expect("commit 5");
        assert_eq!(state(&t, 2), Some(SliceState::Retiring));
        assert_eq!(state(&t, 3), Some(SliceState::Retiring));
        assert_eq!(state(&t, 4), None, "its older prepared slices are dropped");
    }

    #[test]
    fn retire_before_retires_only_older_served_slices() {
        let mut t = table(&[3]);
        t.commit(ep(3), None).expect("commit");
        assert!(!t.retire_before(ep(3), "m.gguf"));
        assert!(t.retire_before(ep(4), "m.gguf"));
        assert_eq!(state(&t, 3), Some(SliceState::Retiring));
        assert_eq!(t.commit(ep(3), None), Err(NodeError::Replaced(ep(3))));
        assert_eq!(
            t.committed(ep(5)).err(),
            Some(NodeError::NotCommitted(ep(5)))
        );
    }

    #[test]
    fn a_plan_of_one_model_retires_none_of_the_others_and_an_unload_retires_its_epoch() {
        let mut t = SliceTable::default();
        for (e, m) in [(1, "a"), (2, "b")] {
            t.prepare(ep(e), Arc::new(m), 10, A, true, Some(m.to_string()))
                .expect("prepare");
            t.commit(ep(e), Some(OWNER)).expect("commit");
        }
        // a plan of `a` at 3 without this node retires `a` only
        assert!(t.retire_before(ep(3), "a"));
        assert_eq!(state(&t, 1), Some(SliceState::Retiring));
        assert_eq!(state(&t, 2), Some(SliceState::Serving));
        assert!(!t.retire_before(ep(3), "c"));
        // `b` unloaded: its epoch retires, and only once
        assert!(t.retire(ep(2)));
        assert!(!t.retire(ep(2)));
        assert!(!t.retire(ep(7)));
        assert_eq!(state(&t, 2), Some(SliceState::Retiring));
        let mut freed = t.collect(&HashSet::new());
        freed.sort();
        assert_eq!(freed, vec![(ep(1), 10), (ep(2), 10)]);
        assert_eq!(t.bytes(), 0);
    }

    #[test]
    fn a_commit_drops_older_prepared_slices() {
        let mut t = table(&[1, 2]);
        t.commit(ep(2), None).expect("commit 2");
        assert_eq!(state(&t, 1), None);
        assert_eq!(t.bytes(), 200);
    }

    #[test]
    fn illegal_transitions_are_typed_errors() {
        let mut t = table(&[2]);
        assert_eq!(
            t.prepare(ep(2), Arc::new("again"), 1, A, true, None),
            Err(NodeError::EpochTaken(ep(2)))
        );
        t.commit(ep(2), None).expect("commit");
        assert_eq!(
            t.prepare(ep(2), Arc::new("x"), 1, A, true, None),
            Err(NodeError::EpochTaken(ep(2)))
        );
        assert_eq!(
            t.prepare(ep(1), Arc::new("old"), 1, A, true, None),
            Err(NodeError::NotNewer {
                epoch: ep(1),
                served: ep(2)
            })
        );
        // an old epoch prepared outside a 2PC cannot be committed behind the served one
        t.prepare(ep(1), Arc::new("old"), 1, A, false, None)
            .expect("held, not checked");
        assert_eq!(
            t.commit(ep(1), None),
            Err(NodeError::Behind {
                epoch: ep(1),
                served: ep(2)
            })
        );
        assert_eq!(t.abort(ep(2)), Err(NodeError::Committed(ep(2))));
        assert_eq!(t.remove(ep(7)), Err(NodeError::NoSuchEpoch(ep(7))));
        assert_eq!(
            t.committed(ep(5)).err(),
            Some(NodeError::ServesOther {
                epoch: ep(5),
                served: ep(2)
            })
        );
    }

    #[test]
    fn abort_frees_a_prepared_slice_and_is_idempotent() {
        let mut t = table(&[4]);
        assert_eq!(t.abort(ep(4)), Ok(400));
        assert_eq!(t.abort(ep(4)), Ok(0));
        assert_eq!(t.bytes(), 0);
    }

    #[test]
    fn a_released_lease_frees_its_slices_but_a_cluster_keeps_prepared_ones() {
        let mut t = table(&[1, 2]);
        t.commit(ep(1), None).expect("commit");
        // in a cluster: the prepared slice passes to the plan owner
        assert_eq!(t.release(A, Some(OWNER)), (100, vec![ep(2)]));
        assert_eq!(t.get(ep(2)).map(|s| s.lease), Some(OWNER));
        // the owner's own release frees it
        assert_eq!(t.release(OWNER, Some(OWNER)), (200, vec![]));
        assert_eq!(t.bytes(), 0);
        // outside a cluster everything goes
        let mut t = table(&[1, 2]);
        assert_eq!(t.release(A, None), (300, vec![]));
    }

    #[test]
    fn committed_slices_pass_to_the_plan_owner_prepared_ones_do_not() {
        let mut t = table(&[1, 2]);
        t.commit(ep(1), None).expect("commit");
        t.pass_committed_to(OWNER);
        assert_eq!(t.get(ep(1)).map(|s| s.lease), Some(OWNER));
        assert_eq!(t.get(ep(2)).map(|s| s.lease), Some(A));
        assert_eq!(t.clear(), 300);
    }
}
