//! `gatehouse check`: find every Envoy Wasm HTTP filter in a config, and compile the
//! configuration of each gatehouse one with the very code the filter runs when Envoy loads it.
//!
//! The config is read as JSON or YAML and walked as a whole, so filters are found wherever
//! they are: listeners' HTTP connection managers, ECDS default configs, nested filter chains.

use crate::Error;
use gatehouse_core::jwt_auth::JwtAuthConfig;
use gatehouse_core::pipeline::{self, StageKind};
use gatehouse_core::token_proxy::{EnvLookup, TokenProxyConfig};
use gatehouse_core::ConfigError;
use serde_json::{Map, Value};
use std::fmt;
use std::path::{Path, PathBuf};

/// `@type` of an Envoy Wasm HTTP filter config.
pub const WASM_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
/// `@type` of the `configuration` wrapper gatehouse filters expect.
pub const STRING_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";
/// Also accepted by Envoy as plugin configuration; its `value` is base64.
pub const BYTES_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.BytesValue";

/// The gatehouse filters, by their `root_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterKind {
    JwtAuth,
    TokenProxy,
    TurnCredentials,
    SessionBinding,
    PageGuard,
    /// The one-pass filter: the stages its config names (`gatehouse_core::pipeline`).
    OnePass,
}

impl FilterKind {
    pub const ALL: [FilterKind; 6] = [
        FilterKind::OnePass,
        FilterKind::JwtAuth,
        FilterKind::TokenProxy,
        FilterKind::TurnCredentials,
        FilterKind::SessionBinding,
        FilterKind::PageGuard,
    ];

    /// The `root_id` the filter is configured with: `jwt_auth`, `token_proxy`.
    pub fn root_id(self) -> &'static str {
        match self {
            FilterKind::JwtAuth => "jwt_auth",
            FilterKind::TokenProxy => "token_proxy",
            FilterKind::TurnCredentials => "turn_credentials",
            FilterKind::SessionBinding => "session_binding",
            FilterKind::PageGuard => "page_guard",
            FilterKind::OnePass => "gatehouse",
        }
    }

    /// The filter a one-pass stage is.
    fn of_stage(stage: StageKind) -> Self {
        match stage {
            StageKind::TokenProxy => FilterKind::TokenProxy,
            StageKind::JwtAuth => FilterKind::JwtAuth,
            StageKind::SessionBinding => FilterKind::SessionBinding,
            StageKind::TurnCredentials => FilterKind::TurnCredentials,
            StageKind::PageGuard => FilterKind::PageGuard,
        }
    }

    /// Does a filter of this kind with `config` run page-guard (which holds response headers)?
    fn runs_page_guard(self, config: &[u8]) -> bool {
        match self {
            FilterKind::PageGuard => true,
            FilterKind::OnePass => pipeline::split(config)
                .is_ok_and(|one| one.stages.iter().any(|(k, _)| *k == StageKind::PageGuard)),
            _ => false,
        }
    }

    pub fn from_root_id(root_id: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.root_id() == root_id)
    }

    /// What a module holds, guessed from its file name: every filter (`gatehouse.wasm`, the
    /// root_id picks one) or one filter's own module (`jwt-auth.wasm`, `gatehouse_jwt_auth.wasm`,
    /// …).
    pub fn from_module(filename: &str) -> Option<Module> {
        let stem = Path::new(filename)
            .file_stem()?
            .to_string_lossy()
            .to_ascii_lowercase()
            .replace('-', "_");
        if stem == "gatehouse" {
            return Some(Module::Every);
        }
        Self::ALL
            .into_iter()
            .find(|k| stem == k.root_id() || stem.ends_with(&format!("_{}", k.root_id())))
            .map(Module::Only)
    }

    /// Compile `config` (the JSON in `configuration.value`) as the filter does at load. `env`
    /// stands for the Wasm VM's environment (token-proxy's `encryption_keys_env`). Returns the
    /// warnings about a config that loads but is weaker than it looks.
    pub fn compile(self, config: &[u8], env: EnvLookup<'_>) -> Result<Vec<String>, ConfigError> {
        match self {
            FilterKind::JwtAuth => JwtAuthConfig::compile(config).map(|c| jwt_auth_warnings(&c)),
            FilterKind::TokenProxy => TokenProxyConfig::compile(config, env).map(|_| Vec::new()),
            FilterKind::TurnCredentials => {
                gatehouse_core::turn::TurnConfig::compile(config, env).map(|_| Vec::new())
            }
            FilterKind::SessionBinding => {
                gatehouse_core::session_binding::SessionBindingConfig::compile_with_env(config, env)
                    .map(|_| Vec::new())
            }
            FilterKind::PageGuard => {
                gatehouse_core::page_guard::PageGuardConfig::compile(config, env)
                    .map(|_| Vec::new())
            }
            // Each stage compiled by its filter's own compiler, its errors under its key.
            FilterKind::OnePass => {
                let mut warnings = Vec::new();
                for (stage, bytes) in pipeline::split(config)?.stages {
                    let found = Self::of_stage(stage)
                        .compile(&bytes, env)
                        .map_err(|e| e.within(stage.key()))?;
                    warnings.extend(found.into_iter().map(|w| format!("{}: {w}", stage.key())));
                }
                Ok(warnings)
            }
        }
    }
}

/// What a jwt-auth config accepts that a reviewer should know about.
fn jwt_auth_warnings(config: &JwtAuthConfig) -> Vec<String> {
    config
        .providers
        .iter()
        .enumerate()
        .filter(|(_, p)| p.audiences.is_empty())
        .map(|(i, p)| {
            format!(
                "providers[{i}] ({}) has no `audiences`: any token its issuer signs is accepted, \
                 whatever service it was minted for (RFC 8725 §3.9); list this API's audience",
                p.name
            )
        })
        .collect()
}

/// What the connection manager around gatehouse filters should say about paths: gatehouse
/// refuses paths with dot-segments or encoded slashes, but Envoy routes on the path it
/// normalizes, so it must normalize the same way for every filter and the router.
fn connection_manager_warnings(hcm: &Map<String, Value>) -> Vec<String> {
    ["normalize_path", "merge_slashes"]
        .into_iter()
        .filter(|k| hcm.get(*k).and_then(Value::as_bool) != Some(true))
        .map(|k| {
            format!(
                "the HTTP connection manager has no `{k}: true`: set it so Envoy routes on the \
                 same clean path the filters match (docs/security.md#paths)"
            )
        })
        .collect()
}

/// What the check made of one Wasm filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A gatehouse filter whose configuration compiles.
    Ok,
    /// A gatehouse filter that would not load; the message names the field.
    Failed(String),
    /// A Wasm filter that is not gatehouse's.
    Skipped,
}

/// What a gatehouse module file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Module {
    /// `dist/gatehouse.wasm`: every filter, the plugin's `root_id` picks one.
    Every,
    /// One filter's own module (`dist/jwt-auth.wasm`, …).
    Only(FilterKind),
}

/// One Wasm filter found in the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The filter's `name` (e.g. `gatehouse.jwt_auth`), else the plugin's `config.name`.
    pub name: String,
    pub root_id: Option<String>,
    /// Where in the document: `static_resources.listeners[0]...http_filters[1]`.
    pub path: String,
    pub outcome: Outcome,
    /// Problems that do not stop the check, e.g. a module file that is not there.
    pub warnings: Vec<String>,
}

impl Finding {
    fn subject(&self) -> String {
        let root_id = match &self.root_id {
            Some(r) => format!("root_id {r}"),
            None => "no root_id".to_string(),
        };
        let at = if self.path.is_empty() {
            "(document root)"
        } else {
            &self.path
        };
        format!("{} ({root_id}) at {at}", self.name)
    }

    /// The report lines: `ok   …`, `FAIL …: <error>`, `skip …`, then one `warn …` per warning.
    pub fn report_lines(&self) -> Vec<String> {
        let subject = self.subject();
        let mut lines = vec![match &self.outcome {
            Outcome::Ok => format!("ok   {subject}"),
            Outcome::Failed(why) => format!("FAIL {subject}: {why}"),
            Outcome::Skipped => format!("skip {subject}: skipped (not a gatehouse filter)"),
        }];
        lines.extend(self.warnings.iter().map(|w| format!("warn {subject}: {w}")));
        lines
    }
}

/// Counts over a check's findings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub ok: usize,
    pub failed: usize,
    pub skipped: usize,
    pub warnings: usize,
}

impl Summary {
    pub fn of(findings: &[Finding]) -> Self {
        let mut s = Self::default();
        for f in findings {
            match f.outcome {
                Outcome::Ok => s.ok += 1,
                Outcome::Failed(_) => s.failed += 1,
                Outcome::Skipped => s.skipped += 1,
            }
            s.warnings += f.warnings.len();
        }
        s
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gatehouse = self.ok + self.failed;
        write!(
            f,
            "{gatehouse} gatehouse filter{}: {} ok, {} failed; {} other Wasm filter{} skipped; {} warning{}",
            if gatehouse == 1 { "" } else { "s" },
            self.ok,
            self.failed,
            self.skipped,
            if self.skipped == 1 { "" } else { "s" },
            self.warnings,
            if self.warnings == 1 { "" } else { "s" },
        )
    }
}

/// Read an Envoy config file: JSON for `.json`, YAML otherwise (YAML is a superset of JSON).
pub fn load_document(path: &Path) -> Result<Value, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::new(format!("cannot read {}: {e}", path.display())))?;
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    parse_document(&text, is_json).map_err(|e| Error::new(format!("{}: {e}", path.display())))
}

/// Parse an Envoy config given as text, as JSON or as YAML. YAML merge keys (`<<`) are
/// applied and, as Envoy does, mapping entries whose key is tagged `!ignore` are dropped.
pub fn parse_document(text: &str, json: bool) -> Result<Value, Error> {
    if json {
        return serde_json::from_str(text).map_err(|e| Error::new(format!("not valid JSON: {e}")));
    }
    let mut yaml: serde_norway::Value =
        serde_norway::from_str(text).map_err(|e| Error::new(format!("not valid YAML: {e}")))?;
    yaml.apply_merge()
        .map_err(|e| Error::new(format!("not valid YAML: {e}")))?;
    yaml_to_json(yaml)
}

fn is_ignore_tag(tag: &serde_norway::value::Tag) -> bool {
    tag.to_string().trim_start_matches('!') == "ignore"
}

fn yaml_to_json(v: serde_norway::Value) -> Result<Value, Error> {
    use serde_norway::Value as Y;
    Ok(match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                n.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map_or_else(|| Value::String(n.to_string()), Value::Number)
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(seq) => Value::Array(
            seq.into_iter()
                .map(yaml_to_json)
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Y::Mapping(mapping) => {
            let mut out = Map::new();
            for (k, v) in mapping {
                let key = match k {
                    Y::Tagged(t) if is_ignore_tag(&t.tag) => continue,
                    Y::Tagged(t) => yaml_key(t.value)?,
                    other => yaml_key(other)?,
                };
                out.insert(key, yaml_to_json(v)?);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => yaml_to_json(t.value)?,
    })
}

fn yaml_key(k: serde_norway::Value) -> Result<String, Error> {
    use serde_norway::Value as Y;
    match k {
        Y::String(s) => Ok(s),
        Y::Number(n) => Ok(n.to_string()),
        Y::Bool(b) => Ok(b.to_string()),
        Y::Null => Ok("null".to_string()),
        _ => Err(Error::new(
            "a mapping key is a list or a mapping; Envoy configs only use scalar keys",
        )),
    }
}

/// A Wasm filter config found in the document, with what holds it.
struct Found<'a> {
    wasm: &'a Map<String, Value>,
    /// The object whose member the Wasm config is (an `http_filters[i]` entry, usually).
    holder: Option<&'a Map<String, Value>>,
    /// The path to report: the holder's for a `typed_config`, else the config's own.
    path: String,
    /// The HTTP connection manager config whose `http_filters` hold the filter, if any.
    hcm: Option<&'a Map<String, Value>>,
}

fn child_path(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    match (path.is_empty(), plain) {
        (true, true) => key.to_string(),
        (false, true) => format!("{path}.{key}"),
        (_, false) => format!("{path}[{}]", Value::String(key.to_string())),
    }
}

fn is_wasm(v: &Value) -> bool {
    v.get("@type").and_then(Value::as_str) == Some(WASM_FILTER_TYPE)
}

fn walk<'a>(
    v: &'a Value,
    path: &str,
    holder: Option<(&'a Map<String, Value>, &str, &str)>,
    hcm: Option<&'a Map<String, Value>>,
    out: &mut Vec<Found<'a>>,
) {
    match v {
        Value::Object(obj) => {
            let hcm = if obj.contains_key("http_filters") {
                Some(obj)
            } else {
                hcm
            };
            if is_wasm(v) {
                let (holder_obj, report_path) = match holder {
                    Some((h, holder_path, "typed_config")) => (Some(h), holder_path.to_string()),
                    Some((h, _, _)) => (Some(h), path.to_string()),
                    None => (None, path.to_string()),
                };
                out.push(Found {
                    wasm: obj,
                    holder: holder_obj,
                    path: report_path,
                    hcm,
                });
            }
            for (k, child) in obj {
                walk(child, &child_path(path, k), Some((obj, path, k)), hcm, out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                walk(child, &format!("{path}[{i}]"), None, hcm, out);
            }
        }
        _ => {}
    }
}

fn str_at<'a>(v: Option<&'a Value>, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(v?, |v, k| v.get(k))
        .and_then(Value::as_str)
}

/// The plugin configuration bytes Envoy hands the filter.
fn configuration_bytes(config: Option<&Value>) -> Result<Vec<u8>, String> {
    let Some(c) = config.and_then(|c| c.get("configuration")) else {
        return Err(
            "config.configuration is missing (a gatehouse filter needs its JSON config there)"
                .to_string(),
        );
    };
    let ty = c.get("@type").and_then(Value::as_str);
    let value = c.get("value");
    match (ty, value) {
        (Some(STRING_VALUE_TYPE), None) => Ok(Vec::new()),
        (Some(STRING_VALUE_TYPE), Some(Value::String(s))) => Ok(s.as_bytes().to_vec()),
        (Some(BYTES_VALUE_TYPE), None) => Ok(Vec::new()),
        (Some(BYTES_VALUE_TYPE), Some(Value::String(s))) => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(s.trim())
                .map_err(|e| format!("config.configuration.value is not base64: {e}"))
        }
        (Some(STRING_VALUE_TYPE | BYTES_VALUE_TYPE), Some(_)) => {
            Err("config.configuration.value must be a string".to_string())
        }
        (Some(other), _) => Err(format!(
            "config.configuration is a {other}; gatehouse filters take a {STRING_VALUE_TYPE} holding JSON"
        )),
        (None, _) => Err(format!(
            "config.configuration needs \"@type\": {STRING_VALUE_TYPE} and a JSON string in `value`"
        )),
    }
}

/// Where a module file would be: relative paths under `root`; absolute ones under `root`
/// (as in a container image's root) and as they are.
fn module_candidates(root: &Path, filename: &str) -> Vec<PathBuf> {
    let p = Path::new(filename);
    match p.strip_prefix("/") {
        Ok(rel) => vec![root.join(rel), p.to_path_buf()],
        Err(_) => vec![root.join(p)],
    }
}

fn check_found(found: &Found<'_>, root: &Path) -> Finding {
    let wasm = found.wasm;
    let config = wasm.get("config");
    let root_id = str_at(config, &["root_id"])
        .filter(|r| !r.is_empty())
        .map(str::to_string);
    let module = str_at(config, &["vm_config", "code", "local", "filename"]);
    let name = found
        .holder
        .and_then(|h| h.get("name"))
        .and_then(Value::as_str)
        .or_else(|| str_at(config, &["name"]))
        .filter(|n| !n.is_empty())
        .unwrap_or("<unnamed>")
        .to_string();
    let mut warnings = Vec::new();
    let by_root_id = root_id.as_deref().and_then(FilterKind::from_root_id);
    let by_module = module.and_then(FilterKind::from_module);
    let kind = match (by_root_id, by_module) {
        (None, Some(Module::Every)) => {
            let known: Vec<&str> = FilterKind::ALL.iter().map(|k| k.root_id()).collect();
            return Finding {
                name,
                path: found.path.clone(),
                outcome: Outcome::Failed(format!(
                    "{} is not a filter of {} (known: {}); Envoy refuses it",
                    root_id
                        .as_deref()
                        .map_or("a missing root_id".to_string(), |r| format!(
                            "root_id `{r}`"
                        )),
                    module.unwrap_or_default(),
                    known.join(", ")
                )),
                root_id,
                warnings: Vec::new(),
            };
        }
        (Some(k), Some(Module::Only(m))) if k != m => {
            warnings.push(format!(
                "root_id {} but the module {} looks like {}",
                k.root_id(),
                module.unwrap_or_default(),
                m.root_id()
            ));
            Some(k)
        }
        (Some(k), _) => Some(k),
        (None, Some(Module::Only(m))) => {
            warnings.push(format!(
                "{} is not a gatehouse root_id, but the module {} is {}'s; checked as {}",
                root_id
                    .as_deref()
                    .map_or("a missing root_id".to_string(), |r| format!("`{r}`")),
                module.unwrap_or_default(),
                m.root_id(),
                m.root_id()
            ));
            Some(m)
        }
        (None, None) => None,
    };
    let Some(kind) = kind else {
        return Finding {
            name,
            root_id,
            path: found.path.clone(),
            outcome: Outcome::Skipped,
            warnings: Vec::new(),
        };
    };
    if let Some(filename) = module {
        let candidates = module_candidates(root, filename);
        if !candidates.iter().any(|c| c.is_file()) {
            let looked = candidates
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            warnings.push(format!(
                "module file {filename} not found (looked for {looked}); build it, or pass --root"
            ));
        }
    }
    if let Some(hcm) = found.hcm {
        warnings.extend(connection_manager_warnings(hcm));
    }
    let vm_env = VmEnvironment::of(config);
    let outcome = match configuration_bytes(config) {
        Err(why) => Outcome::Failed(why),
        Ok(bytes) => match kind.compile(&bytes, &|name| vm_env.lookup(name)) {
            // page-guard holds the response headers while it reads an HTML body; without this
            // Envoy turns that pause into "stop all" and never hands it the body.
            Ok(_)
                if kind.runs_page_guard(&bytes)
                    && config
                        .and_then(|c| c.get("allow_on_headers_stop_iteration"))
                        .and_then(Value::as_bool)
                        != Some(true) =>
            {
                Outcome::Failed(
                    "page_guard needs `allow_on_headers_stop_iteration: true` in the Wasm \
                     plugin config (next to root_id): without it Envoy never passes it an HTML \
                     body and those responses hang"
                        .to_string(),
                )
            }
            Ok(config_warnings) => {
                warnings.extend(config_warnings);
                Outcome::Ok
            }
            Err(e) => Outcome::Failed(e.to_string()),
        },
    };
    warnings.extend(vm_env.unresolved.into_inner().into_iter().map(|name| {
        format!(
            "environment variable {name} is not set here; Envoy passes it to the VM \
             (vm_config.environment_variables.host_env_keys) and the filter checks its value \
             at load. Set it here to check the value too"
        )
    }));
    Finding {
        name,
        root_id,
        path: found.path.clone(),
        outcome,
        warnings,
    }
}

/// The environment Envoy gives a filter's Wasm VM: `vm_config.environment_variables`
/// `key_values` as written, `host_env_keys` from Envoy's own environment. Here, the host is
/// this process; a host variable that is not set here resolves to a placeholder key (so the
/// rest of the config is still checked) and is reported as a warning.
struct VmEnvironment {
    key_values: Map<String, Value>,
    host_env_keys: Vec<String>,
    unresolved: std::cell::RefCell<Vec<String>>,
}

/// A well-formed stand-in for a key list that only Envoy's environment holds.
const PLACEHOLDER_KEYS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

impl VmEnvironment {
    fn of(config: Option<&Value>) -> Self {
        let envs = config
            .and_then(|c| c.get("vm_config"))
            .and_then(|v| v.get("environment_variables"));
        let key_values = envs
            .and_then(|e| e.get("key_values"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let host_env_keys = envs
            .and_then(|e| e.get("host_env_keys"))
            .and_then(Value::as_array)
            .map(|keys| {
                keys.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        Self {
            key_values,
            host_env_keys,
            unresolved: std::cell::RefCell::new(Vec::new()),
        }
    }

    fn lookup(&self, name: &str) -> Option<String> {
        if let Some(v) = self.key_values.get(name) {
            return v.as_str().map(str::to_string);
        }
        if !self.host_env_keys.iter().any(|k| k == name) {
            return None;
        }
        match std::env::var(name) {
            Ok(v) => Some(v),
            Err(_) => {
                self.unresolved.borrow_mut().push(name.to_string());
                Some(PLACEHOLDER_KEYS.to_string())
            }
        }
    }
}

/// Check every Wasm HTTP filter in `doc`, in document order. `root` is the directory module
/// files are looked up under.
pub fn check_document(doc: &Value, root: &Path) -> Vec<Finding> {
    let mut found = Vec::new();
    walk(doc, "", None, None, &mut found);
    found.iter().map(|f| check_found(f, root)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(name: &str, root_id: &str, configuration: Value) -> Value {
        serde_json::json!({
            "name": name,
            "typed_config": {
                "@type": WASM_FILTER_TYPE,
                "config": {
                    "root_id": root_id,
                    "vm_config": {"code": {"local": {"filename": "/nonexistent/m.wasm"}}},
                    "configuration": configuration,
                }
            }
        })
    }

    fn string_value(s: &str) -> Value {
        serde_json::json!({"@type": STRING_VALUE_TYPE, "value": s})
    }

    const TOKEN_PROXY: &str = r#"{"cookie_prefix":"gh","encryption_keys":["000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"]}"#;

    #[test]
    fn finds_filters_anywhere_and_compiles_them() {
        let doc = serde_json::json!({
            "static_resources": {"listeners": [{"filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {"normalize_path": true, "merge_slashes": true, "http_filters": [
                    filter("gatehouse.token_proxy", "token_proxy", string_value(TOKEN_PROXY)),
                    filter("gatehouse.jwt_auth", "jwt_auth", string_value(r#"{"providers":[]}"#)),
                    filter("other", "something_else", string_value("{}")),
                    {"name": "envoy.filters.http.router"}
                ]}
            }]}]}]}
        });
        let findings = check_document(&doc, Path::new("."));
        assert_eq!(findings.len(), 3);
        let base = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config";
        assert_eq!(findings[0].path, format!("{base}.http_filters[0]"));
        assert_eq!(findings[0].outcome, Outcome::Ok);
        assert_eq!(findings[0].warnings.len(), 1, "{:?}", findings[0].warnings);
        assert_eq!(findings[1].name, "gatehouse.jwt_auth");
        assert_eq!(
            findings[1].outcome,
            Outcome::Failed(
                "config error at providers: at least one provider is required".to_string()
            )
        );
        assert_eq!(findings[2].outcome, Outcome::Skipped);
        assert!(findings[2].warnings.is_empty());
        assert_eq!(
            Summary::of(&findings),
            Summary {
                ok: 1,
                failed: 1,
                skipped: 1,
                warnings: 2
            }
        );
    }

    #[test]
    fn checks_the_one_pass_filter_stage_by_stage() {
        let one = |value: &str| serde_json::json!({"http_filters": [filter("gatehouse", "gatehouse", string_value(value))]});
        let ok = format!(r#"{{"token_proxy": {TOKEN_PROXY}}}"#);
        let findings = check_document(&one(&ok), Path::new("."));
        assert_eq!(findings[0].outcome, Outcome::Ok);
        let findings = check_document(&one(r#"{"jwt_auth": {"providers": []}}"#), Path::new("."));
        assert_eq!(
            findings[0].outcome,
            Outcome::Failed(
                "config error at jwt_auth.providers: at least one provider is required".to_string()
            )
        );
        let findings = check_document(&one(r#"{"jwt_authn": {}}"#), Path::new("."));
        assert!(
            matches!(&findings[0].outcome, Outcome::Failed(m) if m.contains("at jwt_authn: unknown stage")),
            "{:?}",
            findings[0].outcome
        );
    }

    #[test]
    fn warns_of_unnormalized_paths_and_of_providers_without_audiences() {
        let jwt = |audiences: &str| {
            string_value(&format!(
                r#"{{"providers":[{{"name":"idp","issuer":"https://idp","audiences":{audiences},
                   "hs256_secrets":[{{"secret_base64url":"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"}}]}}]}}"#
            ))
        };
        let doc = |hcm_extra: Value, audiences: &str| {
            let mut hcm =
                serde_json::json!({"http_filters": [filter("j", "jwt_auth", jwt(audiences))]});
            if let (Some(h), Value::Object(extra)) = (hcm.as_object_mut(), hcm_extra) {
                h.extend(extra);
            }
            serde_json::json!({"filters": [{"typed_config": hcm}]})
        };
        let warnings = |d: &Value| {
            let f = check_document(d, Path::new(".")).remove(0);
            assert_eq!(f.outcome, Outcome::Ok);
            f.warnings
                .into_iter()
                .filter(|w| !w.starts_with("module file"))
                .collect::<Vec<_>>()
        };
        let w = warnings(&doc(serde_json::json!({}), r#"["api"]"#));
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("`normalize_path: true`") && w[1].contains("`merge_slashes: true`"));
        let clean = serde_json::json!({"normalize_path": true, "merge_slashes": true});
        assert!(warnings(&doc(clean.clone(), r#"["api"]"#)).is_empty());
        let w = warnings(&doc(clean, "[]"));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("providers[0] (idp) has no `audiences`"),
            "{w:?}"
        );
    }

    #[test]
    fn configuration_must_be_a_string_value() {
        let doc = filter(
            "f",
            "token_proxy",
            serde_json::json!({"@type": "x", "value": "{}"}),
        );
        let f = &check_document(&doc, Path::new("."))[0];
        assert!(matches!(&f.outcome, Outcome::Failed(m) if m.contains("StringValue")));
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(TOKEN_PROXY);
        let doc = filter(
            "f",
            "token_proxy",
            serde_json::json!({"@type": BYTES_VALUE_TYPE, "value": b64}),
        );
        assert_eq!(check_document(&doc, Path::new("."))[0].outcome, Outcome::Ok);
    }

    #[test]
    fn the_one_module_checks_each_filter_by_root_id_and_refuses_an_unknown_one() {
        let in_one_module = |root_id: &str, configuration: &str| {
            let mut f = filter("f", root_id, string_value(configuration));
            f["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] =
                "dist/gatehouse.wasm".into();
            check_document(&f, Path::new(".")).remove(0)
        };
        let ok = in_one_module("token_proxy", TOKEN_PROXY);
        assert_eq!(ok.outcome, Outcome::Ok);
        assert!(
            !ok.warnings.iter().any(|w| w.contains("looks like")),
            "{:?}",
            ok.warnings
        );
        assert_eq!(
            in_one_module("token_proxi", TOKEN_PROXY).outcome,
            Outcome::Failed(
                "root_id `token_proxi` is not a filter of dist/gatehouse.wasm (known: gatehouse, \
                 jwt_auth, token_proxy, turn_credentials, session_binding, page_guard); Envoy \
                 refuses it"
                    .to_string()
            )
        );
    }

    #[test]
    fn module_names_identify_filters() {
        assert_eq!(
            FilterKind::from_module("/etc/envoy/jwt-auth.wasm"),
            Some(Module::Only(FilterKind::JwtAuth))
        );
        assert_eq!(
            FilterKind::from_module("gatehouse_token_proxy.wasm"),
            Some(Module::Only(FilterKind::TokenProxy))
        );
        assert_eq!(
            FilterKind::from_module("dist/gatehouse.wasm"),
            Some(Module::Every)
        );
        assert_eq!(FilterKind::from_module("not_jwt_authx.wasm"), None);
    }

    #[test]
    fn yaml_merge_keys_and_ignore_tags() {
        let doc = parse_document(
            "!ignore x: &base {a: 1}\ny:\n  <<: *base\n  b: \"two\"\n  3: c\n",
            false,
        )
        .unwrap();
        assert_eq!(
            doc,
            serde_json::json!({"y": {"a": 1, "b": "two", "3": "c"}})
        );
    }

    #[test]
    fn keys_that_are_not_identifiers_are_quoted_in_paths() {
        assert_eq!(
            child_path("a", "gatehouse.jwt_auth"),
            "a[\"gatehouse.jwt_auth\"]"
        );
        assert_eq!(child_path("", "static_resources"), "static_resources");
    }

    fn token_proxy_with_env(environment_variables: Value, var: &str) -> Value {
        let mut f = filter(
            "gatehouse.token_proxy",
            "token_proxy",
            string_value(&format!(
                r#"{{"cookie_prefix":"gh","encryption_keys_env":"{var}"}}"#
            )),
        );
        f["typed_config"]["config"]["vm_config"]["environment_variables"] = environment_variables;
        f
    }

    #[test]
    fn keys_from_the_vm_environment() {
        // Listed for the VM but not set here: checked with a placeholder, and a warning says so.
        let doc = token_proxy_with_env(
            serde_json::json!({"host_env_keys": ["GATEHOUSE_TEST_UNSET_COOKIE_KEYS"]}),
            "GATEHOUSE_TEST_UNSET_COOKIE_KEYS",
        );
        let f = &check_document(&doc, Path::new("."))[0];
        assert_eq!(f.outcome, Outcome::Ok);
        assert!(
            f.warnings
                .iter()
                .any(|w| w.contains("GATEHOUSE_TEST_UNSET_COOKIE_KEYS is not set here")),
            "{:?}",
            f.warnings
        );
        // Not given to the VM at all: Envoy would never pass it, so the filter would not load.
        let doc = token_proxy_with_env(serde_json::json!({}), "GATEHOUSE_TEST_UNSET_COOKIE_KEYS");
        let f = &check_document(&doc, Path::new("."))[0];
        assert!(
            matches!(&f.outcome, Outcome::Failed(m)
                if m.starts_with("config error at encryption_keys_env: environment variable GATEHOUSE_TEST_UNSET_COOKIE_KEYS is not set in the Wasm VM")),
            "{:?}",
            f.outcome
        );
        // Set here (PATH always is): its value is checked, and never printed.
        let doc = token_proxy_with_env(serde_json::json!({"host_env_keys": ["PATH"]}), "PATH");
        let f = &check_document(&doc, Path::new("."))[0];
        assert!(
            matches!(&f.outcome, Outcome::Failed(m)
                if m.contains("environment variable PATH: key 1 of") && !m.contains("/usr")),
            "{:?}",
            f.outcome
        );
        // key_values are the VM's environment as written.
        let key = "00".repeat(32);
        let doc = token_proxy_with_env(serde_json::json!({"key_values": {"K": key}}), "K");
        assert_eq!(check_document(&doc, Path::new("."))[0].outcome, Outcome::Ok);
    }
}
