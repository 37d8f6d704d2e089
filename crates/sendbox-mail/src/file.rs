//! The file transport, the embedded default: each message becomes one
//! `.eml` file in a folder, written atomically (temp file, fsync, rename) so
//! a reader never sees half a message. The file is named after the
//! Message-ID, so sending the same message again rewrites the same file.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{FailureKind, SendError};
use crate::message::Prepared;

/// Writes messages into a folder.
#[derive(Debug, Clone)]
pub struct FileTransport {
    dir: PathBuf,
}

/// A file name from a Message-ID: `<1.ab@x.y>` → `1.ab@x.y.eml`, with
/// anything outside a safe set replaced.
pub fn file_name(message_id: &str) -> String {
    let stem: String = message_id
        .trim_matches(['<', '>'])
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '@' | '-' | '_' | '+') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{stem}.eml")
}

impl FileTransport {
    /// A transport writing into `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, SendError> {
        let dir = dir.into();
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&dir).map_err(|e| {
            SendError::new(
                FailureKind::Configuration,
                format!("cannot create the mail folder {}: {e}", dir.display()),
            )
        })?;
        Ok(FileTransport { dir })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes the message; returns its path.
    pub async fn send(&self, message: &Prepared) -> Result<PathBuf, SendError> {
        let dir = self.dir.clone();
        let message = message.clone();
        tokio::task::spawn_blocking(move || write(&dir, &message))
            .await
            .map_err(|e| SendError::new(FailureKind::Transient, e.to_string()))?
    }
}

fn write(dir: &Path, message: &Prepared) -> Result<PathBuf, SendError> {
    let io = |e: std::io::Error, what: &str| {
        SendError::new(
            FailureKind::Transient,
            format!("{what} in {}: {e}", dir.display()),
        )
    };
    let name = file_name(&message.message_id);
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = private_create(&tmp).map_err(|e| io(e, "cannot create a temp file"))?;
    // Envelope first, as Return-Path/X-Envelope lines a reader can use.
    // Only To and Cc recipients: a Bcc recipient is never written into
    // any header.
    let rcpts = &message.visible_recipients;
    let from = message
        .envelope
        .from()
        .map(ToString::to_string)
        .unwrap_or_default();
    write!(
        f,
        "Return-Path: <{from}>\r\nX-Envelope-To: {}\r\n",
        rcpts.join(", ")
    )
    .and_then(|_| f.write_all(&message.raw))
    .and_then(|_| f.sync_all())
    .map_err(|e| io(e, "cannot write the message"))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(|e| io(e, "cannot move the message into place"))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(path)
}

/// Creates a new file only its owner can read, whatever the umask: a
/// message is private mail. Fails if the file exists (a stale temp file is
/// removed first).
fn private_create(path: &Path) -> std::io::Result<std::fs::File> {
    let _ = std::fs::remove_file(path);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eml_files_are_private_and_name_no_bcc() {
        let dir = tempfile::tempdir().unwrap();
        let email = sendbox_types::Email {
            to: vec!["ops@example.com".into()],
            cc: vec!["lead@example.com".into()],
            bcc: vec!["hidden@example.com".into()],
            subject: "s".into(),
            text: Some("t".into()),
            ..Default::default()
        };
        let prepared = crate::message::build(
            &email,
            &crate::message::Envelope {
                account_mailbox: "a@example.com",
                allowed_from: &[],
                message_id: "<1.x@example.com>",
                date: std::time::SystemTime::now(),
            },
        )
        .unwrap();
        let path = write(dir.path(), &prepared).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("X-Envelope-To: ops@example.com, lead@example.com\r\n"),
            "{text}"
        );
        assert!(!text.contains("hidden@example.com"), "{text}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn file_names_are_safe() {
        assert_eq!(file_name("<1.ab@x.y>"), "1.ab@x.y.eml");
        assert_eq!(file_name("<../../etc/passwd>"), ".._.._etc_passwd.eml");
    }
}
