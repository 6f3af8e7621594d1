//! The relay: sends each batch's activations on to the next stage, one request per batch and
//! address, and hands every step's outcome back to the request that is waiting for it.

use std::sync::Arc;

use proto_types::*;
use tokio::sync::mpsc;

use super::batch::Onward;
use super::peer::PeerPool;

/// Relays until the compute thread (the only sender) is gone.
pub async fn run(mut rx: mpsc::UnboundedReceiver<Onward>, peers: Arc<PeerPool>) {
    while let Some(o) = rx.recv().await {
        let peers = peers.clone();
        tokio::spawn(async move { deliver(o, &peers).await });
    }
}

async fn deliver(o: Onward, peers: &PeerPool) {
    let fail = |items: Vec<(ForwardItem, super::batch::Reply)>, e: ShardError| {
        for (_, reply) in items {
            let _ = reply.send(Err(e.clone()));
        }
    };
    let client = match peers.get(&o.addr).await {
        Ok(c) => c,
        Err(e) => return fail(o.items, e),
    };
    let (items, replies): (Vec<ForwardItem>, Vec<_>) = o.items.into_iter().unzip();
    let n = items.len();
    let req = ForwardRequest {
        epoch: o.epoch,
        items,
    };
    let down =
        |d: String| ShardError::new(ErrorCode::Downstream, format!("next stage {}: {d}", o.addr));
    match client.forward(o.ctx, req).await {
        Ok(Ok(reply)) if reply.outputs.len() == n => {
            for (out, r) in reply.outputs.into_iter().zip(replies) {
                let _ = r.send(out);
            }
        }
        Ok(Ok(reply)) => {
            let e = down(format!("{} outcomes for {n} items", reply.outputs.len()));
            replies
                .into_iter()
                .for_each(|r| drop(r.send(Err(e.clone()))));
        }
        Ok(Err(e)) => replies
            .into_iter()
            .for_each(|r| drop(r.send(Err(e.clone())))),
        Err(e) => {
            // The transport failed: the peer may be gone or restarted; reconnect next time.
            peers.forget(&o.addr);
            let e = down(e.to_string());
            replies
                .into_iter()
                .for_each(|r| drop(r.send(Err(e.clone()))));
        }
    }
}
