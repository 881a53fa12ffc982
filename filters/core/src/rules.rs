//! Rule selection, shared by every filter with `rules` (jwt-auth, session-binding, page-guard).
//!
//! A rule's `match` is one of `route` (Envoy's route name), `prefix` (of `:path`) or `host`
//! (`:authority` without its port); the first matching rule wins. Paths with dot-segments or
//! encoded slashes are refused before any match ([`crate::path::check`]): [`Rules::select`] is
//! the only way to match, and it returns the refusal, so no filter can match an unchecked path.

use crate::config::ConfigError;
use crate::path::{self, PathError};
use serde::Deserialize;

/// A rule's `match`, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(crate) enum RawMatch {
    Route(String),
    Prefix(String),
    Host(String),
}

impl RawMatch {
    /// The matcher of the rule at `rule` (`rules[2]`), for error paths.
    pub(crate) fn compile(self, rule: &str) -> Result<Matcher, ConfigError> {
        Ok(match self {
            RawMatch::Route(s) if !s.is_empty() => Matcher::Route(s),
            RawMatch::Prefix(s) if s.starts_with('/') => Matcher::Prefix(s),
            RawMatch::Host(s) if !s.is_empty() => Matcher::Host(s.to_ascii_lowercase()),
            RawMatch::Prefix(_) => {
                return Err(ConfigError::new(
                    format!("{rule}.match.prefix"),
                    "must start with `/`",
                ))
            }
            _ => {
                return Err(ConfigError::new(
                    format!("{rule}.match"),
                    "must not be empty",
                ))
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    Route(String),
    Prefix(String),
    /// Lowercase, without a port.
    Host(String),
}

impl Matcher {
    /// Does a request on Envoy route `route`, `:path` `path` and `:authority` `host` match?
    /// The host is compared without its port. The path is not checked here: see
    /// [`Rules::select`].
    fn matches(&self, route: Option<&str>, path: &str, host: &str) -> bool {
        let host = host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        });
        match self {
            Matcher::Route(name) => route == Some(name.as_str()),
            Matcher::Prefix(p) => path.starts_with(p.as_str()),
            Matcher::Host(h) => host.eq_ignore_ascii_case(h),
        }
    }
}

/// Which request facts a filter's config looks at: a filter reads only these, since every host
/// call costs about a microsecond inside V8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// Envoy's route name (a rule matches by `route`).
    pub route_name: bool,
    /// `:authority` (a rule matches by `host`).
    pub host: bool,
    /// `Cookie` (jwt-auth: a cookie is a token source).
    pub cookie: bool,
}

/// A filter's rules, in config order, each with what it applies (`T`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules<T> {
    rules: Vec<(Matcher, T)>,
}

impl<T> Rules<T> {
    pub fn new(rules: Vec<(Matcher, T)>) -> Self {
        Self { rules }
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// What each rule applies, in order.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.rules.iter().map(|(_, t)| t)
    }

    /// What the rule at `index` (from [`Self::select`]) applies.
    pub fn get(&self, index: usize) -> Option<&T> {
        self.rules.get(index).map(|(_, t)| t)
    }

    /// The request facts matching these rules needs (`cookie` is the filter's to set).
    pub fn needs(&self) -> Needs {
        let mut needs = Needs {
            route_name: false,
            host: false,
            cookie: false,
        };
        for (m, _) in &self.rules {
            needs.route_name |= matches!(m, Matcher::Route(_));
            needs.host |= matches!(m, Matcher::Host(_));
        }
        needs
    }

    /// The first rule matching a request on Envoy route `route`, `:path` `path`, `:authority`
    /// `host`: its index and what it applies; `Ok(None)` when none matches. A path with a
    /// dot-segment or a hidden separator is refused before any rule looks at it (`/public/../api`
    /// must not match `/public`), whether or not a rule would match it.
    pub fn select(
        &self,
        route: Option<&str>,
        path: &str,
        host: &str,
    ) -> Result<Option<(usize, &T)>, PathError> {
        path::check(path)?;
        Ok(self
            .rules
            .iter()
            .enumerate()
            .find(|(_, (m, _))| m.matches(route, path, host))
            .map(|(i, (_, t))| (i, t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules<&'static str> {
        Rules::new(vec![
            (Matcher::Route("admin".into()), "route"),
            (Matcher::Host("api.example".into()), "host"),
            (Matcher::Prefix("/public".into()), "public"),
            (Matcher::Prefix("/".into()), "root"),
        ])
    }

    fn pick(
        route: Option<&str>,
        path: &str,
        host: &str,
    ) -> Result<Option<&'static str>, PathError> {
        let r = rules();
        r.select(route, path, host).map(|s| s.map(|(_, v)| *v))
    }

    #[test]
    fn the_first_matching_rule_wins() {
        assert_eq!(
            pick(Some("admin"), "/public/x", "api.example"),
            Ok(Some("route"))
        );
        assert_eq!(
            pick(None, "/public/x", "API.example:8443"),
            Ok(Some("host"))
        );
        assert_eq!(pick(None, "/public/x", "other"), Ok(Some("public")));
        assert_eq!(pick(None, "/api", "other"), Ok(Some("root")));
        let r = rules();
        assert_eq!(
            r.select(None, "/public", "x").map(|s| s.map(|(i, _)| i)),
            Ok(Some(2))
        );
        let none: Rules<()> = Rules::new(vec![(Matcher::Prefix("/a".into()), ())]);
        assert_eq!(none.select(None, "/b", "x"), Ok(None));
    }

    #[test]
    fn a_port_is_not_part_of_the_host_but_a_non_numeric_suffix_is() {
        assert_eq!(pick(None, "/x", "api.example:80"), Ok(Some("host")));
        assert_eq!(pick(None, "/x", "api.example:evil"), Ok(Some("root")));
    }

    #[test]
    fn a_walking_path_is_refused_before_any_rule_matches() {
        // It would match `/public` (and `/`): refused all the same, and with no rule at all.
        assert_eq!(
            pick(None, "/public/../api", "x"),
            Err(PathError::DotSegment)
        );
        assert_eq!(
            pick(Some("admin"), "/a%2fb", "x"),
            Err(PathError::HiddenSeparator)
        );
        let empty: Rules<()> = Rules::new(Vec::new());
        assert_eq!(
            empty.select(None, "/%2e%2e/x", "x"),
            Err(PathError::DotSegment)
        );
        assert_eq!(empty.select(None, "/x", "x"), Ok(None));
    }

    #[test]
    fn needs_follow_the_matchers() {
        let n = rules().needs();
        assert!(n.route_name && n.host && !n.cookie);
        let prefixes: Rules<()> = Rules::new(vec![(Matcher::Prefix("/a".into()), ())]);
        let n = prefixes.needs();
        assert!(!n.route_name && !n.host && !n.cookie);
    }

    #[test]
    fn matchers_compile_with_the_field_path_in_errors() {
        let m = RawMatch::Host("API.Example".into()).compile("rules[0]");
        assert_eq!(m.ok(), Some(Matcher::Host("api.example".into())));
        let e = RawMatch::Prefix("api".into()).compile("rules[1]").err();
        assert_eq!(
            e.map(|e| e.to_string().contains("rules[1].match.prefix")),
            Some(true)
        );
        let e = RawMatch::Route(String::new()).compile("rules[2]").err();
        assert_eq!(
            e.map(|e| e.to_string().contains("rules[2].match")),
            Some(true)
        );
    }
}
