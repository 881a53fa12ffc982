//! Is a browser request from one of the web origins the gateway trusts?
//!
//! A credential that arrives in a cookie is sent by the browser whatever page asked for the
//! request, so a cookie-carried credential is only good on a state-changing request or a
//! WebSocket upgrade (which CORS does not guard) that comes from a trusted origin: CSRF and
//! cross-site WebSocket hijacking. `SameSite=Strict` does not stop a sibling subdomain, which is
//! same-site. `Sec-Fetch-Site: same-origin` (a header no page script can set) counts as trusted.

/// `origin` (the `Origin` header) is one of `trusted` (compared case-insensitively, exactly:
/// scheme, host and port), or the browser says the request is `same-origin`.
pub fn is_trusted(origin: Option<&str>, sec_fetch_site: Option<&str>, trusted: &[String]) -> bool {
    if sec_fetch_site.is_some_and(|s| s.trim().eq_ignore_ascii_case("same-origin")) {
        return true;
    }
    origin.is_some_and(|o| {
        let o = o.trim();
        trusted.iter().any(|t| t.eq_ignore_ascii_case(o))
    })
}

/// Did the request reach Envoy over TLS, or, when the hop before Envoy is trusted
/// (`trust_forwarded_proto`), did that hop say `x-forwarded-proto: https`?
pub fn is_https(tls: bool, forwarded_proto: Option<&str>, trust_forwarded_proto: bool) -> bool {
    tls || (trust_forwarded_proto
        && forwarded_proto.is_some_and(|p| p.trim().eq_ignore_ascii_case("https")))
}

/// Methods that change state (CSRF applies to them).
pub fn state_changing(method: &str) -> bool {
    ["POST", "PUT", "PATCH", "DELETE"]
        .iter()
        .any(|m| m.eq_ignore_ascii_case(method))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_origins() {
        let list = vec!["https://app.example".to_string()];
        assert!(is_trusted(Some("https://app.example"), None, &list));
        assert!(is_trusted(Some("HTTPS://APP.EXAMPLE"), None, &list));
        assert!(!is_trusted(Some("https://evil.app.example"), None, &list));
        assert!(!is_trusted(Some("https://app.example:444"), None, &list));
        assert!(!is_trusted(Some("null"), None, &list));
        assert!(!is_trusted(None, None, &list));
        assert!(!is_trusted(None, Some("same-site"), &list));
        assert!(!is_trusted(None, Some("cross-site"), &list));
        assert!(is_trusted(None, Some("same-origin"), &list));
        assert!(is_trusted(Some("https://other"), Some("same-origin"), &[]));
    }

    #[test]
    fn https_from_tls_or_a_trusted_hop_only() {
        assert!(is_https(true, None, false));
        assert!(!is_https(false, Some("https"), false));
        assert!(is_https(false, Some(" HTTPS "), true));
        assert!(!is_https(false, Some("http"), true));
        assert!(!is_https(false, None, true));
    }

    #[test]
    fn state_changing_methods() {
        for m in ["POST", "put", "Patch", "DELETE"] {
            assert!(state_changing(m));
        }
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", ""] {
            assert!(!state_changing(m));
        }
    }
}
