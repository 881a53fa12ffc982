//! `/api/*`: what reached the upstream, as JSON.

use axum::extract::Request;
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Map, Value};

pub async fn echo(request: Request) -> Json<Value> {
    let uri = request.uri();
    Json(json!({
        "method": request.method().as_str(),
        "path": uri.path(),
        "query": uri.query().unwrap_or(""),
        "headers": headers_json(request.headers()),
    }))
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
