//! The relay: sends each batch's activations on to the next stage, one request per batch and
//! address, and hands every step's outcome back to the request that is waiting for it.

use std::sync::Arc;

use proto_types::*;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::batch::{Onward, Reply};
use super::metrics::Metrics;
use super::peer::PeerPool;

/// Relays until the compute thread (the only sender) is gone.
pub async fn run(
    mut rx: mpsc::UnboundedReceiver<Onward>,
    peers: Arc<PeerPool>,
    metrics: Arc<Metrics>,
) {
    // The relays of steps left out of the traces run in one `untraced` span, made once (no
    // span at all without export).
    let quiet = common::telemetry::untraced_span();
    while let Some(o) = rx.recv().await {
        let (peers, metrics) = (peers.clone(), metrics.clone());
        let span = super::trace::relay(&o).unwrap_or_else(|| quiet.clone());
        tokio::spawn(async move { deliver(o, &peers, &metrics).await }.instrument(span));
    }
}

async fn deliver(o: Onward, peers: &PeerPool, metrics: &Metrics) {
    let (items, replies): (Vec<ForwardItem>, Vec<Reply>) = o.items.into_iter().unzip();
    let n = items.len();
    let bytes: usize = items
        .iter()
        .map(|i| match &i.input {
            StageInput::Hidden(w) => w.data.len(),
            StageInput::Tokens(_) => 0,
        })
        .sum();
    let down =
        |d: String| ShardError::new(ErrorCode::Downstream, format!("next stage {}: {d}", o.addr));
    let outcomes = match peers.get(&o.addr).await {
        Err(e) => Err(e),
        Ok(client) => {
            let sent = std::time::Instant::now();
            let req = ForwardRequest {
                epoch: o.epoch,
                items,
            };
            match client.forward(o.ctx, req).await {
                Ok(Ok(reply)) if reply.outputs.len() == n => {
                    let there = std::time::Duration::from_micros(reply.handled_micros);
                    metrics.hop(sent.elapsed(), there, bytes);
                    Ok(reply.outputs)
                }
                Ok(Ok(reply)) => Err(down(format!(
                    "{} outcomes for {n} items",
                    reply.outputs.len()
                ))),
                Ok(Err(e)) => Err(e),
                Err(e) => {
                    // The transport failed: the peer may be gone or restarted; reconnect
                    // next time.
                    peers.forget(&o.addr);
                    Err(down(e.to_string()))
                }
            }
        }
    };
    match outcomes {
        Ok(outs) => outs
            .into_iter()
            .zip(replies)
            .for_each(|(out, r)| drop(r.send(out))),
        Err(e) => replies
            .into_iter()
            .for_each(|r| drop(r.send(Err(e.clone())))),
    }
}
