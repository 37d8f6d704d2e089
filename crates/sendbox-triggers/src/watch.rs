//! The file trigger: watched folders, with include/exclude globs,
//! debouncing, contents read by the host, and paths relative to the root.
//!
//! A file still being written fires once, `debounce` after its last change.
//! Symlinks leading out of the watched folder are not followed. Events that
//! arrive while the plugin is busy wait in a queue; none are dropped, and a
//! stop (shutdown or reload) still sends the changes already seen.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use globset::GlobSet;
use notify::{EventKind, RecursiveMode, Watcher};
use sendbox_types::{Bytes, Event, FileChange, FileEvent};

use crate::{Dispatch, Job, new_event_id};

/// The trigger's name in config, logs and metrics.
pub const TYPE: &str = "file";

/// One watched folder of one plugin.
#[derive(Debug, Clone)]
pub struct Watch {
    /// The plugin.
    pub plugin: String,
    /// The watch's name, passed in events.
    pub name: String,
    /// The folder; created if missing and resolved (symlinks, `..`) when
    /// the watch starts.
    pub dir: PathBuf,
    /// Watch subfolders too.
    pub recursive: bool,
    /// Only paths matching one of these (relative to `dir`); empty: all.
    pub include: GlobSet,
    /// Never paths matching one of these.
    pub exclude: GlobSet,
    /// Quiet time after the last change before the event fires.
    pub debounce: Duration,
    /// Files up to this size have their contents passed in the event.
    pub max_contents_bytes: u64,
    /// Emit `created` for files already present at start.
    pub process_existing: bool,
}

impl Watch {
    fn relative(&self, path: &Path) -> Option<String> {
        let rel = path.strip_prefix(&self.dir).ok()?;
        let s: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let s = s.join("/");
        if s.is_empty() {
            return None;
        }
        if !self.include.is_empty() && !self.include.is_match(&s) {
            return None;
        }
        if self.exclude.is_match(&s) {
            return None;
        }
        Some(s)
    }

    /// Builds the event for `path`, or `None` when it must be ignored (a
    /// folder, or a symlink leading outside the root).
    fn event(&self, path: &Path, change: FileChange) -> Option<FileEvent> {
        let rel = self.relative(path)?;
        if change == FileChange::Removed || !path.exists() {
            return Some(FileEvent {
                watch: self.name.clone(),
                path: rel,
                change: FileChange::Removed,
                size: None,
                contents: None,
            });
        }
        let real = path.canonicalize().ok()?;
        if !real.starts_with(&self.dir) {
            tracing::warn!(plugin = %self.plugin, path = %path.display(), "ignoring a symlink that leads out of the watched folder");
            return None;
        }
        let meta = std::fs::metadata(&real).ok()?;
        if !meta.is_file() {
            return None;
        }
        let contents = (meta.len() <= self.max_contents_bytes)
            .then(|| std::fs::read(&real).ok().map(Bytes))
            .flatten();
        Some(FileEvent {
            watch: self.name.clone(),
            path: rel,
            change,
            size: Some(meta.len()),
            contents,
        })
    }
}

fn existing(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            if recursive {
                existing(&p, recursive, out);
            }
        } else {
            out.push(p);
        }
    }
}

/// A folder being watched, not yet handing out events: changes from the
/// moment [`Started::new`] returns are kept for [`Started::run`].
pub struct Started {
    w: Watch,
    watcher: notify::RecommendedWatcher,
    rx: tokio::sync::mpsc::UnboundedReceiver<notify::Event>,
}

impl Started {
    /// Creates and resolves the folder and starts watching it. Fails if
    /// the folder cannot be created or watched.
    pub fn new(mut w: Watch) -> Result<Started, notify::Error> {
        std::fs::create_dir_all(&w.dir).map_err(notify::Error::io)?;
        w.dir = w.dir.canonicalize().map_err(notify::Error::io)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if let Ok(ev) = res {
                    let _ = tx.send(ev);
                }
            })?;
        watcher.watch(
            &w.dir,
            if w.recursive {
                RecursiveMode::Recursive
            } else {
                RecursiveMode::NonRecursive
            },
        )?;
        Ok(Started { w, watcher, rx })
    }

    /// Hands events to `dispatch` until `shutdown`; see [`run`].
    pub async fn run(self, dispatch: Dispatch, shutdown: impl std::future::Future<Output = ()>) {
        let Started { w, watcher, rx } = self;
        serve(w, watcher, rx, dispatch, shutdown).await;
    }
}

/// Watches until `shutdown`, then stops taking changes but still sends the
/// ones already seen once they settle, so none is lost to a reload or a
/// stop. Returns an error if the folder cannot be watched.
pub async fn run(
    w: Watch,
    dispatch: Dispatch,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), notify::Error> {
    Started::new(w)?.run(dispatch, shutdown).await;
    Ok(())
}

async fn serve(
    w: Watch,
    watcher: notify::RecommendedWatcher,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<notify::Event>,
    dispatch: Dispatch,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut pending: HashMap<PathBuf, (FileChange, Instant)> = HashMap::new();
    if w.process_existing {
        let mut files = Vec::new();
        existing(&w.dir, w.recursive, &mut files);
        for f in files {
            pending.insert(f, (FileChange::Created, Instant::now() - w.debounce));
        }
    }
    let tick = (w.debounce / 4).max(Duration::from_millis(10));
    let mut watcher = Some(watcher);
    loop {
        tokio::select! {
            _ = &mut shutdown, if watcher.is_some() => {
                // No new changes from here; what is pending still goes out.
                watcher = None;
                rx.close();
            }
            Some(ev) = rx.recv(), if watcher.is_some() => {
                let change = match ev.kind {
                    EventKind::Create(_) => FileChange::Created,
                    EventKind::Modify(_) => FileChange::Modified,
                    EventKind::Remove(_) => FileChange::Removed,
                    _ => continue,
                };
                for p in ev.paths {
                    let entry = pending.entry(p).or_insert((change, Instant::now()));
                    // A file created and then written is one `created`.
                    entry.0 = match (entry.0, change) {
                        (FileChange::Created, FileChange::Modified) => FileChange::Created,
                        (_, c) => c,
                    };
                    entry.1 = Instant::now();
                }
            }
            _ = tokio::time::sleep(tick) => {}
        }
        let now = Instant::now();
        let mut due: Vec<(PathBuf, FileChange)> = pending
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) >= w.debounce)
            .map(|(p, (c, _))| (p.clone(), *c))
            .collect();
        due.sort_by(|a, b| a.0.cmp(&b.0));
        for (path, change) in due {
            pending.remove(&path);
            let Some(event) = w.event(&path, change) else {
                continue;
            };
            let job = Job {
                plugin: w.plugin.clone(),
                event: Event::File(event),
                event_id: new_event_id(TYPE),
            };
            let result = dispatch(job).await;
            tracing::debug!(plugin = %w.plugin, path = %path.display(), ?result, "file event handled");
        }
        if watcher.is_none() && pending.is_empty() {
            return;
        }
    }
}
