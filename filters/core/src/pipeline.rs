//! The one-pass chain (`root_id: gatehouse`): which stages a route runs, in which order, what
//! they hand each other in memory, and the one live socket they share. A separate filter is a
//! pass of one stage, so each stage has one implementation.
//!
//! Config: `{"token_proxy": {…}, "jwt_auth": {…}, "session_binding": {…},
//! "turn_credentials": {…}, "page_guard": {…}}`, any non-empty subset; each value is exactly
//! that filter's config, compiled by the same code (its errors are named under the stage's key).
//! The order is fixed: the request runs token_proxy → jwt_auth → session_binding →
//! turn_credentials → page_guard, the response runs them backwards (as Envoy runs encoders).
//!
//! A stage's answer to a callback is a [`Flow`]: go on to the next stage, stop the pass (it
//! answered or refused: the rest do not see the request, the response of its local reply goes
//! back through the stages that saw the request), or wait for an asynchronous call and resume
//! the rest of the pass when the answer comes ([`Pass::resume`]).

use crate::jwt_auth::Verified;
use crate::rules::{Matcher, Needs, RawMatch, Rules};
use crate::ws::LiveSocket;
use crate::ConfigError;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

/// A stage of the one-pass chain: one of the filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageKind {
    TokenProxy,
    JwtAuth,
    SessionBinding,
    TurnCredentials,
    PageGuard,
}

impl StageKind {
    /// The request order (the response runs it backwards).
    pub const ORDER: [StageKind; 5] = [
        StageKind::TokenProxy,
        StageKind::JwtAuth,
        StageKind::SessionBinding,
        StageKind::TurnCredentials,
        StageKind::PageGuard,
    ];

    /// The stage's key in the one-pass config, which is also the filter's `root_id`.
    pub fn key(self) -> &'static str {
        match self {
            StageKind::TokenProxy => "token_proxy",
            StageKind::JwtAuth => "jwt_auth",
            StageKind::SessionBinding => "session_binding",
            StageKind::TurnCredentials => "turn_credentials",
            StageKind::PageGuard => "page_guard",
        }
    }
}

/// The key of the per-route switch ([`Off`]) in the one-pass config.
pub const OFF_KEY: &str = "off";

/// Which stages are off on which routes: Envoy's per-route `FilterConfig { disabled: true }`
/// turns the whole one-pass filter off, so a stage is turned off by the one-pass config's
/// `"off": [{"match": {"route" | "prefix" | "host": …}, "stages": [...]}, …]` (first match wins).
#[derive(Debug, Default)]
pub struct Off {
    rules: Option<Rules<Vec<StageKind>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOff {
    #[serde(rename = "match")]
    matcher: RawMatch,
    stages: Vec<String>,
}

impl Off {
    fn compile(value: &Value, present: &[StageKind]) -> Result<Self, ConfigError> {
        let raw: Vec<RawOff> = serde_json::from_value(value.clone())
            .map_err(|e| ConfigError::new(OFF_KEY, e.to_string()))?;
        let mut rules = Vec::with_capacity(raw.len());
        for (i, rule) in raw.into_iter().enumerate() {
            let at = format!("{OFF_KEY}[{i}]");
            let matcher: Matcher = rule.matcher.compile(&at)?;
            let mut stages = Vec::new();
            for (j, name) in rule.stages.iter().enumerate() {
                match present.iter().find(|s| s.key() == name) {
                    Some(s) => stages.push(*s),
                    None => {
                        return Err(ConfigError::new(
                            format!("{at}.stages[{j}]"),
                            format!("`{name}` is not a stage of this config"),
                        ))
                    }
                }
            }
            rules.push((matcher, stages));
        }
        Ok(Self {
            rules: Some(Rules::new(rules)),
        })
    }

    /// The request facts matching these rules needs (none when there are none).
    pub fn needs(&self) -> Option<Needs> {
        self.rules.as_ref().map(Rules::needs)
    }

    /// The stages off for a request on Envoy route `route`, `:path` `path`, `:authority` `host`.
    /// A path that walks (`..`, `%2f`) turns nothing off: every stage refuses it itself.
    pub fn stages_off(&self, route: Option<&str>, path: &str, host: &str) -> &[StageKind] {
        match self.rules.as_ref().map(|r| r.select(route, path, host)) {
            Some(Ok(Some((_, stages)))) => stages,
            _ => &[],
        }
    }
}

/// A one-pass config: its stages in the fixed order, each with its config bytes for that
/// filter's own compiler (whose errors the caller names with `ConfigError::within(key)`), and
/// which of them are off on which routes.
#[derive(Debug)]
pub struct OnePass {
    pub stages: Vec<(StageKind, Vec<u8>)>,
    pub off: Off,
}

/// Split the one-pass config (see [`OnePass`]). An unknown key, a stage whose value is not an
/// object, an `off` rule naming a stage the config does not have, or no stage at all is refused
/// naming the field.
pub fn split(bytes: &[u8]) -> Result<OnePass, ConfigError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ConfigError::new("", format!("invalid JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(ConfigError::new(
            "",
            "expected an object of stages (token_proxy, jwt_auth, session_binding, \
             turn_credentials, page_guard)",
        ));
    };
    let known: Vec<&str> = StageKind::ORDER.iter().map(|s| s.key()).collect();
    if let Some(unknown) = map
        .keys()
        .find(|k| !known.contains(&k.as_str()) && *k != OFF_KEY)
    {
        return Err(ConfigError::new(
            unknown.as_str(),
            format!(
                "unknown stage; expected one of {} (or `{OFF_KEY}`)",
                known.join(", ")
            ),
        ));
    }
    let mut stages = Vec::new();
    for stage in StageKind::ORDER {
        let Some(config) = map.get(stage.key()) else {
            continue;
        };
        if !config.is_object() {
            return Err(ConfigError::new(
                stage.key(),
                "expected the filter's config (an object)",
            ));
        }
        let bytes =
            serde_json::to_vec(config).map_err(|e| ConfigError::new(stage.key(), e.to_string()))?;
        stages.push((stage, bytes));
    }
    if stages.is_empty() {
        return Err(ConfigError::new(
            "",
            format!(
                "no stage configured; give at least one of {}",
                known.join(", ")
            ),
        ));
    }
    let present: Vec<StageKind> = stages.iter().map(|(k, _)| *k).collect();
    let off = match map.get(OFF_KEY) {
        Some(value) => Off::compile(value, &present)?,
        None => Off::default(),
    };
    Ok(OnePass { stages, off })
}

/// Where a callback is in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
}

impl Phase {
    pub fn is_response(self) -> bool {
        matches!(
            self,
            Phase::ResponseHeaders | Phase::ResponseBody | Phase::ResponseTrailers
        )
    }
}

/// A stage's answer to a callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Done here: the next stage runs.
    Next,
    /// Hold the stream here (a local reply or refusal was sent, or a body is being buffered):
    /// the later stages do not run on this callback. A stop on the request headers ends the
    /// pass: the later stages never see the request.
    Stop,
    /// Paused for an asynchronous call: [`Pass::resume`] goes on when the answer comes.
    Wait,
    /// The later stages still run, then the callback pauses (a body being buffered: the
    /// headers wait for it).
    Hold,
}

/// What the host callback returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Continue,
    Pause,
}

/// The progress of one stream through the stages.
#[derive(Debug)]
pub struct Pass {
    /// The stages off for this request (see [`Off`]): they see nothing of it.
    off: Vec<bool>,
    /// The stages that saw the request headers (the response goes back through these).
    seen: Vec<bool>,
    /// The stage that answered the request (a refusal or a local reply, or an answer it makes
    /// once it has read the request body: a CSP report).
    answered: Option<usize>,
    /// The stage waiting for a call, and in which callback.
    waiting: Option<(usize, Phase)>,
}

impl Pass {
    pub fn new(stages: usize) -> Self {
        Self {
            off: vec![false; stages],
            seen: vec![false; stages],
            answered: None,
            waiting: None,
        }
    }

    /// Stage `i` is off for this request (before its request headers run).
    pub fn turn_off(&mut self, i: usize) {
        if let Some(off) = self.off.get_mut(i) {
            *off = true;
        }
    }

    /// The stages `phase` visits, in order: every stage that is not off on the request headers;
    /// the ones that saw them on the request body (only the one that answered, once one did);
    /// the ones that saw them, backwards, on the response.
    pub fn order(&self, phase: Phase) -> Vec<usize> {
        let seen = (0..self.seen.len()).filter(|&i| self.seen[i]);
        match phase {
            Phase::RequestHeaders => (0..self.off.len()).filter(|&i| !self.off[i]).collect(),
            Phase::RequestBody if self.answered.is_some() => self.answered.into_iter().collect(),
            Phase::RequestBody => seen.collect(),
            _ => seen.rev().collect(),
        }
    }

    /// The stage waiting for a call, if any, and the callback it waits in.
    pub fn waiting(&self) -> Option<(usize, Phase)> {
        self.waiting
    }

    /// Whether a stage answered the request.
    pub fn answered(&self) -> bool {
        self.answered.is_some()
    }

    /// Run `phase`: `step(i)` for each stage it visits (see [`Self::order`]) until one stops
    /// or waits.
    pub fn run(&mut self, phase: Phase, step: impl FnMut(usize) -> Flow) -> Step {
        if self.waiting.is_some() {
            // A stage waits for its call: nothing runs until it answers.
            return Step::Pause;
        }
        let order = self.order(phase);
        self.go(phase, &order, step)
    }

    /// The call the waiting stage paused for answered and `step(i)` is its flow, then the rest
    /// of the pass runs. Returns the callback to resume and how (`Continue`: tell the host to
    /// resume it), or `None` when no stage was waiting.
    pub fn resume(&mut self, mut step: impl FnMut(usize) -> Flow) -> Option<(Phase, Step)> {
        let (stage, phase) = self.waiting.take()?;
        let order = self.order(phase);
        let at = order
            .iter()
            .position(|&i| i == stage)
            .unwrap_or(order.len());
        let rest = order.get(at..).unwrap_or_default().to_vec();
        Some((phase, self.go(phase, &rest, &mut step)))
    }

    fn go(&mut self, phase: Phase, order: &[usize], mut step: impl FnMut(usize) -> Flow) -> Step {
        let mut hold = false;
        for &i in order {
            if phase == Phase::RequestHeaders {
                if let Some(seen) = self.seen.get_mut(i) {
                    *seen = true;
                }
            }
            match step(i) {
                Flow::Next => {}
                Flow::Hold => hold = true,
                Flow::Stop => {
                    if phase == Phase::RequestHeaders {
                        self.answered = Some(i);
                    }
                    return Step::Pause;
                }
                Flow::Wait => {
                    self.waiting = Some((i, phase));
                    return Step::Pause;
                }
            }
        }
        if hold {
            Step::Pause
        } else {
            Step::Continue
        }
    }
}

/// What the stages hand each other in memory within one pass (they still publish it as filter
/// state for other filters, access logs and Envoy).
#[derive(Default, Debug)]
pub struct Handover {
    /// A jwt-auth stage ran in this pass: its claims are here, never read back from filter
    /// state.
    pub from_jwt_auth: bool,
    /// The verified token jwt-auth let through (`None`: it allowed the request without one).
    pub claims: Option<Arc<Verified>>,
    /// The last in-band re-auth token jwt-auth accepted on this chunk, for session-binding.
    pub reauth: Option<Arc<Verified>>,
}

/// The one live socket of a pass: every stage that keeps an upgraded stream joins it when the
/// upstream answers 101. A socket with a deadline (jwt-auth's) replaces one without
/// (session-binding's, which only closes on its own checks); otherwise the earlier deadline
/// stays. One state machine, one close code: the first close asked for wins.
pub fn join(live: &mut Option<LiveSocket>, socket: LiveSocket) {
    match live {
        Some(current) if current.deadline() <= socket.deadline() => {}
        _ => *live = Some(socket),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::{ChunkAction, Dir, CLOSE_UNAUTHORIZED};

    #[test]
    fn split_keeps_the_fixed_order_and_each_stage_config() {
        let stages =
            split(br#"{"page_guard": {"a": 1}, "jwt_auth": {"providers": []}, "token_proxy": {}}"#)
                .expect("valid");
        let stages = stages.stages;
        let kinds: Vec<StageKind> = stages.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            [
                StageKind::TokenProxy,
                StageKind::JwtAuth,
                StageKind::PageGuard
            ]
        );
        assert_eq!(stages[1].1, br#"{"providers":[]}"#);
    }

    #[test]
    fn split_refuses_unknown_stages_non_objects_and_nothing() {
        let e = split(br#"{"jwt_auth": {}, "jwt_authn": {}}"#).expect_err("unknown");
        assert_eq!(e.path, "jwt_authn");
        assert!(e.message.contains("unknown stage"), "{e}");
        let e = split(br#"{"session_binding": []}"#).expect_err("not an object");
        assert_eq!(e.path, "session_binding");
        assert!(split(b"{}").is_err());
        assert!(split(b"[]").is_err());
        assert!(split(b"{").is_err());
    }

    #[test]
    fn a_stage_error_is_named_under_its_key() {
        // Each stage is compiled by its filter's own compiler; the error names the stage.
        let stages = split(br#"{"jwt_auth": {"providers": [{"nmae": "x"}]}}"#)
            .expect("split")
            .stages;
        let Err(e) = crate::jwt_auth::JwtAuthConfig::compile(&stages[0].1) else {
            panic!("a bad provider compiles");
        };
        let e = e.within(stages[0].0.key());
        assert!(e.path.starts_with("jwt_auth.providers"), "{}", e.path);
    }

    #[test]
    fn off_turns_stages_off_by_route_and_never_on_a_walking_path() {
        let one = split(
            br#"{"token_proxy": {}, "jwt_auth": {}, "page_guard": {},
                 "off": [{"match": {"route": "signaling"}, "stages": ["token_proxy"]},
                         {"match": {"prefix": "/dev/"}, "stages": ["token_proxy", "jwt_auth"]}]}"#,
        )
        .expect("valid");
        assert_eq!(one.off.needs().map(|n| n.route_name), Some(true));
        assert_eq!(
            one.off.stages_off(Some("signaling"), "/ws/x", ""),
            [StageKind::TokenProxy]
        );
        assert_eq!(
            one.off.stages_off(None, "/dev/login", ""),
            [StageKind::TokenProxy, StageKind::JwtAuth]
        );
        assert!(one.off.stages_off(None, "/api/x", "").is_empty());
        assert!(one.off.stages_off(None, "/dev/../api/x", "").is_empty());
        let e = split(
            br#"{"jwt_auth": {}, "off": [{"match": {"prefix": "/"}, "stages": ["page_guard"]}]}"#,
        )
        .expect_err("not a stage here");
        assert_eq!(e.path, "off[0].stages[0]");
        let e = split(br#"{"jwt_auth": {}, "off": [{"match": {"prefix": "x"}, "stages": []}]}"#)
            .expect_err("bad prefix");
        assert_eq!(e.path, "off[0].match.prefix");
        // An off stage sees nothing of the request, nor of its response.
        let mut pass = Pass::new(3);
        pass.turn_off(1);
        let mut seen = Vec::new();
        pass.run(Phase::RequestHeaders, |i| {
            seen.push(i);
            Flow::Next
        });
        assert_eq!(seen, [0, 2]);
        assert_eq!(pass.order(Phase::ResponseHeaders), [2, 0]);
        assert_eq!(pass.order(Phase::RequestBody), [0, 2]);
    }

    #[test]
    fn request_runs_in_order_and_a_stop_ends_the_pass() {
        let mut pass = Pass::new(4);
        let mut seen = Vec::new();
        let step = pass.run(Phase::RequestHeaders, |i| {
            seen.push(i);
            if i == 1 {
                Flow::Stop
            } else {
                Flow::Next
            }
        });
        assert_eq!(step, Step::Pause);
        assert_eq!(seen, [0, 1]);
        assert!(pass.answered());
        // The local reply goes back through the stages that saw the request, backwards.
        assert_eq!(pass.order(Phase::ResponseHeaders), [1, 0]);
        // Only the stage that answered reads the request body (a CSP report it answers).
        assert_eq!(pass.order(Phase::RequestBody), [1]);
    }

    #[test]
    fn a_waiting_stage_resumes_the_rest_of_the_pass() {
        let mut pass = Pass::new(3);
        let mut seen = Vec::new();
        let step = pass.run(Phase::RequestHeaders, |i| {
            seen.push(i);
            if i == 1 {
                Flow::Wait
            } else {
                Flow::Next
            }
        });
        assert_eq!(step, Step::Pause);
        assert_eq!(pass.waiting(), Some((1, Phase::RequestHeaders)));
        // Nothing else runs while it waits.
        assert_eq!(pass.run(Phase::RequestBody, |_| Flow::Next), Step::Pause);
        let resumed = pass.resume(|i| {
            seen.push(i);
            Flow::Next
        });
        assert_eq!(resumed, Some((Phase::RequestHeaders, Step::Continue)));
        assert_eq!(seen, [0, 1, 1, 2]);
        assert_eq!(pass.waiting(), None);
        assert_eq!(pass.order(Phase::ResponseBody), [2, 1, 0]);
        assert!(pass.resume(|_| Flow::Next).is_none());
    }

    #[test]
    fn a_resumed_stage_may_refuse_or_wait_again() {
        let mut pass = Pass::new(3);
        pass.run(Phase::RequestHeaders, |i| {
            if i == 0 {
                Flow::Wait
            } else {
                Flow::Next
            }
        });
        assert_eq!(
            pass.resume(|_| Flow::Wait),
            Some((Phase::RequestHeaders, Step::Pause))
        );
        assert_eq!(pass.waiting(), Some((0, Phase::RequestHeaders)));
        let mut seen = Vec::new();
        assert_eq!(
            pass.resume(|i| {
                seen.push(i);
                Flow::Stop
            }),
            Some((Phase::RequestHeaders, Step::Pause))
        );
        assert_eq!(seen, [0]);
        assert!(pass.answered());
        assert_eq!(pass.order(Phase::ResponseHeaders), [0]);
    }

    #[test]
    fn a_hold_lets_the_later_stages_run_then_pauses() {
        let mut pass = Pass::new(3);
        pass.run(Phase::RequestHeaders, |_| Flow::Next);
        let mut seen = Vec::new();
        let step = pass.run(Phase::ResponseHeaders, |i| {
            seen.push(i);
            if i == 2 {
                Flow::Hold
            } else {
                Flow::Next
            }
        });
        assert_eq!(step, Step::Pause);
        assert_eq!(seen, [2, 1, 0]);
    }

    #[test]
    fn a_response_wait_resumes_the_response() {
        let mut pass = Pass::new(2);
        pass.run(Phase::RequestHeaders, |_| Flow::Next);
        let mut seen = Vec::new();
        pass.run(Phase::ResponseHeaders, |i| {
            seen.push(i);
            if i == 1 {
                Flow::Wait
            } else {
                Flow::Next
            }
        });
        let r = pass.resume(|i| {
            seen.push(i);
            Flow::Next
        });
        assert_eq!(r, Some((Phase::ResponseHeaders, Step::Continue)));
        assert_eq!(seen, [1, 1, 0]);
    }

    #[test]
    fn one_live_socket_takes_the_deadline_and_the_first_close() {
        // session-binding joins first on the response (it runs before jwt-auth backwards).
        let mut live = None;
        join(&mut live, LiveSocket::new(u64::MAX));
        join(&mut live, LiveSocket::new(100));
        join(&mut live, LiveSocket::new(u64::MAX));
        let socket = live.as_mut().expect("joined");
        assert_eq!(socket.deadline(), 100);
        // A revocation (session-binding) and the expiry (jwt-auth) on the same chunk: one
        // close, the first asked for.
        socket.refuse("token revoked");
        assert!(!socket.expire(200, |_| None));
        let mut draws = 0;
        let frame = socket.frame(Dir::ToClient, || {
            draws += 1;
            [0; 4]
        });
        assert_eq!(
            frame,
            ChunkAction::Replace(crate::ws::close_frame(
                CLOSE_UNAUTHORIZED,
                "token revoked",
                None
            ))
        );
        // No random draw for a frame towards the client, one towards the upstream, then none.
        assert_eq!(draws, 0);
        assert!(matches!(
            socket.frame(Dir::ToUpstream, || {
                draws += 1;
                [1; 4]
            }),
            ChunkAction::Replace(_)
        ));
        assert_eq!(socket.frame(Dir::ToUpstream, || [2; 4]), ChunkAction::Drop);
        assert_eq!(socket.frame(Dir::ToClient, || [2; 4]), ChunkAction::Drop);
        assert_eq!(draws, 1);
    }
}
