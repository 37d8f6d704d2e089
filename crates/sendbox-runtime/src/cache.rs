//! Compiled-code cache: a component is compiled once and the native artifact
//! kept on disk, keyed by the engine's compatibility hash and the component's
//! SHA-256, so a restart or a reload of the same bytes never compiles again.
//!
//! The folder must be private to sendbox: artifacts are loaded as native code
//! (that is what `Component::deserialize_file` means by unsafe). It is created
//! with mode 0700 and files with 0600.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

/// How a component was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CompileSource {
    /// Loaded from the on-disk cache without compiling.
    Cache,
    /// Compiled now (and written to the cache when one is configured).
    Compiled,
    /// Already loaded for another plugin with the same bytes: its code is
    /// shared.
    Shared,
}

/// The folder for this engine's artifacts under `root`.
pub(crate) fn engine_dir(engine: &Engine, root: &Path) -> PathBuf {
    // DefaultHasher::new() has fixed keys, so the value is stable for a given
    // build; a new build may change it, which only means a recompile.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    root.join(format!("engine-{:016x}", h.finish()))
}

/// SHA-256 of the component bytes, hex.
pub fn content_hash(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Why a cache path must not be trusted, if it exists and is owned by
/// another user or writable by group or others.
#[cfg(unix)]
fn untrusted(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).ok()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Some(format!(
            "{} is owned by uid {}, not this user (uid {me})",
            path.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Some(format!(
            "{} is writable by others (mode {:o})",
            path.display(),
            meta.mode() & 0o777
        ));
    }
    None
}

#[cfg(not(unix))]
fn untrusted(_: &Path) -> Option<String> {
    None
}

/// Errors from [`load`]: compiling failed, or the cache folder is unusable.
pub(crate) enum CacheError {
    Compile(wasmtime::Error),
    Io(PathBuf, std::io::Error),
}

/// Loads a component from the cache under `root`, or compiles it and stores
/// the artifact there.
pub(crate) fn load(
    engine: &Engine,
    root: Option<&Path>,
    bytes: &[u8],
    hash: &str,
) -> Result<(Component, CompileSource), CacheError> {
    let Some(root) = root else {
        return Component::new(engine, bytes)
            .map(|c| (c, CompileSource::Compiled))
            .map_err(CacheError::Compile);
    };
    let dir = engine_dir(engine, root);
    let path = dir.join(format!("{hash}.cwasm"));
    if let Some(why) = [root, dir.as_path(), path.as_path()]
        .into_iter()
        .find_map(untrusted)
    {
        // Someone else could have put native code there: never load it,
        // never add to it. Compile instead; the plugin still loads.
        tracing::warn!(cache = %root.display(), reason = %why, "not using the compiled-code cache; compiling instead (make the folder owned by this user with mode 0700)");
        return Component::new(engine, bytes)
            .map(|c| (c, CompileSource::Compiled))
            .map_err(CacheError::Compile);
    }
    if path.exists() {
        // SAFETY: the artifact was written by this code into a folder only
        // sendbox can write (0700), under a name that is the hash of its
        // source; wasmtime checks the header and the engine's compatibility.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => return Ok((c, CompileSource::Cache)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unusable compiled artifact; compiling again");
            }
        }
    }
    let compiled = engine
        .precompile_component(bytes)
        .map_err(CacheError::Compile)?;
    sendbox_fs::private_dir(&dir).map_err(|e| CacheError::Io(dir.clone(), e))?;
    sendbox_fs::write_atomic(&path, &compiled).map_err(|e| CacheError::Io(path.clone(), e))?;
    // SAFETY: `compiled` was just produced by this engine.
    let component =
        unsafe { Component::deserialize(engine, &compiled) }.map_err(CacheError::Compile)?;
    Ok((component, CompileSource::Compiled))
}
