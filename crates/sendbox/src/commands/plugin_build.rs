//! `sendbox plugin build [DIR]`: builds a plugin folder into a component
//! with its language's toolchain — cargo for Rust (`Cargo.toml`),
//! componentize-py for Python (`app.py`), componentize-js for JavaScript
//! (`app.js`) — against the WIT and SDKs this sendbox carries, so an author
//! needs no checkout of sendbox. A missing toolchain is named with the
//! command that installs it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::Args;
use sendbox_types::manifest::{ConfigKey, Manifest};

use crate::exit::{self, coded};

/// The contract and the SDKs, as this sendbox knows them.
pub const WIT: &str = include_str!("../../../../wit/sendbox.wit");
const PYTHON_SDK: &str = include_str!("../../../../sdk/python/sendbox_pdk/__init__.py");
const JS_SDK: &str = include_str!("../../../../sdk/js/sendbox-pdk.js");

/// The componentize-py release the Python SDK is tested with.
pub const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";
/// The componentize-js release the JavaScript SDK is tested with.
pub const COMPONENTIZE_JS: &str = "@bytecodealliance/componentize-js@0.23.0";

/// `sendbox plugin build`
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The plugin's folder: `Cargo.toml` (Rust), `app.py` (Python) or
    /// `app.js` (JavaScript).
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// Where to write the component. Default `<DIR>/<folder name>.wasm`.
    #[arg(short, long)]
    pub out: Option<PathBuf>,
}

/// A plugin folder's language, by the file that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// `Cargo.toml`.
    Rust,
    /// `app.py`.
    Python,
    /// `app.js`.
    JavaScript,
}

impl Lang {
    /// The language of the plugin in `dir`, if it is one.
    pub fn of(dir: &Path) -> Option<Lang> {
        [
            ("Cargo.toml", Lang::Rust),
            ("app.py", Lang::Python),
            ("app.js", Lang::JavaScript),
        ]
        .into_iter()
        .find(|(file, _)| dir.join(file).is_file())
        .map(|(_, lang)| lang)
    }
}

/// A private scratch folder, removed when dropped.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> std::io::Result<WorkDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("sendbox-build-{}-{nanos}", std::process::id()));
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&path)?;
        Ok(WorkDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `name` found on the `PATH`, or as given in `env` (a path).
fn tool(name: &str, env: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn missing(what: &str, install: &str) -> anyhow::Error {
    coded(
        exit::EX_UNAVAILABLE,
        format!("{what} is not installed: {install}, then run `sendbox plugin build` again"),
    )
}

fn run(mut command: Command, what: &str) -> anyhow::Result<()> {
    let out = command
        .output()
        .map_err(|e| coded(exit::EX_UNAVAILABLE, format!("cannot start {what}: {e}")))?;
    if !out.status.success() {
        return Err(coded(
            exit::EX_DATAERR,
            format!(
                "{what} failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ));
    }
    Ok(())
}

impl BuildArgs {
    /// Builds the plugin; prints where the component went.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let dir = self
            .dir
            .canonicalize()
            .map_err(|e| coded(exit::EX_NOINPUT, format!("{}: {e}", self.dir.display())))?;
        let lang = Lang::of(&dir).ok_or_else(|| {
            coded(
                exit::EX_NOINPUT,
                format!(
                    "{}: not a plugin folder: expected Cargo.toml (Rust), app.py (Python) or app.js (JavaScript); `sendbox plugin new NAME` makes one",
                    dir.display()
                ),
            )
        })?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plugin".into());
        let out = match self.out {
            Some(o) => std::path::absolute(&o)?,
            None => dir.join(format!("{name}.wasm")),
        };
        // The manifest first: a mistake in it is reported before a long build.
        let manifest = manifest_of(&dir, lang)?;
        let work = WorkDir::new()?;
        let wit = work.path().join("wit");
        std::fs::create_dir_all(&wit)?;
        std::fs::write(wit.join("sendbox.wit"), WIT)?;
        match lang {
            Lang::Rust => build_rust(&dir, &out)?,
            Lang::Python => {
                let componentize =
                    tool("componentize-py", "SENDBOX_COMPONENTIZE_PY").ok_or_else(|| {
                        missing(
                            "componentize-py",
                            &format!("`pip install {COMPONENTIZE_PY}`"),
                        )
                    })?;
                let sdk = work.path().join("sdk");
                std::fs::create_dir_all(sdk.join("sendbox_pdk"))?;
                std::fs::write(sdk.join("sendbox_pdk/__init__.py"), PYTHON_SDK)?;
                let mut c = Command::new(componentize);
                c.arg("-d")
                    .arg(&wit)
                    .args(["-w", "hook", "componentize", "app", "-p"])
                    .arg(&dir)
                    .arg("-p")
                    .arg(&sdk)
                    .arg("-o")
                    .arg(&out);
                run(c, "componentize-py")?;
            }
            Lang::JavaScript => {
                let componentize =
                    tool("componentize-js", "SENDBOX_COMPONENTIZE_JS").ok_or_else(|| {
                        missing(
                            "componentize-js",
                            &format!("`npm install -g {COMPONENTIZE_JS}`"),
                        )
                    })?;
                // componentize-js reads modules only under the source's
                // folder: the plugin's files and the SDK go into one.
                let stage = work.path().join("src");
                std::fs::create_dir_all(&stage)?;
                for entry in std::fs::read_dir(&dir)? {
                    let path = entry?.path();
                    if path
                        .extension()
                        .is_some_and(|x| x == "js" || x == "mjs" || x == "json")
                        && let Some(file) = path.file_name()
                    {
                        std::fs::copy(&path, stage.join(file))?;
                    }
                }
                std::fs::write(stage.join("sendbox-pdk.js"), JS_SDK)?;
                let mut c = Command::new(componentize);
                c.current_dir(&stage)
                    .arg("app.js")
                    .arg("--wit")
                    .arg(&wit)
                    .args(["-n", "hook", "-d", "http", "fetch-event", "-o"])
                    .arg(&out);
                run(c, "componentize-js")?;
            }
        }
        match manifest {
            Some(manifest) => {
                let bytes = std::fs::read(&out)?;
                let described = manifest
                    .embed_in(&bytes)
                    .map_err(|e| coded(exit::EX_DATAERR, format!("{}: {e}", out.display())))?;
                std::fs::write(&out, described)?;
                println!(
                    "built {} ({} {}, {} config key(s) described)",
                    out.display(),
                    manifest.name,
                    manifest.version,
                    manifest.config.len()
                );
            }
            None => println!(
                "built {} (no self-description: add {} to describe it)",
                out.display(),
                lang.manifest_file()
            ),
        }
        Ok(ExitCode::SUCCESS)
    }
}

impl Lang {
    /// The language's own manifest, where a plugin describes itself.
    pub fn manifest_file(self) -> &'static str {
        match self {
            Lang::Rust => "Cargo.toml",
            Lang::Python => "pyproject.toml",
            Lang::JavaScript => "package.json",
        }
    }
}

/// The `config` table a plugin declares in its language's manifest:
/// `[package.metadata.sendbox.config]`, `[tool.sendbox.config]` or
/// `"sendbox": {"config": ...}`.
#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SendboxTable {
    #[serde(default)]
    config: BTreeMap<String, ConfigKey>,
}

/// Name, version and description as every manifest spells them.
#[derive(serde::Deserialize)]
struct Package {
    name: Option<String>,
    version: Option<String>,
    description: Option<String>,
}

/// What the plugin in `dir` says about itself, from its language's
/// manifest: `None` when a Python or JavaScript plugin has none.
fn manifest_of(dir: &Path, lang: Lang) -> anyhow::Result<Option<Manifest>> {
    let file = dir.join(lang.manifest_file());
    let bad =
        |e: &dyn std::fmt::Display| coded(exit::EX_DATAERR, format!("{}: {e}", file.display()));
    let (package, sendbox): (Package, Option<serde_json::Value>) = match lang {
        Lang::Rust => {
            // cargo resolves `version.workspace = true` and the like.
            let cargo = tool("cargo", "CARGO")
                .ok_or_else(|| missing("cargo", "install Rust with rustup (https://rustup.rs)"))?;
            let out = Command::new(cargo)
                .args([
                    "metadata",
                    "--no-deps",
                    "--format-version",
                    "1",
                    "--manifest-path",
                ])
                .arg(&file)
                .output()
                .map_err(|e| coded(exit::EX_UNAVAILABLE, format!("cannot start cargo: {e}")))?;
            if !out.status.success() {
                return Err(bad(&String::from_utf8_lossy(&out.stderr)));
            }
            let meta: serde_json::Value =
                serde_json::from_slice(&out.stdout).map_err(|e| bad(&e))?;
            let ours = meta["packages"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| {
                    p["manifest_path"]
                        .as_str()
                        .and_then(|m| Path::new(m).canonicalize().ok())
                        == file.canonicalize().ok()
                })
                .cloned()
                .ok_or_else(|| bad(&"cargo metadata does not list this package"))?;
            let package = serde_json::from_value(ours.clone()).map_err(|e| bad(&e))?;
            (package, Some(ours["metadata"]["sendbox"].clone()))
        }
        Lang::Python => {
            let Ok(text) = std::fs::read_to_string(&file) else {
                return Ok(None);
            };
            let doc: toml::Table = toml::from_str(&text).map_err(|e| bad(&e))?;
            let project = doc
                .get("project")
                .cloned()
                .unwrap_or(toml::Value::Table(Default::default()));
            let package = project
                .try_into()
                .map_err(|e| bad(&format!("[project]: {e}")))?;
            let sendbox = doc
                .get("tool")
                .and_then(|t| t.get("sendbox"))
                .map(|t| serde_json::to_value(t).map_err(|e| bad(&e)))
                .transpose()?;
            (package, sendbox)
        }
        Lang::JavaScript => {
            let Ok(text) = std::fs::read_to_string(&file) else {
                return Ok(None);
            };
            let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&e))?;
            let package = serde_json::from_value(doc.clone()).map_err(|e| bad(&e))?;
            (package, doc.get("sendbox").cloned())
        }
    };
    let where_ = match lang {
        Lang::Rust => "[package.metadata.sendbox]",
        Lang::Python => "[tool.sendbox]",
        Lang::JavaScript => "\"sendbox\"",
    };
    let table: SendboxTable = match sendbox.filter(|v| !v.is_null()) {
        Some(v) => serde_json::from_value(v).map_err(|e| bad(&format!("{where_}: {e}")))?,
        None => SendboxTable::default(),
    };
    let folder = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into());
    let manifest = Manifest {
        name: package.name.unwrap_or(folder),
        version: package.version.unwrap_or_else(|| "0.0.0".into()),
        description: package.description.filter(|d| !d.trim().is_empty()),
        config: table.config,
    };
    manifest.validate().map_err(|e| bad(&e))?;
    Ok(Some(manifest))
}

/// `cargo build --release --target wasm32-wasip2` (into the workspace's or
/// `CARGO_TARGET_DIR`'s target folder, as cargo decides), then the
/// component cargo reports copied to `out`.
fn build_rust(dir: &Path, out: &Path) -> anyhow::Result<()> {
    let cargo = tool("cargo", "CARGO")
        .ok_or_else(|| missing("cargo", "install Rust with rustup (https://rustup.rs)"))?;
    let mut c = Command::new(cargo);
    c.args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip2",
        "--message-format=json-render-diagnostics",
        "--manifest-path",
    ])
    .arg(dir.join("Cargo.toml"));
    let result = c
        .output()
        .map_err(|e| coded(exit::EX_UNAVAILABLE, format!("cannot start cargo: {e}")))?;
    let stderr = String::from_utf8_lossy(&result.stderr);
    if !result.status.success() {
        if stderr.contains("wasm32-wasip2") && stderr.contains("target may not be installed") {
            return Err(missing(
                "the wasm32-wasip2 target",
                "`rustup target add wasm32-wasip2`",
            ));
        }
        return Err(coded(
            exit::EX_DATAERR,
            format!("cargo build failed:\n{stderr}"),
        ));
    }
    // The last `.wasm` cargo reports is the package's own (its
    // dependencies come first).
    let built = String::from_utf8_lossy(&result.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .flat_map(|m| {
            m["filenames"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|f| f.as_str().map(PathBuf::from))
                .filter(|f| f.extension().is_some_and(|x| x == "wasm"))
                .collect::<Vec<_>>()
        })
        .last()
        .ok_or_else(|| {
            coded(
                exit::EX_DATAERR,
                format!(
                    "cargo built no component: is `crate-type = [\"cdylib\"]` in {}/Cargo.toml's [lib]?",
                    dir.display()
                ),
            )
        })?;
    std::fs::copy(&built, out).map_err(|e| {
        coded(
            exit::EX_SOFTWARE,
            format!("cannot copy {} to {}: {e}", built.display(), out.display()),
        )
    })?;
    Ok(())
}
