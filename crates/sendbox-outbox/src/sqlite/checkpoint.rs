//! WAL checkpoints off the writer's path. SQLite's automatic checkpoint
//! runs inside the commit that crosses the threshold, so every few thousand
//! commits one waits for pages to be copied and the database fsynced: the
//! webhook's p99. Here a thread with its own connection checkpoints
//! passively (never blocking the writer) a few times a second; the
//! writer's automatic checkpoint stays only as a backstop for a WAL that
//! grows past [`BACKSTOP_PAGES`].
//!
//! Under steady writing a passive checkpoint never quite finishes (frames
//! are appended while it copies), and SQLite rewrites the WAL from its
//! start only after one that did: the file grew to the backstop, and every
//! commit appended to a longer file, whose fsync must also journal the new
//! size (here ~2× the fsync of blocks the file already has). So after each
//! pass the checkpointer raises [`CatchUp`], and the writer, between two
//! groups, checkpoints the few frames appended meanwhile itself; its next
//! transaction starts the WAL over, so the file stops at what 100 ms of
//! commits write and commits overwrite it.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::Connection;

use crate::OutboxError;

/// How often the checkpointer copies the WAL back into the database: a
/// commit writes ~10 pages (row, body, indexes, audit, counters), so at a
/// few thousand commits a second this keeps the WAL file near 16 MiB.
const EVERY: Duration = Duration::from_millis(100);

/// The writer checkpoints by itself only past this many WAL pages (64 MiB
/// of 4 KiB pages), should the checkpointer fall behind.
pub(super) const BACKSTOP_PAGES: i64 = 16_384;

/// Raised by the checkpointer after each pass; the writer finishes it.
#[derive(Clone)]
pub(super) struct CatchUp(Option<Arc<AtomicBool>>);

impl CatchUp {
    /// `enabled: false` leaves the passes unfinished (a benchmark baseline).
    pub(super) fn new(enabled: bool) -> CatchUp {
        CatchUp(enabled.then(Arc::default))
    }

    fn raise(&self) {
        if let Some(flag) = &self.0 {
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// On the writer thread, between groups: copies what the last pass
    /// left (the frames appended while it ran), so the WAL starts over.
    pub(super) fn finish_on_writer(&self, writer: &Connection) {
        if let Some(flag) = &self.0
            && flag.swap(false, Ordering::Relaxed)
            && let Err(e) = writer.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        {
            tracing::debug!(error = %e, "finishing a WAL checkpoint on the writer failed");
        }
    }
}

/// The running checkpointer; stops when dropped.
pub(super) struct Checkpointer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    pub(super) fn start(path: &Path, catch_up: CatchUp) -> Result<Checkpointer, OutboxError> {
        let conn = super::open_conn(path)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("outbox-checkpt".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(EVERY) {
                    if let Err(e) =
                        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::warn!(error = %e, "WAL checkpoint failed; the writer's own checkpoint takes over");
                    } else {
                        catch_up.raise();
                    }
                }
            })
            .map_err(|e| OutboxError::Open {
                path: path.to_owned(),
                message: format!("cannot start the checkpoint thread: {e}"),
            })?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
