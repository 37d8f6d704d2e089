//! Loading a component: compiled code from the cache or the compiler, the
//! check that it imports only what sendbox offers, the world check, and
//! pre-instantiation; also `inspect`, which describes a component without
//! running it.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::instance::PluginInner;
use crate::{
    CompileSource, LoadError, Plugin, PluginSettings, Runtime, bindings, cache, content_hash,
};
use sendbox_types::manifest::{Manifest, ManifestError};

impl Runtime {
    /// Reads and loads a component file. See [`Runtime::load`].
    pub fn load_file(
        &self,
        name: &str,
        path: &Path,
        settings: PluginSettings,
    ) -> Result<Plugin, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            plugin: name.to_owned(),
            path: path.to_owned(),
            source,
        })?;
        self.load(name, &bytes, settings)
    }

    /// Compiles (or loads from cache) a component, checks that every import
    /// is one we offer and that it implements the `hook` world, and
    /// pre-instantiates it.
    pub fn load(
        &self,
        name: &str,
        bytes: &[u8],
        settings: PluginSettings,
    ) -> Result<Plugin, LoadError> {
        settings
            .limits
            .validate()
            .map_err(|reason| LoadError::BadLimits {
                plugin: name.to_owned(),
                reason,
            })?;
        let started = Instant::now();
        let manifest = manifest(name, bytes)?;
        let mut settings = settings;
        if let Some(m) = &manifest {
            if let Some((key, k)) = m.missing_required(&settings.config).first() {
                return Err(LoadError::MissingConfig {
                    plugin: name.to_owned(),
                    key: (*key).to_owned(),
                    description: k.description.clone(),
                });
            }
            m.with_defaults(&mut settings.config);
        }
        let hash = content_hash(bytes);
        let (component, source) = self.compile(name, bytes, &hash)?;
        let plugin = self.prepare(name, component, hash, source, settings, manifest)?;
        tracing::debug!(plugin = name, ?source, hash = %plugin.inner.hash, elapsed_ms = started.elapsed().as_millis() as u64, "plugin loaded");
        Ok(plugin)
    }

    /// Checks a compiled component's imports and world, and
    /// pre-instantiates it.
    fn prepare(
        &self,
        name: &str,
        component: Arc<Component>,
        hash: String,
        source: CompileSource,
        settings: PluginSettings,
        manifest: Option<Manifest>,
    ) -> Result<Plugin, LoadError> {
        check_imports(&self.engine, name, &component)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::WrongWorld {
                plugin: name.to_owned(),
                reason: format!("{e:#}"),
            })?;
        // `relay-hook` plugins also screen SMTP submissions.
        let screen = crate::relay_bindings::RelayHookPre::new(pre.clone()).ok();
        let pre = bindings::HookPre::new(pre).map_err(|e| LoadError::WrongWorld {
            plugin: name.to_owned(),
            reason: format!("{e:#}"),
        })?;
        Ok(Plugin {
            inner: Arc::new(PluginInner {
                name: name.to_owned(),
                hash,
                source,
                pre,
                screen,
                engine: self.engine.clone(),
                settings,
                manifest,
                _component: component,
            }),
        })
    }
}

/// The component's self-description, if it carries one. Bytes that are
/// not a component are left for the compiler, whose error says more.
fn manifest(name: &str, bytes: &[u8]) -> Result<Option<Manifest>, LoadError> {
    match Manifest::read_from(bytes) {
        Ok(m) => Ok(m),
        Err(ManifestError::NotAComponent(_)) => Ok(None),
        Err(e @ ManifestError::Invalid(_)) => Err(LoadError::BadManifest {
            plugin: name.to_owned(),
            reason: e.to_string(),
        }),
    }
}

impl Runtime {
    /// The component another plugin with these bytes holds, else compiled
    /// code from the cache or the compiler.
    fn compile(
        &self,
        name: &str,
        bytes: &[u8],
        hash: &str,
    ) -> Result<(Arc<Component>, CompileSource), LoadError> {
        let shared = self
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(hash)
            .and_then(std::sync::Weak::upgrade);
        if let Some(c) = shared {
            return Ok((c, CompileSource::Shared));
        }
        let (component, source) = self.compile_anew(name, bytes, hash)?;
        let component = Arc::new(component);
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        loaded.retain(|_, c| c.strong_count() > 0);
        loaded.insert(hash.to_owned(), Arc::downgrade(&component));
        Ok((component, source))
    }

    fn compile_anew(
        &self,
        name: &str,
        bytes: &[u8],
        hash: &str,
    ) -> Result<(Component, CompileSource), LoadError> {
        cache::load(&self.engine, self.cache_dir.as_deref(), bytes, hash).map_err(|e| match e {
            cache::CacheError::Compile(e) => LoadError::NotAComponent {
                plugin: name.to_owned(),
                reason: format!("{e:#}"),
            },
            cache::CacheError::Io(path, source) => LoadError::Cache {
                plugin: name.to_owned(),
                path,
                source,
            },
        })
    }
}

/// WASI 0.2 interfaces a plugin may import. They are linked with an empty
/// context: no env, args, preopened directories, sockets or stdin; clocks
/// and randomness work; stdout and stderr go to bounded buffers.
const OFFERED_WASI: &[&str] = &[
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
];

/// WASI 0.2 interfaces that toolchains with an interpreter inside import
/// whether the plugin uses them or not (componentize-py's Python runtime
/// imports every `wasi:sockets` interface). They are linked to a context
/// that refuses every call — no TCP, no UDP, no name lookup, no address
/// allowed — so such a component loads, and a socket it asks for is
/// refused when asked (an error the plugin sees), never opened.
const DENIED_WASI: &[&str] = &[
    "wasi:sockets/network",
    "wasi:sockets/instance-network",
    "wasi:sockets/tcp",
    "wasi:sockets/tcp-create-socket",
    "wasi:sockets/udp",
    "wasi:sockets/udp-create-socket",
    "wasi:sockets/ip-name-lookup",
];

/// Our own interfaces.
const OFFERED_SENDBOX: &[&str] = &[
    "sendbox:plugin/types",
    "sendbox:plugin/host",
    "sendbox:plugin/state",
    "sendbox:plugin/smtp",
];

/// How the host links one import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Linked {
    /// Linked and working (within the sandbox's limits).
    Offered,
    /// Linked, and every call refused (see [`DENIED_WASI`]).
    Denied,
    /// Not linked: the component is refused at load.
    Refused,
}

fn linked(import: &str) -> Linked {
    let (iface, version) = import.split_once('@').unwrap_or((import, ""));
    let known = if OFFERED_SENDBOX.contains(&iface) {
        version.starts_with("0.1.")
    } else {
        (OFFERED_WASI.contains(&iface) || DENIED_WASI.contains(&iface))
            && version.starts_with("0.2.")
    };
    match known {
        false => Linked::Refused,
        true if DENIED_WASI.contains(&iface) => Linked::Denied,
        true => Linked::Offered,
    }
}

fn check_imports(engine: &Engine, plugin: &str, component: &Component) -> Result<(), LoadError> {
    for (import, _) in component.component_type().imports(engine) {
        if linked(import) == Linked::Refused {
            return Err(LoadError::UnsupportedImport {
                plugin: plugin.to_owned(),
                import: import.to_owned(),
            });
        }
    }
    Ok(())
}

/// What a component imports and exports, for `sendbox plugin inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The world it was checked against.
    pub world: &'static str,
    /// Whether it implements that world with only offered imports.
    pub implements_world: bool,
    /// Why not, when it does not.
    pub problem: Option<String>,
    /// Every import, with whether the host offers it.
    pub imports: Vec<InspectedItem>,
    /// Every export.
    pub exports: Vec<String>,
    /// SHA-256 of the bytes.
    pub sha256: String,
    /// What the plugin says about itself, if it carries a manifest.
    pub manifest: Option<Manifest>,
}

/// One import of an inspected component.
#[derive(Debug, Clone, Serialize)]
pub struct InspectedItem {
    /// Full name, e.g. `wasi:cli/stdout@0.2.6`.
    pub name: String,
    /// Whether sendbox offers it (linked, working or denied).
    pub offered: bool,
    /// How it is linked.
    pub linked: Linked,
}

/// The world plugins implement.
pub const WORLD: &str = "sendbox:plugin/hook@0.1.0";

/// The world of plugins that also screen SMTP submissions.
pub const RELAY_WORLD: &str = "sendbox:plugin/relay-hook@0.1.0";

impl Runtime {
    /// Describes a component without running it.
    pub fn inspect(&self, name: &str, bytes: &[u8]) -> Result<Inspection, LoadError> {
        let manifest = manifest(name, bytes)?;
        let hash = content_hash(bytes);
        let (component, source) = self.compile(name, bytes, &hash)?;
        let ty = component.component_type();
        let imports = ty
            .imports(&self.engine)
            .map(|(name, _)| InspectedItem {
                name: name.to_owned(),
                offered: linked(name) != Linked::Refused,
                linked: linked(name),
            })
            .collect();
        let exports = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_owned())
            .collect();
        // The same compiled component: inspecting never compiles twice.
        let prepared = self.prepare(
            name,
            component.clone(),
            hash.clone(),
            source,
            PluginSettings::default(),
            None,
        );
        let world = match &prepared {
            Ok(p) if p.screens() => RELAY_WORLD,
            _ => WORLD,
        };
        let problem = prepared.err().map(|e| e.to_string());
        Ok(Inspection {
            world,
            implements_world: problem.is_none(),
            problem,
            imports,
            exports,
            sha256: hash,
            manifest,
        })
    }
}
