//! The durable outbox: every accepted email is stored before anyone is told
//! it was accepted, and every state change after that is on record.
//!
//! This crate owns the store (a SQLite file, or a PostgreSQL database that
//! several nodes share): schema migrations, the one-transaction
//! commit of a plugin call (its emails *and* its state writes, or none of
//! them), policy at enqueue, idempotency keys, the suppression list, message
//! states (`queued → sending → sent`, or `retry`, or `dead`) and the audit
//! trail. It must not know about wasmtime, SMTP or tokens: delivery workers
//! claim messages here and report back what the transport said.
//!
//! # Layout
//!
//! - `model`: what the outbox stores and answers, whatever the backend
//!   ([`Call`], [`Message`], its delivery [`State`], [`OutboxError`] —
//!   which never exposes the driver). Plugin key-value state is always
//!   called `plugin_state`.
//! - `policy`: [`Policy`] and the checks of a call that need no store.
//! - `store`: [`Store`], the async operations every backend provides;
//!   `behaviour`: the suite every backend passes
//!   ([`store_behaviour_tests!`]).
//! - `sqlite`: the SQLite backend — [`Outbox`] with its writer thread
//!   (`writer`), the commit of a call (`commit`), reads (`read`), plugin
//!   state (`plugin_state`), the delivery lock (`lock`), WAL checkpoints
//!   off the writer's path (`checkpoint`), migrations
//!   (`schema`) and [`Store`] on `Arc<Outbox>` (`store`).
//! - `postgres`: the PostgreSQL backend, one database shared by several
//!   nodes — [`PgOutbox`] with its pool, migrations, the commit of a call,
//!   claims with leases and fenced results (`delivery`), and [`Store`] on
//!   `Arc<PgOutbox>`.
//!
//! # Durability
//!
//! The database runs in WAL mode with `synchronous = FULL`: a commit returns
//! only after the WAL is fsynced, so an acknowledged outcome survives power
//! loss. To keep that affordable under load, commits go through one writer
//! thread that groups whatever is waiting — commits and delivery results —
//! into one transaction (each call in its own savepoint) and pays one fsync
//! for the group. A message's state row is kept apart from its content
//! (`message_bodies`), so delivery's state changes rewrite small rows.
//!
//! ```no_run
//! use sendbox_outbox::{Call, Outbox, Policy};
//! let outbox = Outbox::open("var/sendbox.db".as_ref())?;
//! let committed = outbox.commit(Call {
//!     plugin: "file-alert".into(),
//!     trigger: "file".into(),
//!     event_id: "evt-1".into(),
//!     account: "alerts".into(),
//!     account_mailbox: "alerts@example.com".into(),
//!     policy: Policy::default(),
//!     emails: vec![],
//!     state_changes: vec![],
//!     ..Default::default()
//! })?;
//! println!("queued {:?}", committed.queued);
//! # Ok::<(), sendbox_outbox::OutboxError>(())
//! ```

#![deny(missing_docs)]

mod any;
pub mod behaviour;
mod model;
mod policy;
mod postgres;
mod sqlite;
mod store;

pub use any::AnyStore;
pub use model::*;
pub use policy::{Policy, default_idempotency_hours};
pub use postgres::{DEFAULT_LEASE, NodeSeen, PgAddress, PgOutbox, PluginAlone};
pub use sendbox_types::now_ms;
pub use sqlite::Outbox;
pub use store::{Store, Versioned};
