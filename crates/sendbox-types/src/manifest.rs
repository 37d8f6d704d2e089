//! What a plugin says about itself — its name, version, description and
//! the config keys it reads — carried inside its component as a custom
//! section named [`SECTION`] holding this struct as JSON.
//!
//! `sendbox plugin build` writes it from the language's own manifest
//! (`Cargo.toml`, `pyproject.toml`, `package.json`); the host reads it
//! without compiling anything. A component without one loads as before.
//!
//! ```
//! use sendbox_types::manifest::{ConfigKey, Manifest};
//! let mut m = Manifest::named("bridge", "1.2.0");
//! m.config.insert("to".into(), ConfigKey::required("Where the emails go."));
//! // The smallest component: its preamble alone.
//! let component = b"\0asm\x0d\x00\x01\x00".to_vec();
//! let described = m.embed_in(&component).unwrap();
//! assert_eq!(Manifest::read_from(&described).unwrap(), Some(m));
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The custom section's name.
pub const SECTION: &str = "sendbox-manifest";

/// Largest manifest read, in bytes of JSON: a description is a few
/// sentences, not a payload.
pub const MAX_BYTES: usize = 64 * 1024;

/// Most config keys a manifest may declare.
pub const MAX_KEYS: usize = 256;

/// A plugin's description of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The plugin's own name, e.g. `webhook-bridge` (the operator's name
    /// for it in the config may differ).
    pub name: String,
    /// Its version, e.g. `0.3.1`.
    pub version: String,
    /// One or two sentences on what it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The config keys it reads (`[plugins.NAME.config]`), by key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, ConfigKey>,
}

/// One config key a plugin reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigKey {
    /// What it means, in a sentence, e.g. `Where the emails go.`
    pub description: String,
    /// The plugin cannot work without it: a config that lacks it is
    /// refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
    /// The value the plugin sees when the config does not set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

impl ConfigKey {
    /// A key the config must set.
    pub fn required(description: &str) -> Self {
        ConfigKey {
            description: description.to_owned(),
            required: true,
            default: None,
        }
    }

    /// A key with a default.
    pub fn with_default(description: &str, default: &str) -> Self {
        ConfigKey {
            description: description.to_owned(),
            required: false,
            default: Some(default.to_owned()),
        }
    }
}

/// Why a manifest cannot be read or written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// The bytes are not a component (or are cut short).
    #[error("not a WebAssembly component: {0}")]
    NotAComponent(&'static str),
    /// The section is there but not a valid manifest.
    #[error("its `{SECTION}` section is not a valid manifest: {0}")]
    Invalid(String),
}

impl Manifest {
    /// A manifest with a name and version and nothing else.
    pub fn named(name: &str, version: &str) -> Self {
        Manifest {
            name: name.to_owned(),
            version: version.to_owned(),
            description: None,
            config: BTreeMap::new(),
        }
    }

    /// Checks what a reader relies on: a name and version, sizes, and
    /// that no key is both required and defaulted.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |m: String| Err(ManifestError::Invalid(m));
        if self.name.trim().is_empty() {
            return bad("`name` is empty".into());
        }
        if self.version.trim().is_empty() {
            return bad("`version` is empty".into());
        }
        if self.config.len() > MAX_KEYS {
            return bad(format!(
                "{} config keys declared; at most {MAX_KEYS}",
                self.config.len()
            ));
        }
        for (key, k) in &self.config {
            if key.is_empty() {
                return bad("a config key is empty".into());
            }
            if k.required && k.default.is_some() {
                return bad(format!(
                    "config key `{key}` is both required and has a default; keep one"
                ));
            }
        }
        Ok(())
    }

    /// The component's manifest, if it carries one (the last, if several).
    pub fn read_from(component: &[u8]) -> Result<Option<Manifest>, ManifestError> {
        let mut found = None;
        for s in sections(component)? {
            if let Some(payload) = s.custom_payload(component, SECTION) {
                found = Some(payload);
            }
        }
        let Some(payload) = found else {
            return Ok(None);
        };
        if payload.len() > MAX_BYTES {
            return Err(ManifestError::Invalid(format!(
                "{} bytes; at most {MAX_BYTES}",
                payload.len()
            )));
        }
        let m: Manifest =
            serde_json::from_slice(payload).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        m.validate()?;
        Ok(Some(m))
    }

    /// The component with this manifest as its only [`SECTION`] (an
    /// earlier one is replaced), appended at the end of the top level.
    pub fn embed_in(&self, component: &[u8]) -> Result<Vec<u8>, ManifestError> {
        self.validate()?;
        let payload =
            serde_json::to_vec(self).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        if payload.len() > MAX_BYTES {
            return Err(ManifestError::Invalid(format!(
                "{} bytes; at most {MAX_BYTES}",
                payload.len()
            )));
        }
        let mut out = Vec::with_capacity(component.len() + payload.len() + 32);
        out.extend_from_slice(&component[..PREAMBLE]);
        for s in sections(component)? {
            if s.custom_payload(component, SECTION).is_none() {
                out.extend_from_slice(&component[s.start..s.end]);
            }
        }
        let mut body = Vec::with_capacity(payload.len() + SECTION.len() + 5);
        leb128(&mut body, SECTION.len());
        body.extend_from_slice(SECTION.as_bytes());
        body.extend_from_slice(&payload);
        out.push(0); // custom section
        leb128(&mut out, body.len());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// The required keys `config` does not set.
    pub fn missing_required<'a>(
        &'a self,
        config: &BTreeMap<String, String>,
    ) -> Vec<(&'a str, &'a ConfigKey)> {
        self.config
            .iter()
            .filter(|(k, c)| c.required && !config.contains_key(*k))
            .map(|(k, c)| (k.as_str(), c))
            .collect()
    }

    /// The keys `config` sets that this plugin does not declare (likely
    /// typos).
    pub fn undeclared<'a>(&self, config: &'a BTreeMap<String, String>) -> Vec<&'a str> {
        config
            .keys()
            .filter(|k| !self.config.contains_key(*k))
            .map(String::as_str)
            .collect()
    }

    /// `config` with the declared defaults added for the keys it lacks.
    pub fn with_defaults(&self, config: &mut BTreeMap<String, String>) {
        for (key, k) in &self.config {
            if let Some(d) = &k.default {
                config.entry(key.clone()).or_insert_with(|| d.clone());
            }
        }
    }
}

/// `\0asm`, then version 0x0d and layer 1: a component.
const PREAMBLE: usize = 8;

/// One top-level section: its bytes from the id to the end.
struct Section {
    start: usize,
    end: usize,
    id: u8,
    /// Where the contents start (after the id and size).
    body: usize,
}

impl Section {
    /// The payload, if this is a custom section called `name`.
    fn custom_payload<'a>(&self, bytes: &'a [u8], name: &str) -> Option<&'a [u8]> {
        if self.id != 0 {
            return None;
        }
        let body = &bytes[self.body..self.end];
        let (len, used) = read_leb128(body)?;
        let rest = body.get(used..)?;
        (rest.get(..len)? == name.as_bytes()).then(|| &rest[len..])
    }
}

/// The top-level sections of a component (nested modules and components
/// are sections too, so what is inside them is never looked at).
fn sections(bytes: &[u8]) -> Result<Vec<Section>, ManifestError> {
    if bytes.len() < PREAMBLE || &bytes[..4] != b"\0asm" {
        return Err(ManifestError::NotAComponent("no `\\0asm` preamble"));
    }
    if bytes[4..PREAMBLE] != [0x0d, 0x00, 0x01, 0x00] {
        return Err(ManifestError::NotAComponent(
            "a core module or another version, not a component",
        ));
    }
    let mut at = PREAMBLE;
    let mut found = Vec::new();
    while at < bytes.len() {
        let id = bytes[at];
        let (size, used) = read_leb128(&bytes[at + 1..]).ok_or(ManifestError::NotAComponent(
            "a section's size is cut short",
        ))?;
        let body = at + 1 + used;
        let end = body
            .checked_add(size)
            .filter(|e| *e <= bytes.len())
            .ok_or(ManifestError::NotAComponent("a section runs past the end"))?;
        found.push(Section {
            start: at,
            end,
            id,
            body,
        });
        at = end;
    }
    Ok(found)
}

/// An unsigned LEB128 u32 and how many bytes it took.
fn read_leb128(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value: u64 = 0;
    for (i, b) in bytes.iter().take(5).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return u32::try_from(value).ok().map(|v| (v as usize, i + 1));
        }
    }
    None
}

fn leb128(out: &mut Vec<u8>, mut value: usize) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &[u8] = b"\0asm\x0d\x00\x01\x00";

    fn described() -> Manifest {
        let mut m = Manifest::named("bridge", "1.0.0");
        m.description = Some("Webhooks to email.".into());
        m.config
            .insert("to".into(), ConfigKey::required("Where the emails go."));
        m.config.insert(
            "prefix".into(),
            ConfigKey::with_default("Subject prefix.", "[hook]"),
        );
        m
    }

    #[test]
    fn embedding_twice_keeps_one_manifest_and_every_other_section() {
        // A component with one other custom section of 200 bytes (a
        // two-byte size) before ours.
        let mut c = EMPTY.to_vec();
        let mut other = vec![4];
        other.extend_from_slice(b"name");
        other.extend(std::iter::repeat_n(7u8, 195));
        c.push(0);
        leb128(&mut c, other.len());
        c.extend_from_slice(&other);
        let once = described().embed_in(&c).unwrap();
        let mut newer = described();
        newer.version = "2.0.0".into();
        let twice = newer.embed_in(&once).unwrap();
        assert_eq!(Manifest::read_from(&twice).unwrap(), Some(newer));
        assert_eq!(sections(&twice).unwrap().len(), 2);
        assert_eq!(&twice[..c.len()], &c[..]);
    }

    #[test]
    fn a_component_without_one_has_none_and_broken_bytes_are_refused() {
        assert_eq!(Manifest::read_from(EMPTY).unwrap(), None);
        assert!(Manifest::read_from(b"\0asm\x01\x00\x00\x00").is_err());
        let mut cut = described().embed_in(EMPTY).unwrap();
        cut.pop();
        assert!(Manifest::read_from(&cut).is_err());
    }

    #[test]
    fn required_defaults_and_typos_are_told_apart() {
        let m = described();
        let mut config = BTreeMap::from([("prefx".to_string(), "x".to_string())]);
        assert_eq!(
            m.missing_required(&config)
                .iter()
                .map(|(k, _)| *k)
                .collect::<Vec<_>>(),
            ["to"]
        );
        assert_eq!(m.undeclared(&config), ["prefx"]);
        m.with_defaults(&mut config);
        assert_eq!(config.get("prefix").map(String::as_str), Some("[hook]"));
        let mut both = described();
        both.config.insert(
            "x".into(),
            ConfigKey {
                description: "d".into(),
                required: true,
                default: Some("v".into()),
            },
        );
        assert!(both.embed_in(EMPTY).is_err());
    }
}
