//! Claims from Envoy dynamic metadata (native `jwt_authn` with `payload_in_metadata`).

use gatehouse_core::jwt::Claims;
use gatehouse_core::session_binding::metadata;
use gatehouse_host as host;
use serde_json::Value;

/// `filter_metadata[namespace][key]` as a JSON object. proxy-wasm returns the `metadata`
/// property as a serialized `envoy.config.core.v3.Metadata`; the core decodes it.
pub fn jwt_authn(namespace: &str, key: &str) -> Option<Claims> {
    let bytes = host::property_bytes(vec!["metadata"])?;
    match metadata::lookup(&bytes, namespace, key)? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}
