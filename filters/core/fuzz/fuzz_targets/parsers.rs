//! The parsers of what arrives from outside at request time (the first byte picks one): a
//! token's JWS form, a fetched JWKS, session-binding's revocation feed, CSP reports, sealed
//! cookies and cookie headers, WebSocket client frames (in chunks), shared-data buckets.
//! Never a panic; the invariants each one promises are asserted.
#![no_main]

use gatehouse_core::jwt::jwk::parse_jwks_document;
use gatehouse_core::jwt::jws::Jws;
use gatehouse_core::jwt::KeySet;
use gatehouse_core::page_guard::parse_reports;
use gatehouse_core::reauth::ClientFrames;
use gatehouse_core::session_binding::revocation::RevocationList;
use gatehouse_core::token_proxy::CookieKeys;
use gatehouse_core::{cookie, sessions};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn keys() -> &'static CookieKeys {
    static KEYS: OnceLock<CookieKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        CookieKeys::from_hex(&[
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff".into(),
        ])
        .expect("keys")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, input)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(input);
    match which % 8 {
        0 => {
            if let Ok(jws) = Jws::parse(&text, 8192) {
                assert!(text.len() <= 8192);
                let _ = jws.payload;
            }
        }
        1 => {
            if let Ok(doc) = parse_jwks_document(input) {
                let _ = KeySet::from_jwks(&doc, false);
            }
        }
        2 => {
            let _ = RevocationList::parse(input);
        }
        3 => {
            let types = [
                "application/reports+json",
                "application/csp-report",
                "application/json",
            ];
            let _ = parse_reports(Some(types[usize::from(which / 8) % 3]), input, 64 * 1024);
        }
        4 => {
            // A forged or damaged sealed cookie never decrypts (AES-GCM authenticates it).
            assert!(keys().decrypt(&text).is_err(), "{text:?} decrypted");
        }
        5 => {
            let (header, name) = text.split_once('\0').unwrap_or((&text, "t"));
            if let Some(value) = cookie::get(header, name) {
                assert!(header.contains(value));
            }
            if let Some(rest) = cookie::without(header, &[name]) {
                assert!(
                    cookie::get(&rest, name).is_none(),
                    "{rest:?} still has {name:?}"
                );
            }
        }
        6 => {
            // Fed whole or in chunks: never a panic, and never more bytes out than in.
            // Fed whole or in chunks, the same bytes come out.
            let mut frames = ClientFrames::default();
            let whole = frames.feed(input, "gatehouse.reauth").forward;
            let whole = whole.as_deref().unwrap_or(input);
            assert!(whole.len() <= input.len());
            let mut frames = ClientFrames::default();
            let mut out = Vec::new();
            for chunk in input.chunks(1 + usize::from(which / 8)) {
                let fed = frames.feed(chunk, "gatehouse.reauth");
                out.extend_from_slice(fed.forward.as_deref().unwrap_or(chunk));
            }
            assert_eq!(out, whole);
        }
        _ => {
            let _ = sessions::lookup(input, "s");
            if let Some(next) =
                sessions::record(input, "s", 1_700_000_010, 1_700_000_000, sessions::DEFAULT_PER_SUBJECT)
            {
                // Recorded, unless the bucket is full of entries that end no sooner (then the
                // session only loses its extension; its sockets close at their own deadline).
                if sessions::lookup(&next, "s") != Some(1_700_000_010) {
                    let text = String::from_utf8_lossy(&next);
                    let ends: Vec<u64> = text
                        .lines()
                        .filter_map(|l| l.split_once(' ')?.1.parse().ok())
                        .collect();
                    assert_eq!(ends.len(), sessions::PER_BUCKET, "{text}");
                    assert!(ends.iter().all(|&d| d >= 1_700_000_010), "{text}");
                }
            }
        }
    }
});
