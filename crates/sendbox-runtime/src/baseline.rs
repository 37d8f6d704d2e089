//! The benchmarks' baseline: the least a wasmtime embedder must do to run a
//! plugin's `handle` once — a store with a default WASI context and no-op
//! imports, instantiate from a pre-instantiated handle, call. No limits, no
//! log capture, no state overlay, no validation. Not for production use.

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::convert::to_wit_event;
use crate::{Event, bindings, wit};

/// Store data for the baseline.
pub struct Bare {
    wasi: WasiCtx,
    table: ResourceTable,
    config: Arc<BTreeMap<String, String>>,
}

impl WasiView for Bare {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wit::types::Host for Bare {}
impl wit::host::Host for Bare {
    fn log(&mut self, _: wit::host::Level, _: String) -> wasmtime::Result<()> {
        Ok(())
    }
    fn config(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.config.get(&key).cloned())
    }
}
impl wit::state::Host for Bare {
    fn get(&mut self, _: String) -> wasmtime::Result<Option<Vec<u8>>> {
        Ok(None)
    }
    fn set(&mut self, _: String, _: Vec<u8>) -> wasmtime::Result<Result<(), String>> {
        Ok(Ok(()))
    }
    fn delete(&mut self, _: String) -> wasmtime::Result<()> {
        Ok(())
    }
    fn keys(&mut self, _: String) -> wasmtime::Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// A pre-instantiated component on a plain linker.
pub struct BareHook {
    engine: Engine,
    pre: bindings::HookPre<Bare>,
    config: Arc<BTreeMap<String, String>>,
}

impl BareHook {
    /// Compiles `bytes` on `engine` and pre-instantiates it; `config`
    /// answers the plugin's `config` calls.
    pub fn new(
        engine: &Engine,
        bytes: &[u8],
        config: BTreeMap<String, String>,
    ) -> wasmtime::Result<Self> {
        let component = Component::new(engine, bytes)?;
        let mut linker = Linker::<Bare>::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        bindings::Hook::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
        let pre = bindings::HookPre::new(linker.instantiate_pre(&component)?)?;
        Ok(BareHook {
            engine: engine.clone(),
            pre,
            config: Arc::new(config),
        })
    }

    /// One fresh instance and one `handle` call, from synchronous code as
    /// [`Plugin::run`](crate::Plugin::run) is called; returns the number of
    /// emails so the work cannot be optimised away.
    pub fn call(&self, event: &Event) -> wasmtime::Result<usize> {
        wasmtime_wasi::runtime::in_tokio(self.call_async(event))
    }

    /// [`BareHook::call`] on the awaiting task.
    pub async fn call_async(&self, event: &Event) -> wasmtime::Result<usize> {
        let mut store = Store::new(
            &self.engine,
            Bare {
                wasi: WasiCtx::builder().build(),
                table: ResourceTable::new(),
                config: self.config.clone(),
            },
        );
        // The engine has epoch interruption on; a bare embedder must
        // still give the store a deadline.
        store.set_epoch_deadline(u64::MAX / 2);
        let hook = self.pre.instantiate_async(&mut store).await?;
        let out = hook.call_handle(&mut store, &to_wit_event(event)).await?;
        Ok(out.map(|o| o.emails.len()).unwrap_or(0))
    }
}
