//! The root span of an HTTP request, after OpenTelemetry's GenAI semantic conventions: named
//! `chat {model}` or `text_completion {model}`, continuing the client's W3C `traceparent`
//! when it sends one. Its RPCs to the nodes (and theirs to each other) run under it, so that
//! the whole chain is one trace. Without trace export it is an ordinary `tracing` span: one
//! per request, nothing per token. Its end is also counted in [`RequestStats`].

use std::time::Instant;

use axum::http::HeaderMap;
use common::generate::FinishReason;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::stats::RequestStats;
use crate::engine::GenRequest;

/// Reads W3C trace-context headers.
struct Headers<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The request's span, when it started and when its first text went out, and the metrics
/// its end is counted in.
#[derive(Debug, Clone)]
pub struct RequestSpan {
    /// The span; the generation task runs in it.
    pub span: tracing::Span,
    started: Instant,
    first: std::sync::Arc<std::sync::OnceLock<std::time::Duration>>,
    /// Set by the first of `done` and `failed`: a request is counted once.
    ended: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stats: std::sync::Arc<RequestStats>,
}

impl RequestSpan {
    /// Opens the span of request `id`, a child of the client's `traceparent` if it sent one.
    /// What the request asks for is recorded by [`RequestSpan::request`] once it is parsed.
    pub fn open(
        headers: &HeaderMap,
        stats: std::sync::Arc<RequestStats>,
        chat: bool,
        model: &str,
        id: &str,
    ) -> Self {
        let op = if chat { "chat" } else { "text_completion" };
        let span = tracing::info_span!(
            "request",
            otel.name = %format!("{op} {model}"),
            otel.kind = "server",
            gen_ai.operation.name = op,
            gen_ai.request.model = model,
            gen_ai.request.max_tokens = Empty,
            gen_ai.request.temperature = Empty,
            gen_ai.request.top_p = Empty,
            gen_ai.response.id = id,
            gen_ai.response.finish_reasons = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            gen_ai.server.time_to_first_token = Empty,
            error.type = Empty,
            otel.status_code = Empty,
        );
        let parent =
            opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
        let _ = span.set_parent(parent);
        RequestSpan {
            span,
            started: Instant::now(),
            first: Default::default(),
            ended: Default::default(),
            stats,
        }
    }

    /// A child span of the request for work done before generation starts (the chat
    /// template, tokenizing).
    pub fn step(&self, name: &'static str) -> tracing::span::EnteredSpan {
        tracing::info_span!(parent: &self.span, "step", otel.name = name).entered()
    }

    /// What the request asks for, once it is parsed and tokenized.
    pub fn request(&self, g: &GenRequest) {
        let s = &self.span;
        s.record("gen_ai.request.max_tokens", g.max_tokens as u64);
        s.record(
            "gen_ai.request.temperature",
            f64::from(g.sampling.temperature),
        );
        s.record("gen_ai.request.top_p", f64::from(g.sampling.top_p));
        s.record("gen_ai.usage.input_tokens", g.prompt.len() as u64);
    }

    /// Its sessions are open on every stage: it was admitted.
    pub fn admitted(&self) {
        self.stats.admitted(self.started.elapsed());
    }

    /// The first text went out (once).
    pub fn first_text(&self) {
        let now = self.started.elapsed();
        if self.first.set(now).is_ok() {
            self.span
                .record("gen_ai.server.time_to_first_token", now.as_secs_f64());
        }
    }

    /// The generation ended.
    pub fn done(&self, finish: FinishReason, input_tokens: usize, output_tokens: usize) {
        if self.ended.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        self.stats.finished(
            input_tokens,
            output_tokens,
            self.first.get().copied(),
            self.started.elapsed(),
        );
        self.span
            .record("gen_ai.response.finish_reasons", finish.as_str());
        self.span
            .record("gen_ai.usage.output_tokens", output_tokens as u64);
    }

    /// It failed with `kind` (OpenAI's error type).
    pub fn failed(&self, kind: &str) {
        if self.ended.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        self.stats.failed(self.started.elapsed());
        self.span.record("error.type", kind);
        self.span.record("otel.status_code", "ERROR");
    }
}
