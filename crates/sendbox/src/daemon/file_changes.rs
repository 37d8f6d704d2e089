//! The config file, every plugin's `.wasm` and the drop-in plugins'
//! folder, watched for changes that call for a reload.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

/// Watches the files a reload depends on and sends once per burst of
/// changes (editors and `cp` write in several steps).
///
/// The folders are watched, so every write in them raises an event (a
/// database or a log kept beside the config writes all the time): events
/// are matched against the watched files on the watcher's own thread, and
/// only theirs reach [`FileChanges::next`] — through a channel of one, as
/// one pending change is all a reload needs to know.
pub struct FileChanges {
    _watcher: Option<notify::RecommendedWatcher>,
    rx: tokio::sync::mpsc::Receiver<()>,
    files: Arc<RwLock<Watched>>,
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
    pub fn new(watched: &Watched) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let files = watched;
        let watched: Arc<RwLock<Watched>> = Arc::default();
        let ours = watched.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(ev) = res else { return };
            if matches!(ev.kind, notify::EventKind::Access(_)) {
                return;
            }
            // The folders are watched by their canonical paths, so an
            // event's path is the folder's canonical path and a name.
            let watched = ours.read().unwrap_or_else(PoisonError::into_inner);
            if ev.paths.iter().any(|p| watched.matches(p)) {
                // Full means a change is already pending: that one will do.
                let _ = tx.try_send(());
            }
        });
        let mut me = FileChanges {
            _watcher: None,
            rx,
            files: watched,
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
        use notify::Watcher;
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
                if let Err(e) = w.watch(&d, notify::RecursiveMode::NonRecursive) {
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
