//! API keys: `/v1/*` needs `Authorization: Bearer KEY` when keys are configured, `/metrics`
//! when a metrics key is; a missing or wrong key gets 401 in OpenAI's error shape.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// The keys a route accepts; empty: open.
#[derive(Debug, Clone, Default)]
pub struct Keys(Arc<Vec<String>>);

impl Keys {
    /// Accepts any of `keys` (none: open).
    pub fn new(keys: Vec<String>) -> Self {
        Keys(Arc::new(keys))
    }

    /// Whether any key is required.
    pub fn required(&self) -> bool {
        !self.0.is_empty()
    }

    /// Whether `given` is one of the keys, compared in constant time (no early exit on the
    /// first differing byte, so the time taken does not reveal a prefix).
    fn accepts(&self, given: &str) -> bool {
        self.0.iter().fold(false, |found, k| {
            found | same(k.as_bytes(), given.as_bytes())
        })
    }
}

fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The 401 OpenAI's API gives.
fn unauthorized(message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error",
                                "code": "invalid_api_key", "param": null}});
    let mut r = (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

/// Middleware: lets the request through when `keys` is open or it carries one of them.
pub async fn require(State(keys): State<Keys>, req: Request, next: Next) -> Response {
    if !keys.required() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        None => unauthorized(
            "no API key: send it as `Authorization: Bearer KEY` (the coordinator runs with --api-key)",
        ),
        Some(k) if keys.accepts(k) => next.run(req).await,
        Some(_) => unauthorized("the API key is not valid"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        let keys = Keys::new(vec!["sk-one".into(), "sk-two".into()]);
        assert!(keys.accepts("sk-one") && keys.accepts("sk-two"));
        for wrong in ["", "sk-on", "sk-one ", "sk-onE", "sk-three"] {
            assert!(!keys.accepts(wrong), "{wrong}");
        }
        assert!(!Keys::default().required());
    }
}
