//! Helpers for cross-process tests.
