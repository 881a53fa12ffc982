//! Path templates against claims, client fingerprints, constant-time comparison: the checks a
//! binding is made of.

use crate::jwt::claims::claim_text;
use crate::jwt::Claims;
use serde_json::Value;
use std::net::IpAddr;
use subtle::ConstantTimeEq;

use super::*;

pub(super) fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Does `claim` bind `segment`: equal as text, or (a list) contain it.
pub(super) fn claim_binds(claim: Option<&Value>, segment: &str) -> bool {
    match claim {
        Some(Value::String(s)) => s == segment,
        Some(v @ (Value::Number(_) | Value::Bool(_))) => claim_text(v) == segment,
        Some(Value::Array(list)) => list.iter().any(|v| match v {
            Value::String(s) => s == segment,
            Value::Number(_) => claim_text(v) == segment,
            _ => false,
        }),
        _ => false,
    }
}

/// The outcome of the scope templates on a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ScopeCheck {
    /// No template of the binding matches the path.
    NoTemplate,
    /// A template matched and `variable`'s segment is not in its claim.
    Mismatch(String),
    Bound,
}

impl Template {
    /// `None` when the path does not have this template's shape; otherwise every
    /// `(variable, claim, decoded segment)`.
    pub(super) fn bind<'a>(
        &'a self,
        path: &str,
    ) -> Option<Vec<(&'a str, &'a str, Option<String>)>> {
        let body = path.strip_prefix('/')?;
        let parts: Vec<&str> = body.split('/').collect();
        if parts.len() < self.segments.len() || (!self.rest && parts.len() != self.segments.len()) {
            return None;
        }
        let mut vars = Vec::new();
        for (seg, part) in self.segments.iter().zip(parts.iter()) {
            match seg {
                Segment::Literal(l) => {
                    if percent_decode(part).as_deref() != Some(l.as_str()) {
                        return None;
                    }
                }
                Segment::Var(name, claim) => {
                    // An empty or undecodable segment binds nothing (and so never matches).
                    let decoded = percent_decode(part).filter(|s| !s.is_empty());
                    vars.push((name.as_str(), claim.as_str(), decoded));
                }
            }
        }
        Some(vars)
    }
}

pub(super) fn check_scope(templates: &[Template], path: &str, claims: &Claims) -> ScopeCheck {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let mut matched = false;
    for t in templates {
        let Some(vars) = t.bind(path) else { continue };
        matched = true;
        for (name, claim, segment) in vars {
            let ok = segment
                .as_deref()
                .is_some_and(|s| claim_binds(claims.get(claim), s));
            if !ok {
                return ScopeCheck::Mismatch(name.to_string());
            }
        }
    }
    if matched {
        ScopeCheck::Bound
    } else {
        ScopeCheck::NoTemplate
    }
}

/// The client's network prefix as the fingerprint covers it: `a.b.c.0/24` for IPv4 (and
/// IPv4-mapped IPv6), the RFC 5952 text of the address masked to 64 bits plus `/64` for IPv6.
pub fn ip_prefix(ip: IpAddr) -> String {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            format!("{}/64", std::net::Ipv6Addr::from(bits))
        }
    }
}

/// The `cfp` claim a client should carry: base64url(SHA-256(User-Agent + "|" + prefix)).
pub fn fingerprint(user_agent: &str, ip: IpAddr) -> String {
    let digest = crate::sha256(format!("{user_agent}|{}", ip_prefix(ip)).as_bytes());
    crate::b64url(&digest)
}

/// The IP of an Envoy address property: `1.2.3.4:5678`, `[2001:db8::1]:5678`, or bare.
pub fn parse_address(address: &str) -> Option<IpAddr> {
    if let Ok(ip) = address.parse() {
        return Some(ip);
    }
    if let Ok(sa) = address.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    None
}

pub(super) fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}
