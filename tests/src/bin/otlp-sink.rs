//! `otlp-sink [ADDR] [--print]`: an OTLP/gRPC trace receiver, for benchmarks of the export's
//! cost (`scripts/bench_cluster.py --traces`) and, as an image, for the compose trace test.
//! Prints `listening on ADDR`, then, every 10 s and on ctrl-c, how many export calls and
//! spans it has received; with `--print`, also each span as a JSON line on stdout, within a
//! second of its arrival. Default address 127.0.0.1:0.

use std::io::Write;

use integration_tests::OtlpReceiver;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let print = args.iter().any(|a| a == "--print");
    let addr = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let rx = OtlpReceiver::start_on(&addr)?;
    let bound = rx.endpoint.trim_start_matches("http://").to_string();
    println!("listening on {bound}");
    std::io::stdout().flush()?;
    let mut printed = 0;
    let mut last_count = std::time::Instant::now();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(if print { 1 } else { 10 }));
        if print {
            let spans = rx.spans();
            let mut out = std::io::stdout().lock();
            for s in spans.iter().skip(printed) {
                let line = serde_json::json!({
                    "service": s.service, "instance": s.instance, "name": s.name,
                    "trace_id": s.trace_id, "span_id": s.span_id, "parent_id": s.parent_id,
                });
                writeln!(out, "{line}")?;
            }
            out.flush()?;
            printed = spans.len();
        }
        if last_count.elapsed().as_secs() >= 10 {
            eprintln!(
                "otlp-sink: {} exports, {} spans",
                rx.exports(),
                rx.spans().len()
            );
            last_count = std::time::Instant::now();
        }
    }
}
