//! The fleet store's host side: calls to etcd's JSON gateway through an Envoy cluster
//! (`dispatch_http_call`), and the millisecond clock their budgets and latency use. What to
//! send and how to read the answers is `gatehouse_core::store`.

use gatehouse_core::store::{Call, StoreConfig};
use proxy_wasm::hostcalls;
use std::time::{Duration, UNIX_EPOCH};

/// `POST` `call` to the store's cluster with `timeout_ms`; the call token, or `None` (logged)
/// when Envoy cannot start it (no such cluster).
pub fn send(config: &StoreConfig, call: &Call, timeout_ms: u64) -> Option<u32> {
    let sent = hostcalls::dispatch_http_call(
        &config.cluster,
        vec![
            (":method", "POST"),
            (":path", call.path),
            (":authority", &config.authority),
            ("content-type", "application/json"),
        ],
        Some(&call.body),
        vec![],
        Duration::from_millis(timeout_ms.max(1)),
    );
    match sent {
        Ok(token) => Some(token),
        Err(_) => {
            super::failed("call the store", &config.cluster);
            None
        }
    }
}

/// Unix time in milliseconds (0 when the host cannot tell): budgets and latency only.
pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// A worker's socket lease id (random; the time when the host has no randomness).
pub fn lease_id() -> i64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        b = now_ms().to_be_bytes();
    }
    gatehouse_core::store::socket_lease(b)
}

/// A store call's answer; one longer than `cap` is refused unread (it reads as
/// [`gatehouse_core::store::StoreError::TooLarge`]).
pub fn response(body_size: usize, cap: Option<usize>) -> (u32, Vec<u8>) {
    match cap {
        Some(cap) if body_size > cap => (200, vec![0; cap + 1]),
        _ => super::http_call_response(body_size),
    }
}

/// The root tick with a store: every 250 ms, so a closed socket's slot is free well within a
/// second (the release is sent on the tick).
pub const TICK: Duration = Duration::from_millis(250);
