//! Config errors and the one JSON entry point every filter's config goes through.

use serde::de::DeserializeOwned;
use std::fmt;

/// A config that cannot be loaded. `path` names the field (`providers[0].jwks.inline.keys[1].n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }

    /// Prefix the path with the field that contains it.
    pub fn within(mut self, outer: &str) -> Self {
        self.path = if self.path.is_empty() {
            outer.to_string()
        } else if self.path.starts_with('[') {
            format!("{outer}{}", self.path)
        } else {
            format!("{outer}.{}", self.path)
        };
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() || self.path == "." {
            write!(f, "config error: {}", self.message)
        } else {
            write!(f, "config error at {}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Parse a JSON config into raw serde structs (which deny unknown fields), keeping the path of
/// the offending field in the error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ConfigError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde_json appends " at line L column C"; keep it, it helps with long configs.
        ConfigError::new(
            if path == "." { String::new() } else { path },
            inner.to_string(),
        )
    })
}

/// Check what every periodic fetch from an Envoy cluster needs: a cluster, a path starting with
/// `/` and a refresh period of at least a second. Errors name the field under `at`
/// (`revocation.cluster`, `providers[0].jwks.remote.path`).
pub(crate) fn check_fetch(
    at: &str,
    cluster: &str,
    path: &str,
    refresh_seconds: u64,
) -> Result<(), ConfigError> {
    if cluster.is_empty() {
        return Err(ConfigError::new(
            format!("{at}.cluster"),
            "must not be empty",
        ));
    }
    if !path.starts_with('/') {
        return Err(ConfigError::new(
            format!("{at}.path"),
            "must start with `/`",
        ));
    }
    if refresh_seconds == 0 {
        return Err(ConfigError::new(
            format!("{at}.refresh_seconds"),
            "must be at least 1",
        ));
    }
    Ok(())
}

/// How a filter reads the Wasm VM's environment (secrets given as `…_env`): WASI `environ_get`
/// in the filters, Envoy's `host_env_keys` resolved by `gatehouse check`, a map in tests.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// A secret in a filter's config, as written: exactly one of `env` (an Envoy environment
/// variable the VM sees, see `host_env_keys`) or `value`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSecret {
    env: Option<String>,
    value: Option<String>,
}

impl RawSecret {
    /// The secret's bytes, at least `min_bytes` of them. Errors name the field `at` (and call
    /// the secret `what`), never its value.
    pub(crate) fn resolve(
        self,
        at: &str,
        env: EnvLookup<'_>,
        what: &str,
        min_bytes: usize,
    ) -> Result<Vec<u8>, ConfigError> {
        let value = match (self.env, self.value) {
            (Some(name), None) => env(&name).ok_or_else(|| {
                ConfigError::new(
                    format!("{at}.env"),
                    format!("environment variable {name} is not set for the VM (list it in vm_config.environment_variables.host_env_keys)"),
                )
            })?,
            (None, Some(v)) => v,
            _ => return Err(ConfigError::new(at, "give exactly one of `env` or `value`")),
        };
        if value.len() < min_bytes {
            return Err(ConfigError::new(
                at,
                format!("the {what} must be at least {min_bytes} bytes"),
            ));
        }
        Ok(value.into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        inner: Vec<Inner>,
    }
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        a: u32,
    }

    #[test]
    fn unknown_field_is_named_with_its_path() {
        let err = parse_json::<Outer>(br#"{"inner":[{"a":1},{"a":2,"b":3}]}"#).unwrap_err();
        assert_eq!(err.path, "inner[1].b");
        assert!(err.message.contains("unknown field `b`"), "{err}");
        assert!(err
            .to_string()
            .starts_with("config error at inner[1].b: unknown field"));
    }

    #[test]
    fn within_prefixes_paths() {
        let e = ConfigError::new("[1].n", "bad").within("keys");
        assert_eq!(e.path, "keys[1].n");
        let e = ConfigError::new("n", "bad").within("keys[0]");
        assert_eq!(e.path, "keys[0].n");
    }
}
