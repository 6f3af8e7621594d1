//! The relay: sends each batch's activations on to the next stage, one request per batch and
//! address, and hands every step's outcome back to the request that is waiting for it.

use std::sync::Arc;

use opentelemetry::trace::{SpanContext, TraceContextExt, TraceState};
use proto_types::*;
use tokio::sync::mpsc;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::batch::{Onward, Reply};
use super::peer::PeerPool;

/// Relays until the compute thread (the only sender) is gone.
pub async fn run(mut rx: mpsc::UnboundedReceiver<Onward>, peers: Arc<PeerPool>) {
    while let Some(o) = rx.recv().await {
        let peers = peers.clone();
        let span = relay_span(&o);
        tokio::spawn(async move { deliver(o, &peers).await }.instrument(span));
    }
}

/// The relay's span, a child of this stage's `forward` span (the trace context the step came
/// with): the next stage's `forward` call, made inside it, links the next stage into the
/// same trace. tarpc takes a call's parent from the current span, not from its context.
fn relay_span(o: &Onward) -> tracing::Span {
    let span = tracing::info_span!(
        "relay",
        otel.name = "relay",
        next_stage = %o.addr,
        items = o.items.len(),
    );
    let t = &o.ctx.trace_context;
    let parent = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
        t.trace_id.into(),
        t.span_id.into(),
        t.sampling_decision.into(),
        true,
        TraceState::default(),
    ));
    let _ = span.set_parent(parent);
    span
}

async fn deliver(o: Onward, peers: &PeerPool) {
    let (items, replies): (Vec<ForwardItem>, Vec<Reply>) = o.items.into_iter().unzip();
    let n = items.len();
    let down =
        |d: String| ShardError::new(ErrorCode::Downstream, format!("next stage {}: {d}", o.addr));
    let outcomes = match peers.get(&o.addr).await {
        Err(e) => Err(e),
        Ok(client) => match client
            .forward(
                o.ctx,
                ForwardRequest {
                    epoch: o.epoch,
                    items,
                },
            )
            .await
        {
            Ok(Ok(reply)) if reply.outputs.len() == n => Ok(reply.outputs),
            Ok(Ok(reply)) => Err(down(format!(
                "{} outcomes for {n} items",
                reply.outputs.len()
            ))),
            Ok(Err(e)) => Err(e),
            Err(e) => {
                // The transport failed: the peer may be gone or restarted; reconnect next time.
                peers.forget(&o.addr);
                Err(down(e.to_string()))
            }
        },
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
