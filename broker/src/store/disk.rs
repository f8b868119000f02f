//! What makes an acknowledged write survive a power cut. sled 0.34's `flush` ends in
//! `sync_file_range` on its log file: the data reaches the disk's queue, but no
//! metadata (the file's new length), no disk cache, and none of the files sled
//! creates (its blobs, for values over its segment size; its snapshots) or their
//! directory entries. With `[storage] sync = "disk"` the group commit then calls
//! `Disk::sync`: fdatasync of the log, fsync of every blob and snapshot created
//! since the last sync, and of the folders whose entries changed.
//!
//! A failed fsync is never retried as if the data were safe: Linux may have dropped
//! the dirty pages it could not write and report success on the next fsync (the
//! PostgreSQL "fsyncgate" lesson). After one failure every later sync fails, so
//! nothing more is acknowledged until the broker restarts and reads the store back.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use tracing::error;

/// The store's files as last made durable.
pub(super) struct Disk {
    /// The store's folder (`data_dir/retained`).
    dir: PathBuf,
    /// sled's log, where every record goes first.
    log: File,
    /// Files in the store's folder at the last sync, with their lengths.
    files: BTreeMap<OsString, u64>,
    /// Files in `blobs/` at the last sync, with their lengths.
    blobs: BTreeMap<OsString, u64>,
    /// The first fsync failure: every sync after it fails with it.
    failed: Option<String>,
}

impl Disk {
    /// Makes what is there durable (the store may have just been created, in a
    /// folder just created too) and remembers it.
    pub(super) fn open(dir: &Path) -> io::Result<Self> {
        let log = File::open(dir.join("db"))?;
        let mut disk = Self {
            dir: dir.to_path_buf(),
            log,
            files: BTreeMap::new(),
            blobs: BTreeMap::new(),
            failed: None,
        };
        disk.sync_changes(true)?;
        for folder in [dir.parent(), dir.parent().and_then(Path::parent)]
            .into_iter()
            .flatten()
        {
            sync_path(folder)?;
        }
        Ok(disk)
    }

    /// Everything sled wrote so far (after its flush) is on stable storage; an error
    /// names the file.
    pub(super) fn sync(&mut self) -> Result<(), String> {
        if let Some(first) = &self.failed {
            return Err(format!(
                "an earlier fsync failed ({first}); nothing is acknowledged until the broker restarts"
            ));
        }
        let synced = self
            .log
            .sync_data()
            .map_err(|e| format!("fsync of {}: {e}", self.dir.join("db").display()))
            .and_then(|()| self.sync_changes(false).map_err(|e| e.to_string()));
        if let Err(e) = &synced {
            error!(store = %self.dir.display(), error = %e,
                "fsync failed: what was written since the last good one may be lost; \
                 nothing more is acknowledged until the broker restarts");
            self.failed = Some(e.clone());
        }
        synced
    }

    /// Files new in the store's folder and in `blobs/`, or grown since the last sync
    /// (sled may have been writing one while it was read: a file is synced again until
    /// its length holds), are fsynced, then the folders whose entries changed
    /// (created, renamed or removed files). The log is synced by itself. `all`: every
    /// file.
    fn sync_changes(&mut self, all: bool) -> io::Result<()> {
        let blobs_dir = self.dir.join("blobs");
        for (dir, known) in [(&self.dir, &mut self.files), (&blobs_dir, &mut self.blobs)] {
            let now = match files(dir) {
                Ok(now) => now,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(with_path(e, dir)),
            };
            for (name, len) in &now {
                if (all || known.get(name) != Some(len)) && name != "db" {
                    match sync_path(&dir.join(name)) {
                        // Removed (or renamed) by sled since the folder was read: the
                        // folder's own sync covers that.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        other => other?,
                    }
                }
            }
            let entries_changed = now.len() != known.len() || now.keys().ne(known.keys());
            if all || entries_changed {
                sync_path(dir)?;
            }
            *known = now;
        }
        Ok(())
    }
}

/// The regular files of a folder, with their lengths.
fn files(dir: &Path) -> io::Result<BTreeMap<OsString, u64>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = match entry.metadata() {
            Ok(meta) => meta,
            // Removed since the folder was read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if meta.is_file() {
            out.insert(entry.file_name(), meta.len());
        }
    }
    Ok(out)
}

/// fsync of a file or folder; the error names it.
fn sync_path(path: &Path) -> io::Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| with_path(e, path))
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("fsync of {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncs_a_real_store_and_notices_new_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("retained");
        let db = sled::Config::new().path(&path).open().unwrap();
        let mut disk = Disk::open(&path).unwrap();
        db.insert(b"a", b"1").unwrap();
        db.flush().unwrap();
        disk.sync().unwrap();
        assert!(disk.files.contains_key(&OsString::from("db")));
        // A value over sled's segment size goes to a blob file of its own.
        db.insert(b"big", vec![7u8; 1 << 20]).unwrap();
        db.flush().unwrap();
        disk.sync().unwrap();
        assert!(!disk.blobs.is_empty(), "no blob written");
    }

    #[test]
    fn after_a_failure_nothing_is_durable_any_more() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("retained");
        let _db = sled::Config::new().path(&path).open().unwrap();
        let mut disk = Disk::open(&path).unwrap();
        disk.failed = Some("fsync of db: Input/output error".into());
        let e = disk.sync().unwrap_err();
        assert!(
            e.contains("earlier fsync failed") && e.contains("restarts"),
            "{e}"
        );
    }
}
