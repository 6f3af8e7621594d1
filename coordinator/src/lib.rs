//! The coordinator: planner, scheduler, OpenAI-compatible HTTP API and 2PC driver.
//!
//! Arrives with issue 3; this crate is a placeholder in the workspace layout.
