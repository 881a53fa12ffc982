//! What `gatehouse check` prints per route: for each route of each HTTP connection manager
//! with an inline `route_config`, which gatehouse filters run on it and which of their `rules`
//! apply (what a reviewer of a config change wants to see).
//!
//! A one-pass filter (`root_id: gatehouse`) is listed stage by stage. A filter is off on a
//! route whose `typed_per_filter_config` disables it (by the filter's name), a stage where the
//! one-pass filter's `off` names it. Otherwise its first matching rule decides (the filters' rules are first-match-wins,
//! `match` is one of `route`, `prefix`, `host`; see docs/jwt-auth.md#rules): a rule applies to
//! every request of the route when it must match them all (`route` equal to the route's name, a
//! `prefix` the route's own prefix or path starts with, a `host` that is the virtual host's only
//! domain), to some when it may match some of them, and then the next rules are listed too.

use serde_json::{Map, Value};

/// The JSON configuration of a Wasm filter (`{}` when it has none or is not JSON: the filter
/// check reports that).
fn config_of(filter: &Map<String, Value>) -> Value {
    let text = filter
        .get("typed_config")
        .and_then(|t| t.get("config"))
        .and_then(|c| c.get("configuration"))
        .and_then(|c| c.get("value"))
        .and_then(Value::as_str)
        .unwrap_or("{}");
    serde_json::from_str::<Value>(text).unwrap_or(Value::Null)
}

fn rules_in(config: &Value) -> Vec<Value> {
    config
        .get("rules")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// One filter, or one stage of a one-pass filter, as listed per route.
struct Listed<'a> {
    /// The filter's or stage's root_id.
    label: String,
    /// The Envoy filter's name (what `typed_per_filter_config` disables).
    filter_name: &'a str,
    rules: Vec<Value>,
    /// The one-pass filter's `off` matches naming this stage.
    off: Vec<Value>,
}

/// The gatehouse filters of an HTTP filter chain; a one-pass filter (`root_id: gatehouse`)
/// is listed stage by stage, in its stage order.
fn listed(filter: &Map<String, Value>) -> Vec<Listed<'_>> {
    let Some(name) = filter.get("name").and_then(Value::as_str) else {
        return Vec::new();
    };
    let Some(root_id) = filter
        .get("typed_config")
        .and_then(|t| t.get("config"))
        .and_then(|c| c.get("root_id"))
        .and_then(Value::as_str)
    else {
        return Vec::new();
    };
    let config = config_of(filter);
    let kind = crate::check::FilterKind::from_root_id(root_id);
    if kind == Some(crate::check::FilterKind::OnePass) {
        let off: Vec<&Value> = config
            .get("off")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .collect();
        return gatehouse_core::pipeline::StageKind::ORDER
            .iter()
            .map(|k| k.key())
            .filter_map(|stage| {
                let stage_config = config.get(stage)?;
                Some(Listed {
                    label: stage.to_string(),
                    filter_name: name,
                    rules: rules_in(stage_config),
                    off: off
                        .iter()
                        .filter(|o| {
                            o.get("stages")
                                .and_then(Value::as_array)
                                .is_some_and(|s| s.iter().any(|n| n.as_str() == Some(stage)))
                        })
                        .filter_map(|o| o.get("match").cloned())
                        .collect(),
                })
            })
            .collect();
    }
    if kind.is_none() {
        return Vec::new();
    }
    vec![Listed {
        label: root_id.to_string(),
        filter_name: name,
        rules: rules_in(&config),
        off: Vec::new(),
    }]
}

#[derive(Debug, PartialEq, Eq)]
enum Applies {
    All,
    Some,
    None,
}

/// Whether rule `m` (its `match`) matches the requests of a route.
fn applies(m: &Value, route_name: Option<&str>, route_match: &Value, domains: &[&str]) -> Applies {
    if let Some(name) = m.get("route").and_then(Value::as_str) {
        return if Some(name) == route_name {
            Applies::All
        } else {
            Applies::None
        };
    }
    if let Some(prefix) = m.get("prefix").and_then(Value::as_str) {
        let own = route_match
            .get("prefix")
            .or_else(|| route_match.get("path"))
            .or_else(|| route_match.get("path_separated_prefix"))
            .and_then(Value::as_str);
        return match own {
            Some(own) if own.starts_with(prefix) => Applies::All,
            // A longer rule prefix under a route prefix: some of the route's paths.
            Some(own) if route_match.get("path").is_none() && prefix.starts_with(own) => {
                Applies::Some
            }
            Some(_) => Applies::None,
            // A regex or another matcher: cannot tell.
            None => Applies::Some,
        };
    }
    if let Some(host) = m.get("host").and_then(Value::as_str) {
        return match domains {
            [only] if only.eq_ignore_ascii_case(host) => Applies::All,
            _ if domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(host) || d.contains('*')) =>
            {
                Applies::Some
            }
            _ => Applies::None,
        };
    }
    Applies::None
}

fn describe_match(m: &Value) -> String {
    match m.as_object().and_then(|o| o.iter().next()) {
        Some((k, v)) => format!("{k} {}", v.as_str().map_or(v.to_string(), str::to_string)),
        None => "?".into(),
    }
}

fn disabled_on(route: &Value, filter_name: &str) -> bool {
    route
        .get("typed_per_filter_config")
        .and_then(|t| t.get(filter_name))
        .and_then(|c| c.get("disabled"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// The per-route lines for one connection manager's routes.
fn report_hcm(hcm: &Map<String, Value>, lines: &mut Vec<String>) {
    let filters: Vec<Listed<'_>> = hcm
        .get("http_filters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .flat_map(listed)
        .collect();
    if filters.is_empty() {
        return;
    }
    let Some(route_config) = hcm.get("route_config") else {
        lines.push(format!(
            "routes of connection manager {}: not inline (RDS), not listed",
            hcm.get("stat_prefix")
                .and_then(Value::as_str)
                .unwrap_or("?")
        ));
        return;
    };
    let width = filters.iter().map(|f| f.label.len()).max().unwrap_or(0);
    for vhost in route_config
        .get("virtual_hosts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let domains: Vec<&str> = vhost
            .get("domains")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let vhost_name = vhost.get("name").and_then(Value::as_str).unwrap_or("?");
        for route in vhost
            .get("routes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = route.get("name").and_then(Value::as_str);
            let route_match = route.get("match").cloned().unwrap_or(Value::Null);
            lines.push(format!(
                "route {} (virtual host {vhost_name}, {}):",
                name.unwrap_or("<unnamed>"),
                describe_match(&route_match)
            ));
            for f in &filters {
                let off = f
                    .off
                    .iter()
                    .map(|m| applies(m, name, &route_match, &domains))
                    .find(|a| *a != Applies::None);
                let what = if disabled_on(route, f.filter_name) {
                    "off (typed_per_filter_config disabled)".to_string()
                } else if off == Some(Applies::All) {
                    "off (the one-pass filter's `off`)".to_string()
                } else {
                    let mut parts = Vec::new();
                    if off == Some(Applies::Some) {
                        parts.push("off on some paths (the one-pass filter's `off`)".to_string());
                    }
                    let mut decided = false;
                    for (i, rule) in f.rules.iter().enumerate() {
                        let m = rule.get("match").cloned().unwrap_or(Value::Null);
                        let off = rule.get("disabled").and_then(Value::as_bool) == Some(true);
                        let label = format!(
                            "rules[{i}] ({}){}",
                            describe_match(&m),
                            if off { ": off" } else { "" }
                        );
                        match applies(&m, name, &route_match, &domains) {
                            Applies::All => {
                                parts.push(label);
                                decided = true;
                                break;
                            }
                            Applies::Some => parts.push(format!("{label} on some paths")),
                            Applies::None => {}
                        }
                    }
                    if !decided {
                        parts.push("defaults".into());
                    }
                    parts.join(", else ")
                };
                lines.push(format!("  {:<width$}  {what}", f.label));
            }
        }
    }
}

fn walk<'a>(v: &'a Value, out: &mut Vec<&'a Map<String, Value>>) {
    match v {
        Value::Object(obj) => {
            if obj.contains_key("http_filters") {
                out.push(obj);
            }
            obj.values().for_each(|c| walk(c, out));
        }
        Value::Array(items) => items.iter().for_each(|c| walk(c, out)),
        _ => {}
    }
}

/// For every route of every connection manager in `doc` that runs gatehouse filters: one line
/// naming the route, then one line per filter saying whether it is off or which rule applies.
pub fn route_report(doc: &Value) -> Vec<String> {
    let mut hcms = Vec::new();
    walk(doc, &mut hcms);
    let mut lines = Vec::new();
    for hcm in hcms {
        report_hcm(hcm, &mut lines);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> Value {
        let text = include_str!("../../envoy-config/envoy.yaml");
        crate::check::parse_document(text, false).unwrap()
    }

    fn block<'a>(lines: &'a [String], route: &str) -> Vec<&'a str> {
        let start = lines
            .iter()
            .position(|l| l.starts_with(&format!("route {route} ")))
            .unwrap();
        lines[start + 1..]
            .iter()
            .take_while(|l| l.starts_with("  "))
            .map(|l| l.as_str())
            .collect()
    }

    fn line_of<'a>(block: &[&'a str], root_id: &str) -> &'a str {
        block
            .iter()
            .find(|l| l.trim_start().starts_with(root_id))
            .unwrap()
            .trim_start()
            .trim_start_matches(root_id)
            .trim()
    }

    #[test]
    fn the_shipped_config_lists_every_route_with_each_filter() {
        let lines = route_report(&shipped());
        for route in [
            "dev",
            "jwks",
            "signaling",
            "api",
            "turn-credentials",
            "static",
        ] {
            let b = block(&lines, route);
            assert_eq!(b.len(), 5, "{route}: {b:?}");
        }
        let signaling = block(&lines, "signaling");
        assert_eq!(
            line_of(&signaling, "token_proxy"),
            "off (the one-pass filter's `off`)"
        );
        assert_eq!(
            line_of(&signaling, "jwt_auth"),
            "rules[1] (route signaling)"
        );
        assert_eq!(
            line_of(&signaling, "session_binding"),
            "rules[1] (route signaling)"
        );
        assert_eq!(
            line_of(&signaling, "page_guard"),
            "rules[1] (route signaling): off"
        );
        let api = block(&lines, "api");
        assert_eq!(line_of(&api, "token_proxy"), "defaults");
        assert_eq!(line_of(&api, "jwt_auth"), "rules[2] (route api)");
        // session-binding's catch-all `prefix /` rule turns it off on the page routes.
        let page = block(&lines, "static");
        assert_eq!(
            line_of(&page, "session_binding"),
            "rules[4] (prefix /): off"
        );
        assert_eq!(
            line_of(&page, "jwt_auth"),
            "off (the one-pass filter's `off`)"
        );
    }

    #[test]
    fn prefix_and_host_rules_apply_to_all_some_or_none_of_a_route() {
        let route = |m: Value| m;
        let all = ["app.example.com"];
        assert_eq!(
            applies(
                &serde_json::json!({"prefix": "/api/"}),
                None,
                &route(serde_json::json!({"prefix": "/api/v1/"})),
                &all
            ),
            Applies::All
        );
        assert_eq!(
            applies(
                &serde_json::json!({"prefix": "/api/admin"}),
                None,
                &route(serde_json::json!({"prefix": "/api/"})),
                &all
            ),
            Applies::Some
        );
        assert_eq!(
            applies(
                &serde_json::json!({"prefix": "/api/admin"}),
                None,
                &route(serde_json::json!({"path": "/api/"})),
                &all
            ),
            Applies::None
        );
        assert_eq!(
            applies(
                &serde_json::json!({"prefix": "/ws/"}),
                None,
                &route(serde_json::json!({"safe_regex": {"regex": ".*"}})),
                &all
            ),
            Applies::Some
        );
        assert_eq!(
            applies(
                &serde_json::json!({"host": "app.example.com"}),
                None,
                &route(serde_json::json!({"prefix": "/"})),
                &all
            ),
            Applies::All
        );
        assert_eq!(
            applies(
                &serde_json::json!({"host": "app.example.com"}),
                None,
                &route(serde_json::json!({"prefix": "/"})),
                &["*"]
            ),
            Applies::Some
        );
        assert_eq!(
            applies(
                &serde_json::json!({"route": "api"}),
                Some("web"),
                &route(serde_json::json!({"prefix": "/"})),
                &all
            ),
            Applies::None
        );
    }

    #[test]
    fn a_rule_on_some_paths_lists_what_applies_to_the_others() {
        let doc = serde_json::json!({"http_filters": [{
            "name": "gatehouse.jwt_auth",
            "typed_config": {"config": {"root_id": "jwt_auth", "configuration": {"value":
                r#"{"rules": [{"match": {"prefix": "/api/admin"}, "require": []}, {"match": {"prefix": "/api/"}, "allow_missing": true}]}"#}}}
        }], "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
            {"name": "api", "match": {"prefix": "/api/"}}]}]}});
        let lines = route_report(&doc);
        assert_eq!(lines[0], "route api (virtual host v, prefix /api/):");
        assert_eq!(
            lines[1].trim(),
            "jwt_auth  rules[0] (prefix /api/admin) on some paths, else rules[1] (prefix /api/)"
        );
    }
}
