//! Screen mail submitted to an SMTP listener from a Rust plugin.
//!
//! A listener that names a plugin (`[listeners.NAME] plugin = "..."`) hands
//! it every message before the `250`: the plugin relays it as sent, replaces
//! it with other emails (none: drops it), or refuses it with an SMTP reply.
//! Such a plugin implements [`Screen`] (and [`sendbox_pdk::Plugin`] for the
//! usual events) and is exported with [`export_screening_plugin!`]; the
//! component then implements world `relay-hook`.
//!
//! This crate owns only the guest side of the `smtp` interface; it is apart
//! from `sendbox-pdk` so that plugins which do not screen stay `hook`
//! components that never import `sendbox:plugin/smtp`.

#![deny(missing_docs)]

extern crate self as sendbox_pdk_screen;

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// The bindings of world `relay-hook`; the interfaces it shares with
/// `hook` are `sendbox_pdk::bindings`'.
#[allow(missing_docs, clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "relay-hook",
        pub_export_macro: true,
        export_macro_name: "__export_relay_hook",
        default_bindings_module: "sendbox_pdk_screen::bindings",
        runtime_path: "sendbox_pdk_screen::__wit_bindgen::rt",
        with: {
            "sendbox:plugin/types@0.1.0": sendbox_pdk::bindings::sendbox::plugin::types,
            "sendbox:plugin/host@0.1.0": sendbox_pdk::bindings::sendbox::plugin::host,
            "sendbox:plugin/state@0.1.0": sendbox_pdk::bindings::sendbox::plugin::state,
        },
    });
}

pub use bindings::sendbox::plugin::smtp::{Reply, Submitted, Verdict};

/// A [`sendbox_pdk::Plugin`] that also screens submitted mail.
pub trait Screen: sendbox_pdk::Plugin {
    /// Decides about one submitted message. `Err` answers the client `451`
    /// (it tries again later); nothing is committed.
    fn on_submitted(message: Submitted) -> Result<Verdict, String>;
}

/// Refuses a message with `code` (421-599) and one line of `text`.
pub fn refuse(code: u16, text: impl Into<String>) -> Verdict {
    Verdict::Refuse(Reply {
        code,
        text: text.into(),
    })
}

/// Exports a type implementing [`Screen`]: `handle` goes to its
/// [`sendbox_pdk::Plugin`] methods, `screen` to [`Screen::on_submitted`].
#[macro_export]
macro_rules! export_screening_plugin {
    ($plugin:ident) => {
        impl $crate::bindings::Guest for $plugin {
            fn handle(
                event: ::sendbox_pdk::Event,
            ) -> ::core::result::Result<::sendbox_pdk::Outcome, ::std::string::String> {
                ::sendbox_pdk::dispatch::<$plugin>(event)
            }
            fn screen(
                message: $crate::Submitted,
            ) -> ::core::result::Result<$crate::Verdict, ::std::string::String> {
                <$plugin as $crate::Screen>::on_submitted(message)
            }
        }
        $crate::bindings::__export_relay_hook!($plugin);
    };
}
