//! Builds the plugin components the tests run: the example plugins in
//! `plugins/` and the hostile ones in `tests/plugins/`.
//!
//! Tests use real `.wasm` components built from source, never checked-in
//! binaries. A missing `wasm32-wasip2` target fails the test loudly with the
//! command that fixes it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root exists")
}

/// Where plugin builds go: beside the host build, in their own target dir so
/// the nested cargo never waits on the outer one's lock.
pub fn wasm_target_dir() -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    base.join("wasm-plugins")
}

fn build(workspace: &str) -> PathBuf {
    let manifest = repo_root().join(workspace).join("Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(wasm_target_dir())
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("cargo can be started");
    if !out.status.success() {
        panic!(
            "building {workspace} for wasm32-wasip2 failed (is the target installed? \
             `rustup target add wasm32-wasip2`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wasm_target_dir().join("wasm32-wasip2/release")
}

/// Path of an example plugin's component, e.g. `example("file-alert")`.
pub fn example(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| build("plugins"));
    dir.join(format!("{}.wasm", name.replace('-', "_")))
}

/// Path of a hostile test plugin's component, e.g. `hostile("hostile-tcp")`.
pub fn hostile(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| build("tests/plugins"));
    dir.join(format!("{}.wasm", name.replace('-', "_")))
}
