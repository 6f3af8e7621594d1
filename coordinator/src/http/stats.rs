//! Request latency and token counts as Prometheus histograms and counters
//! (prometheus-client), served on the coordinator's `/metrics`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// How a request ended.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

/// The coordinator's request metrics.
#[derive(Debug)]
pub struct RequestStats {
    registry: Registry,
    ttft: Histogram,
    tpot: Histogram,
    duration: Histogram,
    admission: Histogram,
    prompt_tokens: Counter,
    generated_tokens: Counter,
    requests: Family<Outcome, Counter>,
}

impl Default for RequestStats {
    fn default() -> Self {
        let ttft = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let tpot = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let duration = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        let admission = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let prompt_tokens = Counter::default();
        let generated_tokens = Counter::default();
        let requests = Family::<Outcome, Counter>::default();
        let mut registry = Registry::with_prefix("coordinator");
        registry.register(
            "time_to_first_token_seconds",
            "From the request's arrival to its first text",
            ttft.clone(),
        );
        registry.register(
            "time_per_output_token_seconds",
            "Mean time between a request's tokens after the first",
            tpot.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "From a request's arrival to its end",
            duration.clone(),
        );
        registry.register(
            "admission_wait_seconds",
            "From a request's arrival to its session being open on every stage",
            admission.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens of finished requests",
            prompt_tokens.clone(),
        );
        registry.register(
            "generated_tokens",
            "Tokens generated for finished requests",
            generated_tokens.clone(),
        );
        registry.register(
            "requests",
            "Requests ended, by outcome (ok, error)",
            requests.clone(),
        );
        RequestStats {
            registry,
            ttft,
            tpot,
            duration,
            admission,
            prompt_tokens,
            generated_tokens,
            requests,
        }
    }
}

impl RequestStats {
    /// A request generated `output` tokens from `prompt`, its first text after `first`
    /// (if any), in `total`.
    pub fn finished(&self, prompt: usize, output: usize, first: Option<Duration>, total: Duration) {
        self.requests
            .get_or_create(&Outcome { outcome: "ok" })
            .inc();
        self.prompt_tokens.inc_by(prompt as u64);
        self.generated_tokens.inc_by(output as u64);
        self.duration.observe(total.as_secs_f64());
        if let Some(first) = first {
            self.ttft.observe(first.as_secs_f64());
            if output > 1 {
                let rest = total.saturating_sub(first).as_secs_f64();
                self.tpot.observe(rest / (output - 1) as f64);
            }
        }
    }

    /// A request was admitted `after` its arrival.
    pub fn admitted(&self, after: Duration) {
        self.admission.observe(after.as_secs_f64());
    }

    /// A request failed after `total`.
    pub fn failed(&self, total: Duration) {
        self.requests
            .get_or_create(&Outcome { outcome: "error" })
            .inc();
        self.duration.observe(total.as_secs_f64());
    }

    /// The metrics in Prometheus' text format, appended to `out` (without the `# EOF` line,
    /// since more lines follow).
    pub fn encode(&self, out: &mut String) {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_ok() {
            out.push_str(text.trim_end().trim_end_matches("# EOF").trim_end());
            out.push('\n');
        }
    }
}
