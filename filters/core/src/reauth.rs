//! In-band re-authentication on a live WebSocket: a client-to-server text frame such as
//! `{"type":"gatehouse.reauth","token":"<jwt>"}` carries a fresh token of the same session. The
//! filter takes such frames out of the stream (the upstream never sees them) and extends the
//! socket. Reading payloads needs them uncompressed: on routes with re-auth the upgrade's
//! `Sec-WebSocket-Extensions` is removed, so no permessage-deflate is negotiated.
//!
//! Frames arrive in arbitrary chunks. [`ClientFrames::scan`] looks at everything buffered so far:
//! complete frames are classified; a frame that may be a re-auth frame but is not complete yet
//! asks for more data ([`Scan::NeedMore`], the shell keeps buffering); any other incomplete frame
//! is passed on and its remaining bytes are skipped in later chunks.

use serde_json::Value;

/// Text frames longer than this are never re-auth frames (tokens are capped well below).
pub const MAX_REAUTH_FRAME: u64 = 16 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// Keep buffering: a possible re-auth frame is incomplete.
    NeedMore,
    /// `forward` replaces the buffered bytes (`None`: forward them unchanged); `tokens` are the
    /// tokens of the re-auth frames taken out, in order.
    Done {
        forward: Option<Vec<u8>>,
        tokens: Vec<String>,
    },
}

/// Client-to-server frame tracking across chunks.
#[derive(Debug, Default)]
pub struct ClientFrames {
    /// Payload bytes of a frame already passed on that are still to come.
    skip: u64,
}

struct Header {
    len: usize,
    payload: u64,
    candidate: bool,
    mask: [u8; 4],
}

fn header(b: &[u8]) -> Option<Header> {
    let (&b0, &b1) = (b.first()?, b.get(1)?);
    let masked = b1 & 0x80 != 0;
    let (mut len, payload) = match b1 & 0x7f {
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
        len += 4;
    }
    // FIN, no RSV bits (nothing compressed), text opcode, masked (client frames always are).
    let candidate = b0 == 0x81 && masked && payload <= MAX_REAUTH_FRAME;
    Some(Header {
        len,
        payload,
        candidate,
        mask,
    })
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

impl ClientFrames {
    /// Classify the buffered client-to-server bytes `data`, taking out re-auth frames of type
    /// `kind`.
    pub fn scan(&mut self, data: &[u8], kind: &str) -> Scan {
        let mut pos = usize::try_from(self.skip)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let mut skip = self.skip - pos as u64;
        let mut kept: Vec<u8> = Vec::new();
        let mut kept_from = 0; // `data[kept_from..pos]` is yet to be copied into `kept`
        let mut removed = false;
        let mut tokens = Vec::new();
        while pos < data.len() {
            let rest = &data[pos..];
            let Some(h) = header(rest) else {
                return Scan::NeedMore; // at most 14 header bytes: the rest is on its way
            };
            let total = (h.len as u64).saturating_add(h.payload);
            if (rest.len() as u64) < total {
                if h.candidate {
                    return Scan::NeedMore;
                }
                skip = total - rest.len() as u64;
                break;
            }
            let end = pos + total as usize;
            if h.candidate {
                let payload: Vec<u8> = data[pos + h.len..end]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ h.mask[i % 4])
                    .collect();
                if let Some(token) = reauth_token(&payload, kind) {
                    kept.extend_from_slice(&data[kept_from..pos]);
                    kept_from = end;
                    removed = true;
                    tokens.push(token);
                }
            }
            pos = end;
        }
        self.skip = skip;
        let forward = removed.then(|| {
            kept.extend_from_slice(&data[kept_from..]);
            kept
        });
        Scan::Done { forward, tokens }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    const KIND: &str = "gatehouse.reauth";

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
            s.scan(&data, KIND),
            Scan::Done {
                forward: Some([hello.clone(), other_json, binary].concat()),
                tokens: vec!["t1".into()]
            }
        );
        assert_eq!(
            s.scan(&hello, KIND),
            Scan::Done {
                forward: None,
                tokens: vec![]
            }
        );
    }

    #[test]
    fn a_split_reauth_frame_waits_for_the_rest_and_big_frames_pass_through() {
        let reauth = frame(1, br#"{"type":"gatehouse.reauth","token":"t2"}"#);
        let mut s = ClientFrames::default();
        assert_eq!(s.scan(&reauth[..1], KIND), Scan::NeedMore);
        assert_eq!(s.scan(&reauth[..10], KIND), Scan::NeedMore);
        assert_eq!(
            s.scan(&reauth, KIND),
            Scan::Done {
                forward: Some(vec![]),
                tokens: vec!["t2".into()]
            }
        );
        // A large binary frame split over chunks is passed on as it comes.
        let big = frame(2, &[7u8; 1000]);
        let (a, b) = big.split_at(300);
        assert_eq!(
            s.scan(a, KIND),
            Scan::Done {
                forward: None,
                tokens: vec![]
            }
        );
        let next = [b, &reauth[..]].concat();
        assert_eq!(
            s.scan(&next, KIND),
            Scan::Done {
                forward: Some(b.to_vec()),
                tokens: vec!["t2".into()]
            }
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut s = ClientFrames::default();
        for len in 0..64usize {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            let _ = s.scan(&data, KIND);
            let _ = ClientFrames::default().scan(&[0xff; 14], KIND);
        }
    }
}
