//! The node's bookkeeping on a real slice (one block of the default model, fetched by
//! `scripts/fetch-model.sh`): leases free what they own, and the memory limit holds under
//! concurrent opens.

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use candle_core::Device;
use common::device::DeviceSpec;
use common::gguf::GgufFile;
use common::model::{LayerRange, Stage};
use common::sampling::Sampler;

use super::*;

const MAX_CTX: usize = 64;

fn slice(epoch: u64) -> Slice {
    let file = GgufFile::open(common::testing::default_model()).expect("the default model opens");
    let range = LayerRange::new(0, 1).expect("range");
    let stage = Stage::load(&file, range, &Device::Cpu, MAX_CTX).expect("one block loads");
    Slice {
        epoch: PlanEpoch(epoch),
        model: "default".into(),
        stage,
        path: common::testing::default_model(),
        grammar: Default::default(),
    }
}

fn config(memory_limit: Option<u64>) -> NodeConfig {
    NodeConfig {
        models_dir: PathBuf::from("models"),
        device: DeviceSpec::Cpu,
        memory_limit,
        max_sessions: 64,
        heartbeat_interval: Duration::from_secs(1),
        lease_ttl: Duration::from_secs(5),
        session_idle: Duration::from_secs(300),
        trim: false,
        poll: Duration::ZERO,
        activations: Default::default(),
    }
}

fn session(lease: LeaseId, slice: &Arc<Slice>) -> SessionEntry {
    let cache = slice
        .stage
        .new_cache(MAX_CTX, Default::default())
        .expect("cache");
    let sampler = Sampler::new(Default::default()).expect("sampler");
    SessionEntry::new(
        lease,
        Session {
            slice: slice.clone(),
            cache,
            next: None,
            sampler,
        },
    )
}

/// A node serving one block under `lease`, with room for `room` sessions beside it (or no
/// limit).
fn serving(room: Option<u64>) -> (Arc<Node>, LeaseId, Arc<Slice>) {
    let s = slice(1);
    let weights = s.stage.weight_bytes() as u64;
    let probe = Arc::new(slice(0));
    let kv = session(LeaseId(0), &probe).max_kv_bytes;
    let limit = room.map(|n| weights + n * kv + kv / 2);
    let node = Arc::new(Node::new(config(limit), Device::Cpu));
    let lease = node.leases.grant("test".into());
    node.put_slice(lease, s, true, false).expect("load");
    let served = node.slice_for(PlanEpoch(1)).expect("served");
    (node, lease, served)
}

#[test]
fn concurrent_opens_at_the_memory_limit_admit_exactly_what_fits() {
    const ROOM: u64 = 3;
    const TRIES: usize = 16;
    let (node, lease, served) = serving(Some(ROOM));
    let start = Arc::new(Barrier::new(TRIES));
    let threads: Vec<_> = (0..TRIES)
        .map(|i| {
            let (node, served, start) = (node.clone(), served.clone(), start.clone());
            std::thread::spawn(move || {
                let s = session(lease, &served);
                start.wait();
                node.open_session(SessionId(i as u64), s)
            })
        })
        .collect();
    let results: Vec<_> = threads
        .into_iter()
        .map(|t| t.join().expect("no panic"))
        .collect();
    let opened = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(opened as u64, ROOM, "{results:?}");
    assert!(results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .all(|e| matches!(e, NodeError::SessionDoesNotFit { .. })));
    assert_eq!(node.session_count() as u64, ROOM);
    let (free, limit) = node.free_bytes();
    assert!(free < limit, "sessions are reserved against the limit");
}

#[test]
fn releasing_a_lease_frees_its_sessions_and_slices() {
    let (node, lease, served) = serving(None);
    node.open_session(SessionId(1), session(lease, &served))
        .expect("open");
    assert_eq!(
        node.open_session(SessionId(1), session(lease, &served))
            .err(),
        Some(NodeError::SessionOpen(SessionId(1)))
    );
    let held = node.held();
    assert_eq!(held.len(), 1);
    assert!(held[0].weights > 0);
    drop(served);
    let bytes = node.release_lease(lease, "test");
    assert_eq!(bytes, held[0].total());
    assert_eq!(node.session_count(), 0);
    assert!(node.slice().is_none());
    assert!(node.held().is_empty());
    assert!(node.take_freed());
    assert_eq!(node.leases_released(), 1);
    // a released lease creates nothing more
    assert_eq!(
        node.put_slice(lease, slice(2), true, false),
        Err(NodeError::UnknownLease(lease))
    );
}

#[test]
fn sessions_close_only_under_their_own_lease() {
    let (node, lease, served) = serving(None);
    let other = node.leases.grant("other".into());
    node.open_session(SessionId(7), session(lease, &served))
        .expect("open");
    assert_eq!(
        node.close_session(SessionId(7), other),
        Err(NodeError::UnknownSession {
            id: SessionId(7),
            owner: Some(other),
            left: false
        })
    );
    assert!(node.close_session(SessionId(7), lease).is_ok());
    assert!(node.session(SessionId(7)).is_err());
}

#[test]
fn the_plan_owner_keeps_committed_slices_when_their_loader_goes() {
    let (node, lease, served) = serving(None);
    drop(served);
    let owner = node.join_cluster("n1", "etcd".into());
    assert_eq!(node.node_id().as_deref(), Some("n1"));
    // the loader's connection closes: the plan's slice stays
    node.release_lease(lease, "coordinator gone");
    assert!(node.slice().is_some());
    assert_eq!(node.renew_plan_owner(|| "etcd".into()), Some(owner));
    // leaving frees everything and ends the owner
    assert!(node.leave("test") > 0);
    assert!(node.has_left());
    assert!(node.slice().is_none());
    assert_eq!(
        node.leases.check(owner),
        Err(NodeError::UnknownLease(owner))
    );
    let l = node.leases.grant("late".into());
    assert_eq!(
        node.put_slice(l, slice(3), false, false),
        Err(NodeError::Left)
    );
}

#[test]
fn idle_sessions_expire_and_their_retired_slice_goes_with_them() {
    let (node, lease, served) = serving(None);
    node.open_session(SessionId(1), session(lease, &served))
        .expect("open");
    drop(served);
    node.put_slice(lease, slice(2), true, false)
        .expect("epoch 2");
    // epoch 1 retires while its session lives
    assert_eq!(
        node.slice_states(),
        vec![
            (PlanEpoch(1), SliceState::Retiring),
            (PlanEpoch(2), SliceState::Serving)
        ]
    );
    node.take_freed();
    node.expire(now_ms() + 301_000);
    assert_eq!(node.session_count(), 0);
    assert_eq!(
        node.slice_states(),
        vec![(PlanEpoch(2), SliceState::Serving)]
    );
    assert!(node.take_freed());
}

#[test]
fn a_committed_load_that_replaces_an_idle_slice_frees_it_at_once() {
    let (node, lease, served) = serving(None);
    drop(served);
    node.take_freed();
    node.put_slice(lease, slice(2), true, false)
        .expect("epoch 2");
    assert_eq!(
        node.slice_states(),
        vec![(PlanEpoch(2), SliceState::Serving)]
    );
    assert!(
        node.take_freed(),
        "the reaper must hand the old weights back"
    );
}

#[test]
fn a_session_cannot_open_on_a_slice_freed_while_it_was_being_built() {
    let (node, lease, served) = serving(None);
    // built against epoch 1, which a newer commit then retires and frees
    let s = session(lease, &served);
    node.put_slice(lease, slice(2), true, false)
        .expect("epoch 2");
    assert_eq!(
        node.open_session(SessionId(1), s).err(),
        Some(NodeError::ServesOther {
            epoch: PlanEpoch(1),
            served: PlanEpoch(2)
        })
    );
    assert_eq!(node.session_count(), 0);
}
