//! Secrets: where they come from, and a type that never prints them.

use std::path::PathBuf;

use crate::AuthError;

/// A secret value (client secret, private key, token). Its `Debug` prints
/// `[redacted]` and it has no `Display`, so it cannot end up in a log line
/// by accident; call [`Secret::expose`] where the value is really needed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a secret is read from. Secrets are referenced, not written into
/// the config: a file (mode 0600 advised) or an environment variable.
/// `Inline` exists for operators who opt in, and is warned about.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// Read the file and trim trailing whitespace.
    File(PathBuf),
    /// Read the environment variable.
    Env(String),
    /// The value itself, from the config file.
    Inline(Secret),
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::File(p) => write!(f, "File({})", p.display()),
            SecretSource::Env(v) => write!(f, "Env({v})"),
            SecretSource::Inline(_) => f.write_str("Inline([redacted])"),
        }
    }
}

impl SecretSource {
    /// Reads the secret, naming where it looked on failure.
    pub fn resolve(&self) -> Result<Secret, AuthError> {
        match self {
            SecretSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| AuthError::Config {
                    message: format!("cannot read secret file {}: {e}", path.display()),
                })?;
                let value = text.trim_end_matches(['\n', '\r']).to_owned();
                if value.is_empty() {
                    return Err(AuthError::Config {
                        message: format!("secret file {} is empty", path.display()),
                    });
                }
                Ok(Secret(value))
            }
            SecretSource::Env(var) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Ok(Secret(v)),
                _ => Err(AuthError::Config {
                    message: format!(
                        "environment variable {var} is not set or empty (export it, or point the config at a file instead)"
                    ),
                }),
            },
            SecretSource::Inline(s) => Ok(s.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        let src = SecretSource::Inline(s);
        assert!(!format!("{src:?}").contains("hunter2"));
    }

    #[test]
    fn missing_env_var_says_what_to_do() {
        let err = SecretSource::Env("SENDBOX_SURELY_UNSET_VAR".into())
            .resolve()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("SENDBOX_SURELY_UNSET_VAR is not set"),
            "{err}"
        );
    }
}
