//! The config file and every plugin's `.wasm`, watched for changes that
//! call for a reload.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Watches the files a reload depends on and sends once per burst of
/// changes (editors and `cp` write in several steps).
pub struct FileChanges {
    _watcher: Option<notify::RecommendedWatcher>,
    rx: tokio::sync::mpsc::UnboundedReceiver<PathBuf>,
    files: Vec<PathBuf>,
}

impl FileChanges {
    /// Watches the folders holding `files`. If watching fails, reloads
    /// still happen on SIGHUP.
    pub fn new(files: &[PathBuf]) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res
                && !matches!(ev.kind, notify::EventKind::Access(_))
            {
                for p in ev.paths {
                    let _ = tx.send(p);
                }
            }
        });
        let mut me = FileChanges {
            _watcher: None,
            rx,
            files: Vec::new(),
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

    /// Replaces the set of files watched (after a reload).
    pub fn set_files(&mut self, files: &[PathBuf]) {
        use notify::Watcher;
        let canonical: Vec<PathBuf> = files.iter().map(|f| canonical_file(f)).collect();
        if let Some(w) = &mut self._watcher {
            let mut dirs: Vec<PathBuf> = canonical
                .iter()
                .filter_map(|f| f.parent().map(Path::to_owned))
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
        self.files = canonical;
    }

    /// Waits for a change to one of the files, then for `quiet` without
    /// further changes.
    pub async fn next(&mut self, quiet: Duration) {
        loop {
            let Some(p) = self.rx.recv().await else {
                return std::future::pending().await;
            };
            if self.files.contains(&canonical_file(&p)) {
                break;
            }
        }
        loop {
            match tokio::time::timeout(quiet, self.rx.recv()).await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            }
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
