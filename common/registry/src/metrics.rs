//! The etcd client's counts as Prometheus text, for the coordinator's and the nodes'
//! `/metrics`: which member calls go to, how often they moved, and how many calls failed on
//! the connection.

use std::fmt::Write;

pub use crate::endpoints::EtcdStats;

impl EtcdStats {
    /// Appends the counts to `out` as Prometheus text, each name starting `<prefix>_etcd_`.
    pub fn encode(&self, prefix: &str, out: &mut String) {
        let p = format!("{prefix}_etcd");
        let _ = writeln!(
            out,
            "# HELP {p}_member_in_use Each etcd member listed: 1 for the one calls go to now.\n\
             # TYPE {p}_member_in_use gauge"
        );
        for (url, used) in &self.members {
            let url = url.replace(['"', '\\', '\n'], "_");
            let _ = writeln!(out, "{p}_member_in_use{{member=\"{url}\"}} {}", *used as u8);
        }
        let _ = writeln!(
            out,
            "# HELP {p}_failovers_total Times calls moved to the next etcd member after a call to \
             one failed on its connection.\n\
             # TYPE {p}_failovers_total counter\n\
             {p}_failovers_total {}",
            self.failovers
        );
        let _ = writeln!(
            out,
            "# HELP {p}_connection_failures_total etcd calls that failed on the connection: \
             not_sent, no connection could be made; broken, it broke or timed out mid-call.\n\
             # TYPE {p}_connection_failures_total counter\n\
             {p}_connection_failures_total{{kind=\"not_sent\"}} {}\n\
             {p}_connection_failures_total{{kind=\"broken\"}} {}",
            self.not_sent, self.broken
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_is_listed_and_names_are_escaped() {
        let s = EtcdStats {
            members: vec![
                ("http://a:2379".into(), false),
                ("http://\"b\":2379".into(), true),
            ],
            failovers: 2,
            not_sent: 5,
            broken: 1,
        };
        let mut out = String::new();
        s.encode("shard", &mut out);
        assert!(
            out.contains("shard_etcd_member_in_use{member=\"http://a:2379\"} 0\n"),
            "{out}"
        );
        assert!(
            out.contains("shard_etcd_member_in_use{member=\"http://_b_:2379\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("shard_etcd_failovers_total 2\n"), "{out}");
        assert!(out.contains("{kind=\"not_sent\"} 5\n"), "{out}");
        assert!(out.contains("{kind=\"broken\"} 1\n"), "{out}");
        // every sample has a TYPE line before it
        for line in out.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(out.contains(&format!("# TYPE {name} ")), "{name}");
        }
    }
}
