//! Secrets by reference (`{ file = ... }`, `{ env = ... }`), never inline
//! unless the operator opts in.

use std::path::PathBuf;

use serde::Deserialize;

use super::*;
use sendbox_auth::SecretSource;

/// A secret reference, or (refused unless opted in) an inline value.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawSecret {
    /// `client_secret = "..."`
    Inline(String),
    /// `{ file = ... }` or `{ env = ... }`
    Reference(RawSecretRef),
}

/// `{ file = "..." }` or `{ env = "..." }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecretRef {
    /// Read the secret from this file.
    pub file: Option<PathBuf>,
    /// Read the secret from this environment variable.
    pub env: Option<String>,
}

/// The source a `{ file = ... }` / `{ env = ... }` reference names.
pub(super) fn secret_ref(
    cx: &mut Ctx<'_>,
    offset: usize,
    key: &str,
    r: &RawSecretRef,
) -> Option<SecretSource> {
    match (&r.file, &r.env) {
        (Some(f), None) => Some(SecretSource::File(cx.resolve_path(f))),
        (None, Some(v)) => Some(SecretSource::Env(v.clone())),
        _ => {
            cx.error(offset, key, "give exactly one of `file` or `env`");
            None
        }
    }
}

pub(super) fn secret_bytes(
    cx: &mut Ctx<'_>,
    offset: usize,
    key: &str,
    r: &RawSecretRef,
) -> Option<Vec<u8>> {
    let src = secret_ref(cx, offset, key, r)?;
    if !cx.resolve_secrets {
        return Some(Vec::new());
    }
    match src.resolve() {
        Ok(s) => Some(s.expose().as_bytes().to_vec()),
        Err(e) => {
            cx.error(offset, key, e);
            None
        }
    }
}
