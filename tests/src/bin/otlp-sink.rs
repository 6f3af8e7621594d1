//! `otlp-sink [ADDR]`: an OTLP/gRPC trace receiver for benchmarks of the export's cost
//! (`scripts/bench_cluster.py --traces`). Prints `listening on ADDR`, then, every 10 s and on
//! ctrl-c, how many export calls and spans it has received. Default address 127.0.0.1:0.

use integration_tests::OtlpReceiver;

fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let rx = OtlpReceiver::start_on(&addr)?;
    let bound = rx.endpoint.trim_start_matches("http://").to_string();
    println!("listening on {bound}");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(10));
        eprintln!(
            "otlp-sink: {} exports, {} spans",
            rx.exports(),
            rx.spans().len()
        );
    }
}
