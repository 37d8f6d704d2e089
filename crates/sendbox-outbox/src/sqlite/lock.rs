//! One delivering process per database: an exclusive lock on `<db>.lock`,
//! released by the kernel when the process dies.

use std::path::PathBuf;
use std::sync::PoisonError;

use super::Outbox;
use crate::OutboxError;

impl Outbox {
    /// Makes this process the one that delivers from this database, until
    /// it exits or drops the outbox: an exclusive lock on `<db>.lock`, which
    /// the kernel releases when the process dies (kill -9 included). A
    /// second process is refused with [`OutboxError::Locked`], naming the
    /// holder. `holder` describes this process, e.g. `sendbox run`.
    pub fn lock_for_delivery(&self, holder: &str) -> Result<(), OutboxError> {
        use std::io::{Read, Seek, Write};
        let mut slot = self
            .delivery_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.is_some() {
            return Ok(());
        }
        let mut lock_path = self.path.clone().into_os_string();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let open_err = |e: std::io::Error| OutboxError::Open {
            path: lock_path.clone(),
            message: format!("cannot open the lock file: {e}"),
        };
        let mut file = sendbox_fs::private_file(&lock_path).map_err(open_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(OutboxError::Locked {
                    path: self.path.clone(),
                    holder: if holder.is_empty() {
                        "another process".into()
                    } else {
                        holder.into()
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(open_err(e)),
        }
        let me = format!(
            "{holder} (pid {}) since {}",
            std::process::id(),
            chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
        );
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(me.as_bytes()))
            .and_then(|()| file.flush());
        written.map_err(open_err)?;
        *slot = Some(file);
        Ok(())
    }
}
