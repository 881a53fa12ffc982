//! End-to-end tests of the `gatehouse` binary: keys and tokens it makes must verify with the
//! filters' own verifier, and `check` must report what the filters would refuse at load.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use gatehouse_core::jwt::{Jws, KeySet, TokenTimes};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};

fn gatehouse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(args)
        .output()
        .expect("run gatehouse")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(args: &[&str]) -> String {
    let o = gatehouse(args);
    assert!(
        o.status.success(),
        "gatehouse {args:?} failed: {}\n{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn b64url_json(part: &str) -> Value {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// keygen, then mint, then verify with gatehouse-core's verifier, for one algorithm.
fn keygen_mint_verify(alg_arg: &str, alg: &str, kty: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("keys");
    let printed = ok(&["keygen", "--alg", alg_arg, "--out", out.to_str().unwrap()]);
    let private_path = out.join("private.jwk.json");
    let jwks_path = out.join("jwks.json");
    assert!(
        printed.contains(private_path.to_str().unwrap()),
        "{printed}"
    );
    assert!(printed.contains(jwks_path.to_str().unwrap()), "{printed}");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&private_path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "private key mode {mode:o}");
    }

    let private = read_json(&private_path);
    let jwks = read_json(&jwks_path);
    let public = &jwks["keys"][0];
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    assert_eq!(public["kty"], kty);
    assert_eq!(public["alg"], alg);
    assert_eq!(public["use"], "sig");
    let kid = public["kid"].as_str().unwrap().to_string();
    assert_eq!(
        kid.len(),
        16,
        "default kid is a 16-character thumbprint prefix"
    );
    assert_eq!(private["kid"], kid.as_str());
    assert_eq!(private["alg"], alg);
    assert!(private.get("d").is_some());
    assert!(
        public.get("d").is_none(),
        "the JWKS must not carry the private key"
    );
    for member in ["p", "q", "dp", "dq", "qi"] {
        assert!(public.get(member).is_none());
    }

    let now = 1_700_000_000u64;
    let token = ok(&[
        "mint",
        "--key",
        private_path.to_str().unwrap(),
        "--ttl",
        "120",
        "--iss",
        "https://gatehouse.test",
        "--aud",
        "gatehouse-demo",
        "--sub",
        "alice",
        "--claim",
        "scope=phone:call",
        "--claim",
        "level=3",
        "--claim",
        "roles=[\"a\",\"b\"]",
        "--now",
        &now.to_string(),
    ]);
    let token = token.trim();
    assert_eq!(token.split('.').count(), 3);

    let header = b64url_json(token.split('.').next().unwrap());
    assert_eq!(header, json!({"alg": alg, "typ": "JWT", "kid": kid}));

    let (keys, skipped) = KeySet::from_jwks(&jwks, true).unwrap();
    assert_eq!((keys.len(), skipped), (1, 0));
    let jws = Jws::parse(token, 8192).unwrap();
    assert_eq!(jws.alg.name(), alg);
    assert_eq!(jws.kid.as_deref(), Some(kid.as_str()));
    jws.verify(&keys).unwrap();

    let claims: Value = serde_json::from_slice(&jws.payload).unwrap();
    assert_eq!(
        claims,
        json!({
            "iat": now, "exp": now + 120,
            "iss": "https://gatehouse.test", "aud": "gatehouse-demo", "sub": "alice",
            "scope": "phone:call", "level": 3, "roles": ["a", "b"],
        })
    );
    let times = TokenTimes::read(claims.as_object().unwrap()).unwrap();
    assert!(times.check(now + 60, &Default::default()).is_ok());
    assert!(times.check(now + 120, &Default::default()).is_err());

    // A tampered payload must not verify.
    let mut parts: Vec<&str> = token.split('.').collect();
    let forged_payload = {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"sub":"mallory","exp":9999999999}"#)
    };
    parts[1] = &forged_payload;
    let forged = parts.join(".");
    assert!(Jws::parse(&forged, 8192).unwrap().verify(&keys).is_err());

    // The key directory works as --key too, and tokens differ in their claims.
    let other = ok(&["mint", "--key", out.to_str().unwrap(), "--sub", "bob"]);
    let jws = Jws::parse(other.trim(), 8192).unwrap();
    jws.verify(&keys).unwrap();
    let claims: Value = serde_json::from_slice(&jws.payload).unwrap();
    assert_eq!(claims["sub"], "bob");
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        300,
        "default ttl"
    );
}

#[test]
fn eddsa_keys_mint_tokens_the_core_verifies() {
    keygen_mint_verify("eddsa", "EdDSA", "OKP");
}

#[test]
fn es256_keys_mint_tokens_the_core_verifies() {
    keygen_mint_verify("es256", "ES256", "EC");
}

#[test]
fn rs256_keys_mint_tokens_the_core_verifies() {
    keygen_mint_verify("rs256", "RS256", "RSA");
}

#[test]
fn keygen_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    ok(&["keygen", "--alg", "eddsa", "--kid", "first", "--out", out]);
    let o = gatehouse(&["keygen", "--alg", "es256", "--out", out]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    let private = read_json(&dir.path().join("private.jwk.json"));
    assert_eq!(private["kid"], "first", "the existing key is untouched");

    ok(&[
        "keygen", "--alg", "es256", "--kid", "second", "--out", out, "--force",
    ]);
    let private = read_json(&dir.path().join("private.jwk.json"));
    assert_eq!(private["kid"], "second");
    assert_eq!(private["alg"], "ES256");
    let jwks = read_json(&dir.path().join("jwks.json"));
    assert_eq!(jwks["keys"][0]["kid"], "second");
}

#[test]
fn mint_header_overrides_and_expired_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    ok(&["keygen", "--alg", "eddsa", "--kid", "k1", "--out", out]);
    let token = ok(&[
        "mint", "--key", out, "--header", "kid=k2", "--claim", "exp=1", "--now", "100",
    ]);
    let header = b64url_json(token.split('.').next().unwrap());
    assert_eq!(header["kid"], "k2");
    let payload = b64url_json(token.trim().split('.').nth(1).unwrap());
    assert_eq!(payload, json!({"iat": 100, "exp": 1}));
    let jwks = read_json(&dir.path().join("jwks.json"));
    let (keys, _) = KeySet::from_jwks(&jwks, true).unwrap();
    assert!(
        Jws::parse(token.trim(), 8192)
            .unwrap()
            .verify(&keys)
            .is_err(),
        "no key k2"
    );
}

#[test]
fn mint_reports_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.json");
    let o = gatehouse(&["mint", "--key", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cannot read"), "{}", stderr(&o));

    let out = dir.path().to_str().unwrap();
    ok(&["keygen", "--alg", "eddsa", "--out", out]);
    let o = gatehouse(&["mint", "--key", out, "--claim", "no-equals-sign"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("name=value"), "{}", stderr(&o));

    let public = dir.path().join("jwks.json");
    let o = gatehouse(&["mint", "--key", public.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "a JWKS is not a private key");
}

const GOOD_JWT_AUTH: &str = r#"{
          "providers": [{
            "name": "local",
            "issuer": "https://gatehouse.local",
            "audiences": ["gatehouse-demo"],
            "jwks": {"remote": {"cluster": "demo", "path": "/.well-known/jwks.json"}}
          }],
          "rules": [{"match": {"prefix": "/public/"}, "allow_missing": true}]
        }"#;

const BAD_JWT_AUTH: &str = r#"{
          "providers": [{
            "name": "local",
            "issuer": "https://gatehouse.local",
            "bogus": true,
            "jwks": {"remote": {"cluster": "demo", "path": "/.well-known/jwks.json"}}
          }]
        }"#;

const TOKEN_PROXY: &str = r#"{"cookie_prefix": "gh", "encryption_keys": ["000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"]}"#;

fn indent(text: &str, spaces: usize) -> String {
    let pad = " ".repeat(spaces);
    text.lines()
        .map(|l| format!("{pad}{}", l.trim_start()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// An Envoy bootstrap with token-proxy, jwt-auth (configured with `jwt_auth_json`), another
/// Wasm filter and the router.
fn envoy_yaml(jwt_auth_json: &str) -> String {
    format!(
        r#"
static_resources:
  listeners:
  - name: main
    address:
      socket_address: {{ address: 0.0.0.0, port_value: 8080 }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          normalize_path: true
          merge_slashes: true
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: demo }}
                typed_per_filter_config:
                  gatehouse.jwt_auth:
                    "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig
                    disabled: true
          http_filters:
          - name: gatehouse.token_proxy
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: token_proxy
                root_id: token_proxy
                vm_config:
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: dist/token-proxy.wasm }} }}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{TOKEN_PROXY}'
          - name: gatehouse.jwt_auth
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: jwt_auth
                root_id: jwt_auth
                vm_config:
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: dist/jwt-auth.wasm }} }}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: |
{jwt_auth}
          - name: someone.else
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                root_id: add_header
                vm_config:
                  code: {{ local: {{ filename: dist/add-header.wasm }} }}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: demo
    type: STATIC
    load_assignment:
      cluster_name: demo
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: 9000 }}
"#,
        jwt_auth = indent(jwt_auth_json, 20),
    )
}

const HTTP_FILTERS: &str =
    "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters";

/// A temporary directory with `envoy.yaml` and, under `dist/`, the two gatehouse modules.
fn fixture(yaml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("envoy.yaml"), yaml).unwrap();
    std::fs::create_dir(dir.path().join("dist")).unwrap();
    for m in ["jwt-auth.wasm", "token-proxy.wasm"] {
        std::fs::write(dir.path().join("dist").join(m), b"\0asm").unwrap();
    }
    dir
}

#[test]
fn check_passes_a_good_config() {
    let dir = fixture(&envoy_yaml(GOOD_JWT_AUTH));
    let file = dir.path().join("envoy.yaml");
    let root = dir.path().to_str().unwrap();
    let o = gatehouse(&["check", file.to_str().unwrap(), "--root", root]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", stderr(&o));
    assert!(
        out.contains(&format!(
            "ok   gatehouse.token_proxy (root_id token_proxy) at {HTTP_FILTERS}[0]\n"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "ok   gatehouse.jwt_auth (root_id jwt_auth) at {HTTP_FILTERS}[1]\n"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "skip someone.else (root_id add_header) at {HTTP_FILTERS}[2]: skipped (not a gatehouse filter)"
        )),
        "{out}"
    );
    assert!(!out.contains("FAIL"), "{out}");
    assert!(
        !out.lines().any(|l| l.starts_with("warn ")),
        "the modules exist under --root: {out}"
    );
    assert!(out.contains("2 gatehouse filters: 2 ok, 0 failed"), "{out}");
}

#[test]
fn check_fails_an_unknown_field_with_its_path() {
    let dir = fixture(&envoy_yaml(BAD_JWT_AUTH));
    let file = dir.path().join("envoy.yaml");
    let root = dir.path().to_str().unwrap();
    let o = gatehouse(&["check", file.to_str().unwrap(), "--root", root]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{}", stderr(&o));
    let fail = out
        .lines()
        .find(|l| l.starts_with("FAIL "))
        .unwrap_or_else(|| panic!("no FAIL line in {out}"));
    assert!(
        fail.starts_with(&format!(
            "FAIL gatehouse.jwt_auth (root_id jwt_auth) at {HTTP_FILTERS}[1]: config error at providers[0].bogus: unknown field `bogus`"
        )),
        "{fail}"
    );
    assert!(out.contains("ok   gatehouse.token_proxy"), "{out}");
    assert!(out.contains("1 ok, 1 failed"), "{out}");
}

#[test]
fn check_warns_about_missing_modules_without_failing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("envoy.yaml");
    std::fs::write(&file, envoy_yaml(GOOD_JWT_AUTH)).unwrap();
    let o = gatehouse(&[
        "check",
        file.to_str().unwrap(),
        "--root",
        dir.path().to_str().unwrap(),
    ]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    let warns: Vec<&str> = out.lines().filter(|l| l.starts_with("warn ")).collect();
    assert_eq!(warns.len(), 2, "{out}");
    assert!(
        warns[1].contains("gatehouse.jwt_auth") && warns[1].contains("dist/jwt-auth.wasm"),
        "{out}"
    );
}

#[test]
fn check_reads_json_configs() {
    let doc = json!({"static_resources": {"listeners": [{"filter_chains": [{"filters": [{
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {"http_filters": [{
            "name": "gatehouse.jwt_auth",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "root_id": "jwt_auth",
                    "configuration": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": r#"{"providers":[{"name":"a","issuer":""}]}"#
                    }
                }
            }
        }]}
    }]}]}]}});
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("envoy.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let o = gatehouse(&["check", file.to_str().unwrap()]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("config error at providers[0].issuer: must not be empty"),
        "{out}"
    );
}

#[test]
fn check_exits_2_on_unreadable_or_unparsable_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.yaml");
    let o = gatehouse(&["check", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot read"), "{}", stderr(&o));

    let broken = dir.path().join("broken.yaml");
    std::fs::write(&broken, "static_resources: [unclosed\n  - : :").unwrap();
    let o = gatehouse(&["check", broken.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert!(stderr(&o).contains("not valid YAML"), "{}", stderr(&o));

    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, "{\"a\": ").unwrap();
    let o = gatehouse(&["check", broken.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not valid JSON"), "{}", stderr(&o));
}

#[test]
fn help_describes_every_subcommand() {
    let top = ok(&["--help"]);
    for sub in ["keygen", "mint", "check"] {
        assert!(top.contains(sub), "{top}");
        let help = ok(&[sub, "--help"]);
        assert!(help.len() > 200, "{sub}: {help}");
    }
    assert!(ok(&["keygen", "--help"]).contains("eddsa"));
    assert!(ok(&["check", "--help"]).contains("--root"));
}
