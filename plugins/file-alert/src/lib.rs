//! file-alert: a created or modified file becomes an email with the file
//! attached.
//!
//! Config (all under `[plugins.<name>.config]`):
//! - `to` (required): recipient, or several separated by commas.
//! - `subject`: template; `{path}`, `{watch}`, `{change}` and `{size}` are
//!   replaced. Default `[{watch}] {path} {change}`.
//! - `max_attachment_bytes`: larger files are described, not attached.
//!   Default 5242880 (5 MiB).
//! - `notify_removed`: `true` to also mail when a file is removed. Default
//!   `false`.

use sendbox_pdk::{Email, FileChange, FileEvent, Outcome, Plugin, config, export_plugin, log};

struct FileAlert;

const DEFAULT_SUBJECT: &str = "[{watch}] {path} {change}";
const DEFAULT_MAX_ATTACHMENT_BYTES: u64 = 5 << 20;

impl Plugin for FileAlert {
    fn on_file(event: FileEvent) -> Result<Outcome, String> {
        let to = config::get("to").ok_or("config `to` is missing: set the recipient address")?;
        let max: u64 =
            config::parse("max_attachment_bytes")?.unwrap_or(DEFAULT_MAX_ATTACHMENT_BYTES);
        let notify_removed: bool = config::parse("notify_removed")?.unwrap_or(false);
        if event.change == FileChange::Removed && !notify_removed {
            log::debug(&format!("{} removed; notify_removed is off", event.path));
            return Ok(Outcome::none());
        }

        let size = event
            .size
            .or(event.contents.as_ref().map(|c| c.len() as u64));
        let subject = render(&config::get_or("subject", DEFAULT_SUBJECT), &event, size);
        let name = file_name(&event.path);
        let mut email = Email::to(to.split(',').next().unwrap_or_default().trim());
        for extra in to
            .split(',')
            .skip(1)
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            email = email.to(extra);
        }
        let mut body = format!(
            "File {} in watch \"{}\": {}\n",
            event.change.as_str(),
            event.watch,
            event.path
        );
        if let Some(size) = size {
            body.push_str(&format!("Size: {size} bytes\n"));
        }
        match event.contents {
            Some(contents) if (contents.len() as u64) <= max => {
                body.push_str(&format!("The file is attached as {name}.\n"));
                email = email.attach(name, content_type(name), contents);
            }
            Some(contents) => {
                body.push_str(&format!(
                    "Not attached: {} bytes is over the {max}-byte limit (max_attachment_bytes).\n",
                    contents.len()
                ));
            }
            None if event.change != FileChange::Removed => {
                body.push_str("Not attached: the host did not pass the contents (too large or not readable).\n");
            }
            None => {}
        }
        Ok(Outcome::email(email.subject(subject).text(body).build()))
    }
}

fn render(template: &str, event: &FileEvent, size: Option<u64>) -> String {
    let subject = template
        .replace("{path}", &event.path)
        .replace("{watch}", &event.watch)
        .replace("{change}", event.change.as_str())
        .replace("{size}", &size.map(|s| s.to_string()).unwrap_or_default());
    // A subject is one line: a path with a line break must not break it.
    subject.replace(['\r', '\n'], " ")
}

fn file_name(path: &str) -> &str {
    path.rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("file")
}

fn content_type(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("txt" | "log") => "text/plain",
        Some("csv") => "text/csv",
        Some("json") => "application/json",
        Some("xml") => "application/xml",
        Some("html" | "htm") => "text/html",
        Some("pdf") => "application/pdf",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("zip") => "application/zip",
        Some("gz") => "application/gzip",
        _ => "application/octet-stream",
    }
}

export_plugin!(FileAlert);
