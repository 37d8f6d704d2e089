//! The file transport, the embedded default: each message becomes one
//! `.eml` file in a folder, written atomically (temp file, fsync, rename) so
//! a reader never sees half a message. The file is named after the
//! Message-ID, so sending the same message again rewrites the same file.

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
        sendbox_fs::private_dir(&dir).map_err(|e| {
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
    let path = dir.join(file_name(&message.message_id));
    // Envelope first, as Return-Path/X-Envelope-To lines a reader can use;
    // only To and Cc recipients: a Bcc recipient is never written into any
    // header.
    let from = message
        .envelope
        .from()
        .map(ToString::to_string)
        .unwrap_or_default();
    let mut bytes = format!(
        "Return-Path: <{from}>\r\nX-Envelope-To: {}\r\n",
        message.visible_recipients.join(", ")
    )
    .into_bytes();
    bytes.extend_from_slice(&message.raw);
    // 0600, atomic: a reader never sees half a message.
    sendbox_fs::write_atomic(&path, &bytes).map_err(|e| {
        SendError::new(
            FailureKind::Transient,
            format!("cannot write the message in {}: {e}", dir.display()),
        )
    })?;
    Ok(path)
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
