//! `PowerFs`: an in-memory FUSE file system modelling a disk with a volatile
//! page cache, so that a test can cut the power and see what was really fsynced.
//!
//! - A regular file has `current` contents (what reads see) and `durable` ones.
//!   write, truncate and fallocate change `current`; the FUSE fsync op (fsync
//!   and fdatasync alike) copies `current` to `durable`.
//! - A directory has `current` and `durable` entries. create, mkdir, unlink,
//!   rmdir and rename change `current`; fsyncdir copies it to `durable`. So a
//!   new file is lost unless its directory is fsynced, and a rename lasts only
//!   once both directories are. The root starts empty. There are no symlinks,
//!   hard links or special files.
//! - `power_cut()`: everything reverts to its durable state, inodes no longer
//!   reachable from the root are dropped, and all open handles die: I/O on a
//!   pre-cut handle fails with EIO (closing it works), and an fd or path whose
//!   inode was dropped gets ESTALE. Metadata (mode, owner, times) is kept as is.
//! - `fail_fsync(true)`: fsync and fsyncdir fail with EIO and persist nothing.
//! - No kernel cache outlives a cut: files are opened with FOPEN_DIRECT_IO (no
//!   page cache) and entry and attribute TTLs are zero.
//! - flock and POSIX locks are handled by the kernel locally (fuser does not
//!   ask for FUSE_FLOCK_LOCKS). sync_file_range(2) never reaches the file
//!   system: it returns 0 and persists nothing (sled's `flush()` relies on it).
//! - Mounting calls mount(2) directly when the process has CAP_SYS_ADMIN (root):
//!   no `fusermount3` (Debian package `fuse3`) is needed then.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};

const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;
/// Contents live in memory: refuse sizes that would exhaust it rather than abort.
const MAX_SIZE: u64 = 4 << 30;

type R<T> = Result<T, Errno>;
type Entries = BTreeMap<OsString, u64>;

#[derive(Clone)]
enum Content {
    File(Vec<u8>),
    Dir(Entries),
}

struct Inode {
    /// Size, blocks and a directory's nlink are filled in by `State::attr`.
    attr: FileAttr,
    cur: Content,
    dur: Content,
}

/// A directory handle lists the entries as of opendir, so that deleting
/// entries while reading the directory skips none.
type Listing = Vec<(u64, FileType, OsString)>;

#[derive(Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    handles: HashMap<u64, Option<Listing>>,
    next_ino: u64,
    next_fh: u64,
    fail_fsync: bool,
    fsyncs: u64,
    fsyncdirs: u64,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // A test that panicked must not take the file system down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn set_len(v: &mut Vec<u8>, len: u64) -> R<()> {
    if len > MAX_SIZE {
        return Err(Errno::from_i32(libc::EFBIG));
    }
    v.resize(len as usize, 0);
    Ok(())
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl State {
    fn node(&self, ino: u64) -> R<&Inode> {
        self.inodes.get(&ino).ok_or(Errno::ESTALE)
    }

    fn is_dir(&self, ino: u64) -> bool {
        self.inodes.get(&ino).map(|n| n.attr.kind) == Some(FileType::Directory)
    }

    fn attr(&self, ino: u64) -> R<FileAttr> {
        let n = self.node(ino)?;
        let mut a = n.attr;
        match &n.cur {
            Content::File(v) => a.size = v.len() as u64,
            Content::Dir(e) => a.nlink = 2 + e.values().filter(|c| self.is_dir(**c)).count() as u32,
        }
        a.blocks = a.size.div_ceil(512);
        Ok(a)
    }

    /// The inode's current contents, for a change: bumps mtime and ctime.
    fn change(&mut self, ino: u64) -> R<&mut Content> {
        let n = self.inodes.get_mut(&ino).ok_or(Errno::ESTALE)?;
        (n.attr.mtime, n.attr.ctime) = (SystemTime::now(), SystemTime::now());
        Ok(&mut n.cur)
    }

    fn entries(&self, dir: u64) -> R<&Entries> {
        match &self.node(dir)?.cur {
            Content::Dir(e) => Ok(e),
            Content::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> R<&mut Entries> {
        match self.change(dir)? {
            Content::Dir(e) => Ok(e),
            Content::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn child(&self, dir: u64, name: &OsStr) -> R<u64> {
        self.entries(dir)?.get(name).copied().ok_or(Errno::ENOENT)
    }

    fn check_fh(&self, fh: FileHandle) -> R<()> {
        // A power cut forgets all handles: their processes are "rebooted".
        match self.handles.contains_key(&fh.0) {
            true => Ok(()),
            false => Err(Errno::EIO),
        }
    }

    fn open(&mut self, listing: Option<Listing>) -> FileHandle {
        self.next_fh += 1;
        self.handles.insert(self.next_fh, listing);
        FileHandle(self.next_fh)
    }

    fn new_inode(&mut self, kind: FileType, mode: u32, uid: u32, gid: u32) -> u64 {
        self.next_ino += 1;
        let (ino, now) = (self.next_ino, SystemTime::now());
        let dir = kind == FileType::Directory;
        let attr = FileAttr {
            ino: INodeNo(ino),
            size: if dir { 4096 } else { 0 },
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm: (mode & 0o7777) as u16,
            nlink: 1,
            uid,
            gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        };
        let cur = if dir {
            Content::Dir(Entries::new())
        } else {
            Content::File(Vec::new())
        };
        let node = Inode {
            dur: cur.clone(),
            cur,
            attr,
        };
        self.inodes.insert(ino, node);
        ino
    }

    fn create(
        &mut self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        kind: FileType,
    ) -> R<FileAttr> {
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        if self.entries(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.new_inode(kind, mode, req.uid(), req.gid());
        self.entries_mut(parent)?.insert(name.to_owned(), ino);
        self.attr(ino)
    }

    fn unlink(&mut self, parent: u64, name: &OsStr, want_dir: bool) -> R<()> {
        let ino = self.child(parent, name)?;
        match (&self.node(ino)?.cur, want_dir) {
            (Content::Dir(_), false) => return Err(Errno::EISDIR),
            (Content::File(_), true) => return Err(Errno::ENOTDIR),
            (Content::Dir(e), true) if !e.is_empty() => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        self.entries_mut(parent)?.remove(name);
        // The inode stays until a power cut: open handles and durable entries may use it.
        if let Some(n) = self.inodes.get_mut(&ino) {
            (n.attr.nlink, n.attr.ctime) = (n.attr.nlink.saturating_sub(1), SystemTime::now());
        }
        Ok(())
    }

    fn rename(
        &mut self,
        p: u64,
        name: &OsStr,
        np: u64,
        nname: &OsStr,
        flags: RenameFlags,
    ) -> R<()> {
        let ino = self.child(p, name)?;
        if flags.difference(RenameFlags::RENAME_NOREPLACE) != RenameFlags::empty() {
            return Err(Errno::EINVAL); // EXCHANGE and WHITEOUT are not modelled
        }
        match self.entries(np)?.get(nname).copied() {
            Some(_) if !flags.is_empty() => return Err(Errno::EEXIST),
            Some(t) if t == ino => return Ok(()),
            Some(_) => self.unlink(np, nname, self.is_dir(ino))?,
            None if nname.len() > 255 => return Err(Errno::ENAMETOOLONG),
            None => {}
        }
        // (The kernel refuses to move a directory below itself.)
        self.entries_mut(p)?.remove(name);
        self.entries_mut(np)?.insert(nname.to_owned(), ino);
        self.change(ino).map(drop)
    }

    fn read(&self, ino: u64, fh: FileHandle, offset: u64, size: u32) -> R<&[u8]> {
        self.check_fh(fh)?;
        match &self.node(ino)?.cur {
            Content::File(v) => {
                let start = offset.min(v.len() as u64) as usize;
                Ok(&v[start..v.len().min(start + size as usize)])
            }
            Content::Dir(_) => Err(Errno::EISDIR),
        }
    }

    /// Writes `data` at `offset`, extending the file with zeros up to there.
    fn write(&mut self, ino: u64, fh: Option<FileHandle>, offset: u64, data: &[u8]) -> R<u32> {
        fh.map_or(Ok(()), |fh| self.check_fh(fh))?;
        let Content::File(v) = self.change(ino)? else {
            return Err(Errno::EISDIR);
        };
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EINVAL)?;
        if end > v.len() as u64 {
            set_len(v, end)?;
        }
        v[offset as usize..end as usize].copy_from_slice(data);
        Ok(data.len() as u32)
    }

    fn opendir(&mut self, ino: u64) -> R<FileHandle> {
        let entries = self.entries(ino)?;
        let has = |n: &Inode| matches!(&n.cur, Content::Dir(e) if e.values().any(|c| *c == ino));
        let parent = self
            .inodes
            .iter()
            .find(|(_, n)| has(n))
            .map_or(ROOT, |(p, _)| *p);
        let dots = [(ino, ".".into()), (parent, "..".into())];
        let all = dots
            .into_iter()
            .chain(entries.iter().map(|(n, c)| (*c, n.clone())));
        let kind = |c| {
            self.inodes
                .get(&c)
                .map_or(FileType::RegularFile, |n| n.attr.kind)
        };
        let listing = all.map(|(c, n)| (c, kind(c), n)).collect();
        Ok(self.open(Some(listing)))
    }

    fn fsync(&mut self, ino: u64, fh: FileHandle, dir: bool) -> R<()> {
        let calls = if dir {
            &mut self.fsyncdirs
        } else {
            &mut self.fsyncs
        };
        *calls += 1;
        self.check_fh(fh)?;
        if self.fail_fsync {
            return Err(Errno::EIO);
        }
        let n = self.inodes.get_mut(&ino).ok_or(Errno::ESTALE)?;
        n.dur.clone_from(&n.cur);
        Ok(())
    }

    fn power_cut(&mut self) {
        self.handles.clear();
        for n in self.inodes.values_mut() {
            n.cur.clone_from(&n.dur);
        }
        // Keep what is reachable from the root, counting links on the way.
        let mut links: HashMap<u64, u32> = HashMap::new();
        let mut seen = HashSet::new();
        let mut stack = vec![ROOT];
        while let Some(ino) = stack.pop() {
            if let (true, Some(Content::Dir(e))) =
                (seen.insert(ino), self.inodes.get(&ino).map(|n| &n.cur))
            {
                for &c in e.values() {
                    *links.entry(c).or_default() += 1;
                    stack.push(c);
                }
            }
        }
        self.inodes.retain(|ino, _| seen.contains(ino));
        for (ino, n) in self.inodes.iter_mut() {
            n.attr.nlink = links.get(ino).copied().unwrap_or(1);
        }
    }
}

/// Sends a result as the reply it belongs to.
trait Answer<T> {
    fn answer(self, res: R<T>);
}

macro_rules! answer {
    ($reply:ty, $t:ty, |$r:ident, $v:pat_param| $ok:expr) => {
        impl Answer<$t> for $reply {
            fn answer(self, res: R<$t>) {
                let $r = self;
                match res {
                    Ok($v) => $ok,
                    Err(e) => $r.error(e),
                }
            }
        }
    };
}

answer! { ReplyEntry, FileAttr, |r, a| r.entry(&TTL, &a, Generation(0)) }
answer! { ReplyAttr, FileAttr, |r, a| r.attr(&TTL, &a) }
answer! { ReplyEmpty, (), |r, ()| r.ok() }
answer! { ReplyWrite, u32, |r, n| r.written(n) }
answer! { ReplyData, &[u8], |r, d| r.data(d) }
answer! { ReplyOpen, (FileHandle, FopenFlags), |r, (fh, f)| r.opened(fh, f) }

struct Fs(Arc<Mutex<State>>);

impl Fs {
    fn st(&self) -> MutexGuard<'_, State> {
        lock(&self.0)
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let st = self.st();
        reply.answer(st.child(parent.0, name).and_then(|ino| st.attr(ino)));
    }

    fn getattr(&self, _: &Request, ino: INodeNo, _: Option<FileHandle>, reply: ReplyAttr) {
        reply.answer(self.st().attr(ino.0));
    }

    fn setattr(
        &self,
        _: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _: Option<SystemTime>,
        fh: Option<FileHandle>,
        _: Option<SystemTime>,
        _: Option<SystemTime>,
        _: Option<SystemTime>,
        _: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut st = self.st();
        let res = (|| {
            if let Some(len) = size {
                st.write(ino.0, fh, 0, &[])?; // checks the handle, bumps mtime
                if let Some(Inode {
                    cur: Content::File(v),
                    ..
                }) = st.inodes.get_mut(&ino.0)
                {
                    set_len(v, len)?;
                }
            }
            let a = &mut st.inodes.get_mut(&ino.0).ok_or(Errno::ESTALE)?.attr;
            a.perm = mode.map_or(a.perm, |m| (m & 0o7777) as u16);
            (a.uid, a.gid) = (uid.unwrap_or(a.uid), gid.unwrap_or(a.gid));
            (a.atime, a.mtime) = (atime.map_or(a.atime, time), mtime.map_or(a.mtime, time));
            a.ctime = SystemTime::now();
            st.attr(ino.0)
        })();
        reply.answer(res);
    }

    fn mkdir(
        &self,
        req: &Request,
        dir: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let kind = FileType::Directory;
        reply.answer(self.st().create(req, dir.0, name, mode & !umask, kind));
    }

    fn unlink(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply.answer(self.st().unlink(parent.0, name, false));
    }

    fn rmdir(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply.answer(self.st().unlink(parent.0, name, true));
    }

    fn rename(
        &self,
        _: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.answer(
            self.st()
                .rename(parent.0, name, newparent.0, newname, flags),
        );
    }

    fn open(&self, _: &Request, ino: INodeNo, _: OpenFlags, reply: ReplyOpen) {
        let mut st = self.st();
        let res = match st.is_dir(ino.0) {
            true => Err(Errno::EISDIR),
            false => st.node(ino.0).map(|_| ()),
        };
        // No page cache, so that no pre-cut contents can ever be served from it.
        reply.answer(res.map(|()| (st.open(None), FopenFlags::FOPEN_DIRECT_IO)));
    }

    fn read(
        &self,
        _: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _: OpenFlags,
        _: Option<LockOwner>,
        reply: ReplyData,
    ) {
        reply.answer(self.st().read(ino.0, fh, offset, size));
    }

    fn write(
        &self,
        _: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _: WriteFlags,
        _: OpenFlags,
        _: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.answer(self.st().write(ino.0, Some(fh), offset, data));
    }

    fn flush(&self, _: &Request, _: INodeNo, _: FileHandle, _: LockOwner, reply: ReplyEmpty) {
        reply.ok(); // close() works even on a pre-cut handle
    }

    fn release(
        &self,
        _: &Request,
        _: INodeNo,
        fh: FileHandle,
        _: OpenFlags,
        _: Option<LockOwner>,
        _: bool,
        reply: ReplyEmpty,
    ) {
        self.st().handles.remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _: &Request, ino: INodeNo, fh: FileHandle, _: bool, reply: ReplyEmpty) {
        reply.answer(self.st().fsync(ino.0, fh, false));
    }

    fn opendir(&self, _: &Request, ino: INodeNo, _: OpenFlags, reply: ReplyOpen) {
        reply.answer(self.st().opendir(ino.0).map(|fh| (fh, FopenFlags::empty())));
    }

    fn readdir(
        &self,
        _: &Request,
        _: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let st = self.st();
        let Some(Some(listing)) = st.handles.get(&fh.0) else {
            return reply.error(Errno::EIO);
        };
        for (i, (ino, kind, name)) in listing.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _: &Request, _: INodeNo, fh: FileHandle, _: OpenFlags, reply: ReplyEmpty) {
        self.st().handles.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _: &Request, ino: INodeNo, fh: FileHandle, _: bool, reply: ReplyEmpty) {
        reply.answer(self.st().fsync(ino.0, fh, true));
    }

    fn statfs(&self, _: &Request, _: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 28, 1 << 28, 1 << 28, 1 << 20, 1 << 20, 4096, 255, 4096);
    }

    fn access(&self, _: &Request, ino: INodeNo, _: AccessFlags, reply: ReplyEmpty) {
        reply.answer(self.st().node(ino.0).map(|_| ())); // no permission model
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _: i32,
        reply: ReplyCreate,
    ) {
        let mut st = self.st();
        match st.create(req, parent.0, name, mode & !umask, FileType::RegularFile) {
            Ok(a) => {
                let fh = st.open(None);
                reply.created(&TTL, &a, Generation(0), fh, FopenFlags::FOPEN_DIRECT_IO);
            }
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut st = self.st();
        let end = offset.checked_add(length).ok_or(Errno::EINVAL);
        // Memory needs no reservation: only mode 0 does anything, extend the file.
        let res = match (mode, end) {
            (0, Ok(end)) if end > st.attr(ino.0).map_or(0, |a| a.size) => {
                st.write(ino.0, Some(fh), end, &[])
            }
            (0 | libc::FALLOC_FL_KEEP_SIZE, end) => {
                end.and_then(|_| st.write(ino.0, Some(fh), 0, &[]))
            }
            _ => Err(Errno::EOPNOTSUPP),
        };
        reply.answer(res.map(drop));
    }
}

/// A mounted `PowerFs`; unmounted on drop.
pub struct PowerFs {
    state: Arc<Mutex<State>>,
    session: Option<fuser::BackgroundSession>,
    dir: PathBuf,
}

impl PowerFs {
    /// Mounts an empty file system at `dir` (an existing empty directory); unmounted on drop.
    pub fn mount(dir: &Path) -> io::Result<PowerFs> {
        reap_dead_mounts();
        let dir = dir.canonicalize()?;
        let mut st = State::default();
        // SAFETY: getuid and getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        st.new_inode(FileType::Directory, 0o755, uid, gid);
        let state = Arc::new(Mutex::new(st));
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("powerfs".into())];
        // Returns once the kernel's INIT is answered: the mount is usable at once.
        let session = Some(fuser::spawn_mount(Fs(state.clone()), &dir, &config)?);
        Ok(PowerFs {
            state,
            session,
            dir,
        })
    }

    /// Everything not fsynced is lost, as after a power cut.
    pub fn power_cut(&self) {
        lock(&self.state).power_cut();
    }

    /// While true, fsync and fsyncdir fail with EIO and persist nothing.
    pub fn fail_fsync(&self, fail: bool) {
        lock(&self.state).fail_fsync = fail;
    }

    /// fsync and fsyncdir calls so far.
    pub fn syncs(&self) -> (u64, u64) {
        let st = lock(&self.state);
        (st.fsyncs, st.fsyncdirs)
    }
}

impl Drop for PowerFs {
    fn drop(&mut self) {
        // umount(2) fails with EBUSY while a file in the mount is still open (a
        // leaked fd, a child process): then detach the mount lazily, so that
        // the directory is usable and removable at once.
        if let Some(Err(_)) = self.session.take().map(|s| s.umount_and_join()) {
            detach(&self.dir);
        }
    }
}

fn detach(dir: &Path) {
    if let Ok(c) = CString::new(dir.as_os_str().as_bytes()) {
        // SAFETY: c is a NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Detaches PowerFs mounts left by a killed test process, which would linger
/// as "Transport endpoint is not connected". (Mount points that mountinfo
/// shows escaped, with spaces, are left alone.)
fn reap_dead_mounts() {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // "id parent dev root mountpoint options... - fstype source superoptions"
    let ours = info.lines().filter_map(|l| l.split_once(" - "));
    for (left, _) in ours.filter(|(_, right)| right.starts_with("fuse powerfs ")) {
        let mountpoint = Path::new(left.split(' ').nth(4).unwrap_or_default());
        let err = std::fs::metadata(mountpoint)
            .err()
            .and_then(|e| e.raw_os_error());
        if err == Some(libc::ENOTCONN) {
            detach(mountpoint);
        }
    }
}

/// Whether FUSE mounts can work here (/dev/fuse openable, and the helper binary
/// present if one is needed): tests skip with a printed reason otherwise.
pub fn available() -> Result<(), String> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse");
    dev.map_err(|e| format!("cannot open /dev/fuse: {e}"))?;
    // fuser calls mount(2) itself when allowed (CAP_SYS_ADMIN, bit 21), else runs fusermount3.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status.lines().find_map(|l| l.strip_prefix("CapEff:"));
    let caps = caps.and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = std::env::split_paths(&path);
    if caps.unwrap_or(0) & (1 << 21) != 0 || dirs.any(|d| d.join("fusermount3").exists()) {
        return Ok(());
    }
    Err("not root (no CAP_SYS_ADMIN) and no fusermount3: install Debian's fuse3".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, File, OpenOptions};
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;

    /// Field order matters: the file system is unmounted before the temp dir goes.
    struct Mnt {
        fs: PowerFs,
        dir: PathBuf,
        _tmp: tempfile::TempDir,
    }

    fn mnt() -> Option<Mnt> {
        if let Err(why) = available() {
            eprintln!("skipping: {why}");
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mnt");
        fs::create_dir(&dir).unwrap();
        let fs = PowerFs::mount(&dir).unwrap();
        Some(Mnt { fs, dir, _tmp: tmp })
    }

    fn sync_dir(p: &Path) -> io::Result<()> {
        File::open(p)?.sync_all()
    }

    fn put(p: &Path, data: &[u8]) {
        let mut f = File::create(p).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }

    fn errno<T: std::fmt::Debug>(r: io::Result<T>) -> Option<i32> {
        r.unwrap_err().raw_os_error()
    }

    #[test]
    fn unsynced_append_is_lost() {
        let Some(m) = mnt() else { return };
        let p = m.dir.join("f");
        put(&p, b"hello");
        sync_dir(&m.dir).unwrap();
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b" world").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"hello world");
        m.fs.power_cut();
        assert_eq!(fs::read(&p).unwrap(), b"hello");
        // The pre-cut handle is dead; closing it still works.
        assert_eq!(errno(f.write_all(b"x")), Some(libc::EIO));
        drop(f);
        assert_eq!(m.fs.syncs(), (1, 1));
    }

    #[test]
    fn file_needs_its_directory_fsynced() {
        let Some(m) = mnt() else { return };
        let sub = m.dir.join("sub");
        fs::create_dir(&sub).unwrap();
        sync_dir(&m.dir).unwrap();
        put(&sub.join("a"), b"data");
        m.fs.power_cut();
        assert!(!sub.join("a").exists());
        put(&sub.join("b"), b"data");
        sync_dir(&sub).unwrap();
        m.fs.power_cut();
        assert_eq!(fs::read(sub.join("b")).unwrap(), b"data");
        // An fd whose inode the cut dropped gets ESTALE.
        let f = File::create(sub.join("c")).unwrap();
        m.fs.power_cut();
        assert_eq!(errno(f.metadata()), Some(libc::ESTALE));
    }

    #[test]
    fn rename_needs_directory_fsync() {
        let Some(m) = mnt() else { return };
        let (p, tmp) = (m.dir.join("f"), m.dir.join("f.tmp"));
        put(&tmp, b"old");
        fs::rename(&tmp, &p).unwrap();
        sync_dir(&m.dir).unwrap();
        put(&tmp, b"new");
        fs::rename(&tmp, &p).unwrap(); // replaces f
        m.fs.power_cut();
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert!(!tmp.exists());
        put(&tmp, b"new");
        fs::rename(&tmp, &p).unwrap();
        sync_dir(&m.dir).unwrap();
        m.fs.power_cut();
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert!(!tmp.exists());
        File::create(&tmp).unwrap();
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap();
        let rename2 = |to: &Path, flags| {
            let (from, to) = (c(&tmp), c(to));
            let at = libc::AT_FDCWD;
            match unsafe { libc::renameat2(at, from.as_ptr(), at, to.as_ptr(), flags) } {
                0 => None,
                _ => io::Error::last_os_error().raw_os_error(),
            }
        };
        assert_eq!(rename2(&p, libc::RENAME_EXCHANGE), Some(libc::EINVAL));
        assert_eq!(rename2(&p, libc::RENAME_NOREPLACE), Some(libc::EEXIST));
        assert_eq!(rename2(&m.dir.join("g"), libc::RENAME_NOREPLACE), None);
    }

    #[test]
    fn failing_fsync_persists_nothing() {
        let Some(m) = mnt() else { return };
        let p = m.dir.join("f");
        put(&p, b"");
        sync_dir(&m.dir).unwrap();
        let mut f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all(b"data").unwrap();
        m.fs.fail_fsync(true);
        assert_eq!(errno(f.sync_all()), Some(libc::EIO));
        assert_eq!(errno(f.sync_data()), Some(libc::EIO));
        assert_eq!(errno(sync_dir(&m.dir)), Some(libc::EIO));
        m.fs.fail_fsync(false);
        assert_eq!(m.fs.syncs(), (3, 2));
        m.fs.power_cut();
        assert_eq!(fs::read(&p).unwrap(), b"");
    }

    #[test]
    fn ordinary_tools_work() {
        let Some(m) = mnt() else { return };
        let d = m.dir.join("a/b/c");
        fs::create_dir_all(&d).unwrap();
        let p = d.join("db");
        File::create(&p).unwrap();
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        // flock is emulated by the kernel: another open file description conflicts.
        let g = File::open(&p).unwrap();
        let flock = |f: &File| unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!((flock(&f), flock(&g)), (0, -1));
        f.write_all_at(b"xy", 10).unwrap(); // extends with zeros
        let mut buf = [1u8; 12];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"\0\0\0\0\0\0\0\0\0\0xy");
        // sync_file_range never reaches FUSE: it succeeds and persists nothing.
        let flags = libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        let r = unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 12, flags) };
        assert_eq!((r, m.fs.syncs()), (0, (0, 0)));
        assert_eq!(unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 8192) }, 0);
        assert_eq!(f.metadata().unwrap().len(), 8192);
        f.set_len(3).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"\0\0\0");
        let names = fs::read_dir(m.dir.join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name());
        assert_eq!(names.collect::<Vec<_>>(), ["c"]);
        assert_eq!(
            errno(fs::remove_dir(m.dir.join("a/b"))),
            Some(libc::ENOTEMPTY)
        );
        fs::remove_file(&p).unwrap();
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let c = CString::new(m.dir.as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        assert!(st.f_bavail * st.f_frsize >= 1 << 40);
        drop((f, g));
        fs::remove_dir_all(m.dir.join("a")).unwrap();
        assert_eq!(fs::read_dir(&m.dir).unwrap().count(), 0);
    }

    fn mounted(p: &Path) -> bool {
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        info.lines().any(|l| l.split(' ').nth(4) == p.to_str())
    }

    #[test]
    fn unmounts_on_drop_even_when_busy_or_panicking() {
        let Some(m) = mnt() else { return };
        let dir = m.dir.canonicalize().unwrap();
        assert!(mounted(&dir));
        drop(m.fs);
        assert!(!mounted(&dir));
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0); // no ENOTCONN
                                                            // A test that panics while a file in the mount is still open.
        let (d, leaked) = (dir.clone(), Arc::new(Mutex::new(-1)));
        let l = leaked.clone();
        let r = std::panic::catch_unwind(move || {
            let _fs = PowerFs::mount(&d).unwrap();
            let f = File::create(d.join("x")).unwrap();
            *l.lock().unwrap() = f.as_raw_fd();
            std::mem::forget(f);
            panic!("deliberate panic with a file open in the mount");
        });
        assert!(r.is_err());
        assert!(!mounted(&dir));
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        unsafe { libc::close(*leaked.lock().unwrap()) };
    }

    fn ls(dir: &Path) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let (e, name) = e.map(|e| (e.path(), e.file_name())).unwrap();
                let len = fs::metadata(&e).unwrap().len();
                format!("{} ({len} bytes)", name.to_string_lossy())
            })
            .collect();
        out.sort();
        out
    }

    /// sled's background threads may hold the `db` file (and its flock) for a
    /// moment after the `Db` is dropped.
    fn open(path: &Path) -> sled::Db {
        for _ in 0..200 {
            match sled::open(path) {
                Err(e) if e.to_string().contains("could not acquire lock") => {}
                db => return db.unwrap(),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("sled's lock on {path:?} was never released");
    }

    #[test]
    fn sled_survives_only_what_is_fsynced() {
        let Some(m) = mnt() else { return };
        let path = m.dir.join("sled");
        let count = |r: std::ops::Range<u32>| {
            let db = open(&path);
            r.filter(|i| db.get(i.to_be_bytes()).unwrap().is_some())
                .count()
        };
        let sync_dirs = || {
            sync_dir(&path).unwrap();
            sync_dir(&m.dir).unwrap();
        };
        // Inserts, flushes, calls `then` and closes the database.
        let fill = |r: std::ops::Range<u32>, then: &dyn Fn()| {
            let s0 = m.fs.syncs();
            let db = open(&path);
            let s1 = m.fs.syncs();
            for i in r {
                db.insert(i.to_be_bytes(), vec![7u8; 100]).unwrap();
            }
            db.flush().unwrap();
            let s2 = m.fs.syncs();
            then();
            drop(db);
            let s3 = m.fs.syncs();
            println!("  (fsync, fsyncdir) before open {s0:?}, opened {s1:?}, flushed {s2:?}, dropped {s3:?}");
        };
        fill(0..100, &|| {});
        println!("sled created: {:?}", ls(&path));
        assert_eq!(count(0..100), 100);
        fill(100..200, &|| {});
        m.fs.power_cut();
        let lost = (count(0..100), count(100..200));
        println!("flush only, cut, directories never fsynced: {lost:?} of (100, 100) left");
        // Again with sled's directory entries made durable.
        fill(0..100, &sync_dirs);
        File::open(path.join("db")).unwrap().sync_all().unwrap();
        fill(100..200, &|| {});
        m.fs.power_cut();
        let left = (count(0..100), count(100..200));
        println!("flush only, cut, directories fsynced before: {left:?} of (100, 100) left");
        fill(0..200, &|| {
            File::open(path.join("db")).unwrap().sync_all().unwrap();
            sync_dirs();
        });
        m.fs.power_cut();
        println!("sled's files after the last cut: {:?}", ls(&path));
        assert_eq!(count(0..200), 200);
    }
}
