//! WAL checkpoints off the writer's path. SQLite's automatic checkpoint
//! runs inside the commit that crosses the threshold, so every few thousand
//! commits one waits for pages to be copied and the database fsynced: the
//! webhook's p99. Here a thread with its own connection checkpoints
//! passively (never blocking the writer) a few times a second; the
//! writer's automatic checkpoint stays only as a backstop for a WAL that
//! grows past [`BACKSTOP_PAGES`].

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use crate::OutboxError;

/// How often the checkpointer copies the WAL back into the database.
const EVERY: Duration = Duration::from_millis(250);

/// The writer checkpoints by itself only past this many WAL pages (64 MiB
/// of 4 KiB pages), should the checkpointer fall behind.
pub(super) const BACKSTOP_PAGES: i64 = 16_384;

/// The running checkpointer; stops when dropped.
pub(super) struct Checkpointer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    pub(super) fn start(path: &Path) -> Result<Checkpointer, OutboxError> {
        let conn = super::open_conn(path)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sendbox-outbox-checkpoint".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(EVERY) {
                    if let Err(e) =
                        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::warn!(error = %e, "WAL checkpoint failed; the writer's own checkpoint takes over");
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
