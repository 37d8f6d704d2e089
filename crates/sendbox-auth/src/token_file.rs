//! The refresh-token file of a delegated account: JSON, mode 0600, replaced
//! atomically (temp file, fsync, rename, fsync of the folder) so a crash
//! mid-write never loses the only valid refresh token.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{AuthError, Secret};

/// What the token file holds.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredToken {
    /// The current refresh token.
    pub refresh_token: String,
    /// Seconds since the Unix epoch when it was obtained.
    pub obtained_at_unix: u64,
    /// Scopes granted.
    #[serde(default)]
    pub scopes: Vec<String>,
}

impl std::fmt::Debug for StoredToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredToken")
            .field("refresh_token", &"[redacted]")
            .field("obtained_at_unix", &self.obtained_at_unix)
            .field("scopes", &self.scopes)
            .finish()
    }
}

impl StoredToken {
    /// The refresh token as a [`Secret`].
    pub fn secret(&self) -> Secret {
        Secret::new(self.refresh_token.clone())
    }
}

/// Reads the token file; a missing file means `sendbox login` has not run.
pub fn read(path: &Path, account: &str) -> Result<StoredToken, AuthError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(AuthError::LoginRequired(format!(
                "account `{account}` has no token file at {}: run `sendbox login --config <file> {account}` once",
                path.display()
            )));
        }
        Err(e) => {
            return Err(AuthError::Config {
                message: format!("cannot read token file {}: {e}", path.display()),
            });
        }
    };
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(account, path = %path.display(), "token file is readable by others: chmod 600 it");
        }
    }
    serde_json::from_str(&text).map_err(|e| AuthError::Config {
        message: format!(
            "token file {} is not valid ({e}): run `sendbox login` for `{account}` again",
            path.display()
        ),
    })
}

/// Writes the token file atomically with mode 0600 (in a 0700 folder when
/// it has to create one).
pub fn write(path: &Path, token: &StoredToken) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        sendbox_fs::private_dir(dir)?;
    }
    let json = serde_json::to_vec_pretty(token).map_err(std::io::Error::other)?;
    sendbox_fs::write_atomic(path, &json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_file_is_private_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acct.token.json");
        let t = StoredToken {
            refresh_token: "rt-1".into(),
            obtained_at_unix: 1,
            scopes: vec!["a".into()],
        };
        write(&path, &t).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert_eq!(read(&path, "acct").unwrap().refresh_token, "rt-1");
        assert!(!format!("{t:?}").contains("rt-1"));
    }

    #[cfg(unix)]
    #[test]
    fn a_link_planted_at_the_temp_path_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acct.token.json");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        let tmp = dir
            .path()
            .join(format!(".acct.token.json.tmp-{}-0", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let t = StoredToken {
            refresh_token: "rt-2".into(),
            obtained_at_unix: 1,
            scopes: vec![],
        };
        write(&path, &t).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(read(&path, "acct").unwrap().refresh_token, "rt-2");
    }

    #[test]
    fn missing_file_asks_for_login() {
        let err = read(Path::new("/nonexistent/x.json"), "acct").unwrap_err();
        assert!(err.to_string().contains("sendbox login"), "{err}");
    }
}
