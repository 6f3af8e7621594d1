//! [`NodeConfig`]: the node's typed, checked configuration.

use std::path::PathBuf;
use std::time::Duration;

use common::device::DeviceSpec;

use super::error::{NodeError, Result};

/// Typed node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where model files are looked up by name.
    pub models_dir: PathBuf,
    /// The device.
    pub device: DeviceSpec,
    /// Most bytes the node may hold (weights plus caches); `None`: no limit.
    pub memory_limit: Option<u64>,
    /// Most sessions at once.
    pub max_sessions: usize,
    /// Advertised heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Lease time-to-live.
    pub lease_ttl: Duration,
    /// A session with no step for this long is closed.
    pub session_idle: Duration,
    /// Hand freed heap memory back to the OS (`malloc_trim`) after frees.
    pub trim: bool,
    /// How long the compute thread polls for the next step after a pass before it sleeps.
    pub poll: Duration,
    /// The precision of the activations sent on to the next stage.
    pub activations: Activations,
}

/// The precision of the activations a stage sends to the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Activations {
    /// 32-bit floats, as the stage computed them: a cluster's output equals one process's.
    #[default]
    F32,
    /// IEEE half precision: half the bytes on every hop; the output may differ slightly.
    F16,
    /// bfloat16: half the bytes, f32's range, fewer mantissa bits than f16.
    Bf16,
}

/// The longest `--poll-us`.
const MAX_POLL: Duration = Duration::from_secs(1);

impl NodeConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if self.max_sessions == 0 {
            return Err(NodeError::Config(
                "--max-sessions must be at least 1".into(),
            ));
        }
        if self.heartbeat_interval.is_zero() || self.lease_ttl <= self.heartbeat_interval {
            return Err(NodeError::Config(format!(
                "the lease TTL ({:?}) must be longer than the heartbeat interval ({:?}), which must not be 0",
                self.lease_ttl, self.heartbeat_interval
            )));
        }
        if self.session_idle.is_zero() {
            return Err(NodeError::Config(
                "--session-idle-secs must be at least 1".into(),
            ));
        }
        if self.poll > MAX_POLL {
            return Err(NodeError::Config(format!(
                "--poll-us must be at most {} (a second): the compute thread spins that long after every pass",
                MAX_POLL.as_micros()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NodeConfig {
        NodeConfig {
            models_dir: PathBuf::from("models"),
            device: DeviceSpec::Cpu,
            memory_limit: None,
            max_sessions: 64,
            heartbeat_interval: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(5),
            session_idle: Duration::from_secs(300),
            trim: true,
            poll: Duration::ZERO,
            activations: Activations::F32,
        }
    }

    #[test]
    fn validate_refuses_what_would_break_the_node() {
        assert_eq!(config().validate(), Ok(()));
        let poll = |us| NodeConfig {
            poll: Duration::from_micros(us),
            ..config()
        };
        assert_eq!(poll(3000).validate(), Ok(()));
        assert!(poll(2_000_000)
            .validate()
            .is_err_and(|e| e.to_string().contains("--poll-us")));
        let sessions = NodeConfig {
            max_sessions: 0,
            ..config()
        };
        assert!(sessions.validate().is_err());
        let ttl = NodeConfig {
            lease_ttl: Duration::from_millis(500),
            ..config()
        };
        assert!(ttl
            .validate()
            .is_err_and(|e| e.to_string().contains("lease TTL")));
    }
}
