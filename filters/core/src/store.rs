//! Fleet state on etcd v3: what several Envoy replicas share (used single-use token ids, open
//! socket slots), reached through an Envoy cluster and etcd's JSON gRPC gateway (`/v3/kv/txn`,
//! `/v3/lease/grant`, `/v3/lease/keepalive`). This module builds the requests and reads the
//! answers; it never calls the host. See docs/fleet.md.
//!
//! - Keys are hashes under the configured prefix (`<prefix>jti/<hash>`,
//!   `<prefix>sock/<owner hash>/<n>`): no token, `jti`, `sub` or `sid` in clear.
//! - **Single use**: one transaction creates the token id's key if absent
//!   (`compare create_revision == 0`), attached to a lease that ends at the next
//!   [`LEASE_STEP`] boundary after `exp` + skew. The lease id is derived from the prefix and that
//!   boundary, so every replica uses the same lease for tokens ending close together and a
//!   connect costs one round trip; the first connect of a step meets "lease not found", grants
//!   it (another replica's concurrent grant is "already exists": fine) and retries once.
//! - **Socket caps**: an owner (one value of the cap claim) has `limit` numbered slot keys. A
//!   connect takes the lowest free one in the same transaction, as a chain of nested
//!   transactions (`slot 0 absent → put, else slot 1 absent → put, …`). It is exact: etcd runs
//!   the whole transaction atomically and linearizably, a key is created at most once, and
//!   there are only `limit` keys, so `limit` sockets at most hold one across every replica.
//!   A slot key is attached to its worker's lease, kept alive on the root tick while the worker
//!   lives; a killed replica's slots vanish when its lease expires.

use crate::config::ConfigError;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

/// The largest store answer read; a bigger one is [`StoreError::TooLarge`].
pub const MAX_ANSWER: usize = 64 * 1024;
/// Token-id leases end on multiples of this many seconds (tokens ending within one step share
/// a lease).
pub const LEASE_STEP: u64 = 60;
/// The largest socket cap the store accepts: the slot chain is nested once per slot.
pub const MAX_CAP: u32 = 16;

// ---------------------------------------------------------------------------------------------
// Config.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStore {
    etcd: RawEtcd,
    when_unavailable: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    cluster: String,
    authority: Option<String>,
    #[serde(default = "default_prefix")]
    prefix: String,
    #[serde(default = "default_timeout")]
    timeout_ms: u64,
}

fn default_prefix() -> String {
    "gatehouse/".into()
}
fn default_timeout() -> u64 {
    250
}

/// What a request does when the store cannot answer (unreachable, slow, or a bad answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenUnavailable {
    /// Refuse (503 / close 1013): never accepted twice, never over the cap.
    Closed,
    /// Fall back to this Envoy's own state (counted `store.local_fallback`).
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub cluster: String,
    pub authority: String,
    pub prefix: String,
    pub timeout_ms: u64,
    pub when_unavailable: WhenUnavailable,
}

impl WhenUnavailable {
    pub fn name(self) -> &'static str {
        match self {
            WhenUnavailable::Closed => "closed",
            WhenUnavailable::Local => "local",
        }
    }
}

impl StoreConfig {
    pub(crate) fn compile(raw: RawStore) -> Result<Self, ConfigError> {
        let e = raw.etcd;
        if e.cluster.is_empty() {
            return Err(ConfigError::new("store.etcd.cluster", "must not be empty"));
        }
        if e.prefix.is_empty() || e.prefix.len() > 128 {
            return Err(ConfigError::new(
                "store.etcd.prefix",
                "must be 1 to 128 characters",
            ));
        }
        if !(1..=10_000).contains(&e.timeout_ms) {
            return Err(ConfigError::new(
                "store.etcd.timeout_ms",
                "must be between 1 and 10000",
            ));
        }
        let when_unavailable = match raw.when_unavailable.as_deref() {
            None | Some("closed") => WhenUnavailable::Closed,
            Some("local") => WhenUnavailable::Local,
            Some(_) => {
                return Err(ConfigError::new(
                    "store.when_unavailable",
                    "must be `closed` (refuse) or `local` (this Envoy's own state)",
                ))
            }
        };
        Ok(Self {
            authority: e.authority.unwrap_or_else(|| e.cluster.clone()),
            cluster: e.cluster,
            prefix: e.prefix,
            timeout_ms: e.timeout_ms,
            when_unavailable,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Requests.

/// One HTTP call to etcd's JSON gateway: `POST path` with a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub path: &'static str,
    pub body: Vec<u8>,
}

const TXN: &str = "/v3/kv/txn";
const GRANT: &str = "/v3/lease/grant";
const KEEPALIVE: &str = "/v3/lease/keepalive";

fn b64(data: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(data.as_bytes())
}

fn call(path: &'static str, body: Value) -> Call {
    Call {
        path,
        body: body.to_string().into_bytes(),
    }
}

pub fn jti_key(prefix: &str, id: &str) -> String {
    format!("{prefix}jti/{id}")
}

pub fn slot_key(prefix: &str, owner: &str, n: u32) -> String {
    format!("{prefix}sock/{owner}/{n}")
}

/// A lease id derived from what it is for: the same on every replica.
fn derived_lease(prefix: &str, what: &str, n: u64) -> i64 {
    let h = crate::sha256(format!("{prefix}\0{what}\0{n}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(h.get(..8).unwrap_or(&[1; 8]));
    (i64::from_be_bytes(b) & i64::MAX).max(1)
}

/// The shared lease of token ids recorded until `until`: its id and, granted at `now`, its TTL
/// (it ends at the next [`LEASE_STEP`] boundary, never before `until`).
pub fn jti_lease(prefix: &str, until: u64, now: u64) -> (i64, u64) {
    let end = until.div_ceil(LEASE_STEP).saturating_mul(LEASE_STEP);
    (
        derived_lease(prefix, "jti", end),
        end.saturating_sub(now).max(1) + 1,
    )
}

/// A worker's own socket lease id, from 8 random bytes.
pub fn socket_lease(random: [u8; 8]) -> i64 {
    (i64::from_be_bytes(random) & i64::MAX).max(1)
}

/// A JSON object from its fields, moved in (no copy of nested values).
fn object<const N: usize>(fields: [(&str, Value); N]) -> Value {
    Value::Object(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

fn create_if_absent(key: &str) -> Value {
    json!({"key": b64(key), "target": "CREATE", "create_revision": "0"})
}

fn put(key: &str, value: &str, lease: i64) -> Value {
    json!({"request_put": {"key": b64(key), "value": b64(value), "lease": lease.to_string()}})
}

pub fn grant(lease: i64, ttl: u64) -> Call {
    call(
        GRANT,
        json!({"ID": lease.to_string(), "TTL": ttl.to_string()}),
    )
}

pub fn keepalive(lease: i64) -> Call {
    call(KEEPALIVE, json!({"ID": lease.to_string()}))
}

/// A single-use token id to claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JtiClaim {
    pub id: String,
    /// The owner and its cap of outstanding ids (used by the local fallback only).
    pub owner: Option<(String, usize)>,
    pub until: u64,
}

/// A socket slot to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotClaim {
    pub owner: String,
    pub slot: String,
    pub limit: u32,
    /// The slot's TTL in the local fallback.
    pub ttl: u64,
}

/// What one connect claims; recorded by the decision (it is a
/// [`crate::session_binding::store::BindingStore`] that answers "fresh" and "granted") and sent
/// as one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Connect {
    pub jti: Option<JtiClaim>,
    pub slot: Option<SlotClaim>,
    pub now: u64,
}

impl Connect {
    pub fn is_empty(&self) -> bool {
        self.jti.is_none() && self.slot.is_none()
    }

    /// The slot chain: the lowest free slot is taken. Built from the last slot up, each level
    /// moved into the one above (`json!` would copy the whole subtree at every level: that made
    /// a `limit: 8` connect cost ~180 µs natively).
    fn chain(prefix: &str, s: &SlotClaim, lease: i64) -> Value {
        let mut inner: Option<Value> = None;
        for n in (0..s.limit.max(1)).rev() {
            let key = slot_key(prefix, &s.owner, n);
            let failure = inner.take().map(|t| vec![object([("request_txn", t)])]);
            inner = Some(object([
                ("compare", Value::Array(vec![create_if_absent(&key)])),
                ("success", Value::Array(vec![put(&key, &s.slot, lease)])),
                ("failure", Value::Array(failure.unwrap_or_default())),
            ]));
        }
        inner.unwrap_or_else(|| object([]))
    }

    /// The one transaction of this connect.
    pub fn txn(&self, prefix: &str, sock_lease: i64) -> Call {
        let chain = self
            .slot
            .as_ref()
            .map(|s| Self::chain(prefix, s, sock_lease));
        let body = match (&self.jti, chain) {
            (Some(j), chain) => {
                let key = jti_key(prefix, &j.id);
                let (lease, _) = jti_lease(prefix, j.until, self.now);
                let mut success = vec![put(&key, "1", lease)];
                success.extend(chain.map(|c| object([("request_txn", c)])));
                object([
                    ("compare", Value::Array(vec![create_if_absent(&key)])),
                    ("success", Value::Array(success)),
                ])
            }
            (None, Some(chain)) => chain,
            (None, None) => object([]),
        };
        call(TXN, body)
    }
}

/// Free slots (`(owner, n, slot id)`), each only if it is still this socket's: one round trip.
pub fn release(prefix: &str, slots: &[(String, u32, String)]) -> Call {
    let ops: Vec<Value> = slots
        .iter()
        .map(|(owner, n, slot)| {
            let key = slot_key(prefix, owner, *n);
            json!({"request_txn": {
                "compare": [{"key": b64(&key), "target": "VALUE", "value": b64(slot)}],
                "success": [{"request_delete_range": {"key": b64(&key)}}],
            }})
        })
        .collect();
    call(TXN, object([("success", Value::Array(ops))]))
}

/// Put live sockets' slots back after their lease was lost (etcd was away longer than its
/// TTL), each only where the slot is still free.
pub fn restore(prefix: &str, slots: &[(String, u32, String)], lease: i64) -> Call {
    let ops: Vec<Value> = slots
        .iter()
        .map(|(owner, n, slot)| {
            let key = slot_key(prefix, owner, *n);
            json!({"request_txn": {
                "compare": [create_if_absent(&key)],
                "success": [put(&key, slot, lease)],
            }})
        })
        .collect();
    call(TXN, object([("success", Value::Array(ops))]))
}

// ---------------------------------------------------------------------------------------------
// Answers.

/// Why the store gave no usable answer. Every one is counted (`store.error.<reason>`), logged,
/// and handled by `when_unavailable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// No answer within `timeout_ms`, or no connection (no status, or Envoy's own 502–504).
    Unavailable,
    /// An HTTP status other than 200 (or an etcd error we do not handle).
    Status,
    /// The answer is not JSON.
    Malformed,
    /// JSON, but not etcd's shape (a field missing or of the wrong type).
    WrongType,
    /// Longer than [`MAX_ANSWER`].
    TooLarge,
    /// Still "lease not found" after granting it.
    LeaseMissing,
}

pub const STORE_ERRORS: [StoreError; 6] = [
    StoreError::Unavailable,
    StoreError::Status,
    StoreError::Malformed,
    StoreError::WrongType,
    StoreError::TooLarge,
    StoreError::LeaseMissing,
];

impl StoreError {
    pub fn reason(self) -> &'static str {
        match self {
            StoreError::Unavailable => "unavailable",
            StoreError::Status => "status",
            StoreError::Malformed => "malformed",
            StoreError::WrongType => "wrong_type",
            StoreError::TooLarge => "too_large",
            StoreError::LeaseMissing => "lease_missing",
        }
    }
}

/// What etcd said, before it is read as one operation's answer.
#[derive(Debug, PartialEq)]
enum Answer {
    Ok(Value),
    LeaseNotFound,
    LeaseExists,
}

fn answer(status: u32, body: &[u8]) -> Result<Answer, StoreError> {
    if body.len() > MAX_ANSWER {
        return Err(StoreError::TooLarge);
    }
    if status == 0 {
        return Err(StoreError::Unavailable);
    }
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        // Envoy's own answer when etcd is unreachable or slow: "no healthy upstream",
        // "upstream connect error …", "upstream request timeout".
        Err(_) if matches!(status, 502..=504) => return Err(StoreError::Unavailable),
        Err(_) if status != 200 => return Err(StoreError::Status),
        Err(_) => return Err(StoreError::Malformed),
    };
    if !v.is_object() {
        return Err(StoreError::WrongType);
    }
    if status != 200 {
        // gRPC codes: 5 NOT_FOUND, 9 FAILED_PRECONDITION (etcd's "lease already exists").
        let message = v.get("message").and_then(Value::as_str).unwrap_or("");
        return match v.get("code").and_then(Value::as_u64) {
            Some(5) if message.contains("lease not found") => Ok(Answer::LeaseNotFound),
            Some(9) if message.contains("lease already exists") => Ok(Answer::LeaseExists),
            _ => Err(StoreError::Status),
        };
    }
    // Every etcd answer has a header: a `{}` from something else is no "claim lost".
    if !v.get("header").is_some_and(Value::is_object) {
        return Err(StoreError::WrongType);
    }
    Ok(Answer::Ok(v))
}

/// A txn's `succeeded` (proto3 JSON omits false).
fn succeeded(txn: &Value) -> Result<bool, StoreError> {
    match txn.get("succeeded") {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(StoreError::WrongType),
    }
}

/// The nested txn answer at `responses[i].response_txn`.
fn nested(txn: &Value, i: usize) -> Result<&Value, StoreError> {
    txn.get("responses")
        .and_then(Value::as_array)
        .and_then(|r| r.get(i))
        .and_then(|r| r.get("response_txn"))
        .filter(|t| t.is_object())
        .ok_or(StoreError::WrongType)
}

/// Which slot the chain from slot `n` took.
fn chain_slot(txn: &Value, n: u32, limit: u32) -> Result<Option<u32>, StoreError> {
    if succeeded(txn)? {
        return Ok(Some(n));
    }
    if n + 1 >= limit {
        return Ok(None);
    }
    chain_slot(nested(txn, 0)?, n + 1, limit)
}

/// The store's verdict on a connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// Everything claimed; the socket holds slot `n` (when it claimed one).
    Fresh { slot: Option<u32> },
    /// The token id was claimed before.
    Replay,
    /// The token id (if any) is claimed, but every slot is taken.
    OverCap,
}

fn read_connect(c: &Connect, v: &Value) -> Result<Claimed, StoreError> {
    let top_ok = succeeded(v)?;
    match (&c.jti, &c.slot) {
        (Some(_), _) if !top_ok => Ok(Claimed::Replay),
        (Some(_), None) => Ok(Claimed::Fresh { slot: None }),
        (Some(_), Some(s)) => Ok(chain_slot(nested(v, 1)?, 0, s.limit)?
            .map_or(Claimed::OverCap, |n| Claimed::Fresh { slot: Some(n) })),
        (None, Some(s)) => Ok(chain_slot(v, 0, s.limit)?
            .map_or(Claimed::OverCap, |n| Claimed::Fresh { slot: Some(n) })),
        (None, None) => Ok(Claimed::Fresh { slot: None }),
    }
}

/// The next step of a flow: another call (with what is left of the time budget, ms), or done.
#[derive(Debug, PartialEq)]
pub enum Step<T> {
    Send(Call, u64),
    Done(Result<T, StoreError>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Txn { retried: bool },
    GrantJti,
    GrantSock,
}

/// One connect against the store: the transaction, and on "lease not found" the grants and one
/// retry, all within one `timeout_ms` budget.
#[derive(Debug)]
pub struct ConnectFlow {
    pub connect: Connect,
    prefix: String,
    sock_lease: i64,
    sock_ttl: u64,
    stage: Stage,
    pub started_ms: u64,
    deadline_ms: u64,
}

impl ConnectFlow {
    /// Start at `now_ms`: the first call and its timeout.
    pub fn start(
        connect: Connect,
        config: &StoreConfig,
        sock_lease: i64,
        sock_ttl: u64,
        now_ms: u64,
    ) -> (Self, Call, u64) {
        let first = connect.txn(&config.prefix, sock_lease);
        (
            Self {
                connect,
                prefix: config.prefix.clone(),
                sock_lease,
                sock_ttl,
                stage: Stage::Txn { retried: false },
                started_ms: now_ms,
                deadline_ms: now_ms.saturating_add(config.timeout_ms),
            },
            first,
            config.timeout_ms,
        )
    }

    fn send(&mut self, stage: Stage, call: Call, now_ms: u64) -> Step<Claimed> {
        let left = self.deadline_ms.saturating_sub(now_ms);
        if left == 0 {
            return Step::Done(Err(StoreError::Unavailable));
        }
        self.stage = stage;
        Step::Send(call, left)
    }

    fn retry(&mut self, now_ms: u64) -> Step<Claimed> {
        let call = self.connect.txn(&self.prefix, self.sock_lease);
        self.send(Stage::Txn { retried: true }, call, now_ms)
    }

    fn grant_sock(&mut self, now_ms: u64) -> Step<Claimed> {
        if self.connect.slot.is_some() {
            let call = grant(self.sock_lease, self.sock_ttl);
            self.send(Stage::GrantSock, call, now_ms)
        } else {
            self.retry(now_ms)
        }
    }

    /// The answer to the last call (`status` 0: none came).
    pub fn answer(&mut self, status: u32, body: &[u8], now_ms: u64) -> Step<Claimed> {
        let a = match answer(status, body) {
            Ok(a) => a,
            Err(e) => return Step::Done(Err(e)),
        };
        match (self.stage, a) {
            (Stage::Txn { .. }, Answer::Ok(v)) => Step::Done(read_connect(&self.connect, &v)),
            (Stage::Txn { retried: false }, Answer::LeaseNotFound) => match &self.connect.jti {
                Some(j) => {
                    let (lease, ttl) = jti_lease(&self.prefix, j.until, self.connect.now);
                    let call = grant(lease, ttl);
                    self.send(Stage::GrantJti, call, now_ms)
                }
                None => self.grant_sock(now_ms),
            },
            (Stage::Txn { retried: true }, Answer::LeaseNotFound) => {
                Step::Done(Err(StoreError::LeaseMissing))
            }
            (Stage::GrantJti, Answer::Ok(_) | Answer::LeaseExists) => self.grant_sock(now_ms),
            (Stage::GrantSock, Answer::Ok(_) | Answer::LeaseExists) => self.retry(now_ms),
            _ => Step::Done(Err(StoreError::Status)),
        }
    }
}

/// A lease keep-alive's answer: `Ok(true)` alive, `Ok(false)` gone (expired: grant it again).
pub fn read_keepalive(status: u32, body: &[u8]) -> Result<bool, StoreError> {
    if body.len() > MAX_ANSWER {
        return Err(StoreError::TooLarge);
    }
    if status == 0 || matches!(status, 502..=504) {
        return Err(StoreError::Unavailable);
    }
    if status != 200 {
        return Err(StoreError::Status);
    }
    let v: Value = serde_json::from_slice(body).map_err(|_| StoreError::Malformed)?;
    let result = v.get("result").ok_or(StoreError::WrongType)?;
    match result.get("TTL") {
        None => Ok(false),
        Some(Value::String(s)) => s
            .parse::<i64>()
            .map(|t| t > 0)
            .map_err(|_| StoreError::WrongType),
        Some(Value::Number(n)) => Ok(n.as_i64().is_some_and(|t| t > 0)),
        Some(_) => Err(StoreError::WrongType),
    }
}

/// A grant's answer (an existing lease of that id is fine).
pub fn read_grant(status: u32, body: &[u8]) -> Result<(), StoreError> {
    answer(status, body).and_then(|a| match a {
        Answer::Ok(_) | Answer::LeaseExists => Ok(()),
        Answer::LeaseNotFound => Err(StoreError::Status),
    })
}

/// Any other txn's answer (release, restore): only whether etcd took it.
pub fn read_txn(status: u32, body: &[u8]) -> Result<(), StoreError> {
    match answer(status, body)? {
        Answer::Ok(_) => Ok(()),
        _ => Err(StoreError::Status),
    }
}

// ---------------------------------------------------------------------------------------------
// Session deadlines (jwt-auth): `<prefix>sess/<hash>` → the session's deadline (unix seconds,
// zero-padded so etcd's byte comparison orders them), on a lease shared by deadlines ending in
// the same [`LEASE_STEP`] and ending a little past them ([`crate::sessions::GRACE`]).

pub fn session_key(prefix: &str, session: &str) -> String {
    let hash: String = crate::sha256(session.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{prefix}sess/{hash}")
}

fn deadline_value(deadline: u64) -> String {
    format!("{deadline:020}")
}

/// The shared lease of session deadlines at `deadline`: its id and, granted at `now`, its TTL.
pub fn session_lease(prefix: &str, deadline: u64, now: u64) -> (i64, u64) {
    let end = deadline
        .saturating_add(crate::sessions::GRACE + 1)
        .div_ceil(LEASE_STEP)
        .saturating_mul(LEASE_STEP);
    (
        derived_lease(prefix, "sess", end),
        end.saturating_sub(now).max(1) + 1,
    )
}

/// Record `(session, deadline)`s in one transaction; each only raises the stored deadline
/// (created if absent, else put only where the stored one is smaller).
pub fn write_deadlines(prefix: &str, entries: &[(String, u64)], now: u64) -> Call {
    let ops: Vec<Value> = entries
        .iter()
        .map(|(session, deadline)| {
            let key = session_key(prefix, session);
            let value = deadline_value(*deadline);
            let (lease, _) = session_lease(prefix, *deadline, now);
            json!({"request_txn": {
                "compare": [create_if_absent(&key)],
                "success": [put(&key, &value, lease)],
                "failure": [{"request_txn": {
                    "compare": [{"key": b64(&key), "target": "VALUE", "result": "LESS",
                                 "value": b64(&value)}],
                    "success": [put(&key, &value, lease)],
                }}],
            }})
        })
        .collect();
    call(TXN, object([("success", Value::Array(ops))]))
}

/// Read the sessions' deadlines in one transaction.
pub fn read_deadlines(prefix: &str, sessions: &[String]) -> Call {
    let ops: Vec<Value> = sessions
        .iter()
        .map(|s| json!({"request_range": {"key": b64(&session_key(prefix, s))}}))
        .collect();
    call(TXN, object([("success", Value::Array(ops))]))
}

/// A deadline write's answer: `Ok(true)` written, `Ok(false)` a lease was missing (grant the
/// batch's leases, then write again).
pub fn read_write_answer(status: u32, body: &[u8]) -> Result<bool, StoreError> {
    match answer(status, body)? {
        Answer::Ok(_) => Ok(true),
        Answer::LeaseNotFound => Ok(false),
        Answer::LeaseExists => Err(StoreError::Status),
    }
}

/// A deadline read's answer: one deadline (or none recorded) per session asked, in order.
pub fn read_deadlines_answer(
    status: u32,
    body: &[u8],
    asked: usize,
) -> Result<Vec<Option<u64>>, StoreError> {
    let v = match answer(status, body)? {
        Answer::Ok(v) => v,
        _ => return Err(StoreError::Status),
    };
    let responses = match v.get("responses") {
        None if asked == 0 => return Ok(vec![]),
        Some(Value::Array(r)) if r.len() == asked => r,
        _ => return Err(StoreError::WrongType),
    };
    responses
        .iter()
        .map(|r| {
            let range = r
                .get("response_range")
                .filter(|r| r.is_object())
                .ok_or(StoreError::WrongType)?;
            let kv = match range.get("kvs") {
                None => return Ok(None),
                Some(Value::Array(kvs)) => match kvs.first() {
                    None => return Ok(None),
                    Some(kv) => kv,
                },
                Some(_) => return Err(StoreError::WrongType),
            };
            let value = kv
                .get("value")
                .and_then(Value::as_str)
                .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(StoreError::WrongType)?;
            Ok(Some(value))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// A worker's sockets: its lease, kept alive on the root tick, and the slots its live sockets
// hold.

/// What a root call was for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCall {
    Keepalive,
    Grant,
    Restore,
    Release(Vec<(String, u32, String)>),
}

/// One worker's socket lease and slots (the root context keeps it).
#[derive(Debug)]
pub struct Sockets {
    pub lease: i64,
    /// The lease TTL (`sockets.slot_ttl_seconds`): a dead replica's slots go after this.
    pub ttl: u64,
    /// slot id → (owner, slot number), for the live sockets holding an etcd slot.
    live: std::collections::BTreeMap<String, (String, u32)>,
    /// Closed sockets' slots, freed on the next tick in one call.
    closed: Vec<(String, u32, String)>,
    next_keepalive: u64,
    in_flight: Vec<(u32, RootCall)>,
}

impl Sockets {
    pub fn new(lease: i64, ttl: u64) -> Self {
        Self {
            lease,
            ttl,
            live: Default::default(),
            closed: Vec::new(),
            next_keepalive: 0,
            in_flight: Vec::new(),
        }
    }

    pub fn held(&mut self, slot: &str, owner: &str, n: u32) {
        self.live.insert(slot.to_string(), (owner.to_string(), n));
    }

    /// The socket holding `slot` ended: free its slot on the next tick.
    pub fn closed(&mut self, slot: &str) {
        if let Some((owner, n)) = self.live.remove(slot) {
            self.closed.push((owner, n, slot.to_string()));
        }
    }

    /// A stream ended while its connect waited for etcd: the claim may have been applied
    /// without us hearing it, so free whichever of the owner's slots holds this socket's id.
    pub fn abandoned(&mut self, claim: &SlotClaim) {
        self.closed
            .extend((0..claim.limit).map(|n| (claim.owner.clone(), n, claim.slot.clone())));
    }

    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    fn live_slots(&self) -> Vec<(String, u32, String)> {
        self.live
            .iter()
            .map(|(slot, (owner, n))| (owner.clone(), *n, slot.clone()))
            .collect()
    }

    fn busy(&self, what: &RootCall) -> bool {
        self.in_flight.iter().any(|(_, c)| {
            std::mem::discriminant(c) == std::mem::discriminant(what)
                || (matches!(what, RootCall::Keepalive)
                    && matches!(c, RootCall::Grant | RootCall::Restore))
        })
    }

    /// The calls due at `now` (seconds): freeing closed slots, and a keep-alive every third of
    /// the TTL while live sockets hold slots.
    pub fn due(&mut self, prefix: &str, now: u64) -> Vec<(RootCall, Call)> {
        let mut calls = Vec::new();
        if !self.closed.is_empty() && !self.busy(&RootCall::Release(vec![])) {
            let slots = std::mem::take(&mut self.closed);
            calls.push((RootCall::Release(slots.clone()), release(prefix, &slots)));
        }
        if !self.live.is_empty() && now >= self.next_keepalive && !self.busy(&RootCall::Keepalive) {
            self.next_keepalive = now + (self.ttl / 3).max(1);
            calls.push((RootCall::Keepalive, keepalive(self.lease)));
        }
        calls
    }

    pub fn sent(&mut self, token: u32, what: RootCall) {
        self.in_flight.push((token, what));
    }

    /// A call could not be started: a release is tried again on the next tick.
    pub fn not_sent(&mut self, what: RootCall) {
        if let RootCall::Release(slots) = what {
            self.closed.extend(slots);
        }
    }

    /// The answer to root call `token`: `None` when it is not ours; else what to count and a
    /// follow-up call (a lost lease is granted again, then the live slots are put back).
    pub fn answer(
        &mut self,
        prefix: &str,
        token: u32,
        status: u32,
        body: &[u8],
    ) -> Option<(crate::stats::StoreStat, Option<(RootCall, Call)>)> {
        use crate::stats::StoreStat;
        let at = self.in_flight.iter().position(|(t, _)| *t == token)?;
        let (_, what) = self.in_flight.swap_remove(at);
        Some(match what {
            RootCall::Keepalive => match read_keepalive(status, body) {
                Ok(true) => (StoreStat::KeepaliveOk, None),
                Ok(false) => (
                    StoreStat::LeaseRestored,
                    Some((RootCall::Grant, grant(self.lease, self.ttl))),
                ),
                Err(e) => {
                    // Try again soon; live sockets stay open whatever etcd does.
                    self.next_keepalive = 0;
                    (StoreStat::Error(e), None)
                }
            },
            RootCall::Grant => match read_grant(status, body) {
                Ok(()) => {
                    let slots = self.live_slots();
                    (
                        StoreStat::KeepaliveOk,
                        Some((RootCall::Restore, restore(prefix, &slots, self.lease))),
                    )
                }
                Err(e) => {
                    self.next_keepalive = 0;
                    (StoreStat::Error(e), None)
                }
            },
            RootCall::Restore => match read_txn(status, body) {
                Ok(()) => (StoreStat::KeepaliveOk, None),
                Err(e) => (StoreStat::Error(e), None),
            },
            RootCall::Release(slots) => match read_txn(status, body) {
                Ok(()) => (StoreStat::Released, None),
                Err(_) => {
                    // The lease frees them at the latest; try once more on the next tick.
                    self.closed.extend(slots);
                    (StoreStat::ReleaseFailed, None)
                }
            },
        })
    }
}

#[cfg(test)]
mod tests;
