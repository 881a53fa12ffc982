//! `/api/*`: what reached the upstream, as JSON.

use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

/// The largest request body the echo reads (and counts): more is 413.
const MAX_BODY: usize = 1 << 20;

pub async fn echo(request: Request) -> Response {
    let (parts, body) = request.into_parts();
    // The body is read to its end before answering. A handler that answers without reading it
    // makes hyper close the keep-alive connection after the response, without `Connection:
    // close`, whenever the body had not fully arrived with the headers: a proxy that meanwhile
    // sent the connection its next request sees it reset (Envoy's 503 "upstream connect error
    // … connection termination" in the soak, docs/performance.md).
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body over 1 MiB\n").into_response();
    };
    Json(json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query().unwrap_or(""),
        "headers": headers_json(&parts.headers),
        "body_bytes": body.len(),
    }))
    .into_response()
}

/// Header name → value; repeated headers are joined with ", ".
pub fn headers_json(headers: &HeaderMap) -> Value {
    let mut out = Map::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match out.get_mut(name.as_str()) {
            Some(Value::String(seen)) => {
                seen.push_str(", ");
                seen.push_str(&value);
            }
            _ => {
                out.insert(name.as_str().to_owned(), Value::String(value));
            }
        }
    }
    Value::Object(out)
}
