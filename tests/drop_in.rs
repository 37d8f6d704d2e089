//! Drop-in plugins and plugins that describe themselves, on the real
//! binary: a `NAME.wasm` + `NAME.toml` pair in `[daemon] plugins_dir` is
//! picked up, changed and removed while `sendbox run` serves; the
//! component's manifest supplies config defaults, and a config that lacks
//! a required key is refused by `sendbox check` and by a reload (the
//! previous version keeps serving); and an author's whole loop in each
//! language — `plugin new`, `build`, `test`, drop in, an email arrives.

use crate::support::daemon;
use sendbox_test_support::wasm;
use sendbox_types::manifest::{ConfigKey, Manifest};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use daemon::{Daemon, replace_file};

/// webhook-bridge with a manifest: `to` required, `subject_prefix`
/// defaulting to `[dropped]` (the plugin's own default is `[webhook]`, so
/// a subject starting `[dropped]` shows the host served the default).
fn described_bridge() -> Vec<u8> {
    let mut m = Manifest::named("webhook-bridge", "9.9.9");
    m.description = Some("Webhooks become readable emails.".into());
    m.config.insert(
        "to".into(),
        ConfigKey::required("Recipient, or several separated by commas."),
    );
    m.config.insert(
        "subject_prefix".into(),
        ConfigKey::with_default("Put before every subject.", "[dropped]"),
    );
    let bytes = std::fs::read(wasm::example("webhook-bridge")).unwrap();
    m.embed_in(&bytes).unwrap()
}

/// The test daemon's `[daemon]` with `plugins_dir = "plugins.d"`, and the
/// file account `local`: the config text, before any plugin.
fn with_plugins_dir() -> String {
    format!(
        "{}plugins_dir = \"plugins.d\"\n{}",
        daemon::daemon_section(),
        daemon::FILE_ACCOUNT
    )
}

fn drop_in(config: &str) -> String {
    format!(
        "account = \"local\"\n{config}\n[policy]\nidempotency_hours = 0\n[webhook]\npath = \"/hooks/drop\"\nunauthenticated = true\n"
    )
}

/// POSTs the sample alert; the status and, for a 202, the queued email's
/// subject.
async fn post(base: &str, store: &Path) -> (u16, Option<String>) {
    let body =
        std::fs::read(wasm::repo_root().join("plugins/webhook-bridge/samples/alert.json")).unwrap();
    let url = format!("{base}/hooks/drop");
    crate::reload::post(&reqwest::Client::new(), &url, body, store).await
}

/// Posts until the answer's status is `status` and its subject starts
/// with `prefix` (when given): a reload takes a moment after a file lands.
async fn until(base: &str, store: &Path, status: u16, prefix: Option<&str>, d: &Daemon) {
    let start = Instant::now();
    loop {
        let (got, subject) = post(base, store).await;
        let subject_ok = match prefix {
            Some(p) => subject.as_deref().is_some_and(|s| s.starts_with(p)),
            None => true,
        };
        if got == status && subject_ok {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "still {got} {subject:?}, waiting for {status} {prefix:?}; logs:\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn check(config: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sendbox"))
        .args(["check", "--config"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_in_plugin_is_picked_up_changed_refused_and_removed_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // Not there yet: the daemon creates it and watches it.
    let plugins_d = dir.path().join("plugins.d");
    let config: PathBuf = dir.path().join("sendbox.toml");
    std::fs::write(&config, with_plugins_dir()).unwrap();
    let store = dir.path().join("var/sendbox.db");
    let d = Daemon::start(&config, &[]);
    let (status, _) = post(&d.base, &store).await;
    assert_eq!(status, 404, "nothing serves /hooks/drop yet");
    assert!(plugins_d.is_dir(), "the daemon made the folder");

    // The pair lands (component first, as a deploy tool copies): served,
    // with the manifest's default for the key the config leaves out.
    replace_file(&plugins_d.join("bridge.wasm"), &described_bridge());
    replace_file(
        &plugins_d.join("bridge.toml"),
        drop_in("[config]\nto = \"oncall@example.com\"").as_bytes(),
    );
    until(&d.base, &store, 202, Some("[dropped] "), &d).await;

    // Its section changes: the new config serves.
    replace_file(
        &plugins_d.join("bridge.toml"),
        drop_in("[config]\nto = \"oncall@example.com\"\nsubject_prefix = \"[edited]\"").as_bytes(),
    );
    until(&d.base, &store, 202, Some("[edited] "), &d).await;

    // A section without the required key: `sendbox check` names the
    // plugin and the key; the running daemon keeps the previous version.
    let reloads = d.count_logged("reload done");
    replace_file(
        &plugins_d.join("bridge.toml"),
        drop_in("[config]\nsubject_prefix = \"[no-to]\"").as_bytes(),
    );
    let (code, out) = check(&config);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("x plugin bridge: plugin `bridge` requires config key `to` (Recipient, or several separated by commas.)"),
        "{out}"
    );
    let done = d.reload_done(reloads + 1);
    assert!(done.contains("failed=[\"bridge\"]"), "{done}");
    assert!(
        d.logs().contains("requires config key `to`"),
        "{}",
        d.logs()
    );
    let (status, subject) = post(&d.base, &store).await;
    assert_eq!(status, 202);
    assert!(
        subject.unwrap().starts_with("[edited] "),
        "the previous version serves"
    );

    // A file that is not valid: the reload is refused, naming the file and
    // line; everything keeps running.
    let refused = d.count_logged("config not reloaded");
    replace_file(
        &plugins_d.join("bridge.toml"),
        b"account = \"local\"\nsecret_sauce = 1\n",
    );
    d.wait_logged("config not reloaded", refused + 1);
    assert!(
        d.logs()
            .contains("bridge.toml:2:1: unknown field `secret_sauce`"),
        "{}",
        d.logs()
    );
    let (status, subject) = post(&d.base, &store).await;
    assert_eq!(status, 202);
    assert!(subject.unwrap().starts_with("[edited] "));

    // A fixed file, then the pair removed: the route goes.
    replace_file(
        &plugins_d.join("bridge.toml"),
        drop_in("[config]\nto = \"oncall@example.com\"\nsubject_prefix = \"[fixed]\"").as_bytes(),
    );
    until(&d.base, &store, 202, Some("[fixed] "), &d).await;
    std::fs::remove_file(plugins_d.join("bridge.toml")).unwrap();
    std::fs::remove_file(plugins_d.join("bridge.wasm")).unwrap();
    until(&d.base, &store, 404, None, &d).await;
    assert!(
        d.logs().contains("plugin removed from the config"),
        "{}",
        d.logs()
    );
}

#[test]
fn check_describes_each_plugin_warns_on_undeclared_keys_and_refuses_a_name_defined_twice() {
    let dir = tempfile::tempdir().unwrap();
    let plugins_d = dir.path().join("plugins.d");
    std::fs::create_dir_all(&plugins_d).unwrap();
    std::fs::write(plugins_d.join("bridge.wasm"), described_bridge()).unwrap();
    std::fs::write(
        plugins_d.join("bridge.toml"),
        drop_in("[config]\nto = \"oncall@example.com\"\nsubjct_prefix = \"[typo]\""),
    )
    .unwrap();
    // A component left without its section: a warning, not loaded.
    std::fs::write(plugins_d.join("orphan.wasm"), described_bridge()).unwrap();
    let config = dir.path().join("sendbox.toml");
    let head = with_plugins_dir();
    std::fs::write(&config, &head).unwrap();
    let (code, out) = check(&config);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("√ plugin bridge loads"), "{out}");
    assert!(
        out.contains("webhook-bridge 9.9.9: Webhooks become readable emails."),
        "{out}"
    );
    assert!(
        out.contains("! warning: plugin bridge: config key `subjct_prefix` is not one it reads (a typo?); it reads: subject_prefix, to"),
        "{out}"
    );
    assert!(
        out.contains("orphan.wasm: no orphan.toml beside it, so it is not loaded"),
        "{out}"
    );
    assert!(!out.contains("plugin orphan"), "{out}");

    // The same name in the config file too: refused, naming both files.
    std::fs::write(
        &config,
        format!(
            "{head}[plugins.bridge]\nwasm = \"plugins.d/bridge.wasm\"\naccount = \"local\"\n[plugins.bridge.config]\nto = \"x@example.com\"\n"
        ),
    )
    .unwrap();
    let (code, out) = check(&config);
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains("bridge.toml: plugin `bridge` is also defined in")
            && out.contains("sendbox.toml; rename one of them"),
        "{out}"
    );

    // A file name that would not make a plain plugin name: refused.
    std::fs::write(&config, &head).unwrap();
    std::fs::write(plugins_d.join("bad name\".toml"), drop_in("")).unwrap();
    let (code, out) = check(&config);
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains("is not a plugin name: rename the file"),
        "{out}"
    );
    std::fs::remove_file(plugins_d.join("bad name\".toml")).unwrap();

    // A folder not there yet: a warning; the daemon creates it and picks
    // up what lands there.
    std::fs::write(&config, head.replace("plugins.d", "later.d")).unwrap();
    let (code, out) = check(&config);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("`daemon.plugins_dir`: the folder")
            && out.contains("later.d does not exist yet"),
        "{out}"
    );
    // A file where the folder should be: refused.
    std::fs::write(dir.path().join("later.d"), "not a folder").unwrap();
    let (code, out) = check(&config);
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains("`daemon.plugins_dir`: cannot read the folder"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_plugin_new_to_an_email_through_a_drop_in_in_each_language() {
    use crate::plugin_build::{ok, sendbox};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sendbox.toml");
    std::fs::write(&config, with_plugins_dir()).unwrap();
    let d = Daemon::start(&config, &[]);
    let plugins_d = dir.path().join("plugins.d");
    let src = dir.path().join("src");
    let http = reqwest::Client::new();
    for lang in ["python", "js", "rust"] {
        // What the README's first lines of "Writing a plugin" do.
        let name = format!("notice-{lang}");
        let folder = src.join(&name);
        let f = folder.to_str().unwrap();
        ok(&sendbox(&[
            "plugin",
            "new",
            &name,
            "--lang",
            lang,
            "--dir",
            src.to_str().unwrap(),
        ]));
        ok(&sendbox(&["plugin", "build", f]));
        let tested = ok(&sendbox(&["plugin", "test", f]));
        assert!(tested.contains("1 case(s), 0 failed"), "{tested}");
        std::fs::copy(
            folder.join(format!("{name}.wasm")),
            plugins_d.join(format!("{name}.wasm")),
        )
        .unwrap();
        std::fs::write(
            plugins_d.join(format!("{name}.toml")),
            format!(
                "account = \"local\"\n[webhook]\npath = \"/hooks/{name}\"\nunauthenticated = true\n"
            ),
        )
        .unwrap();
        // Served once the reload has run; the email lands as an .eml file.
        let start = Instant::now();
        let text = format!("The {lang} backup finished.");
        loop {
            let r = http
                .post(format!("{}/hooks/{name}", d.base))
                .body(text.clone())
                .send()
                .await
                .unwrap();
            if r.status() == 202 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{name}: still {}; logs:\n{}",
                r.status(),
                d.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mail = daemon::wait_for_mail(&dir.path().join("mail"), &text);
        assert!(
            mail.contains(&format!("Subject: Webhook: /hooks/{name}")),
            "{mail}"
        );
        assert!(mail.contains("To: ops@example.com"), "{mail}");
    }
}
