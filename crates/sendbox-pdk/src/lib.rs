//! Write sendbox plugins in Rust.
//!
//! A plugin is a crate built for `wasm32-wasip2` (`crate-type = ["cdylib"]`)
//! that implements [`Plugin`] for one type and exports it with
//! [`export_plugin!`]. It handles only the events it cares about: the others
//! get an empty [`Outcome`]. It returns what it wants sent; the host checks it
//! against policy, commits it with the plugin's [`state`] writes, and
//! delivers it. A plugin never sees a token, a secret, the filesystem, the
//! network or the environment.
//!
//! This crate owns the guest side of `wit/sendbox.wit`. It must not know
//! anything about how the host stores, checks or sends what a plugin returns.
//!
//! # Layout
//!
//! - [`Plugin`] and [`export_plugin!`]: the entry point.
//! - [`Email::to`], [`Outcome`] and [`Response`] helpers: builders for what a
//!   plugin returns.
//! - [`HttpRequest::json`], [`Response::json`]: JSON for webhooks.
//! - [`log`], [`config`], [`state`]: the host's imports.
//! - [`bindings`]: the raw generated bindings, for anything not wrapped here.
//!
//! # Example
//!
//! ```no_run
//! use sendbox_pdk::{Email, HttpRequest, Outcome, Plugin, Response, export_plugin};
//!
//! #[derive(serde::Deserialize)]
//! struct Deploy { service: String, version: String }
//!
//! struct DeployNotice;
//!
//! impl Plugin for DeployNotice {
//!     fn on_webhook(req: HttpRequest) -> Result<Outcome, String> {
//!         let deploy: Deploy = match req.json() {
//!             Ok(d) => d,
//!             Err(reason) => return Ok(Outcome::respond(Response::text(400, &reason))),
//!         };
//!         let to = sendbox_pdk::config::get("to").unwrap_or_else(|| "ops@example.com".into());
//!         Ok(Outcome::email(
//!             Email::to(&to)
//!                 .subject(format!("{} {} deployed", deploy.service, deploy.version))
//!                 .text(format!("{} is now at {}.", deploy.service, deploy.version))
//!                 .build(),
//!         ))
//!     }
//! }
//!
//! export_plugin!(DeployNotice);
//! ```

#![deny(missing_docs)]

extern crate self as sendbox_pdk;

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// The bindings generated from `wit/sendbox.wit`.
#[allow(missing_docs, clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "hook",
        pub_export_macro: true,
        export_macro_name: "__export_hook",
        default_bindings_module: "sendbox_pdk::bindings",
        runtime_path: "sendbox_pdk::__wit_bindgen::rt",
    });
}

pub use bindings::sendbox::plugin::types::{
    Attachment, Email, Event, FileChange, FileEvent, HttpRequest, HttpResponse, Outcome, Tick,
};

/// What a plugin does with each kind of event. Implement only the methods
/// you need; the rest return an empty outcome (nothing sent, `202` for a
/// webhook).
///
/// Returning `Err(reason)` commits nothing: no email, no state write. The
/// reason is logged, and a webhook caller gets a `500`.
pub trait Plugin {
    /// A watched file was created, modified or removed.
    fn on_file(event: FileEvent) -> Result<Outcome, String> {
        let _ = event;
        Ok(Outcome::none())
    }

    /// A webhook request arrived (already authenticated by the host).
    fn on_webhook(request: HttpRequest) -> Result<Outcome, String> {
        let _ = request;
        Ok(Outcome::none())
    }

    /// A schedule fired.
    fn on_schedule(tick: Tick) -> Result<Outcome, String> {
        let _ = tick;
        Ok(Outcome::none())
    }
}

/// Routes an event to the right [`Plugin`] method. Used by
/// [`export_plugin!`].
#[doc(hidden)]
pub fn dispatch<P: Plugin>(event: Event) -> Result<Outcome, String> {
    match event {
        Event::File(f) => P::on_file(f),
        Event::Webhook(r) => P::on_webhook(r),
        Event::Schedule(t) => P::on_schedule(t),
    }
}

/// Exports a type implementing [`Plugin`] as the component's `handle`.
///
/// ```ignore
/// struct MyPlugin;
/// impl sendbox_pdk::Plugin for MyPlugin { /* ... */ }
/// sendbox_pdk::export_plugin!(MyPlugin);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ident) => {
        impl $crate::bindings::Guest for $plugin {
            fn handle(
                event: $crate::Event,
            ) -> ::core::result::Result<$crate::Outcome, ::std::string::String> {
                $crate::dispatch::<$plugin>(event)
            }
        }
        $crate::bindings::__export_hook!($plugin);
    };
}

impl Outcome {
    /// Nothing to send; a webhook gets the default `202`.
    pub fn none() -> Outcome {
        Outcome {
            emails: Vec::new(),
            response: None,
        }
    }

    /// Send one email.
    pub fn email(email: Email) -> Outcome {
        Outcome {
            emails: vec![email],
            response: None,
        }
    }

    /// Send these emails.
    pub fn emails(emails: Vec<Email>) -> Outcome {
        Outcome {
            emails,
            response: None,
        }
    }

    /// Send nothing and answer the webhook with `response`.
    pub fn respond(response: HttpResponse) -> Outcome {
        Outcome {
            emails: Vec::new(),
            response: Some(response),
        }
    }

    /// Also answer the webhook with `response`.
    pub fn with_response(mut self, response: HttpResponse) -> Outcome {
        self.response = Some(response);
        self
    }
}

/// Builds an [`Email`]. Start with [`Email::to`].
#[derive(Debug, Clone)]
#[must_use = "call .build() to get the Email"]
pub struct EmailBuilder {
    email: Email,
}

impl Email {
    /// Starts an email to one recipient; add more with
    /// [`EmailBuilder::to`].
    pub fn to(address: impl Into<String>) -> EmailBuilder {
        EmailBuilder {
            email: Email {
                to: vec![address.into()],
                cc: Vec::new(),
                bcc: Vec::new(),
                sender: None,
                reply_to: None,
                subject: String::new(),
                text: None,
                html: None,
                attachments: Vec::new(),
                headers: Vec::new(),
                idempotency_key: None,
            },
        }
    }
}

impl EmailBuilder {
    /// Adds a recipient.
    pub fn to(mut self, address: impl Into<String>) -> Self {
        self.email.to.push(address.into());
        self
    }
    /// Adds a carbon-copy recipient.
    pub fn cc(mut self, address: impl Into<String>) -> Self {
        self.email.cc.push(address.into());
        self
    }
    /// Adds a blind carbon-copy recipient.
    pub fn bcc(mut self, address: impl Into<String>) -> Self {
        self.email.bcc.push(address.into());
        self
    }
    /// Sets the From address (must be allowed for this plugin by the
    /// operator; by default the account's mailbox is used).
    pub fn from(mut self, address: impl Into<String>) -> Self {
        self.email.sender = Some(address.into());
        self
    }
    /// Sets Reply-To.
    pub fn reply_to(mut self, address: impl Into<String>) -> Self {
        self.email.reply_to = Some(address.into());
        self
    }
    /// Sets the subject (no line breaks).
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.email.subject = subject.into();
        self
    }
    /// Sets the plain-text body.
    pub fn text(mut self, body: impl Into<String>) -> Self {
        self.email.text = Some(body.into());
        self
    }
    /// Sets the HTML body.
    pub fn html(mut self, body: impl Into<String>) -> Self {
        self.email.html = Some(body.into());
        self
    }
    /// Attaches a file.
    pub fn attach(
        mut self,
        filename: impl Into<String>,
        content_type: impl Into<String>,
        data: Vec<u8>,
    ) -> Self {
        self.email.attachments.push(Attachment {
            filename: filename.into(),
            content_type: content_type.into(),
            data,
        });
        self
    }
    /// Adds a header such as `X-Priority` (not From, To, Subject... which
    /// the host writes).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.email.headers.push((name.into(), value.into()));
        self
    }
    /// Emails with the same key from this plugin are delivered once.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.email.idempotency_key = Some(key.into());
        self
    }
    /// Finishes the email.
    pub fn build(self) -> Email {
        self.email
    }
}

/// Builders for webhook responses.
pub struct Response;

impl Response {
    /// A response with a status and no body.
    pub fn status(status: u16) -> HttpResponse {
        HttpResponse {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A `text/plain` response.
    pub fn text(status: u16, body: &str) -> HttpResponse {
        HttpResponse {
            status,
            headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    /// An `application/json` response.
    pub fn json<T: serde::Serialize>(status: u16, value: &T) -> HttpResponse {
        HttpResponse {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(value).unwrap_or_else(|e| {
                format!("{{\"error\":\"cannot serialize response: {e}\"}}").into_bytes()
            }),
        }
    }
}

impl HttpRequest {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Parses the body as JSON, with a reason fit for a `400` on failure.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_slice(&self.body)
            .map_err(|e| format!("body is not the expected JSON: {e}"))
    }

    /// The body as UTF-8 text.
    pub fn text(&self) -> Result<&str, String> {
        std::str::from_utf8(&self.body).map_err(|e| format!("body is not UTF-8: {e}"))
    }
}

impl FileChange {
    /// `created`, `modified` or `removed`.
    pub fn as_str(self) -> &'static str {
        match self {
            FileChange::Created => "created",
            FileChange::Modified => "modified",
            FileChange::Removed => "removed",
        }
    }
}

/// Writing to the host's log (tagged with plugin and event ids).
pub mod log {
    use crate::bindings::sendbox::plugin::host::{self, Level};

    /// Logs at debug level.
    pub fn debug(message: &str) {
        host::log(Level::Debug, message);
    }
    /// Logs at info level.
    pub fn info(message: &str) {
        host::log(Level::Info, message);
    }
    /// Logs at warn level.
    pub fn warn(message: &str) {
        host::log(Level::Warn, message);
    }
    /// Logs at error level.
    pub fn error(message: &str) {
        host::log(Level::Error, message);
    }
}

/// This plugin's configuration values from the operator's config file.
pub mod config {
    /// Reads a value.
    pub fn get(key: &str) -> Option<String> {
        crate::bindings::sendbox::plugin::host::config(key)
    }

    /// Reads a value or falls back to `default`.
    pub fn get_or(key: &str, default: &str) -> String {
        get(key).unwrap_or_else(|| default.to_owned())
    }

    /// Reads and parses a value; `Err` names the key and the bad value.
    pub fn parse<T: std::str::FromStr>(key: &str) -> Result<Option<T>, String>
    where
        T::Err: std::fmt::Display,
    {
        match get(key) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|e| format!("config `{key}` = {v:?}: {e}")),
        }
    }
}

/// This plugin's persistent key-value state. Writes are kept only if the
/// current call returns `Ok`.
pub mod state {
    use crate::bindings::sendbox::plugin::state as raw;

    /// Reads a value.
    pub fn get(key: &str) -> Option<Vec<u8>> {
        raw::get(key)
    }
    /// Writes a value; fails when the quota would be exceeded.
    pub fn set(key: &str, value: &[u8]) -> Result<(), String> {
        raw::set(key, value)
    }
    /// Removes a value.
    pub fn delete(key: &str) {
        raw::delete(key)
    }
    /// Keys starting with `prefix`, in byte order.
    pub fn keys(prefix: &str) -> Vec<String> {
        raw::keys(prefix)
    }
    /// Reads and parses a JSON value; a missing key is `Ok(None)`.
    pub fn get_json<T: serde::de::DeserializeOwned>(key: &str) -> Result<Option<T>, String> {
        match get(key) {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("state `{key}` is not the expected JSON: {e}")),
        }
    }
    /// Writes a value as JSON.
    pub fn set_json<T: serde::Serialize>(key: &str, value: &T) -> Result<(), String> {
        let bytes = serde_json::to_vec(value).map_err(|e| e.to_string())?;
        set(key, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_builder_fills_every_field() {
        let e = Email::to("a@example.com")
            .to("b@example.com")
            .cc("c@example.com")
            .bcc("d@example.com")
            .from("alerts@example.com")
            .reply_to("ops@example.com")
            .subject("s")
            .text("t")
            .html("<p>h</p>")
            .attach("f.txt", "text/plain", b"x".to_vec())
            .header("X-Tag", "v")
            .idempotency_key("k")
            .build();
        assert_eq!(e.to, ["a@example.com", "b@example.com"]);
        assert_eq!(e.cc, ["c@example.com"]);
        assert_eq!(e.bcc, ["d@example.com"]);
        assert_eq!(e.sender.as_deref(), Some("alerts@example.com"));
        assert_eq!(e.reply_to.as_deref(), Some("ops@example.com"));
        assert_eq!(e.attachments[0].filename, "f.txt");
        assert_eq!(e.headers, [("X-Tag".to_string(), "v".to_string())]);
        assert_eq!(e.idempotency_key.as_deref(), Some("k"));
    }

    #[test]
    fn request_json_reports_the_parse_error() {
        let req = HttpRequest {
            method: "POST".into(),
            path: "/".into(),
            query: String::new(),
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: b"{not json".to_vec(),
        };
        let err = req.json::<serde_json::Value>().unwrap_err();
        assert!(err.starts_with("body is not the expected JSON"), "{err}");
        assert_eq!(req.header("content-type"), Some("application/json"));
    }

    #[test]
    fn json_response_sets_content_type() {
        let r = Response::json(400, &serde_json::json!({"error": "bad"}));
        assert_eq!(r.status, 400);
        assert_eq!(r.headers[0].1, "application/json");
        assert_eq!(r.body, br#"{"error":"bad"}"#);
    }
}
