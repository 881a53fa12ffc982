//! `cargo xtask up`: the local stack as processes — the demo upstream and Envoy in front of it,
//! configured by `envoy-config/envoy.yaml` (the same file docker-compose.yml mounts).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::tools;

const DEMO_ADDR: &str = "127.0.0.1:8081";
const ENVOY_ADDR: &str = "127.0.0.1:8080";
const ADMIN_ADDR: &str = "127.0.0.1:9901";

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

pub fn up() -> Result<(), String> {
    tools::build()?;
    tools::venv()?;
    let envoy = tools::envoy()?;
    let root = tools::root();

    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .map_err(|e| format!("Ctrl-C handler: {e}"))?;

    let mut started = Started(Vec::new());
    let demo = Command::new(root.join("target/release/gatehouse-demo"))
        .current_dir(&root)
        .env("GATEHOUSE_DEMO_ADDR", DEMO_ADDR)
        .env("GATEHOUSE_KEYS_DIR", root.join(".local/keys"))
        .spawn()
        .map_err(|e| format!("cannot start the demo: {e}"))?;
    started.0.push(("demo", demo));
    wait_http(DEMO_ADDR, "/healthz", &stop, &mut started)?;

    let envoy = Command::new(envoy)
        .current_dir(&root)
        .args(["-c", "envoy-config/envoy.yaml", "--log-level", "info"])
        .spawn()
        .map_err(|e| format!("cannot start Envoy: {e}"))?;
    started.0.push(("envoy", envoy));
    wait_http(ADMIN_ADDR, "/ready", &stop, &mut started)?;

    println!();
    println!("  gatehouse local stack is up");
    println!("  phone page        http://{ENVOY_ADDR}/");
    println!("  echo API          http://{ENVOY_ADDR}/api/echo   (needs a token)");
    println!(
        "  signaling socket  ws://{ENVOY_ADDR}/ws/echo      (token in Sec-WebSocket-Protocol)"
    );
    println!("  dev login         curl -X POST http://{ENVOY_ADDR}/dev/login");
    println!("  Envoy admin       http://{ADMIN_ADDR}/stats?filter=gatehouse");
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
