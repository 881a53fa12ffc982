//! page-guard's HTML rewriter: the deployment's secret placeholder never survives, whether the
//! body is rewritten whole or fed in chunks (of the size the first byte says), and both give the
//! same output — except for a placeholder wrapped around another, where the outer one's first
//! part may already be out when a chunk removes the inner one.
#![no_main]

use gatehouse_core::page_guard::html::{RewriteParams, Rewriter};
use gatehouse_core::page_guard::{NonceText, PageGuardConfig};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const PLACEHOLDER: &str = "GH_NONCE_PLACEHOLDER_0123";

fn config() -> &'static PageGuardConfig {
    static CONFIG: OnceLock<PageGuardConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let raw = serde_json::json!({
            "csp": {"default-src": ["'self'"], "script-src": ["'strict-dynamic'"]},
            "nonce": {"placeholder": PLACEHOLDER},
            "sri": {"manifest": {
                "/a.js": "sha384-11LCxR+6DimqGQVwqdQlPkQHegWNMpf6OlYw1b0BJiL5fCisrtMTtcg7uZDKp9qF",
                "/s/b.css": "sha384-11LCxR+6DimqGQVwqdQlPkQHegWNMpf6OlYw1b0BJiL5fCisrtMTtcg7uZDKp9qF"}}
        });
        PageGuardConfig::compile(raw.to_string().as_bytes(), &|_| None).expect("config")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let nonces = NonceText {
        script: "bm9uY2U".into(),
        style: "c3R5bGU".into(),
    };
    let params: RewriteParams<'_> = config().rewrite_params(Some(&nonces), "/s/page.html");
    let (whole, stats) = Rewriter::rewrite_all(&params, body);
    let mut rewriter = Rewriter::new();
    let mut chunked = Vec::new();
    let step = 1 + usize::from(split);
    for chunk in body.chunks(step) {
        rewriter.feed(&params, chunk, &mut chunked);
    }
    rewriter.finish(&params, &mut chunked);
    for (how, out) in [("whole", &whole), ("in chunks", &chunked)] {
        assert!(
            memchr_find(out, PLACEHOLDER.as_bytes()).is_none(),
            "the placeholder survives {how} (chunks of {step}): {:?}",
            String::from_utf8_lossy(out)
        );
    }
    // Wrapped placeholders: one pass of removals leaves another behind.
    let once = remove_all(body, PLACEHOLDER.as_bytes());
    if memchr_find(&once, PLACEHOLDER.as_bytes()).is_some() {
        return;
    }
    assert!(
        whole == chunked,
        "chunks of {step} change the output:\n{:?}\n{:?}",
        String::from_utf8_lossy(&whole),
        String::from_utf8_lossy(&chunked)
    );
    assert_eq!(stats, rewriter.stats(), "chunks of {step}");
});

fn remove_all(hay: &[u8], needle: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(needle) {
            i += needle.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

fn memchr_find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
