//! WebSocket pieces (RFC 6455) the filters need: the handshake answer, close frames, and the
//! close-on-expiry state of a live socket.

use base64::Engine;
use sha1::{Digest, Sha1};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Close codes the browser sees as `CloseEvent.code`.
pub const CLOSE_BAD_REQUEST: u16 = 4400;
pub const CLOSE_UNAUTHORIZED: u16 = 4401;
pub const CLOSE_FORBIDDEN: u16 = 4403;
/// Over a concurrency cap (too many open sockets for one user or session).
pub const CLOSE_TOO_MANY: u16 = 4429;
/// RFC 6455 registry: "Try Again Later".
pub const CLOSE_TRY_AGAIN_LATER: u16 = 1013;

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.trim().as_bytes());
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// A close frame with `code` and `reason` (cut to fit the 123-byte limit on a char boundary).
/// `mask` is required for frames sent towards the server (client-to-server frames are masked).
pub fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    let mut frame = Vec::with_capacity(6 + payload.len());
    frame.push(0x88); // FIN + opcode 8 (close)
    let len = payload.len() as u8; // <= 125
    match mask {
        None => {
            frame.push(len);
            frame.extend_from_slice(&payload);
        }
        Some(m) => {
            frame.push(0x80 | len);
            frame.extend_from_slice(&m);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
    }
    frame
}

/// The subprotocols offered in a `Sec-WebSocket-Protocol` header.
pub fn protocols(header: &str) -> impl Iterator<Item = &str> {
    header.split(',').map(str::trim).filter(|p| !p.is_empty())
}

/// Direction of a chunk on an upgraded stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client to upstream (request body).
    ToUpstream,
    /// Upstream to client (response body).
    ToClient,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ChunkAction {
    Pass,
    /// Replace the chunk with these bytes (a close frame).
    Replace(Vec<u8>),
    /// Empty the chunk: after our close frame nothing else may follow in that direction.
    Drop,
}

/// A live, authenticated WebSocket. Proxy-wasm gives no per-stream timer, so the deadline is
/// enforced on the next chunk in either direction: that chunk becomes a close frame, the peer
/// answers with its own close, which becomes our close frame towards the other side, and
/// everything after is dropped. Both ends see `code`.
#[derive(Debug)]
pub struct LiveSocket {
    deadline: u64,
    /// The socket's session key: when `deadline` passes, a fresher deadline of the session
    /// (from any worker) is looked up before closing.
    session: Option<String>,
    /// Absolute end, whatever the refreshes.
    until: Option<u64>,
    closing: Option<(u16, &'static str)>,
    sent_upstream: bool,
    sent_client: bool,
}

impl LiveSocket {
    pub fn new(deadline: u64) -> Self {
        Self::following(deadline, None, None)
    }

    /// A socket that follows `session` (see [`LiveSocket::on_chunk`]) and ends at `until`.
    pub fn following(deadline: u64, session: Option<String>, until: Option<u64>) -> Self {
        Self {
            deadline,
            session,
            until,
            closing: None,
            sent_upstream: false,
            sent_client: false,
        }
    }

    pub fn deadline(&self) -> u64 {
        self.deadline
    }

    pub fn is_closing(&self) -> bool {
        self.closing.is_some()
    }

    /// A fresh token of this socket's session (in-band re-auth): a later deadline counts.
    pub fn extend(&mut self, deadline: u64) {
        if self.closing.is_none() {
            self.deadline = self.deadline.max(deadline);
        }
    }

    /// Close with 4401 and `reason` on the next chunk (a refused re-auth, a revoked token).
    pub fn refuse(&mut self, reason: &'static str) {
        self.close_with(CLOSE_UNAUTHORIZED, reason);
    }

    /// Close with `code` and `reason` on the next chunk; the first close asked for wins.
    pub fn close_with(&mut self, code: u16, reason: &'static str) {
        if self.closing.is_none() {
            self.closing = Some((code, reason));
        }
    }

    /// The close code once closing.
    pub fn close_code(&self) -> Option<u16> {
        self.closing.map(|(code, _)| code)
    }

    /// Why the socket is closing (for the log line), or `""` while it is open.
    pub fn close_reason(&self) -> &'static str {
        self.closing.map_or("", |(_, reason)| reason)
    }

    /// The session this socket follows, if any.
    pub fn session(&self) -> Option<&str> {
        self.session.as_deref()
    }

    /// Decide what happens to a non-empty chunk seen at `now`. `mask` is fresh randomness for a
    /// frame towards the upstream. Past the deadline, `session_deadline` gives the session's
    /// latest deadline (a fresh token of the same session seen anywhere); a later one keeps the
    /// socket open. [`Self::expire`], then [`Self::frame`].
    pub fn on_chunk(
        &mut self,
        dir: Dir,
        now: u64,
        mask: [u8; 4],
        session_deadline: impl FnOnce(&str) -> Option<u64>,
    ) -> ChunkAction {
        self.expire(now, session_deadline);
        self.frame(dir, || mask)
    }

    /// Close the socket if its deadline (or lifetime) has passed at `now`; past the deadline,
    /// `session_deadline` gives the session's latest deadline (a fresh token of the same
    /// session seen anywhere) and a later one keeps it open. True when this began the close.
    pub fn expire(&mut self, now: u64, session_deadline: impl FnOnce(&str) -> Option<u64>) -> bool {
        if self.closing.is_some() {
            return false;
        }
        if self.until.is_some_and(|u| now >= u) {
            self.closing = Some((CLOSE_UNAUTHORIZED, "socket lifetime exceeded"));
        } else if now >= self.deadline {
            match self.session.as_deref().and_then(session_deadline) {
                Some(d) if d > now => self.deadline = d,
                _ => {
                    let reason = if self.session.is_some() {
                        "session expired"
                    } else {
                        "token expired"
                    };
                    self.closing = Some((CLOSE_UNAUTHORIZED, reason));
                }
            }
        }
        self.closing.is_some()
    }

    /// What happens to a non-empty chunk going `dir`: it passes while the socket is open; once
    /// it is closing, the first chunk each way becomes the close frame and the rest are dropped.
    /// `mask` is asked for only for a close frame towards the upstream (one random draw at most).
    pub fn frame(&mut self, dir: Dir, mask: impl FnOnce() -> [u8; 4]) -> ChunkAction {
        let Some((code, reason)) = self.closing else {
            return ChunkAction::Pass;
        };
        let sent = match dir {
            Dir::ToUpstream => &mut self.sent_upstream,
            Dir::ToClient => &mut self.sent_client,
        };
        if *sent {
            return ChunkAction::Drop;
        }
        *sent = true;
        let mask = (dir == Dir::ToUpstream).then(mask);
        ChunkAction::Replace(close_frame(code, reason, mask))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc6455_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn close_frames() {
        assert_eq!(
            close_frame(4401, "x", None),
            vec![0x88, 3, 0x11, 0x31, b'x']
        );
        let masked = close_frame(4401, "x", Some([1, 2, 3, 4]));
        assert_eq!(masked[..6], [0x88, 0x83, 1, 2, 3, 4]);
        assert_eq!(masked[6..], [0x11 ^ 1, 0x31 ^ 2, b'x' ^ 3]);
        let long = "é".repeat(100);
        let f = close_frame(4401, &long, None);
        assert!(f[1] <= 125);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }

    #[test]
    fn live_socket_closes_both_sides_once_then_drops() {
        let mut s = LiveSocket::new(100);
        assert_eq!(
            s.on_chunk(Dir::ToClient, 99, [0; 4], |_| None),
            ChunkAction::Pass
        );
        assert_eq!(
            s.on_chunk(Dir::ToUpstream, 100, [9; 4], |_| None),
            ChunkAction::Replace(close_frame(4401, "token expired", Some([9; 4])))
        );
        assert_eq!(
            s.on_chunk(Dir::ToUpstream, 100, [9; 4], |_| None),
            ChunkAction::Drop
        );
        assert_eq!(
            s.on_chunk(Dir::ToClient, 100, [0; 4], |_| None),
            ChunkAction::Replace(close_frame(4401, "token expired", None))
        );
        assert_eq!(
            s.on_chunk(Dir::ToClient, 101, [0; 4], |_| None),
            ChunkAction::Drop
        );
        assert!(s.is_closing());
    }

    #[test]
    fn protocol_list() {
        let p: Vec<_> = protocols(" sip, bearer.a.b.c ,,x").collect();
        assert_eq!(p, ["sip", "bearer.a.b.c", "x"]);
    }

    #[test]
    fn a_session_socket_follows_fresher_deadlines_until_its_lifetime_ends() {
        let mut s = LiveSocket::following(100, Some("abc".into()), Some(300));
        assert_eq!(s.session(), Some("abc"));
        // Past its own deadline, the session's later deadline keeps it open.
        assert_eq!(
            s.on_chunk(Dir::ToUpstream, 150, [0; 4], |k| (k == "abc")
                .then_some(200)),
            ChunkAction::Pass
        );
        assert_eq!(s.deadline(), 200);
        assert_eq!(
            s.on_chunk(Dir::ToClient, 199, [0; 4], |_| None),
            ChunkAction::Pass
        );
        // No fresher token: "session expired".
        assert_eq!(
            s.on_chunk(Dir::ToClient, 200, [0; 4], |_| Some(200)),
            ChunkAction::Replace(close_frame(4401, "session expired", None))
        );
        // Whatever the refreshes, the lifetime ends it.
        let mut s = LiveSocket::following(100, Some("abc".into()), Some(120));
        assert_eq!(
            s.on_chunk(Dir::ToClient, 120, [0; 4], |_| Some(10_000)),
            ChunkAction::Replace(close_frame(4401, "socket lifetime exceeded", None))
        );
    }
}
