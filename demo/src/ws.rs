//! `/ws/*`: a WebSocket echo that selects the `sip` subprotocol.
//!
//! Test commands (text frames):
//! - `__headers__` → the upgrade request's headers as JSON (what the upstream saw);
//! - `__later__:<ms>:<text>` → sends `<text>` after `<ms>` milliseconds, so a test can make the
//!   upstream speak first after a token has expired.
//!
//! Like most signaling servers it pings every `GATEHOUSE_DEMO_PING_SECONDS` (default 20; 0 turns
//! it off). That keepalive is what bounds how long a socket nobody speaks on outlives its token:
//! jwt-auth closes a socket on the first frame after its deadline, in either direction.

use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::Response;
use tokio::sync::mpsc;

use crate::echo::headers_json;

pub async fn upgrade(ws: WebSocketUpgrade, headers: HeaderMap) -> Response {
    let seen = headers_json(&headers).to_string();
    ws.protocols(["sip"])
        .on_upgrade(move |socket| session(socket, seen))
}

fn ping_interval() -> Option<Duration> {
    let secs: u64 = std::env::var("GATEHOUSE_DEMO_PING_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    (secs > 0).then(|| Duration::from_secs(secs))
}

async fn session(mut socket: WebSocket, seen: String) {
    let (later_tx, mut later_rx) = mpsc::channel::<String>(16);
    let every = ping_interval();
    let mut ping = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
    ping.reset(); // the first tick would fire at once
    loop {
        let reply = tokio::select! {
            _ = ping.tick(), if every.is_some() => Message::Ping(Default::default()),
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => match command(text.as_str(), &seen, &later_tx) {
                    Some(reply) => Message::Text(reply.into()),
                    None => continue,
                },
                Some(Ok(Message::Binary(bytes))) => Message::Binary(bytes),
                // The close reply (RFC 6455 5.5.1) is queued by the WebSocket library and
                // written by the next receive, which then ends the stream.
                Some(Ok(Message::Close(_))) => continue,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return,
            },
            Some(text) = later_rx.recv() => Message::Text(text.into()),
        };
        if socket.send(reply).await.is_err() {
            return;
        }
    }
}

fn command(text: &str, seen: &str, later: &mpsc::Sender<String>) -> Option<String> {
    if text == "__headers__" {
        return Some(seen.to_owned());
    }
    if let Some(rest) = text.strip_prefix("__later__:") {
        let (ms, message) = rest.split_once(':')?;
        let ms: u64 = ms.parse().ok()?;
        let later = later.clone();
        let message = message.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let _ = later.send(message).await;
        });
        return None;
    }
    Some(text.to_owned())
}
