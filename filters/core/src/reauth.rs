//! In-band re-authentication on a live WebSocket: a client-to-server text frame such as
//! `{"type":"gatehouse.reauth","token":"<jwt>"}` carries a fresh token of the same session. The
//! filter takes such frames out of the stream (the upstream never sees them) and extends the
//! socket. Reading payloads needs them uncompressed: on routes with re-auth the upgrade's
//! `Sec-WebSocket-Extensions` is removed, so no permessage-deflate is negotiated.
//!
//! Frames arrive in arbitrary chunks. [`ClientFrames::feed`] is incremental: it keeps its place
//! in the stream across calls and looks at each byte a bounded number of times, so the work is
//! linear in what the client sends however it is cut into chunks. Each call says what goes on
//! now in place of the chunk ([`Fed::forward`]); only a frame that may still be a re-auth frame
//! is held back inside the scanner until it is complete (at most [`MAX_REAUTH_FRAME`] bytes of
//! payload plus its header). A frame is a *candidate* while it is a single masked text frame
//! (FIN, no RSV bits) of at most [`MAX_REAUTH_FRAME`] bytes whose payload so far starts like
//! `{"type":"<kind>"` (JSON whitespace allowed between the tokens, `type` the first key, `kind`
//! written without escapes). Any other frame (binary, fragmented, too long, or a text frame
//! whose first bytes rule it out) goes on as its bytes arrive, even mid-frame, and the bytes
//! already held for it are let out at once. A complete candidate is taken out if it parses as a
//! JSON object whose `type` is `kind` and whose `token` is a string; otherwise it goes on
//! unchanged. Every other byte goes on exactly, in order.

use serde_json::Value;

/// Text frames longer than this are never re-auth frames (tokens are capped well below).
pub const MAX_REAUTH_FRAME: u64 = 16 * 1024;

/// The longest WebSocket frame header: 2 bytes, an 8-byte length, a 4-byte mask.
const MAX_HEADER: usize = 14;

/// What one chunk of client bytes becomes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fed {
    /// The bytes that go on now in place of the chunk; `None`: the chunk goes on unchanged.
    /// May hold bytes of earlier chunks that were held back, and lacks what is held back now.
    pub forward: Option<Vec<u8>>,
    /// The tokens of the re-auth frames completed by this chunk, in order (taken out of the
    /// stream).
    pub tokens: Vec<String>,
}

/// Where the scanner is in the client's frame stream.
#[derive(Debug, Default, Clone, Copy)]
enum State {
    /// Reading a frame header (its bytes so far in `hdr`).
    #[default]
    Header,
    /// Passing on `left` more payload bytes of a frame that is not a re-auth frame.
    Pass { left: u64 },
    /// Holding back a candidate: `left` payload bytes to come, `seen` seen, `matched` bytes
    /// of the `{"type":"<kind>"` prefix matched so far.
    Candidate {
        left: usize,
        seen: usize,
        matched: usize,
        mask: [u8; 4],
    },
}

/// Client-to-server frame tracking across chunks.
#[derive(Debug, Default)]
pub struct ClientFrames {
    state: State,
    /// The header bytes of the frame being read.
    hdr: [u8; MAX_HEADER],
    hdr_len: usize,
    /// Whether the current frame's bytes pass on as they come (it cannot be a re-auth frame)
    /// rather than being held back in `held`.
    passing: bool,
    /// Bytes of the current frame held back: its header and payload so far.
    held: Vec<u8>,
    /// Where `held` starts in the chunk being fed, when it all comes from that chunk.
    held_at: Option<usize>,
    /// Bytes examined one at a time or copied, over the scanner's life (see [`Self::work`]).
    work: u64,
}

struct Header {
    payload: u64,
    candidate: bool,
    mask: [u8; 4],
}

fn header(b: &[u8]) -> Option<Header> {
    let (&b0, &b1) = (b.first()?, b.get(1)?);
    let masked = b1 & 0x80 != 0;
    let (len, payload) = match b1 & 0x7f {
        126 => (4, u64::from(u16::from_be_bytes([*b.get(2)?, *b.get(3)?]))),
        127 => {
            let bytes: [u8; 8] = b.get(2..10)?.try_into().ok()?;
            (10, u64::from_be_bytes(bytes))
        }
        n => (2, u64::from(n)),
    };
    let mut mask = [0; 4];
    if masked {
        mask.copy_from_slice(b.get(len..len + 4)?);
    }
    // FIN, no RSV bits (nothing compressed), text opcode, masked (client frames always are).
    let candidate = b0 == 0x81 && masked && payload <= MAX_REAUTH_FRAME;
    Some(Header {
        payload,
        candidate,
        mask,
    })
}

/// Whether a header whose first bytes are `b` (not complete yet) may still begin a candidate.
fn may_be_candidate(b: &[u8]) -> bool {
    b.first().is_none_or(|&b0| b0 == 0x81) && b.get(1).is_none_or(|&b1| b1 & 0x80 != 0)
}

/// The prefix `{"type":"<kind>"` a candidate's payload starts with.
fn prefix(kind: &str) -> Vec<u8> {
    [br#"{"type":""#.as_slice(), kind.as_bytes(), b"\""].concat()
}

/// Positions in [`prefix`] before which JSON whitespace may come: before `{`, `"type"`, `:`
/// and `"<kind>"`.
fn whitespace_before(matched: usize) -> bool {
    matches!(matched, 0 | 1 | 7 | 8)
}

/// The token of a re-auth message of type `kind`.
fn reauth_token(payload: &[u8], kind: &str) -> Option<String> {
    if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let Value::Object(msg) = serde_json::from_slice(payload).ok()? else {
        return None;
    };
    if msg.get("type").and_then(Value::as_str) != Some(kind) {
        return None;
    }
    msg.get("token").and_then(Value::as_str).map(str::to_owned)
}

/// The bytes that go on in place of a chunk, built without copying while they are the chunk's
/// own first bytes.
struct Out<'a> {
    chunk: &'a [u8],
    /// Once the output is not a prefix of the chunk: the output so far.
    bytes: Option<Vec<u8>>,
    /// While `bytes` is `None`: the output is `chunk[..same]`.
    same: usize,
    copied: u64,
}

impl<'a> Out<'a> {
    fn new(chunk: &'a [u8]) -> Self {
        Out {
            chunk,
            bytes: None,
            same: 0,
            copied: 0,
        }
    }

    /// The output so far, as owned bytes.
    fn owned(&mut self) -> &mut Vec<u8> {
        let (chunk, same, copied) = (self.chunk, self.same, &mut self.copied);
        self.bytes.get_or_insert_with(|| {
            *copied += same as u64;
            chunk.get(..same).unwrap_or_default().to_vec()
        })
    }

    /// Pass on `chunk[from..to]`.
    fn pass(&mut self, from: usize, to: usize) {
        if self.bytes.is_none() && from == self.same {
            self.same = to;
            return;
        }
        let part = self.chunk.get(from..to).unwrap_or_default();
        self.copied += part.len() as u64;
        self.owned().extend_from_slice(part);
    }

    /// Pass on bytes that are not (all) the chunk's own, e.g. held back from earlier chunks.
    fn let_out(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.copied += bytes.len() as u64;
        self.owned().extend_from_slice(bytes);
    }

    fn finish(mut self) -> (Option<Vec<u8>>, u64) {
        if self.bytes.is_none() && self.same == self.chunk.len() {
            return (None, self.copied);
        }
        let bytes = std::mem::take(self.owned());
        (Some(bytes), self.copied)
    }
}

impl ClientFrames {
    /// Take the next `chunk` of client-to-server bytes, taking out re-auth frames of type
    /// `kind`. The chunk is replaced by [`Fed::forward`]; what is held back stays here and
    /// comes out in a later call's `forward` (or is taken out, if it is a re-auth frame).
    pub fn feed(&mut self, chunk: &[u8], kind: &str) -> Fed {
        let pattern = prefix(kind);
        let mut out = Out::new(chunk);
        let mut tokens = Vec::new();
        let mut pos = 0;
        self.held_at = None;
        while let Some(rest) = chunk.get(pos..).filter(|r| !r.is_empty()) {
            match self.state {
                State::Pass { left } => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(rest.len());
                    out.pass(pos, pos + n);
                    pos += n;
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        self.next_frame()
                    } else {
                        State::Pass { left }
                    };
                }
                State::Header => {
                    let Some(&b) = rest.first() else { break };
                    self.work += 1;
                    if let Some(slot) = self.hdr.get_mut(self.hdr_len) {
                        *slot = b;
                        self.hdr_len += 1;
                    }
                    if !self.passing {
                        if self.held.is_empty() {
                            self.held_at = Some(pos);
                        }
                        self.held.push(b);
                        self.work += 1;
                    } else {
                        out.pass(pos, pos + 1);
                    }
                    pos += 1;
                    let hdr = self.hdr.get(..self.hdr_len).unwrap_or_default();
                    match header(hdr) {
                        None => {
                            if !self.passing && !may_be_candidate(hdr) {
                                self.release(&mut out);
                            }
                        }
                        Some(h) if h.candidate && !self.passing && h.payload > 0 => {
                            self.state = State::Candidate {
                                left: h.payload as usize,
                                seen: 0,
                                matched: 0,
                                mask: h.mask,
                            };
                        }
                        Some(h) => {
                            self.release(&mut out);
                            self.state = if h.payload == 0 {
                                self.next_frame()
                            } else {
                                State::Pass { left: h.payload }
                            };
                        }
                    }
                }
                State::Candidate {
                    left,
                    seen,
                    matched,
                    mask,
                } => {
                    let (n, matched) = match pattern.get(matched) {
                        // Still matching the prefix: one byte at a time.
                        Some(&want) => {
                            let Some(&b) = rest.first() else { break };
                            self.work += 1;
                            let u = b ^ mask.get(seen % 4).copied().unwrap_or(0);
                            let matched = if u == want {
                                Some(matched + 1)
                            } else if whitespace_before(matched) && is_json_space(u) {
                                Some(matched)
                            } else {
                                None
                            };
                            (1, matched)
                        }
                        // The prefix is there: take what the chunk has of the payload.
                        None => (left.min(rest.len()), Some(matched)),
                    };
                    let part = rest.get(..n).unwrap_or_default();
                    self.held.extend_from_slice(part);
                    self.work += n as u64;
                    pos += n;
                    let left = left - n;
                    let complete = left == 0;
                    self.state = match matched {
                        Some(matched) if !complete => State::Candidate {
                            left,
                            seen: seen + n,
                            matched,
                            mask,
                        },
                        Some(matched) if matched == pattern.len() => {
                            let payload: Vec<u8> = self
                                .held
                                .get(self.hdr_len..)
                                .unwrap_or_default()
                                .iter()
                                .zip(mask.iter().cycle())
                                .map(|(b, m)| b ^ m)
                                .collect();
                            self.work += payload.len() as u64;
                            match reauth_token(&payload, kind) {
                                Some(token) => {
                                    tokens.push(token);
                                    self.held.clear();
                                }
                                None => self.release(&mut out),
                            }
                            self.next_frame()
                        }
                        // Complete before the prefix was, or ruled out by this byte.
                        _ => {
                            self.release(&mut out);
                            if complete {
                                self.next_frame()
                            } else {
                                State::Pass { left: left as u64 }
                            }
                        }
                    };
                }
            }
        }
        let (forward, copied) = out.finish();
        self.work += copied;
        Fed { forward, tokens }
    }

    /// Bytes examined one at a time or copied by this scanner so far (the payload of a frame
    /// passed on whole within one chunk is neither): at most a small constant times what it was
    /// fed, however that was cut into chunks.
    pub fn work(&self) -> u64 {
        self.work
    }

    /// Bytes held back now (an incomplete frame header or candidate).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Let out what is held back of the current frame; its further bytes go on as they come.
    fn release(&mut self, out: &mut Out) {
        match self.held_at {
            // Held within this chunk, right after what goes on: no copy needed.
            Some(at) if out.bytes.is_none() && out.same == at => out.pass(at, at + self.held.len()),
            _ => out.let_out(&self.held),
        }
        self.held.clear();
        self.passing = true;
    }

    /// Start reading the next frame.
    fn next_frame(&mut self) -> State {
        self.hdr_len = 0;
        self.passing = false;
        self.held.clear();
        State::Header
    }
}

fn is_json_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_with(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut f = vec![first];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        frame_with(0x80 | opcode, payload, [1, 2, 3, 4])
    }

    const KIND: &str = "gatehouse.reauth";

    /// Feed `data` in chunks of `size` bytes: everything forwarded, the tokens, and the largest
    /// amount held back at any point.
    fn feed_in(s: &mut ClientFrames, data: &[u8], size: usize) -> (Vec<u8>, Vec<String>, usize) {
        let (mut out, mut tokens, mut held) = (Vec::new(), Vec::new(), 0);
        for chunk in data.chunks(size) {
            let fed = s.feed(chunk, KIND);
            out.extend_from_slice(fed.forward.as_deref().unwrap_or(chunk));
            tokens.extend(fed.tokens);
            held = held.max(s.held());
        }
        (out, tokens, held)
    }

    #[test]
    fn reauth_frames_are_taken_out_and_the_rest_is_kept_byte_for_byte() {
        let hello = frame(1, b"INVITE sip:bob");
        let reauth = frame(1, br#"{"type":"gatehouse.reauth","token":"t1"}"#);
        let other_json = frame(1, br#"{"type":"chat","token":"not a reauth"}"#);
        let binary = frame(2, br#"{"type":"gatehouse.reauth","token":"binary"}"#);
        let data = [
            hello.clone(),
            reauth.clone(),
            other_json.clone(),
            binary.clone(),
        ]
        .concat();
        let mut s = ClientFrames::default();
        assert_eq!(
            s.feed(&data, KIND),
            Fed {
                forward: Some([hello.clone(), other_json, binary].concat()),
                tokens: vec!["t1".into()]
            }
        );
        assert_eq!(s.feed(&hello, KIND), Fed::default(), "unchanged: no copy");
    }

    #[test]
    fn a_split_reauth_frame_is_held_back_inside_the_scanner_and_big_frames_pass_through() {
        let reauth = frame(1, br#"{"type":"gatehouse.reauth","token":"t2"}"#);
        let mut s = ClientFrames::default();
        let (a, rest) = reauth.split_at(1);
        let (b, c) = rest.split_at(20);
        for part in [a, b] {
            assert_eq!(
                s.feed(part, KIND),
                Fed {
                    forward: Some(vec![]),
                    tokens: vec![]
                }
            );
        }
        assert_eq!(s.held(), 21);
        assert_eq!(
            s.feed(c, KIND),
            Fed {
                forward: Some(vec![]),
                tokens: vec!["t2".into()]
            }
        );
        assert_eq!(s.held(), 0);
        // A large binary frame split over chunks is passed on as it comes.
        let big = frame(2, &[7u8; 1000]);
        let (a, b) = big.split_at(300);
        assert_eq!(s.feed(a, KIND), Fed::default());
        let next = [b, &reauth[..]].concat();
        assert_eq!(
            s.feed(&next, KIND),
            Fed {
                forward: Some(b.to_vec()),
                tokens: vec!["t2".into()]
            }
        );
    }

    #[test]
    fn a_text_frame_that_cannot_be_a_reauth_frame_goes_on_mid_frame() {
        let mut s = ClientFrames::default();
        // Starts like a candidate (short masked text frame), ruled out by its first byte.
        let sip = frame(1, &[b'I'; 5000]);
        let (head, tail) = sip.split_at(6);
        // Header incomplete and possibly a candidate: held.
        assert_eq!(s.feed(&head[..3], KIND).forward, Some(vec![]));
        // Header complete, first payload byte `I`: the held bytes come out with it.
        assert_eq!(
            s.feed(&[&head[3..], &tail[..10]].concat(), KIND).forward,
            Some([head, &tail[..10]].concat())
        );
        assert_eq!(s.held(), 0);
        // The rest goes on untouched.
        assert_eq!(s.feed(&tail[10..2000], KIND), Fed::default());
        assert_eq!(s.feed(&tail[2000..], KIND), Fed::default());
        // A JSON frame of another type is let out once `type` says so, before it ends.
        let chat = frame(
            1,
            format!(r#"{{"type":"chat","text":"{}"}}"#, "x".repeat(3000)).as_bytes(),
        );
        assert_eq!(
            s.feed(&chat[..100], KIND),
            Fed::default(),
            "all of it goes on now"
        );
        assert_eq!(s.held(), 0);
        assert_eq!(s.feed(&chat[100..], KIND), Fed::default());
        // Over MAX_REAUTH_FRAME, or unmasked, or fragmented, or binary: never held.
        for f in [
            frame(
                1,
                format!(
                    r#"{{"type":"gatehouse.reauth","token":"{}"}}"#,
                    "t".repeat(17_000)
                )
                .as_bytes(),
            ),
            frame_with(0x01, br#"{"type":"gatehouse.reauth","token":"t"}"#, [0; 4]),
            frame(2, br#"{"type":"gatehouse.reauth","token":"t"}"#),
        ] {
            let mut s = ClientFrames::default();
            let (out, tokens, _) = feed_in(&mut s, &f, 5);
            assert_eq!((out, tokens), (f.clone(), vec![]));
        }
        let unmasked = {
            let mut f = vec![0x81, 5];
            f.extend_from_slice(b"hello");
            f
        };
        let mut s = ClientFrames::default();
        assert_eq!(s.feed(&unmasked[..1], KIND).forward, Some(vec![]));
        assert_eq!(s.feed(&unmasked[1..2], KIND).forward, Some(vec![0x81, 5]));
        assert_eq!(s.feed(&unmasked[2..], KIND), Fed::default());
    }

    /// A stream of every kind of frame, and what the upstream must get of it.
    fn mixed_stream() -> (Vec<u8>, Vec<u8>, Vec<String>) {
        let (mut all, mut kept, mut tokens) = (Vec::new(), Vec::new(), Vec::new());
        let mut add = |f: Vec<u8>, token: Option<&str>| {
            all.extend_from_slice(&f);
            match token {
                Some(t) => tokens.push(t.to_string()),
                None => kept.extend_from_slice(&f),
            }
        };
        add(frame(1, b"INVITE sip:bob@example.com SIP/2.0"), None);
        add(
            frame(1, br#"{"type":"gatehouse.reauth","token":"a"}"#),
            Some("a"),
        );
        add(
            frame(1, br#" { "type" : "gatehouse.reauth", "token": "b" } "#),
            Some("b"),
        );
        add(
            frame_with(
                0x81,
                br#"{"type": "gatehouse.reauth", "token": "c"}"#,
                [0; 4],
            ),
            Some("c"),
        );
        add(frame(9, b"ping"), None);
        add(frame(1, br#"{"type":"gatehouse.reauth"}"#), None);
        add(frame(1, br#"{"type":"gatehouse.reauth","token":7}"#), None);
        add(
            frame(1, br#"{"type":"gatehouse.reauthX","token":"x"}"#),
            None,
        );
        add(
            frame(1, br#"{"type":"gatehouse.reauth","token":"unfinished"#),
            None,
        );
        add(
            frame(1, br#"{"token":"d","type":"gatehouse.reauth"}"#),
            None,
        );
        add(frame(1, b""), None);
        add(frame(1, b"{"), None);
        add(frame(1, &[b'x'; 16 * 1024]), None);
        let pad = "p".repeat(16 * 1024 - 60);
        let big = format!(r#"{{"type":"gatehouse.reauth","pad":"{pad}","token":"e"}}"#);
        add(frame(1, big.as_bytes()), Some("e"));
        add(
            frame(
                1,
                format!(r#"{{"type":"gatehouse.reauth","pad":"{pad}"}}"#).as_bytes(),
            ),
            None,
        );
        add(frame(2, &[0x81; 70_000]), None);
        add(
            frame_with(
                0x01,
                br#"{"type":"gatehouse.reauth","token":"frag"}"#,
                [5, 6, 7, 8],
            ),
            None,
        );
        add(frame_with(0x80, b"", [5, 6, 7, 8]), None);
        add(frame(8, &[0x03, 0xe8]), None);
        (all, kept, tokens)
    }

    #[test]
    fn any_cut_into_chunks_keeps_every_other_byte_in_order_and_finds_every_token() {
        let (all, kept, tokens) = mixed_stream();
        for size in [1, 2, 3, 7, 13, 100, 1000, 4096, all.len()] {
            let mut s = ClientFrames::default();
            let (out, found, held) = feed_in(&mut s, &all, size);
            assert!(out == kept, "chunks of {size}: bytes differ");
            assert_eq!(found, tokens, "chunks of {size}");
            assert!(
                held <= MAX_HEADER + MAX_REAUTH_FRAME as usize,
                "{held} held"
            );
            assert_eq!(s.held(), 0);
        }
    }

    #[test]
    fn the_work_per_byte_is_bounded_however_the_stream_is_cut() {
        // 1 MiB of 16 KiB text frames (SIP-like, JSON of another type, and re-auth-looking
        // frames that are held whole), with re-auth frames between them.
        let mut data = Vec::new();
        let mut want_tokens = 0;
        let pad = "p".repeat(16 * 1024 - 60);
        for i in 0.. {
            if data.len() >= 1 << 20 {
                break;
            }
            let f = match i % 4 {
                0 => frame(1, &[b'I'; 16 * 1024]),
                1 => frame(1, format!(r#"{{"type":"chat","t":"{pad}"}}"#).as_bytes()),
                2 => frame(
                    1,
                    format!(r#"{{"type":"gatehouse.reauth","pad":"{pad}"}}"#).as_bytes(),
                ),
                _ => {
                    want_tokens += 1;
                    frame(1, br#"{"type":"gatehouse.reauth","token":"t"}"#)
                }
            };
            data.extend_from_slice(&f);
        }
        let n = data.len() as u64;
        for size in [1, 100, 16 * 1024] {
            let mut s = ClientFrames::default();
            let (_, tokens, _) = feed_in(&mut s, &data, size);
            assert_eq!(tokens.len(), want_tokens);
            // Each byte is examined or copied a few times at most: into the held-back frame,
            // unmasked once, and out again. A scanner that rescans what it holds would do
            // ~frame size / chunk size times that.
            assert!(
                s.work() <= 3 * n,
                "chunks of {size}: {} units of work for {n} bytes",
                s.work()
            );
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut s = ClientFrames::default();
        for len in 0..64usize {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            let _ = s.feed(&data, KIND);
            let _ = ClientFrames::default().feed(&[0xff; 14], KIND);
        }
    }
}
