//! `sendbox plugin build` through the real binary: a plugin folder in each
//! language becomes a component that `sendbox plugin run` runs, with the
//! WIT and SDKs the binary carries (the Python and JavaScript folders hold
//! only the plugin's own file and its manifest), and that carries what the
//! manifest says (`plugin inspect` prints it; its defaults are served, its
//! required keys enforced); a missing toolchain is named with the command
//! that installs it.

use sendbox_test_support::wasm;

use std::path::Path;
use std::process::{Command, Output};

/// `sendbox ARGS` with the pinned toolchains (as an author's machine would
/// have them on its PATH).
pub(crate) fn sendbox(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sendbox"))
        .args(args)
        .env("SENDBOX_COMPONENTIZE_PY", wasm::componentize_py())
        .env("SENDBOX_COMPONENTIZE_JS", wasm::componentize_js())
        .env("CARGO_TARGET_DIR", wasm::wasm_target_dir())
        .env(
            "SENDBOX_CACHE_DIR",
            wasm::wasm_target_dir().join("sendbox-cache"),
        )
        .output()
        .expect("sendbox starts")
}

pub(crate) fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Copies `file` of the repository's `from` folder into `to`.
fn copy(from: &str, file: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(wasm::repo_root().join(from).join(file), to.join(file)).unwrap();
}

/// Runs `wasm` on `event` with `to` as its recipient; the outcome's first
/// email's subject.
fn subject(wasm: &Path, event: &Path) -> String {
    let out = ok(&sendbox(&[
        "plugin",
        "run",
        wasm.to_str().unwrap(),
        "--event",
        event.to_str().unwrap(),
        "--config",
        "to=ops@example.com",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["outcome"]["emails"][0]["subject"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_folder_in_each_language_builds_into_a_component_that_runs() {
    let dir = tempfile::tempdir().unwrap();
    let root = wasm::repo_root();
    let alert = root.join("plugins/file-alert/sample-event.json");

    // Python: app.py and its manifest; the SDK comes with sendbox.
    let py = dir.path().join("bridge");
    copy("plugins/webhook-bridge-py", "app.py", &py);
    copy("plugins/webhook-bridge-py", "pyproject.toml", &py);
    let built = ok(&sendbox(&["plugin", "build", py.to_str().unwrap()]));
    assert!(
        built.contains("bridge.wasm (webhook-bridge-py 0.1.0, 2 config key(s) described)"),
        "{built}"
    );
    let about = inspect(&py.join("bridge.wasm"));
    for line in [
        "plugin:   webhook-bridge-py 0.1.0",
        "about:    Alertmanager alerts and GitHub pushes, posted as JSON webhooks, become readable emails.",
        "  subject_prefix (default \"[webhook]\"): Put before every subject.",
        "  to (required): Recipient, or several separated by commas.",
    ] {
        assert!(about.contains(line), "{line:?} in:\n{about}");
    }
    assert_eq!(
        subject(
            &py.join("bridge.wasm"),
            &root.join("plugins/webhook-bridge-py/sample-event.json")
        ),
        "[webhook] FIRING: DiskFull (1 alert, 1 firing)"
    );

    // JavaScript: app.js and package.json.
    let js = dir.path().join("alerts");
    copy("plugins/file-alert-js", "app.js", &js);
    copy("plugins/file-alert-js", "package.json", &js);
    let out = js.join("out/alerts.wasm");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    ok(&sendbox(&[
        "plugin",
        "build",
        js.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert_eq!(
        subject(&out, &alert),
        "[incoming] reports/2026-11-27.csv created"
    );
    let about = inspect(&out);
    assert!(about.contains("plugin:   file-alert-js 0.1.0"), "{about}");
    assert!(
        about.contains(
            "  notify_removed (default \"false\"): `true` to also mail when a file is removed."
        ),
        "{about}"
    );

    // Rust: the example crate, where it is.
    let rs = dir.path().join("file-alert.wasm");
    ok(&sendbox(&[
        "plugin",
        "build",
        root.join("plugins/file-alert").to_str().unwrap(),
        "--out",
        rs.to_str().unwrap(),
    ]));
    assert_eq!(
        subject(&rs, &alert),
        "[incoming] reports/2026-11-27.csv created"
    );
    // The version comes from the workspace, as cargo resolves it.
    let about = inspect(&rs);
    assert!(about.contains("plugin:   file-alert 0.1.0"), "{about}");
    assert!(about.contains("  to (required): "), "{about}");
    // Run without the key it requires: refused, naming it.
    let out = sendbox(&[
        "plugin",
        "run",
        rs.to_str().unwrap(),
        "--event",
        alert.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("requires config key `to`"), "{err}");

    // A manifest with a mistake: refused before anything is built.
    let bad = dir.path().join("bad");
    copy("plugins/file-alert-js", "app.js", &bad);
    std::fs::write(
        bad.join("package.json"),
        r#"{"name": "bad", "version": "1.0.0", "sendbox": {"confg": {}}}"#,
    )
    .unwrap();
    let out = sendbox(&["plugin", "build", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("package.json: \"sendbox\": unknown field `confg`"),
        "{err}"
    );
}

/// `sendbox plugin inspect WASM`'s text.
fn inspect(wasm: &Path) -> String {
    ok(&sendbox(&["plugin", "inspect", wasm.to_str().unwrap()]))
}

#[test]
fn a_missing_toolchain_is_named_with_the_command_that_installs_it() {
    let dir = tempfile::tempdir().unwrap();
    let py = dir.path().join("p");
    copy("plugins/webhook-bridge-py", "app.py", &py);
    let out = Command::new(env!("CARGO_BIN_EXE_sendbox"))
        .args(["plugin", "build", py.to_str().unwrap()])
        .env_remove("SENDBOX_COMPONENTIZE_PY")
        .env("PATH", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("componentize-py is not installed: `pip install componentize-py==0.25.1`"),
        "{err}"
    );

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = sendbox(&["plugin", "build", empty.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(66));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a plugin folder"), "{err}");
}

#[test]
fn new_then_build_then_run_gives_the_expected_outcome_in_each_language() {
    let dir = tempfile::tempdir().unwrap();
    for lang in ["python", "js", "rust"] {
        let name = format!("backup-notice-{lang}");
        let created = ok(&sendbox(&[
            "plugin",
            "new",
            &name,
            "--lang",
            lang,
            "--dir",
            dir.path().to_str().unwrap(),
        ]));
        assert!(created.contains("created"), "{created}");
        let folder = dir.path().join(&name);
        // The manifest's default for `to` changed: the host serves it (the
        // code's own fallback is ops@example.com).
        let manifest = folder.join(match lang {
            "python" => "pyproject.toml",
            "js" => "package.json",
            _ => "Cargo.toml",
        });
        for file in [manifest, folder.join("expected-outcome.json")] {
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(text.contains("ops@example.com"), "{}", file.display());
            std::fs::write(&file, text.replace("ops@example.com", "team@example.com")).unwrap();
        }
        ok(&sendbox(&["plugin", "build", folder.to_str().unwrap()]));
        let out = ok(&sendbox(&[
            "plugin",
            "run",
            folder.join(format!("{name}.wasm")).to_str().unwrap(),
            "--event",
            folder.join("sample-event.json").to_str().unwrap(),
        ]));
        let run: serde_json::Value = serde_json::from_str(&out).unwrap();
        let expected: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(folder.join("expected-outcome.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(run["outcome"], expected, "{lang}");
    }
    // The same name twice is refused, as is a name that is not one.
    let again = sendbox(&[
        "plugin",
        "new",
        "backup-notice-js",
        "--lang",
        "js",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(64));
    let bad = sendbox(&[
        "plugin",
        "new",
        "../escape",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(64));
}

#[test]
fn plugin_test_compares_each_case_shows_a_diff_and_blesses() {
    let dir = tempfile::tempdir().unwrap();
    ok(&sendbox(&[
        "plugin",
        "new",
        "nightly",
        "--lang",
        "python",
        "--dir",
        dir.path().to_str().unwrap(),
    ]));
    let folder = dir.path().join("nightly");
    let f = folder.to_str().unwrap();
    ok(&sendbox(&["plugin", "build", f]));
    let passed = ok(&sendbox(&["plugin", "test", f]));
    assert!(passed.contains("ok     sample"), "{passed}");
    assert!(passed.contains("1 case(s), 0 failed"), "{passed}");

    // A second case whose expectation is wrong: a diff, exit 1.
    std::fs::create_dir_all(folder.join("tests")).unwrap();
    std::fs::write(
        folder.join("tests/late.event.json"),
        r#"{"webhook": {"path": "/hooks/late", "body": "The backup is late."}}"#,
    )
    .unwrap();
    let expected = std::fs::read_to_string(folder.join("expected-outcome.json")).unwrap();
    std::fs::write(folder.join("tests/late.expected.json"), &expected).unwrap();
    let out = sendbox(&["plugin", "test", f]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FAILED late"), "{text}");
    assert!(
        text.contains(r#" -       "text": "The nightly backup finished.","#),
        "{text}"
    );
    assert!(
        text.contains(r#" +       "text": "The backup is late.","#),
        "{text}"
    );
    assert!(text.contains("2 case(s), 1 failed"), "{text}");

    // --bless writes what it gives; then every case passes.
    ok(&sendbox(&["plugin", "test", f, "--bless"]));
    let passed = ok(&sendbox(&["plugin", "test", f]));
    assert!(passed.contains("2 case(s), 0 failed"), "{passed}");
}
