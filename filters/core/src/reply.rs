//! Local replies, built in one place: RFC 6750 / RFC 9457 for plain HTTP, and a completed
//! handshake plus a close frame for WebSocket upgrades (so browser JS reads the close code;
//! a plain 401 would surface as 1006).

use crate::ws;

/// A header change a decision asks for, on the request that goes upstream or on the response
/// that goes to the client (the decision says which).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderEdit {
    /// Replace every value of the header with this one.
    Set(String, String),
    /// Add one more value (`set-cookie`).
    Add(String, String),
    /// Remove every value of the header.
    Remove(String),
}

/// What the shell sends instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The category of a refusal; each filter maps its typed errors onto one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400 / close 4400: the request itself is unacceptable (token in the URL, …).
    BadRequest,
    /// 401 / close 4401, no credentials at all.
    MissingCredentials,
    /// 401 / close 4401, credentials present but not valid.
    InvalidCredentials,
    /// 403 / close 4403, valid credentials that are not allowed here.
    Forbidden,
    /// 405: a locally answered endpoint asked with the wrong method.
    MethodNotAllowed,
    /// 429 / close 4429: valid credentials over a concurrency cap (too many open sockets, or a
    /// bounded store that is full).
    TooMany,
    /// 503 / close 1013 (try again later): a dependency of the decision is unavailable, and the
    /// configuration says to refuse rather than guess (a stale revocation list, fail-closed).
    Unavailable,
}

/// The facts of a WebSocket upgrade needed to answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsHandshake {
    pub accept: String,
    /// The subprotocol to select: the browser fails the handshake if it offered some and the
    /// answer selects none.
    pub protocol: Option<String>,
}

impl Refusal {
    pub fn status(self) -> u32 {
        match self {
            Refusal::BadRequest => 400,
            Refusal::MissingCredentials | Refusal::InvalidCredentials => 401,
            Refusal::Forbidden => 403,
            Refusal::MethodNotAllowed => 405,
            Refusal::TooMany => 429,
            Refusal::Unavailable => 503,
        }
    }

    pub fn close_code(self) -> u16 {
        match self {
            Refusal::BadRequest | Refusal::MethodNotAllowed => ws::CLOSE_BAD_REQUEST,
            Refusal::MissingCredentials | Refusal::InvalidCredentials => ws::CLOSE_UNAUTHORIZED,
            Refusal::Forbidden => ws::CLOSE_FORBIDDEN,
            Refusal::TooMany => ws::CLOSE_TOO_MANY,
            Refusal::Unavailable => ws::CLOSE_TRY_AGAIN_LATER,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Refusal::BadRequest => "Bad Request",
            Refusal::MissingCredentials | Refusal::InvalidCredentials => "Unauthorized",
            Refusal::Forbidden => "Forbidden",
            Refusal::MethodNotAllowed => "Method Not Allowed",
            Refusal::TooMany => "Too Many Requests",
            Refusal::Unavailable => "Service Unavailable",
        }
    }

    /// Generic on purpose: the log line and the stat say which check failed, the client is not
    /// told.
    fn detail(self) -> &'static str {
        match self {
            Refusal::BadRequest => "The request is malformed; credentials never belong in the URL.",
            Refusal::MissingCredentials => "Credentials are required.",
            Refusal::InvalidCredentials => "The credentials are invalid or expired.",
            Refusal::Forbidden => "The credentials do not allow this request.",
            Refusal::MethodNotAllowed => "This endpoint does not answer this method.",
            Refusal::TooMany => "Too many concurrent connections for these credentials.",
            Refusal::Unavailable => "The request cannot be checked right now; try again later.",
        }
    }

    fn close_reason(self) -> &'static str {
        match self {
            Refusal::BadRequest | Refusal::MethodNotAllowed => "bad request",
            Refusal::MissingCredentials | Refusal::InvalidCredentials => "unauthorized",
            Refusal::Forbidden => "forbidden",
            Refusal::TooMany => "too many connections",
            Refusal::Unavailable => "try again later",
        }
    }

    fn www_authenticate(self) -> Option<&'static str> {
        match self {
            Refusal::MissingCredentials => Some(r#"Bearer realm="gatehouse""#),
            Refusal::InvalidCredentials => {
                Some(r#"Bearer realm="gatehouse", error="invalid_token""#)
            }
            Refusal::Forbidden => Some(r#"Bearer realm="gatehouse", error="insufficient_scope""#),
            Refusal::BadRequest => Some(r#"Bearer realm="gatehouse", error="invalid_request""#),
            Refusal::MethodNotAllowed | Refusal::TooMany | Refusal::Unavailable => None,
        }
    }

    /// The reply for this refusal: a WebSocket close when `ws` is given, else problem+json.
    pub fn reply(self, ws: Option<&WsHandshake>) -> LocalReply {
        match ws {
            Some(hs) => {
                let mut headers = vec![
                    ("upgrade".to_string(), "websocket".to_string()),
                    ("connection".to_string(), "Upgrade".to_string()),
                    ("sec-websocket-accept".to_string(), hs.accept.clone()),
                ];
                if let Some(p) = &hs.protocol {
                    headers.push(("sec-websocket-protocol".to_string(), p.clone()));
                }
                LocalReply {
                    status: 101,
                    headers,
                    body: ws::close_frame(self.close_code(), self.close_reason(), None),
                }
            }
            None => {
                let body = serde_json::json!({
                    "type": "about:blank",
                    "title": self.title(),
                    "status": self.status(),
                    "detail": self.detail(),
                });
                let mut headers = vec![
                    (
                        "content-type".to_string(),
                        "application/problem+json".to_string(),
                    ),
                    ("cache-control".to_string(), "no-store".to_string()),
                ];
                if let Some(w) = self.www_authenticate() {
                    headers.push(("www-authenticate".to_string(), w.to_string()));
                }
                if matches!(self, Refusal::TooMany | Refusal::Unavailable) {
                    headers.push(("retry-after".to_string(), "5".to_string()));
                }
                LocalReply {
                    status: self.status(),
                    headers,
                    body: body.to_string().into_bytes(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_problem_json() {
        let r = Refusal::InvalidCredentials.reply(None);
        assert_eq!(r.status, 401);
        assert!(r.headers.contains(&(
            "www-authenticate".into(),
            r#"Bearer realm="gatehouse", error="invalid_token""#.into()
        )));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["status"], 401);
        let missing = Refusal::MissingCredentials.reply(None);
        let w = &missing
            .headers
            .iter()
            .find(|(k, _)| k == "www-authenticate")
            .unwrap()
            .1;
        assert!(
            !w.contains("error="),
            "RFC 6750: no error code when no token was sent"
        );
        assert_eq!(Refusal::Forbidden.reply(None).status, 403);
    }

    #[test]
    fn websocket_close() {
        let hs = WsHandshake {
            accept: "abc".into(),
            protocol: Some("sip".into()),
        };
        let r = Refusal::Forbidden.reply(Some(&hs));
        assert_eq!(r.status, 101);
        assert_eq!(&r.body[2..4], &4403u16.to_be_bytes());
        assert!(r
            .headers
            .contains(&("sec-websocket-protocol".into(), "sip".into())));
        let r = Refusal::TooMany.reply(Some(&hs));
        assert_eq!((r.status, &r.body[2..4]), (101, &4429u16.to_be_bytes()[..]));
        let r = Refusal::Unavailable.reply(Some(&hs));
        assert_eq!(&r.body[2..4], &1013u16.to_be_bytes());
    }

    #[test]
    fn capacity_and_availability_over_http() {
        let r = Refusal::TooMany.reply(None);
        assert_eq!(r.status, 429);
        assert!(r.headers.contains(&("retry-after".into(), "5".into())));
        assert!(!r.headers.iter().any(|(k, _)| k == "www-authenticate"));
        assert_eq!(Refusal::Unavailable.reply(None).status, 503);
    }
}
