//! `cargo xtask up`: the local stack as processes — the demo upstream and Envoy in front of it,
//! configured by `envoy-config/envoy.yaml` (the same file docker-compose.yml mounts). Both get
//! the login cookies' key in `GATEHOUSE_COOKIE_KEYS`: the demo encrypts with it, token-proxy
//! in Envoy decrypts with it. Envoy's turn-credentials signs with `GATEHOUSE_TURN_SECRET`, the
//! `static-auth-secret` of the coturn started here. Kamailio (`envoy-config/kamailio/kamailio.cfg`)
//! takes SIP over WebSocket behind Envoy's `/ws/sip`. Envoy's HTTPS listener gets a certificate
//! signed by a local CA, both generated on first run into `.local/tls/`.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::tools;

const DEMO_ADDR: &str = "127.0.0.1:8081";
const ENVOY_ADDR: &str = "127.0.0.1:8080";
const ADMIN_ADDR: &str = "127.0.0.1:9901";
const TLS_ORIGIN: &str = "https://127.0.0.1:8443";
/// Where envoy.yaml's `kamailio` cluster points (kamailio.cfg's default `WS_LISTEN`).
const KAMAILIO_ADDR: &str = "127.0.0.1:8082";
const KAMAILIO_CFG: &str = "envoy-config/kamailio/kamailio.cfg";
/// envoy.yaml's turn-credentials `urls`.
const TURN_PORT: u16 = 3478;
/// The HTTPS listener's certificate and key, as PEM text in Envoy's environment.
const TLS_CERT_VAR: &str = "GATEHOUSE_TLS_CERT";
const TLS_KEY_VAR: &str = "GATEHOUSE_TLS_KEY";
const ENVOY_PORT: u16 = 8080;
const ADMIN_PORT: u16 = 9901;
/// The HTTPS listener (`ingress_tls`); replica i listens on TLS_PORT + 10·i.
const TLS_PORT: u16 = 8443;
/// etcd for the fleet state (envoy.yaml's `etcd` cluster and session-binding's `store`).
const ETCD_CLIENT: &str = "127.0.0.1:2379";
const ETCD_PEER: &str = "http://127.0.0.1:2380";
/// The login cookies' AES-256 keys, for the demo (encrypts) and Envoy's token-proxy (decrypts):
/// 64 hex characters each, comma-separated, current first. Never in a committed file.
const COOKIE_KEYS_VAR: &str = "GATEHOUSE_COOKIE_KEYS";
const COOKIE_KEYS_FILE: &str = "cookie-keys";
/// The TURN REST API secret turn-credentials signs with (coturn's `static-auth-secret`).
const TURN_SECRET_VAR: &str = "GATEHOUSE_TURN_SECRET";
const TURN_SECRET_FILE: &str = "turn-secret";

/// Kills what it started when dropped, whatever way `up` ends.
struct Started(Vec<(&'static str, Child)>);

impl Drop for Started {
    fn drop(&mut self) {
        for (name, child) in self.0.iter_mut().rev() {
            if let Ok(None) = child.try_wait() {
                println!("xtask: stopping {name} (pid {})", child.id());
                // SIGTERM first so Envoy and the demo shut down cleanly, then make sure.
                let _ = Command::new("kill").arg(child.id().to_string()).status();
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    sleep(Duration::from_millis(100));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

pub fn up(args: &[String]) -> Result<(), String> {
    let replicas = parse_replicas(args)?;
    tools::ensure_system_packages()?;
    tools::build()?;
    tools::venv()?;
    let envoy = tools::envoy()?;
    let root = tools::root();

    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .map_err(|e| format!("Ctrl-C handler: {e}"))?;

    let keys_dir = root.join(".local/keys");
    let cookie_keys = local_secret(&keys_dir, COOKIE_KEYS_VAR, COOKIE_KEYS_FILE)?;
    let turn_secret = local_secret(&keys_dir, TURN_SECRET_VAR, TURN_SECRET_FILE)?;

    let (tls_cert, tls_key) = local_tls(&root.join(".local/tls"))?;

    let mut started = Started(Vec::new());
    started
        .0
        .push(("coturn", start_coturn(&root, &turn_secret)?));
    started.0.push(("kamailio", start_kamailio(&root)?));
    let demo = Command::new(root.join("target/release/gatehouse-demo"))
        .current_dir(&root)
        .env("GATEHOUSE_DEMO_ADDR", DEMO_ADDR)
        .env("GATEHOUSE_KEYS_DIR", &keys_dir)
        .env(COOKIE_KEYS_VAR, &cookie_keys)
        .spawn()
        .map_err(|e| format!("cannot start the demo: {e}"))?;
    started.0.push(("demo", demo));
    wait_http(DEMO_ADDR, "/healthz", &stop, &mut started)?;
    start_etcd(&root, &stop, &mut started)?;

    for i in 0..replicas {
        let config = replica_config(&root, i)?;
        let envoy = Command::new(&envoy)
            .current_dir(&root)
            .args([
                "-c",
                &config,
                "--log-level",
                "info",
                "--use-dynamic-base-id",
            ])
            .env(COOKIE_KEYS_VAR, &cookie_keys)
            .env(TURN_SECRET_VAR, &turn_secret)
            .env(TLS_CERT_VAR, &tls_cert)
            .env(TLS_KEY_VAR, &tls_key)
            .spawn()
            .map_err(|e| format!("cannot start Envoy: {e}"))?;
        started.0.push(("envoy", envoy));
        let admin = format!("127.0.0.1:{}", ADMIN_PORT + 10 * i);
        wait_http(&admin, "/ready", &stop, &mut started)?;
    }
    if TcpStream::connect(KAMAILIO_ADDR).is_err() {
        return Err(format!("Kamailio is not listening on {KAMAILIO_ADDR}"));
    }

    println!();
    println!("  gatehouse local stack is up");
    println!("  phone (HTTPS)     {TLS_ORIGIN}/   (SIP over wss:// to Kamailio, media via coturn)");
    println!("                    trust the local CA once: .local/tls/ca.pem (or click through the warning)");
    println!("  plain HTTP        http://{ENVOY_ADDR}/    (curl and local tools; ws://…/ws/echo; /ws/sip is wss-only)");
    println!(
        "  echo API          http://{ENVOY_ADDR}/api/echo   (needs a token, or the login cookies)"
    );
    println!(
        "  signaling socket  ws://{ENVOY_ADDR}/ws/echo      (a fresh token in Sec-WebSocket-Protocol + the login's __Host-gh-sid cookie)"
    );
    println!("  dev login         curl -X POST http://{ENVOY_ADDR}/dev/login");
    println!("  Envoy admin       http://{ADMIN_ADDR}/stats?filter=gatehouse");
    println!("  TURN credentials  curl -X POST http://{ENVOY_ADDR}/turn-credentials -H 'origin: http://{ENVOY_ADDR}' -H 'authorization: Bearer …'");
    println!("  Kamailio          ws://{KAMAILIO_ADDR} (behind {TLS_ORIGIN}/ws/sip), coturn turn:127.0.0.1:{TURN_PORT}");
    print_replicas(replicas);
    println!("  secrets           {COOKIE_KEYS_VAR}, {TURN_SECRET_VAR} from .local/keys/ (or your environment)");
    println!("  Ctrl-C stops everything started here.");
    println!();

    while !stop.load(Ordering::SeqCst) {
        if let Some(name) = exited(&mut started) {
            return Err(format!("{name} exited; stopping the stack"));
        }
        sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// A secret of the local stack: the variable `var` when set, else `keys_dir/<file>`, generated
/// on first run (32 random bytes as hex, mode 0600; the folder is git-ignored).
fn local_secret(keys_dir: &Path, var: &str, file: &str) -> Result<String, String> {
    if let Ok(keys) = std::env::var(var) {
        println!("xtask: {var} from the environment");
        return Ok(keys);
    }
    let file = keys_dir.join(file);
    if file.exists() {
        let keys = fs::read_to_string(&file)
            .map_err(|e| format!("{}: {e}", file.display()))?
            .trim()
            .to_owned();
        if keys.is_empty() {
            return Err(format!(
                "{} is empty: delete it to generate a new key",
                file.display()
            ));
        }
        return Ok(keys);
    }
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| format!("no randomness for {var}: {e}"))?;
    let keys: String = key.iter().map(|b| format!("{b:02x}")).collect();
    fs::create_dir_all(keys_dir).map_err(|e| format!("{}: {e}", keys_dir.display()))?;
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(&file)
        .and_then(|mut f| writeln!(f, "{keys}"))
        .map_err(|e| format!("{}: {e}", file.display()))?;
    println!("xtask: generated {var} into {}", file.display());
    Ok(keys)
}

fn exited(started: &mut Started) -> Option<&'static str> {
    started
        .0
        .iter_mut()
        .find_map(|(name, child)| (!matches!(child.try_wait(), Ok(None))).then_some(*name))
}

/// Polls `GET path` on `addr` until it answers 200.
fn wait_http(
    addr: &str,
    path: &str,
    stop: &AtomicBool,
    started: &mut Started,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
        if let Some(name) = exited(started) {
            return Err(format!("{name} exited while starting"));
        }
        if http_ok(addr, path) {
            return Ok(());
        }
        sleep(Duration::from_millis(200));
    }
    Err(format!("http://{addr}{path} did not answer 200 in time"))
}

fn http_ok(addr: &str, path: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// The HTTPS listener's certificate chain and key (PEM): `dir/server.pem` and
/// `dir/server-key.pem`, signed by the local CA `dir/ca.pem`, all generated on first run (the
/// folder is git-ignored; the CA's key is not kept, so it signs nothing else).
fn local_tls(dir: &Path) -> Result<(String, String), String> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let (cert_file, key_file) = (dir.join("server.pem"), dir.join("server-key.pem"));
    if cert_file.exists() && key_file.exists() {
        let read = |f: &Path| fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()));
        return Ok((read(&cert_file)?, read(&key_file)?));
    }
    let fail = |e: rcgen::Error| format!("cannot generate the local TLS certificate: {e}");
    let ca_key = KeyPair::generate().map_err(fail)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "gatehouse local stack CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(fail)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().map_err(fail)?;
    let mut server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .map_err(fail)?;
    server
        .distinguished_name
        .push(DnType::CommonName, "gatehouse local stack");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = server.signed_by(&key, &issuer).map_err(fail)?;
    let chain = format!("{}{}", cert.pem(), ca_cert.pem());
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    write_private(&dir.join("ca.pem"), &ca_cert.pem())?;
    write_private(&cert_file, &chain)?;
    write_private(&key_file, &key.serialize_pem())?;
    println!(
        "xtask: generated a local CA and a certificate for 127.0.0.1 and localhost into {}",
        dir.display()
    );
    Ok((chain, key.serialize_pem()))
}

/// Writes a new file readable by its owner only.
fn write_private(file: &Path, text: &str) -> Result<(), String> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(file)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("{}: {e}", file.display()))
}

/// coturn on 127.0.0.1:3478 with `use-auth-secret`: it accepts the TURN REST credentials
/// turn-credentials mints with the same secret, and nothing else. Its config (with the secret)
/// is written to `.local/coturn/turnserver.conf`, mode 0600, never on a command line.
fn start_coturn(root: &Path, secret: &str) -> Result<Child, String> {
    let dir = root.join(".local/coturn");
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let conf = dir.join("turnserver.conf");
    let lines = [
        "listening-ip=127.0.0.1".to_owned(),
        "relay-ip=127.0.0.1".to_owned(),
        format!("listening-port={TURN_PORT}"),
        "min-port=49160".to_owned(),
        "max-port=49200".to_owned(),
        "use-auth-secret".to_owned(),
        format!("static-auth-secret={secret}"),
        "realm=gatehouse.local".to_owned(),
        "fingerprint".to_owned(),
        "no-tls".to_owned(),
        "no-dtls".to_owned(),
        "no-cli".to_owned(),
        // The local stack's browsers and relays are all on loopback.
        "allow-loopback-peers".to_owned(),
        "log-file=stdout".to_owned(),
        "simple-log".to_owned(),
        format!("pidfile={}", dir.join("turnserver.pid").display()),
        format!("userdb={}", dir.join("turndb").display()),
        String::new(),
    ];
    write_private(&conf, &lines.join("\n"))?;
    Command::new("turnserver")
        .arg("-c")
        .arg(&conf)
        .spawn()
        .map_err(|e| format!("cannot start coturn (turnserver): {e}"))
}

/// Kamailio in the foreground with the shipped config (SIP over WebSocket on 127.0.0.1:8082).
fn start_kamailio(root: &Path) -> Result<Child, String> {
    let run = root.join(".local/kamailio");
    fs::create_dir_all(&run).map_err(|e| format!("{}: {e}", run.display()))?;
    Command::new("kamailio")
        .current_dir(root)
        .args(["-f", KAMAILIO_CFG, "-DD", "-E", "-Y"])
        .arg(&run)
        .arg("-P")
        .arg(run.join("kamailio.pid"))
        .spawn()
        .map_err(|e| format!("cannot start Kamailio: {e}"))
}

// ------------------------------------------------------------------------------ fleet (etcd)

/// `--replicas N` (default 1, at most 50).
fn parse_replicas(args: &[String]) -> Result<u16, String> {
    match args {
        [] => Ok(1),
        [flag, n] if flag == "--replicas" => n
            .parse::<u16>()
            .ok()
            .filter(|n| (1..=50).contains(n))
            .ok_or_else(|| format!("--replicas {n}: expected a number from 1 to 50")),
        _ => Err("usage: cargo xtask up [--replicas N]".into()),
    }
}

/// A real etcd (Debian `etcd-server`), one member, its data in the git-ignored `.local/etcd`.
fn start_etcd(root: &Path, stop: &AtomicBool, started: &mut Started) -> Result<(), String> {
    tools::need_program("etcd", "apt-get install etcd-server")?;
    let data = root.join(".local/etcd");
    fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
    let log = fs::File::create(root.join(".local/etcd.log"))
        .map_err(|e| format!(".local/etcd.log: {e}"))?;
    let client = format!("http://{ETCD_CLIENT}");
    let etcd = Command::new("etcd")
        .current_dir(root)
        .args(["--name", "local", "--data-dir"])
        .arg(&data)
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            ETCD_PEER,
            "--initial-advertise-peer-urls",
            ETCD_PEER,
        ])
        .args(["--initial-cluster", &format!("local={ETCD_PEER}")])
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start etcd: {e}"))?;
    started.0.push(("etcd", etcd));
    wait_http(ETCD_CLIENT, "/health", stop, started)
}

/// Replica `i`'s config: envoy-config/envoy.yaml itself for 0, else a copy in `.local/` on
/// 8080+10·i (its origins too) with its admin on 9901+10·i.
fn replica_config(root: &Path, i: u16) -> Result<String, String> {
    const SHIPPED: &str = "envoy-config/envoy.yaml";
    if i == 0 {
        return Ok(SHIPPED.into());
    }
    let text = fs::read_to_string(root.join(SHIPPED)).map_err(|e| format!("{SHIPPED}: {e}"))?;
    let (port, admin, tls) = (ENVOY_PORT + 10 * i, ADMIN_PORT + 10 * i, TLS_PORT + 10 * i);
    let text = text
        .replace(
            &format!("port_value: {TLS_PORT}"),
            &format!("port_value: {tls}"),
        )
        .replace(&format!(":{TLS_PORT}\""), &format!(":{tls}\""))
        .replace(
            &format!("port_value: {ENVOY_PORT}"),
            &format!("port_value: {port}"),
        )
        .replace(
            &format!("port_value: {ADMIN_PORT}"),
            &format!("port_value: {admin}"),
        )
        .replace(&format!(":{ENVOY_PORT}\""), &format!(":{port}\""));
    let path = format!(".local/envoy-replica-{i}.yaml");
    fs::write(root.join(&path), text).map_err(|e| format!("{path}: {e}"))?;
    Ok(path)
}

fn print_replicas(replicas: u16) {
    println!("  etcd              http://{ETCD_CLIENT}   (fleet state; data in .local/etcd)");
    for i in 1..replicas {
        println!(
            "  replica {i}         http://127.0.0.1:{}/   https://127.0.0.1:{}/   admin http://127.0.0.1:{}/",
            ENVOY_PORT + 10 * i,
            TLS_PORT + 10 * i,
            ADMIN_PORT + 10 * i
        );
    }
}

#[cfg(test)]
mod tests {
    use super::local_tls;

    #[test]
    fn the_local_certificate_is_made_once_and_then_reused() {
        let dir = std::env::temp_dir().join(format!("gatehouse-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = local_tls(&dir);
        let again = local_tls(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        let (chain, key) = first.unwrap();
        let reread = again.unwrap();
        // The server certificate, then the CA that signed it; a PKCS#8 key.
        assert_eq!(chain.matches("-----BEGIN CERTIFICATE-----").count(), 2);
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(reread, (chain, key));
    }
}
