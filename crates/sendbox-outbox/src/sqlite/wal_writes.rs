//! One `pwrite` per commit for the WAL: a VFS over SQLite's own (`unix`)
//! that gathers the frames a transaction appends to the WAL and writes
//! them in one call when the commit's frame is complete, before SQLite
//! syncs them or tells any reader they exist.
//!
//! SQLite writes a WAL frame as two calls — its 24-byte header, then the
//! page — so a group commit of a dozen emails is some forty `pwrite`s, each
//! a system call with the inode lock, the page-cache lookup and the
//! timestamps it takes. Gathered, the same bytes land in one.
//!
//! What keeps it exact:
//! - Only a file SQLite opens as a WAL is gathered; the database, its
//!   shared memory and every other file pass straight through.
//! - Gathered bytes are written before anything that could see the file
//!   otherwise: a read, a sync, a size or truncation, a file control, the
//!   close, and a write that does not continue them.
//! - A commit is written when its frame is: SQLite marks the frame that
//!   ends a transaction in its header (the database size after the commit,
//!   zero in every other frame), and the page write after that header
//!   writes everything gathered before the call returns. A failed write is
//!   that call's error, as it would have been without gathering, and
//!   SQLite fails the transaction; nothing of it was made visible.
//! - Frames of a transaction that has not committed may wait in memory,
//!   as they may wait in SQLite's page cache: a crash loses them, and
//!   SQLite ignores them anyway (past the last commit frame).
//!
//! This module owns only the bytes' way to the file; what the frames mean
//! is SQLite's.

use std::ffi::{CStr, c_int, c_void};
use std::sync::OnceLock;

use rusqlite::ffi;

/// The name connections open the database with.
pub(crate) const VFS_NAME: &CStr = c"sendbox-wal-gather";

/// The most bytes gathered into one write: the `unix` VFS writes at most
/// this many per call (it masks the count to 17 bits, since SQLite itself
/// never writes more than a 64 KiB page at once). A group of about 30
/// frames of 4 KiB pages fits; a larger transaction is written in pieces.
const MAX_GATHERED: usize = 0x1ffff;

/// SQLite's WAL frame header.
const FRAME_HEADER: usize = 24;

/// Registers the VFS once (with SQLite's default as what it delegates to);
/// `Err` says why it could not be.
pub(crate) fn register() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            // SAFETY: sqlite3_vfs_find with a null name returns the default
            // VFS, which SQLite keeps for the life of the process.
            let real = unsafe { ffi::sqlite3_vfs_find(std::ptr::null()) };
            if real.is_null() {
                return Err("SQLite has no default VFS".into());
            }
            // SAFETY: `real` is a valid, never-freed VFS.
            let real_ref = unsafe { &*real };
            let header = std::mem::size_of::<GatheringFile>();
            let ours = Box::leak(Box::new(ffi::sqlite3_vfs {
                szOsFile: (header + real_ref.szOsFile as usize) as c_int,
                pNext: std::ptr::null_mut(),
                zName: VFS_NAME.as_ptr(),
                pAppData: real.cast::<c_void>(),
                xOpen: Some(open),
                ..*real_ref
            }));
            // SAFETY: `ours` lives for the rest of the process; not made
            // the default.
            let rc = unsafe { ffi::sqlite3_vfs_register(ours, 0) };
            if rc == ffi::SQLITE_OK {
                Ok(())
            } else {
                Err(format!("sqlite3_vfs_register failed ({rc})"))
            }
        })
        .clone()
}

/// What SQLite allocates for each open file (`szOsFile`): this header,
/// then the real VFS's file right after it.
#[repr(C)]
struct GatheringFile {
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
    /// Only for a WAL file.
    gathered: *mut Gathered,
}

/// Bytes that continue one another, not yet written.
struct Gathered {
    bytes: Vec<u8>,
    /// The file offset of `bytes[0]`.
    start: i64,
    /// The last write was the header of a transaction's commit frame: the
    /// next (its page) ends the transaction.
    commit_header: bool,
}

/// SAFETY (for every method below): SQLite passes the `sqlite3_file` it
/// allocated with our `szOsFile` and opened with [`open`].
unsafe fn parts<'a>(
    f: *mut ffi::sqlite3_file,
) -> (*mut ffi::sqlite3_file, Option<&'a mut Gathered>) {
    let f = f.cast::<GatheringFile>();
    unsafe { ((*f).real, (*f).gathered.as_mut()) }
}

unsafe fn real_methods<'a>(real: *mut ffi::sqlite3_file) -> &'a ffi::sqlite3_io_methods {
    unsafe { &*(*real).pMethods }
}

/// Writes what is gathered; SQLite's error code if that fails.
unsafe fn write_out(real: *mut ffi::sqlite3_file, g: &mut Gathered) -> c_int {
    g.commit_header = false;
    if g.bytes.is_empty() {
        return ffi::SQLITE_OK;
    }
    let m = unsafe { real_methods(real) };
    let Some(write) = m.xWrite else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    #[cfg(test)]
    tests::WAL_WRITES.with(|n| n.set(n.get() + 1));
    // Whatever the outcome, these bytes are done with: on failure SQLite
    // fails the transaction they belong to.
    let rc = unsafe {
        write(
            real,
            g.bytes.as_ptr().cast(),
            g.bytes.len() as c_int,
            g.start,
        )
    };
    g.bytes.clear();
    rc
}

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    unsafe {
        let real_vfs = (*vfs).pAppData.cast::<ffi::sqlite3_vfs>();
        let ours = file.cast::<GatheringFile>();
        let real = file
            .cast::<u8>()
            .add(std::mem::size_of::<GatheringFile>())
            .cast::<ffi::sqlite3_file>();
        std::ptr::write(
            ours,
            GatheringFile {
                base: ffi::sqlite3_file {
                    pMethods: std::ptr::null(),
                },
                real,
                gathered: std::ptr::null_mut(),
            },
        );
        (*real).pMethods = std::ptr::null();
        let Some(real_open) = (*real_vfs).xOpen else {
            return ffi::SQLITE_CANTOPEN;
        };
        let rc = real_open(real_vfs, name, real, flags, out_flags);
        // SQLite calls xClose only when pMethods is set: set it exactly
        // when the real file needs closing.
        if (*real).pMethods.is_null() {
            return rc;
        }
        (*ours).base.pMethods = &METHODS;
        if rc == ffi::SQLITE_OK && flags & ffi::SQLITE_OPEN_WAL != 0 {
            (*ours).gathered = Box::into_raw(Box::new(Gathered {
                bytes: Vec::new(),
                start: 0,
                commit_header: false,
            }));
        }
        rc
    }
}

unsafe extern "C" fn close(f: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let (real, g) = parts(f);
        let mut rc = ffi::SQLITE_OK;
        if let Some(g) = g {
            rc = write_out(real, g);
            let ours = f.cast::<GatheringFile>();
            drop(Box::from_raw((*ours).gathered));
            (*ours).gathered = std::ptr::null_mut();
        }
        let closed = match real_methods(real).xClose {
            Some(close) => close(real),
            None => ffi::SQLITE_OK,
        };
        if rc == ffi::SQLITE_OK { closed } else { rc }
    }
}

unsafe extern "C" fn write(
    f: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    unsafe {
        let (real, g) = parts(f);
        let m = real_methods(real);
        let Some(real_write) = m.xWrite else {
            return ffi::SQLITE_IOERR_WRITE;
        };
        let Some(g) = g else {
            return real_write(real, buf, amount, offset);
        };
        let Ok(len) = usize::try_from(amount) else {
            return ffi::SQLITE_IOERR_WRITE;
        };
        let data = std::slice::from_raw_parts(buf.cast::<u8>(), len);
        let continues = !g.bytes.is_empty()
            && offset == g.start + g.bytes.len() as i64
            && g.bytes.len() + len <= MAX_GATHERED;
        if !continues {
            let rc = write_out(real, g);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
            g.start = offset;
        }
        let ends_commit = g.commit_header;
        g.bytes.extend_from_slice(data);
        // A frame header whose "database size after commit" is not zero
        // starts the frame that ends a transaction.
        g.commit_header = len == FRAME_HEADER && data[4..8] != [0, 0, 0, 0];
        // What is gathered stays within MAX_GATHERED: a write that would
        // take it past went out first (SQLite writes at most a 64 KiB page).
        if ends_commit {
            return write_out(real, g);
        }
        ffi::SQLITE_OK
    }
}

/// Writes what is gathered, then runs the real method.
macro_rules! written_first {
    ($name:ident, $method:ident, ($($arg:ident: $ty:ty),*)) => {
        unsafe extern "C" fn $name(f: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> c_int {
            unsafe {
                let (real, g) = parts(f);
                if let Some(g) = g {
                    let rc = write_out(real, g);
                    if rc != ffi::SQLITE_OK {
                        return rc;
                    }
                }
                match real_methods(real).$method {
                    Some(method) => method(real $(, $arg)*),
                    None => ffi::SQLITE_MISUSE,
                }
            }
        }
    };
}

written_first!(read, xRead, (buf: *mut c_void, amount: c_int, offset: i64));
written_first!(truncate, xTruncate, (size: i64));
written_first!(sync, xSync, (flags: c_int));
written_first!(file_size, xFileSize, (size: *mut i64));
written_first!(file_control, xFileControl, (op: c_int, arg: *mut c_void));

/// Runs the real method (nothing to do with gathered bytes).
macro_rules! passed_through {
    ($name:ident, $method:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty, $missing:expr) => {
        unsafe extern "C" fn $name(f: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> $ret {
            unsafe {
                let (real, _) = parts(f);
                match real_methods(real).$method {
                    Some(method) => method(real $(, $arg)*),
                    None => $missing,
                }
            }
        }
    };
}

passed_through!(lock, xLock, (level: c_int) -> c_int, ffi::SQLITE_MISUSE);
passed_through!(unlock, xUnlock, (level: c_int) -> c_int, ffi::SQLITE_MISUSE);
passed_through!(check_reserved, xCheckReservedLock, (out: *mut c_int) -> c_int, ffi::SQLITE_MISUSE);
passed_through!(sector_size, xSectorSize, () -> c_int, 4096);
passed_through!(device_characteristics, xDeviceCharacteristics, () -> c_int, 0);
passed_through!(shm_map, xShmMap, (page: c_int, size: c_int, extend: c_int, out: *mut *mut c_void) -> c_int, ffi::SQLITE_IOERR_SHMMAP);
passed_through!(shm_lock, xShmLock, (offset: c_int, n: c_int, flags: c_int) -> c_int, ffi::SQLITE_IOERR_SHMLOCK);
passed_through!(shm_unmap, xShmUnmap, (delete: c_int) -> c_int, ffi::SQLITE_OK);

/// A memory-mapped page, where the real file offers them (SQLite reads
/// instead when `*out` is null).
unsafe extern "C" fn fetch(
    f: *mut ffi::sqlite3_file,
    offset: i64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    unsafe {
        let (real, _) = parts(f);
        match real_methods(real).xFetch {
            Some(method) => method(real, offset, amount, out),
            None => {
                *out = std::ptr::null_mut();
                ffi::SQLITE_OK
            }
        }
    }
}
passed_through!(unfetch, xUnfetch, (offset: i64, p: *mut c_void) -> c_int, ffi::SQLITE_OK);

unsafe extern "C" fn shm_barrier(f: *mut ffi::sqlite3_file) {
    unsafe {
        let (real, _) = parts(f);
        if let Some(barrier) = real_methods(real).xShmBarrier {
            barrier(real);
        }
    }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: Some(shm_map),
    xShmLock: Some(shm_lock),
    xShmBarrier: Some(shm_barrier),
    xShmUnmap: Some(shm_unmap),
    xFetch: Some(fetch),
    xUnfetch: Some(unfetch),
};

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use rusqlite::{Connection, OpenFlags, params};

    thread_local! {
        /// `pwrite`s of gathered WAL bytes made on this thread.
        pub(super) static WAL_WRITES: Cell<usize> = const { Cell::new(0) };
    }

    fn writes() -> usize {
        WAL_WRITES.with(Cell::get)
    }

    fn open(path: &std::path::Path) -> Connection {
        super::register().unwrap();
        let c = Connection::open_with_flags_and_vfs(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
            super::VFS_NAME,
        )
        .unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.pragma_update(None, "synchronous", "FULL").unwrap();
        c.execute_batch(
            "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, body TEXT);
             CREATE INDEX IF NOT EXISTS t_body ON t (body);",
        )
        .unwrap();
        c
    }

    /// A new database `name` in a folder of its own (kept while the
    /// `TempDir` lives), opened through the gathering VFS.
    fn fresh(name: &str) -> (tempfile::TempDir, std::path::PathBuf, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        let c = open(&path);
        (dir, path, c)
    }

    /// `n` rows, each touching the table, both indexes and (1.5 KB) an
    /// overflow of its leaf: several WAL frames per transaction.
    fn insert(c: &Connection, from: usize, n: usize) {
        let tx = c.unchecked_transaction().unwrap();
        for i in from..from + n {
            tx.execute(
                "INSERT INTO t (k, body) VALUES (?1, ?2)",
                params![format!("key-{i}"), format!("{i:06}{}", "x".repeat(1500))],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }

    /// Frames in the WAL file (a 32-byte header, then frames of a 24-byte
    /// header and a 4 KiB page); it is not checkpointed in these tests, so
    /// never starts over.
    fn frames(db: &std::path::Path) -> u64 {
        let wal = db.with_extension("db-wal");
        (std::fs::metadata(wal).unwrap().len() - 32) / (24 + 4096)
    }

    #[test]
    fn a_commit_of_many_frames_is_one_write_and_every_reader_sees_it() {
        let (_dir, path, c) = fresh("g.db");
        c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        let before_frames = frames(&path);
        let before = writes();
        insert(&c, 0, 12);
        let written = writes() - before;
        let new_frames = frames(&path) - before_frames;
        assert!(new_frames >= 12, "the commit wrote {new_frames} frames");
        assert_eq!(written, 1, "{new_frames} frames in {written} writes");

        // Another connection with SQLite's own VFS reads the WAL as written.
        let plain = Connection::open(&path).unwrap();
        let (n, last): (i64, String) = plain
            .query_row("SELECT count(*), max(k) FROM t", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((n, last.as_str()), (12, "key-9"));
        assert_eq!(
            plain
                .query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
                .unwrap(),
            "ok"
        );
    }

    /// Everything in `path`'s table `t` with bodies as [`insert`] writes
    /// them, and SQLite finds the file sound.
    fn rows_read_back(path: &std::path::Path) -> i64 {
        let plain = Connection::open(path).unwrap();
        assert_eq!(
            plain
                .query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
                .unwrap(),
            "ok"
        );
        plain
            .query_row(
                "SELECT count(*) FROM t WHERE length(body) = 1506",
                [],
                |r| r.get(0),
            )
            .unwrap()
    }

    #[test]
    fn a_transaction_larger_than_one_write_is_written_in_pieces_and_commits_whole() {
        let (_dir, path, c) = fresh("big.db");
        // A page cache large enough that nothing spills before the commit.
        c.pragma_update(None, "cache_size", -64_000).unwrap();
        let before = writes();
        insert(&c, 0, 2_000);
        let written = writes() - before;
        let bytes = frames(&path) * (24 + 4096);
        assert!(bytes > 3_000_000, "{bytes} bytes of frames");
        // Each piece as large as the cap allows (whole frames).
        let pieces = bytes.div_ceil((super::MAX_GATHERED / (24 + 4096) * (24 + 4096)) as u64);
        assert_eq!(written as u64, pieces, "{bytes} bytes in {written} writes");
        drop(c);
        // Reopened after close (the WAL read from the file): all there.
        assert_eq!(rows_read_back(&path), 2_000);
    }

    #[test]
    fn a_transaction_that_spills_and_rewrites_its_frames_commits_whole() {
        let (_dir, path, c) = fresh("spill.db");
        // A page cache of 10 pages: the transaction writes frames to the
        // WAL long before its commit, overwrites some of them in place and
        // reads some back.
        c.pragma_update(None, "cache_size", 10).unwrap();
        insert(&c, 0, 2_000);
        insert(&c, 2_000, 10);
        assert_eq!(rows_read_back(&path), 2_010);
    }

    #[test]
    fn the_wal_starting_over_after_a_checkpoint_is_read_back_right() {
        let (_dir, path, c) = fresh("restart.db");
        for round in 0..5 {
            insert(&c, round * 10, 10);
            // A full checkpoint with no reader lets the next write start
            // the WAL over from its header.
            c.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
                .unwrap();
        }
        assert_eq!(rows_read_back(&path), 50);
    }
}
