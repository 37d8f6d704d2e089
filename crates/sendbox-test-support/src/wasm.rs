//! Builds the plugin components the tests run: the example plugins in
//! `plugins/` and the hostile ones in `tests/plugins/` (Rust with cargo,
//! Python with componentize-py, JavaScript with componentize-js).
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

/// The componentize-py the tests build Python plugins with:
/// `SENDBOX_COMPONENTIZE_PY`, else the pinned one `./scripts/test.sh`
/// installs (`~/.cache/sendbox-python`), else `componentize-py` on the
/// `PATH`.
pub fn componentize_py() -> PathBuf {
    if let Some(p) = std::env::var_os("SENDBOX_COMPONENTIZE_PY") {
        return PathBuf::from(p);
    }
    if let Some(home) = std::env::var_os("HOME") {
        let pinned = PathBuf::from(home).join(".cache/sendbox-python/bin/componentize-py");
        if pinned.is_file() {
            return pinned;
        }
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("componentize-py"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "componentize-py is needed to build the Python plugins: `pip install componentize-py==0.25.1` \
             (./scripts/test.sh installs it), or set SENDBOX_COMPONENTIZE_PY to its path"
        )
    })
}

/// Path of a Python plugin's component, built from `<dir>/app.py` (`dir`
/// relative to the repository, e.g. `plugins/webhook-bridge-py`) with the
/// Python PDK in `sdk/python`, against `wit/sendbox.wit`.
pub fn python(dir: &str) -> PathBuf {
    let root = repo_root();
    built_from(
        dir,
        "py",
        &root.join("sdk/python/sendbox_pdk"),
        |src, out| {
            let mut c = Command::new(componentize_py());
            c.arg("-d")
                .arg(root.join("wit"))
                .args(["-w", "hook", "componentize", "app", "-p"])
                .arg(src)
                .arg("-p")
                .arg(root.join("sdk/python"))
                .arg("-o")
                .arg(out);
            c
        },
    )
}

/// The componentize-js the tests build JavaScript plugins with:
/// `SENDBOX_COMPONENTIZE_JS`, else the one `tests/toolchains` pins
/// (`npm ci --prefix tests/toolchains`, which `./scripts/test.sh` runs).
pub fn componentize_js() -> PathBuf {
    if let Some(p) = std::env::var_os("SENDBOX_COMPONENTIZE_JS") {
        return PathBuf::from(p);
    }
    let pinned = repo_root().join("tests/toolchains/node_modules/.bin/componentize-js");
    if !pinned.is_file() {
        panic!(
            "componentize-js is needed to build the JavaScript plugins: `npm ci --prefix tests/toolchains` \
             (./scripts/test.sh runs it), or set SENDBOX_COMPONENTIZE_JS to its path"
        );
    }
    pinned
}

/// Path of a JavaScript plugin's component, built from `<dir>/app.js`
/// with the JavaScript PDK (`sdk/js/sendbox-pdk.js`) copied beside it,
/// against `wit/sendbox.wit`, without HTTP (a plugin has no network).
pub fn javascript(dir: &str) -> PathBuf {
    let root = repo_root();
    built_from(dir, "js", &root.join("sdk/js"), |src, out| {
        // componentize-js reads modules only under the source's folder: the
        // app and the SDK go into one.
        let stage = out.with_extension("src");
        let _ = std::fs::remove_dir_all(&stage);
        std::fs::create_dir_all(&stage).expect("a staging folder");
        for from in [src.join("app.js"), root.join("sdk/js/sendbox-pdk.js")] {
            let name = from.file_name().expect("a file");
            std::fs::copy(&from, stage.join(name)).expect("the sources can be staged");
        }
        let mut c = Command::new(componentize_js());
        c.current_dir(&stage)
            .arg("app.js")
            .arg("--wit")
            .arg(root.join("wit"))
            .args(["-n", "hook", "-d", "http", "fetch-event", "-o"])
            .arg(out);
        c
    })
}

/// Builds `<dir>`'s component with `command(source folder, output)` once
/// per change of its sources (`ext` files in `dir` and `sdk`, and the WIT):
/// the output is kept with a hash of them.
fn built_from(
    dir: &str,
    ext: &str,
    sdk: &Path,
    command: impl FnOnce(&Path, &Path) -> Command,
) -> PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let root = repo_root();
    let src = root.join(dir);
    let name = src
        .file_name()
        .expect("a folder")
        .to_string_lossy()
        .into_owned();
    let out_dir = wasm_target_dir().join(ext);
    std::fs::create_dir_all(&out_dir).expect("the build folder can be made");
    let out = out_dir.join(format!("{name}.wasm"));
    let stamp = out_dir.join(format!("{name}.sources"));
    let mut sources = String::new();
    for folder in [src.as_path(), sdk] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
            .expect("the plugin's folder exists")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == ext))
            .collect();
        files.sort();
        for f in files {
            sources.push_str(&std::fs::read_to_string(&f).expect("readable source"));
        }
    }
    sources.push_str(&std::fs::read_to_string(root.join("wit/sendbox.wit")).expect("the WIT"));
    let digest = format!("{:x}", fnv1a(&sources));
    if out.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == digest) {
        return out;
    }
    let tmp = out_dir.join(format!("{name}.{}.tmp.wasm", std::process::id()));
    let result = command(&src, &tmp)
        .output()
        .unwrap_or_else(|e| panic!("the {ext} toolchain cannot be started: {e}"));
    if !result.status.success() {
        panic!(
            "building {dir} failed:\n{}{}",
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        );
    }
    std::fs::rename(&tmp, &out).expect("the component can be moved in place");
    std::fs::write(&stamp, digest).expect("the stamp can be written");
    out
}

/// A 64-bit FNV-1a hash: enough to tell sources apart, no dependency.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}
