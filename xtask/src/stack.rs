//! `cargo xtask up`: the local stack as processes — the demo upstream and Envoy in front of it,
//! configured by `envoy-config/envoy.yaml` (the same file docker-compose.yml mounts). Both get
//! the login cookies' key in `GATEHOUSE_COOKIE_KEYS`: the demo encrypts with it, token-proxy
//! in Envoy decrypts with it. Envoy's turn-credentials signs with `GATEHOUSE_TURN_SECRET`.

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
const ENVOY_PORT: u16 = 8080;
const ADMIN_PORT: u16 = 9901;
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

    let mut started = Started(Vec::new());
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
            .spawn()
            .map_err(|e| format!("cannot start Envoy: {e}"))?;
        started.0.push(("envoy", envoy));
        let admin = format!("127.0.0.1:{}", ADMIN_PORT + 10 * i);
        wait_http(&admin, "/ready", &stop, &mut started)?;
    }

    println!();
    println!("  gatehouse local stack is up");
    println!("  phone page        http://{ENVOY_ADDR}/");
    println!(
        "  echo API          http://{ENVOY_ADDR}/api/echo   (needs a token, or the login cookies)"
    );
    println!(
        "  signaling socket  ws://{ENVOY_ADDR}/ws/echo      (a fresh token in Sec-WebSocket-Protocol + the login's __Host-gh-sid cookie)"
    );
    println!("  dev login         curl -X POST http://{ENVOY_ADDR}/dev/login");
    println!("  Envoy admin       http://{ADMIN_ADDR}/stats?filter=gatehouse");
    println!("  TURN credentials  curl -X POST http://{ENVOY_ADDR}/turn-credentials -H 'origin: http://{ENVOY_ADDR}' -H 'authorization: Bearer …'");
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
    let (port, admin) = (ENVOY_PORT + 10 * i, ADMIN_PORT + 10 * i);
    let text = text
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
            "  replica {i}         http://127.0.0.1:{}/   admin http://127.0.0.1:{}/",
            ENVOY_PORT + 10 * i,
            ADMIN_PORT + 10 * i
        );
    }
}
