//! `sendbox plugin new NAME --lang rust|python|js`: a ready plugin folder —
//! the source (a webhook becomes an email), a sample event, the outcome it
//! should give, and a README with the build and run commands — that
//! `sendbox plugin build` builds as it is.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};

use crate::commands::plugin_build::{COMPONENTIZE_JS, COMPONENTIZE_PY, WIT};
use crate::exit::{self, coded};

/// `sendbox plugin new`
#[derive(Debug, Args)]
pub struct NewArgs {
    /// The plugin's name, also its folder's: lowercase letters, digits and
    /// dashes, e.g. `backup-notice`.
    pub name: String,
    /// The language to write it in.
    #[arg(long, value_enum, default_value = "rust")]
    pub lang: NewLang,
    /// Where to create the folder.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
}

/// The languages `plugin new` writes.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum NewLang {
    /// Rust, with wit-bindgen.
    Rust,
    /// Python, with the Python SDK (componentize-py).
    Python,
    /// JavaScript, with the JavaScript SDK (componentize-js).
    Js,
}

const SAMPLE: &str = include_str!("templates/sample-event.json");
const EXPECTED: &str = include_str!("templates/expected-outcome.json");
const README: &str = include_str!("templates/README.md");

fn valid(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
}

fn write(folder: &Path, file: &str, text: &str, name: &str) -> anyhow::Result<()> {
    let path = folder.join(file);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, text.replace("{{name}}", name))?;
    Ok(())
}

impl NewArgs {
    /// Writes the folder; prints what to do next.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        if !valid(&self.name) {
            return Err(coded(
                exit::EX_USAGE,
                format!(
                    "{:?} is not a plugin name: use lowercase letters, digits and dashes, starting with a letter (e.g. backup-notice)",
                    self.name
                ),
            ));
        }
        let folder = self.dir.join(&self.name);
        if folder.exists() {
            return Err(coded(
                exit::EX_USAGE,
                format!(
                    "{} exists already: choose another name or remove it",
                    folder.display()
                ),
            ));
        }
        let (lang, install, files): (&str, String, Vec<(&str, &str)>) = match self.lang {
            NewLang::Rust => (
                "Rust",
                "rustup target add wasm32-wasip2".into(),
                vec![
                    ("Cargo.toml", include_str!("templates/Cargo.toml.template")),
                    ("src/lib.rs", include_str!("templates/lib.rs.template")),
                    ("wit/sendbox.wit", WIT),
                    (".gitignore", "/target\n*.wasm\n"),
                ],
            ),
            NewLang::Python => (
                "Python",
                format!("pip install {COMPONENTIZE_PY}"),
                vec![
                    ("app.py", include_str!("templates/app.py")),
                    ("pyproject.toml", include_str!("templates/pyproject.toml")),
                ],
            ),
            NewLang::Js => (
                "JavaScript",
                format!("npm install -g {COMPONENTIZE_JS}"),
                vec![
                    ("app.js", include_str!("templates/app.js")),
                    ("package.json", include_str!("templates/package.json")),
                ],
            ),
        };
        std::fs::create_dir_all(&folder)?;
        for (file, text) in files {
            write(&folder, file, text, &self.name)?;
        }
        write(&folder, "sample-event.json", SAMPLE, &self.name)?;
        write(&folder, "expected-outcome.json", EXPECTED, &self.name)?;
        let readme = README
            .replace("{{lang}}", lang)
            .replace("{{install}}", &install)
            .replace("{{secret_env}}", "SENDBOX_WEBHOOK_SECRET");
        write(&folder, "README.md", &readme, &self.name)?;
        println!("created {} ({lang})", folder.display());
        println!(
            "next: cd {} && {install} && sendbox plugin build .",
            folder.display()
        );
        Ok(ExitCode::SUCCESS)
    }
}
