//! `coordinator`: the cluster coordinator (planner, HTTP API); arrives with issue 3.

fn main() {
    eprintln!("coordinator: not implemented yet; see README.md");
    std::process::exit(2);
}
