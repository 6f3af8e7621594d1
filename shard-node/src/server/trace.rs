//! Spans of a node's work in the trace of the request that asked for it.
//!
//! The tarpc server span of each call is tarpc's. Under a `forward` call come the pass's own
//! span and the relay to the next stage. A decode stream would make a span per token and
//! stage, thousands per request, so the policy is: every prefill chunk gets a `forward`
//! span; a session's decode steps get one at every position that is a multiple of
//! [`DECODE_SPAN_EVERY`]. A batched pass that serves several requests appears in each of
//! their traces, as one span per request, carrying the batch's size: a span has one parent,
//! and each request's trace should show its own pass without following links.

use opentelemetry::trace::{SpanContext, TraceContextExt, TraceState};
use tarpc::context::Context;
use tarpc::server::Serve;
use tarpc::{RequestName, ServerError};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::batch::{Onward, Pending};

/// One decode step in this many gets a `forward` span (the coordinator samples the same
/// steps: the others arrive unsampled).
pub const DECODE_SPAN_EVERY: u32 = common::telemetry::DECODE_TRACE_EVERY;

/// The OpenTelemetry parent of work done for a call with context `ctx`.
fn parent(ctx: &Context) -> opentelemetry::Context {
    let t = &ctx.trace_context;
    opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
        t.trace_id.into(),
        t.span_id.into(),
        t.sampling_decision.into(),
        true,
        TraceState::default(),
    ))
}

/// Whether the caller records this call's trace (it leaves out most decode steps).
pub fn sampled(ctx: &Context) -> bool {
    ctx.trace_context.sampling_decision == tarpc::trace::SamplingDecision::Sampled
}

/// Tells the exporter which requests to leave tarpc's server span out for (see
/// [`common::telemetry::note_rpc`]): those whose caller traces the request but not this
/// call. A call with no trace at all keeps its span (the node's own root).
pub fn note_request<Req>(message: &std::io::Result<tarpc::ClientMessage<Req>>) {
    if let Ok(tarpc::ClientMessage::Request(r)) = message {
        let t = &r.context.trace_context;
        common::telemetry::note_rpc(
            !t.trace_id.is_none()
                && t.sampling_decision == tarpc::trace::SamplingDecision::Unsampled,
        );
    }
}

/// The relay's span, a child of this stage's `forward` call: the next stage's `forward`
/// call, made inside it, links the next stage into the same trace (tarpc takes a call's
/// parent from the current span, not from its context). `None` when the call is not
/// sampled: the relay then runs unrecorded, passing the unsampled context on as it is.
pub fn relay(o: &Onward) -> Option<tracing::Span> {
    if !sampled(&o.ctx) || !common::telemetry::exporting() {
        return None;
    }
    let span = tracing::info_span!(
        "relay",
        otel.name = "relay",
        next_stage = %o.addr,
        items = o.items.len(),
    );
    let _ = span.set_parent(parent(&o.ctx));
    Some(span)
}

/// The spans of one pass, per the policy above: `None` for the steps it leaves out.
pub fn pass(pendings: &[Pending], rows: &[usize]) -> Vec<Option<tracing::Span>> {
    if !common::telemetry::exporting() {
        return vec![None; pendings.len()];
    }
    let batch_rows: usize = rows.iter().sum();
    pendings
        .iter()
        .zip(rows)
        .map(|(p, &n)| {
            if !sampled(&p.ctx) || (n == 1 && !p.item.start.is_multiple_of(DECODE_SPAN_EVERY)) {
                return None;
            }
            let stage = &p.slice.stage;
            let span = tracing::info_span!(
                "forward",
                otel.name = "forward",
                rows = n,
                start = p.item.start,
                layers = %stage.range(),
                device = ?stage.device().location(),
                batch_items = pendings.len(),
                batch_rows,
                epoch = p.slice.epoch.0,
            );
            let _ = span.set_parent(parent(&p.ctx));
            Some(span)
        })
        .collect()
}

/// The node's service with its tarpc server spans named after the method. tarpc names a
/// server span once the span has started, and the OpenTelemetry layer no longer applies a
/// name then: every call would read `RPC`.
#[derive(Debug, Clone)]
pub struct Named<S>(pub S);

impl<S: Serve> Serve for Named<S> {
    type Req = S::Req;
    type Resp = S::Resp;

    async fn serve(self, ctx: Context, req: S::Req) -> Result<S::Resp, ServerError> {
        if sampled(&ctx) && common::telemetry::exporting() {
            let name = req.name().to_string();
            tracing::Span::current().context().span().update_name(name);
        }
        self.0.serve(ctx, req).await
    }
}
