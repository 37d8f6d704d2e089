//! The file trigger: watched folders, with include/exclude globs,
//! debouncing, contents read by the host, and paths relative to the root.
//!
//! A file fires once, when it is complete: `debounce` after its last change
//! and, when it was written, not before the writer closed it (whichever is
//! later; a writer that keeps a file open longer than [`OPEN_WAIT`] past
//! its last change is not waited for). Symlinks are never followed while
//! walking a folder, and a file reached through one that leads out of the
//! watched folder is ignored. A folder moved into a recursive watch reports
//! every file in it. When the kernel's event queue overflows, the folder is
//! rescanned and every file changed since shortly before the last event is
//! reported again as `modified`. Contents are read up to
//! `max_contents_bytes` and no further, even if the file grows meanwhile.
//! Events that arrive while the plugin is busy wait in a queue; none are
//! dropped, and a stop (shutdown or reload) still sends the changes already
//! seen.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use globset::GlobSet;
use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
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
        let present = std::fs::symlink_metadata(path).is_ok();
        if present && change != FileChange::Removed && !path.exists() {
            // A dangling or looping symlink: nothing to read, nothing gone.
            return None;
        }
        if change == FileChange::Removed || !present {
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
        let (size, contents) = match read_capped(&real, self.max_contents_bytes) {
            // Grew past the cap since its size was read: no contents.
            Some(bytes) => (bytes.len() as u64, Some(Bytes(bytes))),
            None => (meta.len(), None),
        };
        Some(FileEvent {
            watch: self.name.clone(),
            path: rel,
            change,
            size: Some(size),
            contents,
        })
    }
}

/// Reads at most `max` bytes of `path`; `None` if it holds more (or cannot
/// be read). Never reads past the cap, whatever the file's size now.
fn read_capped(path: &Path, max: u64) -> Option<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    let mut buf = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut buf)
        .ok()?;
    (buf.len() as u64 <= max).then_some(buf)
}

/// Files under `dir`, sorted; into subfolders when `recursive`. Symlinks
/// are listed (the event checks where they lead) but never descended into,
/// so a link loop cannot trap the walk.
fn existing(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let Ok(kind) = e.file_type() else { continue };
        if kind.is_dir() {
            if recursive {
                existing(&e.path(), recursive, out);
            }
        } else {
            out.push(e.path());
        }
    }
}

/// Longest a written file is waited for to be closed after its last change.
pub const OPEN_WAIT: Duration = Duration::from_secs(30);

/// A change seen and not yet handed out.
struct Pending {
    change: FileChange,
    /// The last change.
    at: Instant,
    /// Written and not yet closed.
    open: bool,
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
    let mut pending: HashMap<PathBuf, Pending> = HashMap::new();
    let settled = |change| Pending {
        change,
        at: Instant::now() - w.debounce,
        open: false,
    };
    if w.process_existing {
        let mut files = Vec::new();
        existing(&w.dir, w.recursive, &mut files);
        for f in files {
            pending.insert(f, settled(FileChange::Created));
        }
    }
    // Wall time of the latest event, for rescans after an overflow.
    let mut last_event = std::time::SystemTime::now();
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
                if ev.need_rescan() {
                    // The kernel dropped events: look at what changed since
                    // shortly before the last one we saw.
                    let since = last_event - Duration::from_secs(2);
                    tracing::warn!(plugin = %w.plugin, watch = %w.name, "file events were lost (queue overflow); rescanning the folder");
                    let mut files = Vec::new();
                    existing(&w.dir, w.recursive, &mut files);
                    for f in files {
                        let changed = std::fs::symlink_metadata(&f)
                            .and_then(|m| m.modified())
                            .is_ok_and(|t| t >= since);
                        if changed {
                            pending.entry(f).or_insert_with(|| settled(FileChange::Modified));
                        }
                    }
                    continue;
                }
                last_event = std::time::SystemTime::now();
                let (change, writes) = match ev.kind {
                    EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                        // Closed after writing: complete once quiet.
                        for p in &ev.paths {
                            if let Some(entry) = pending.get_mut(p) {
                                entry.open = false;
                            }
                        }
                        continue;
                    }
                    // Only a write (IN_MODIFY) says a writer has the file
                    // open; a create alone (touch, a link) may never close.
                    EventKind::Create(_) => (FileChange::Created, false),
                    EventKind::Modify(ModifyKind::Name(RenameMode::From)) => (FileChange::Removed, false),
                    EventKind::Modify(ModifyKind::Name(_) | ModifyKind::Metadata(_)) => (FileChange::Modified, false),
                    EventKind::Modify(_) => (FileChange::Modified, true),
                    EventKind::Remove(_) => (FileChange::Removed, false),
                    _ => continue,
                };
                for p in ev.paths {
                    // A folder moved (or made) inside a recursive watch:
                    // its files are reported, complete as they are.
                    if w.recursive && change != FileChange::Removed {
                        let is_dir = std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir());
                        if is_dir {
                            let mut files = Vec::new();
                            existing(&p, true, &mut files);
                            for f in files {
                                pending.entry(f).or_insert_with(|| Pending {
                                    change: FileChange::Created,
                                    at: Instant::now(),
                                    open: false,
                                });
                            }
                            continue;
                        }
                    }
                    let entry = pending.entry(p).or_insert(Pending {
                        change,
                        at: Instant::now(),
                        open: false,
                    });
                    // A file created and then written is one `created`.
                    entry.change = match (entry.change, change) {
                        (FileChange::Created, FileChange::Modified) => FileChange::Created,
                        (_, c) => c,
                    };
                    entry.at = Instant::now();
                    entry.open = (entry.open || writes) && change != FileChange::Removed;
                }
            }
            _ = tokio::time::sleep(tick) => {}
        }
        let now = Instant::now();
        let stopping = watcher.is_none();
        let mut due: Vec<(PathBuf, FileChange)> = pending
            .iter()
            .filter(|(_, p)| {
                let quiet = now.duration_since(p.at);
                // On a stop, no close event will come: quiet is enough.
                quiet >= w.debounce && (!p.open || stopping || quiet >= OPEN_WAIT)
            })
            .map(|(p, e)| (p.clone(), e.change))
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
                slot: None,
            };
            let result = dispatch(job).await;
            tracing::debug!(plugin = %w.plugin, path = %path.display(), ?result, "file event handled");
        }
        if watcher.is_none() && pending.is_empty() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_overflow_rescans_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let w = Watch {
            plugin: "p".into(),
            name: "w".into(),
            dir: dir.path().canonicalize().unwrap(),
            recursive: true,
            include: GlobSet::empty(),
            exclude: GlobSet::empty(),
            debounce: Duration::from_millis(50),
            max_contents_bytes: 1024,
            process_existing: false,
        };
        // A real watcher keeps its place; the events come from the test,
        // standing in for a kernel queue that overflowed: the files below
        // were written and their events lost.
        let watcher = notify::recommended_watcher(|_: notify::Result<notify::Event>| {}).unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/lost.csv"), "x").unwrap();
        std::fs::write(dir.path().join("lost2.csv"), "y").unwrap();
        tx.send(notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan))
            .unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let dispatch: Dispatch = std::sync::Arc::new(move |job: Job| {
            let s = s.clone();
            Box::pin(async move {
                if let Event::File(f) = job.event {
                    s.lock().unwrap().push(f.path);
                }
                crate::Dispatched::NoPlugin
            })
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(w, watcher, rx, dispatch, async move {
            let _ = stop_rx.await;
        }));
        tokio::time::sleep(Duration::from_millis(400)).await;
        let _ = stop_tx.send(());
        task.await.unwrap();
        drop(tx);
        let mut got = seen.lock().unwrap().clone();
        got.sort();
        assert_eq!(got, ["lost2.csv", "sub/lost.csv"]);
    }

    #[test]
    fn contents_are_read_up_to_the_cap_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![1u8; 10]).unwrap();
        assert_eq!(read_capped(&p, 10).map(|b| b.len()), Some(10));
        assert_eq!(read_capped(&p, 9), None);
    }
}
