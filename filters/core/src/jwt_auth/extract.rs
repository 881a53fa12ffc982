//! Credential locations: the tokens a policy's sources hold, the ones refused in a query, and
//! every credential stripped before the request goes upstream.

use crate::{cookie, ws};

use super::*;

impl JwtAuth {
    /// Remove every credential from every location any policy reads (like Envoy's jwt_authn
    /// `sanitizeHeaders`): token subprotocol entries, the `Authorization` header (all of its
    /// values: Envoy joins repeated headers with `,`; and a `Bearer` one even when it is not a
    /// source, since an upstream would take it for a token jwt-auth vouched for), the token
    /// cookies. True when the subprotocol header held only token entries.
    pub(super) fn strip_credentials(&self, req: &Request<'_>, edits: &mut Vec<HeaderEdit>) -> bool {
        let mut only_tokens = false;
        let mut auth_source = false;
        let mut cookies: Vec<&str> = Vec::new();
        let mut prefixes: Vec<&str> = Vec::new();
        for s in &self.config.strip {
            match s {
                Source::WebsocketProtocol { prefix } => prefixes.push(prefix),
                Source::Authorization => auth_source = true,
                Source::Cookie { name } => cookies.push(name),
            }
        }
        if let Some(header) = req.ws_protocols.filter(|_| !prefixes.is_empty()) {
            let all: Vec<&str> = ws::protocols(header).collect();
            let others: Vec<&str> = all
                .iter()
                .copied()
                .filter(|p| !prefixes.iter().any(|pre| p.starts_with(pre)))
                .collect();
            if others.len() != all.len() {
                only_tokens = others.is_empty();
                edits.push(if others.is_empty() {
                    HeaderEdit::Remove("sec-websocket-protocol".into())
                } else {
                    HeaderEdit::Set("sec-websocket-protocol".into(), others.join(", "))
                });
            }
        }
        if let Some(value) = req.authorization {
            if auth_source || !bearer_tokens(value).is_empty() {
                edits.push(HeaderEdit::Remove("authorization".into()));
            }
        }
        if let Some(header) = req.cookie.filter(|_| !cookies.is_empty()) {
            if cookies.iter().any(|n| cookie::get(header, n).is_some()) {
                edits.push(match cookie::without(header, &cookies) {
                    Some(rest) => HeaderEdit::Set("cookie".into(), rest),
                    None => HeaderEdit::Remove("cookie".into()),
                });
            }
        }
        only_tokens
    }

    pub(super) fn query_has_token(&self, path: &str) -> bool {
        let Some((_, query)) = path.split_once('?') else {
            return false;
        };
        let query = query.split('#').next().unwrap_or(query);
        form_urlencoded::parse(query.as_bytes()).any(|(k, _)| {
            self.config
                .refused_query_params
                .iter()
                .any(|r| r.eq_ignore_ascii_case(&k))
        })
    }
}

/// The `Bearer` credentials of an `Authorization` value (Envoy joins repeated headers with
/// `,`; the scheme is case-insensitive and any run of spaces or tabs may follow it).
pub fn bearer_tokens(value: &str) -> Vec<&str> {
    value
        .split(',')
        .filter_map(|cred| {
            let cred = cred.trim_matches([' ', '\t']);
            let (scheme, rest) = cred.split_once([' ', '\t'])?;
            let token = rest.trim_matches([' ', '\t']);
            (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
        })
        .collect()
}

/// Which kind of location a token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Location {
    Protocol,
    Authorization,
    Cookie,
}

/// Every token in `policy`'s sources, in source order, with the kind of location it was in.
pub(super) fn policy_tokens<'r>(policy: &Policy, req: &Request<'r>) -> Vec<(&'r str, Location)> {
    let mut found = Vec::new();
    for source in &policy.sources {
        match source {
            Source::WebsocketProtocol { prefix } => {
                if let Some(header) = req.ws_protocols {
                    found.extend(
                        ws::protocols(header)
                            .filter_map(|p| p.strip_prefix(prefix.as_str()))
                            .map(|t| (t, Location::Protocol)),
                    );
                }
            }
            Source::Authorization => {
                if let Some(value) = req.authorization {
                    found.extend(
                        bearer_tokens(value)
                            .into_iter()
                            .map(|t| (t, Location::Authorization)),
                    );
                }
            }
            Source::Cookie { name } => {
                if let Some(t) = req.cookie.and_then(|h| cookie::get(h, name)) {
                    found.push((t, Location::Cookie));
                }
            }
        }
    }
    found
}
