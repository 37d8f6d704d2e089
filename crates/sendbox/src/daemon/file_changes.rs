//! The config file, every plugin's `.wasm` and the drop-in plugins'
//! folder, watched for changes that call for a reload.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

/// Watches the files a reload depends on and sends once per burst of
/// changes (editors and `cp` write in several steps).
///
/// The folders are watched (an editor replaces a file by renaming a new
/// one over it), and a database or a log kept beside the config writes
/// there all the time. On Linux the folders are watched for what a reload
/// needs only — a file closed after writing, created, moved, removed, or
/// its attributes changed — so those writes never wake the watcher (each
/// write would, with `notify`'s fixed mask: ~10–20% of the daemon's CPU
/// when relaying with the store beside the config). Events are matched
/// against the watched files as they are read, and only theirs reach
/// [`FileChanges::next`] — through a channel of one, as one pending change
/// is all a reload needs to know.
pub struct FileChanges {
    _watcher: Option<os::Watcher>,
    rx: tokio::sync::mpsc::Receiver<()>,
    files: Arc<RwLock<Watched>>,
    /// Events read from the OS, matching or not.
    events_read: Arc<AtomicU64>,
}

/// What a reload depends on.
#[derive(Debug, Default, Clone)]
pub struct Watched {
    /// Files whose every change counts.
    pub files: Vec<PathBuf>,
    /// Folders where a `.toml` or `.wasm` appearing, changing or going
    /// counts (the drop-in plugins' folder).
    pub dirs: Vec<PathBuf>,
}

impl Watched {
    fn matches(&self, path: &Path) -> bool {
        self.files.iter().any(|f| f == path)
            || (path
                .parent()
                .is_some_and(|d| self.dirs.iter().any(|w| w == d))
                && path.extension().is_some_and(|x| x == "toml" || x == "wasm")
                && path
                    .file_name()
                    .is_some_and(|n| !n.to_string_lossy().starts_with('.')))
    }
}

impl FileChanges {
    /// Watches the folders holding the files, and the folders. If watching
    /// fails, reloads still happen on SIGHUP.
    /// Needs a Tokio runtime.
    pub fn new(watched: &Watched) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let files = watched;
        let watched: Arc<RwLock<Watched>> = Arc::default();
        let events_read = Arc::new(AtomicU64::new(0));
        let (ours, read) = (watched.clone(), events_read.clone());
        // `None`: the OS may have lost events (its queue overflowed).
        let watcher = os::Watcher::new(move |path: Option<&Path>| {
            read.fetch_add(1, Ordering::Relaxed);
            // The folders are watched by their canonical paths, so an
            // event's path is the folder's canonical path and a name.
            let watched = ours.read().unwrap_or_else(PoisonError::into_inner);
            if path.is_none_or(|p| watched.matches(p)) {
                // Full means a change is already pending: that one will do.
                let _ = tx.try_send(());
            }
        });
        let mut me = FileChanges {
            _watcher: None,
            rx,
            files: watched,
            events_read,
        };
        match watcher {
            Ok(w) => me._watcher = Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the config and plugin files; reload with SIGHUP")
            }
        }
        me.set_files(files);
        me
    }

    /// Replaces what is watched (after a reload).
    pub fn set_files(&mut self, watched: &Watched) {
        let canonical: Vec<PathBuf> = watched.files.iter().map(|f| canonical_file(f)).collect();
        let folders: Vec<PathBuf> = watched
            .dirs
            .iter()
            .map(|d| d.canonicalize().unwrap_or_else(|_| d.clone()))
            .collect();
        if let Some(w) = &mut self._watcher {
            let mut dirs: Vec<PathBuf> = canonical
                .iter()
                .filter_map(|f| f.parent().map(Path::to_owned))
                .chain(folders.iter().cloned())
                .collect();
            dirs.sort();
            dirs.dedup();
            for d in dirs {
                // Watching a folder twice is harmless; a missing one is logged.
                if let Err(e) = w.watch(&d) {
                    tracing::warn!(dir = %d.display(), error = %e, "cannot watch folder for reloads");
                }
            }
        }
        *self.files.write().unwrap_or_else(PoisonError::into_inner) = Watched {
            files: canonical,
            dirs: folders,
        };
    }

    /// Waits for a change to one of the files, then for `quiet` without
    /// further changes to them.
    pub async fn next(&mut self, quiet: Duration) {
        if self.rx.recv().await.is_none() {
            return std::future::pending().await;
        }
        while let Ok(Some(())) = tokio::time::timeout(quiet, self.rx.recv()).await {}
    }

    /// Events read from the OS so far, whether they matched a watched
    /// file or not.
    pub fn events_read(&self) -> u64 {
        self.events_read.load(Ordering::Relaxed)
    }
}

/// Linux: inotify on the folders with only the events a reload needs.
#[cfg(target_os = "linux")]
mod os {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, PoisonError, RwLock};

    use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;

    /// A change a reload may need to see; not `MODIFY` (each write), nor
    /// opens, reads and closes without writing.
    fn mask() -> WatchMask {
        WatchMask::CLOSE_WRITE
            | WatchMask::CREATE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE
            | WatchMask::ATTRIB
    }

    pub(super) struct Watcher {
        watches: Watches,
        folders: Arc<RwLock<HashMap<WatchDescriptor, PathBuf>>>,
        reader: tokio::task::JoinHandle<()>,
    }

    impl Watcher {
        pub(super) fn new(
            on_event: impl Fn(Option<&Path>) + Send + 'static,
        ) -> std::io::Result<Watcher> {
            // Non-blocking, as `AsyncFd` needs.
            let inotify = Inotify::init()?;
            let watches = inotify.watches();
            // SAFETY: `Inotify` owns its descriptor, always returns that
            // one, and closes it only when dropped (with the `AsyncFd`, or
            // later: `watches` shares it).
            let mut fd = unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) }
                .map_err(std::io::Error::from)?;
            let folders: Arc<RwLock<HashMap<WatchDescriptor, PathBuf>>> = Arc::default();
            let names = folders.clone();
            let reader = tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                loop {
                    let Ok(mut ready) = fd.readable_mut().await else {
                        return;
                    };
                    let events = match ready.try_io(|i| i.get_mut().read_events(&mut buffer)) {
                        Ok(Ok(events)) => events,
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "cannot read file changes; reload with SIGHUP");
                            return;
                        }
                        // Not readable after all: wait again.
                        Err(_) => continue,
                    };
                    let folders = names.read().unwrap_or_else(PoisonError::into_inner);
                    for event in events {
                        if event.mask.contains(EventMask::Q_OVERFLOW) {
                            on_event(None);
                        } else if let (Some(dir), Some(name)) = (folders.get(&event.wd), event.name)
                        {
                            on_event(Some(&dir.join(name)));
                        }
                    }
                }
            });
            Ok(Watcher {
                watches,
                folders,
                reader,
            })
        }

        /// Watches a folder (again: harmless).
        pub(super) fn watch(&mut self, dir: &Path) -> std::io::Result<()> {
            let wd = self.watches.add(dir, mask())?;
            self.folders
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(wd, dir.to_owned());
            Ok(())
        }
    }

    impl Drop for Watcher {
        fn drop(&mut self) {
            // The task owns the inotify descriptor: it closes with it.
            self.reader.abort();
        }
    }
}

/// Elsewhere: `notify`'s watcher, which reports every write too.
#[cfg(not(target_os = "linux"))]
mod os {
    use std::path::Path;

    use notify::Watcher as _;

    pub(super) struct Watcher(notify::RecommendedWatcher);

    impl Watcher {
        pub(super) fn new(
            on_event: impl Fn(Option<&Path>) + Send + 'static,
        ) -> notify::Result<Watcher> {
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                let Ok(ev) = res else { return };
                if matches!(ev.kind, notify::EventKind::Access(_)) {
                    return;
                }
                if ev.need_rescan() {
                    on_event(None);
                }
                for p in &ev.paths {
                    on_event(Some(p));
                }
            })
            .map(Watcher)
        }

        pub(super) fn watch(&mut self, dir: &Path) -> notify::Result<()> {
            self.0.watch(dir, notify::RecursiveMode::NonRecursive)
        }
    }
}

/// The file's path with its folder resolved (the file itself may not
/// exist between a delete and a rename).
fn canonical_file(f: &Path) -> PathBuf {
    match (f.parent(), f.file_name()) {
        (Some(dir), Some(name)) => (if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
        .canonicalize()
        .map(|d| d.join(name))
        .unwrap_or_else(|_| f.to_owned()),
        _ => f.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Long enough for an event that comes within milliseconds; reached
    /// only when the change was missed.
    const MISSED: Duration = Duration::from_secs(10);
    const QUIET: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn edits_and_replacements_of_the_config_are_seen_and_a_busy_file_beside_it_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("sendbox.toml");
        std::fs::write(&config, "# v1\n").unwrap();
        // A store beside the config, open before the watch starts, as the
        // daemon's is.
        let mut store = std::fs::File::create(dir.path().join("sendbox.db")).unwrap();
        let mut changes = FileChanges::new(&Watched {
            files: vec![config.clone()],
            dirs: Vec::new(),
        });

        // Thousands of writes to it: none is a change of the config.
        for i in 0..2000 {
            writeln!(store, "row {i}").unwrap();
            if i % 100 == 0 {
                store.sync_data().unwrap();
            }
        }
        store.sync_data().unwrap();
        let woke = tokio::time::timeout(Duration::from_millis(300), changes.next(QUIET)).await;
        assert!(woke.is_err(), "a write beside the config is not a change");
        #[cfg(target_os = "linux")]
        assert_eq!(
            changes.events_read(),
            0,
            "on Linux the writes beside the config are not even read"
        );

        // Written in place, then replaced as an editor does (rename).
        std::fs::write(&config, "# v2\n").unwrap();
        tokio::time::timeout(MISSED, changes.next(QUIET))
            .await
            .expect("an edit in place is seen");
        let new = dir.path().join(".sendbox.toml.swp");
        std::fs::write(&new, "# v3\n").unwrap();
        std::fs::rename(&new, &config).unwrap();
        tokio::time::timeout(MISSED, changes.next(QUIET))
            .await
            .expect("a replacement is seen");
        // Removed, then back.
        std::fs::remove_file(&config).unwrap();
        tokio::time::timeout(MISSED, changes.next(QUIET))
            .await
            .expect("a removal is seen");
        std::fs::write(&config, "# v4\n").unwrap();
        tokio::time::timeout(MISSED, changes.next(QUIET))
            .await
            .expect("a new file is seen");
    }

    #[tokio::test]
    async fn a_plugin_dropped_into_the_watched_folder_is_seen_and_a_hidden_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("plugins.d");
        std::fs::create_dir(&plugins).unwrap();
        let mut changes = FileChanges::new(&Watched {
            files: Vec::new(),
            dirs: vec![plugins.clone()],
        });
        std::fs::write(plugins.join(".partial.wasm"), b"half").unwrap();
        std::fs::write(plugins.join("notes.txt"), b"not a plugin").unwrap();
        let woke = tokio::time::timeout(Duration::from_millis(300), changes.next(QUIET)).await;
        assert!(woke.is_err(), "neither a hidden file nor a .txt counts");
        std::fs::rename(plugins.join(".partial.wasm"), plugins.join("bridge.wasm")).unwrap();
        tokio::time::timeout(MISSED, changes.next(QUIET))
            .await
            .expect("a plugin moved into the folder is seen");
        std::fs::write(plugins.join("bridge.toml"), "").unwrap();
        tokio::time::timeout(MISSED, changes.next(QUIET))
            .await
            .expect("its settings file is seen");
    }
}
