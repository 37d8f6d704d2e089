//! The file trigger on a real folder with real inotify events: debouncing,
//! globs, relative paths, symlinks out of the root, files present at start,
//! and events queued while the plugin is busy.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use globset::{Glob, GlobSet, GlobSetBuilder};
use sendbox_triggers::watch::{self, Watch};
use sendbox_triggers::{Dispatch, Dispatched, Job};
use sendbox_types::{Event, FileChange, FileEvent};

fn globs(p: &[&str]) -> GlobSet {
    let mut b = GlobSetBuilder::new();
    for g in p {
        b.add(Glob::new(g).unwrap());
    }
    b.build().unwrap()
}

/// Records every job; each takes `busy` to "run".
fn recorder(busy: Duration) -> (Dispatch, Arc<Mutex<Vec<FileEvent>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let d: Dispatch = Arc::new(move |job: Job| {
        let s = s.clone();
        Box::pin(async move {
            tokio::time::sleep(busy).await;
            if let Event::File(f) = job.event {
                s.lock().unwrap().push(f);
            }
            Dispatched::Committed {
                queued: vec![],
                duplicates: vec![],
                response: None,
            }
        })
    });
    (d, seen)
}

fn watch(dir: &Path, recursive: bool, process_existing: bool) -> Watch {
    Watch {
        plugin: "p".into(),
        name: "incoming".into(),
        dir: dir.canonicalize().unwrap(),
        recursive,
        include: GlobSet::empty(),
        exclude: globs(&["*.tmp"]),
        debounce: Duration::from_millis(300),
        max_contents_bytes: 1024,
        process_existing,
    }
}

async fn until(seen: &Arc<Mutex<Vec<FileEvent>>>, n: usize) -> Vec<FileEvent> {
    let start = Instant::now();
    while seen.lock().unwrap().len() < n {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "got {:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Anything extra would arrive within a debounce period.
    tokio::time::sleep(Duration::from_millis(600)).await;
    seen.lock().unwrap().clone()
}

fn spawn(w: Watch, d: Dispatch) -> tokio::sync::oneshot::Sender<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        watch::run(w, d, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    tx
}

#[tokio::test]
async fn a_file_written_in_pieces_fires_once_after_it_settles() {
    let dir = tempfile::tempdir().unwrap();
    let (d, seen) = recorder(Duration::ZERO);
    let _stop = spawn(watch(dir.path(), false, false), d);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let path = dir.path().join("report.csv");
    for i in 0..5 {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        writeln!(f, "line {i}").unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    std::fs::write(dir.path().join("skip.tmp"), "x").unwrap();
    let got = until(&seen, 1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].path, "report.csv");
    assert_eq!(got[0].change, FileChange::Created);
    assert_eq!(
        got[0].contents.as_ref().unwrap().0.len(),
        35,
        "the whole settled file"
    );
}

#[tokio::test]
async fn paths_are_relative_and_symlinks_out_of_the_root_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), "do not send").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let (d, seen) = recorder(Duration::ZERO);
    let _stop = spawn(watch(dir.path(), true, false), d);
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::os::unix::fs::symlink(
        outside.path().join("secret.txt"),
        dir.path().join("link.txt"),
    )
    .unwrap();
    std::fs::write(dir.path().join("sub/inner.txt"), "hello").unwrap();
    let got = until(&seen, 1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].path, "sub/inner.txt");
    assert_eq!(got[0].contents.as_ref().unwrap().0, b"hello");
}

#[tokio::test]
async fn files_present_at_start_and_events_during_a_busy_plugin_are_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("old.txt"), "old").unwrap();
    // Each event keeps the "plugin" busy for 300 ms.
    let (d, seen) = recorder(Duration::from_millis(300));
    let _stop = spawn(watch(dir.path(), false, true), d);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..4 {
        std::fs::write(dir.path().join(format!("new{i}.txt")), "n").unwrap();
    }
    std::fs::remove_file(dir.path().join("old.txt")).unwrap();
    let got = until(&seen, 6).await;
    let mut names: Vec<(String, FileChange)> =
        got.iter().map(|e| (e.path.clone(), e.change)).collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        names.contains(&("old.txt".into(), FileChange::Created)),
        "{names:?}"
    );
    assert!(
        names.contains(&("old.txt".into(), FileChange::Removed)),
        "{names:?}"
    );
    for i in 0..4 {
        assert!(
            names.iter().any(|(n, _)| n == &format!("new{i}.txt")),
            "{names:?}"
        );
    }
}

#[tokio::test]
async fn a_stop_sends_what_was_already_seen_and_nothing_after() {
    let dir = tempfile::tempdir().unwrap();
    let (d, seen) = recorder(Duration::ZERO);
    let w = watch(dir.path(), false, false);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(watch::run(w, d, async move {
        let _ = stop_rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(dir.path().join("seen.csv"), "a").unwrap();
    // Stop (a reload or SIGTERM) inside the 300 ms debounce window.
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop_tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    std::fs::write(dir.path().join("after.csv"), "b").unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the watch ends once what it saw is sent")
        .unwrap()
        .unwrap();
    let got: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|f| f.path.clone())
        .collect();
    assert_eq!(
        got,
        ["seen.csv"],
        "the pending file is sent; a change after the stop is not"
    );
}

#[tokio::test]
async fn a_folder_moved_into_a_recursive_watch_reports_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let batch = outside.path().join("batch");
    std::fs::create_dir_all(batch.join("deeper")).unwrap();
    for name in ["a.csv", "b.csv", "deeper/c.csv"] {
        std::fs::write(batch.join(name), name).unwrap();
    }
    let (d, seen) = recorder(Duration::ZERO);
    let _stop = spawn(watch(dir.path(), true, false), d);
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::rename(&batch, dir.path().join("batch")).unwrap();
    let got = until(&seen, 3).await;
    let mut paths: Vec<(String, FileChange)> =
        got.iter().map(|e| (e.path.clone(), e.change)).collect();
    paths.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        paths,
        [
            ("batch/a.csv".to_string(), FileChange::Created),
            ("batch/b.csv".to_string(), FileChange::Created),
            ("batch/deeper/c.csv".to_string(), FileChange::Created),
        ]
    );
    assert_eq!(got[0].contents.as_ref().unwrap().0.len(), 5);
}

#[tokio::test]
async fn symlink_loops_do_not_trap_the_walk() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/file.txt"), "x").unwrap();
    std::os::unix::fs::symlink(dir.path(), dir.path().join("sub/loop")).unwrap();
    std::os::unix::fs::symlink("self", dir.path().join("self")).unwrap();
    let (d, seen) = recorder(Duration::ZERO);
    let _stop = spawn(watch(dir.path(), true, true), d);
    let got = until(&seen, 1).await;
    let paths: Vec<&str> = got.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["sub/file.txt"], "{got:?}");
}

#[tokio::test]
async fn a_file_open_for_writing_is_handed_over_once_closed() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let (d, seen) = recorder(Duration::ZERO);
    let _stop = spawn(watch(dir.path(), false, false), d);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut f = std::fs::File::create(dir.path().join("scan.pdf")).unwrap();
    f.write_all(b"first half ").unwrap();
    f.flush().unwrap();
    // Quiet for twice the debounce, but still open: not handed over.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(seen.lock().unwrap().is_empty(), "fired while still open");
    f.write_all(b"second half").unwrap();
    drop(f);
    let got = until(&seen, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].contents.as_ref().unwrap().0,
        b"first half second half"
    );
}

#[tokio::test]
async fn contents_are_never_read_past_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (d, seen) = recorder(Duration::ZERO);
    // max_contents_bytes is 1024 in these tests.
    let _stop = spawn(watch(dir.path(), false, false), d);
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::write(dir.path().join("small.txt"), vec![b'a'; 1024]).unwrap();
    std::fs::write(dir.path().join("big.txt"), vec![b'b'; 1025]).unwrap();
    let got = until(&seen, 2).await;
    for e in &got {
        match e.path.as_str() {
            "small.txt" => assert_eq!(e.contents.as_ref().unwrap().0.len(), 1024),
            "big.txt" => {
                assert!(e.contents.is_none());
                assert_eq!(e.size, Some(1025));
            }
            other => panic!("unexpected {other}"),
        }
    }
}
