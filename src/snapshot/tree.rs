//! The hash tree of a snapshot, for `snapship verify`: what a snapshot holds, content and
//! metadata, as one root hash that two nodes compare, with directory listings to descend
//! where they differ.
//!
//! Read top-down:
//! - [`Entry`] is one name in a directory: its [`Meta`] (type, mode, owner, size, mtime,
//!   xattrs, symlink target) and its hash (a file: BLAKE3 of its content; a symlink: of its
//!   target; a directory: of its sorted entries, names, metadata and hashes, so a directory's
//!   hash covers everything below it).
//! - [`Tree::compute`] walks a snapshot without ever following a symlink (`lstat`, and files
//!   opened `O_NOFOLLOW`), hashes the files on a few threads, and builds the directories'
//!   hashes bottom-up. A [`Cache`] of content hashes from an earlier verify lets it rehash
//!   only files whose inode, size, mtime or ctime changed (the kernel sets ctime on every
//!   change and no one can set it back, and a btrfs snapshot keeps the inodes and ctimes of
//!   what it did not change).
//! - [`compare_entries`] is the pure comparison of one directory's listings on two nodes:
//!   the differences to print, and the subdirectories to descend into.
//!
//! Names go on the wire as text: UTF-8 names as they are, anything else (and `%`) escaped
//! as `%XX` ([`wire_name`]). Paths inside a tree are those names joined with `/`; the root
//! is `""`. A tree is looked up by such a path only in memory: nothing a peer sends is ever
//! used as a filesystem path.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use anyhow::{Context, Result, bail};
use rustix::fs::{AtFlags, Mode, OFlags, Stat};
use serde::{Deserialize, Serialize};

/// What kind of file an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileType {
    File,
    Dir,
    Symlink,
    /// A device, fifo or socket (compared by metadata; `rdev` is in `size`).
    Special,
}

impl FileType {
    fn word(self) -> &'static str {
        match self {
            FileType::File => "file",
            FileType::Dir => "directory",
            FileType::Symlink => "symlink",
            FileType::Special => "special file",
        }
    }
}

/// The metadata `verify` compares. A directory's size is left out (btrfs counts its names'
/// lengths, which the entries already cover); a special file's `size` is its device number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    #[serde(rename = "t")]
    pub kind: FileType,
    /// Permission bits with setuid, setgid and sticky (`mode & 0o7777`).
    #[serde(rename = "m")]
    pub mode: u32,
    #[serde(rename = "u")]
    pub uid: u32,
    #[serde(rename = "g")]
    pub gid: u32,
    #[serde(rename = "s")]
    pub size: u64,
    /// Modification time: seconds and nanoseconds since the epoch.
    #[serde(rename = "mt")]
    pub mtime: (i64, i64),
    /// Extended attributes, sorted by name: the name and the BLAKE3 of the value.
    #[serde(rename = "x", default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<(String, String)>,
    /// A symlink's target (escaped like names).
    #[serde(rename = "l", default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// One name in a directory of the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    #[serde(rename = "n")]
    pub name: String,
    #[serde(rename = "a")]
    pub meta: Meta,
    /// Hex BLAKE3: a file's content, a symlink's target, a directory's entries.
    #[serde(rename = "h")]
    pub hash: String,
}

/// A snapshot's hash tree: the root (name `""`) and every directory's entries, sorted by
/// name, keyed by the directory's path inside the snapshot.
#[derive(Debug, Clone)]
pub struct Tree {
    pub root: Entry,
    pub dirs: HashMap<String, Vec<Entry>>,
    /// Each file's identity (inode, size, mtime, ctime) as the walk found it, by path: what
    /// [`cache_of`] keeps with its hash.
    ids: HashMap<String, FileId>,
    /// How many files were hashed, and how many content hashes came from the cache.
    pub hashed: usize,
    pub reused: usize,
}

/// Content hashes of an earlier tree, by path: reused for a file whose identity (inode, size,
/// mtime, ctime) is the same.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Cache {
    /// The snapshot the hashes were taken of.
    pub snapshot: String,
    pub files: HashMap<String, CachedFile>,
}

/// What makes a cached content hash reusable: (inode, size, mtime s, mtime ns, ctime s,
/// ctime ns).
pub type FileId = (u64, u64, i64, i64, i64, i64);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedFile {
    pub id: FileId,
    pub hash: String,
}

/// How many threads hash file contents at once: a few, so a verify leaves the node's other
/// work some cores (hashing is I/O bound on most disks anyway).
pub fn hash_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4)
}

/// `name` as text on the wire: UTF-8 as is, other bytes and `%` as `%XX`.
pub fn wire_name(name: &[u8]) -> String {
    match std::str::from_utf8(name) {
        Ok(text) if !text.contains('%') => text.to_string(),
        _ => {
            let mut out = String::new();
            for chunk in name.utf8_chunks() {
                for c in chunk.valid().chars() {
                    if c == '%' { out.push_str("%25") } else { out.push(c) }
                }
                for b in chunk.invalid() {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
            out
        }
    }
}

/// `path` (a tree path, `a/b`) joined with `name`.
pub fn join(path: &str, name: &str) -> String {
    if path.is_empty() { name.to_string() } else { format!("{path}/{name}") }
}

/// A tree path as a peer sent it, checked: names without `/`, `..`, `.` or NUL, so that it
/// can only ever name a directory of the tree (it is looked up in memory, never opened).
pub fn check_path(parts: &[String]) -> Result<String> {
    for p in parts {
        if p.is_empty() || p == "." || p == ".." || p.contains('/') || p.contains('\0') {
            bail!("{p:?} is not a name inside a snapshot");
        }
    }
    Ok(parts.join("/"))
}

/// The identity that makes a cached content hash reusable. (`Stat`'s field types differ
/// between architectures: the casts are no-ops only on some.)
#[allow(clippy::unnecessary_cast)]
fn file_id(st: &Stat) -> FileId {
    (st.st_ino as u64, st.st_size as u64, st.st_mtime as i64, st.st_mtime_nsec as i64, st.st_ctime as i64, st.st_ctime_nsec as i64)
}

fn kind_of(st: &Stat) -> FileType {
    match rustix::fs::FileType::from_raw_mode(st.st_mode as _) {
        rustix::fs::FileType::Symlink => FileType::Symlink,
        rustix::fs::FileType::Directory => FileType::Dir,
        rustix::fs::FileType::RegularFile => FileType::File,
        _ => FileType::Special,
    }
}

/// The metadata of a stat'ed entry, with its xattrs and (a symlink's) target.
#[allow(clippy::unnecessary_cast)]
fn meta_of(st: &Stat, xattrs: Vec<(String, String)>, target: Option<String>) -> Meta {
    let kind = kind_of(st);
    let size = match kind {
        FileType::File | FileType::Symlink => st.st_size as u64,
        FileType::Dir => 0,
        FileType::Special => st.st_rdev as u64,
    };
    Meta {
        kind,
        mode: st.st_mode as u32 & 0o7777,
        uid: st.st_uid as u32,
        gid: st.st_gid as u32,
        size,
        mtime: (st.st_mtime as i64, st.st_mtime_nsec as i64),
        xattrs,
        target,
    }
}

/// Where the extended attributes of an entry are read: through a descriptor the walk holds
/// open anyway (a regular file's: no path lookup), or by path, never following a symlink.
#[derive(Clone, Copy)]
enum XattrsOf<'a> {
    Fd(BorrowedFd<'a>),
    Path(&'a Path),
}

impl XattrsOf<'_> {
    fn list(self, buf: &mut [u8]) -> rustix::io::Result<usize> {
        match self {
            XattrsOf::Fd(fd) => rustix::fs::flistxattr(fd, buf),
            XattrsOf::Path(p) => rustix::fs::llistxattr(p, buf),
        }
    }

    fn get(self, name: &std::ffi::OsStr, buf: &mut [u8]) -> rustix::io::Result<usize> {
        match self {
            XattrsOf::Fd(fd) => rustix::fs::fgetxattr(fd, name, buf),
            XattrsOf::Path(p) => rustix::fs::lgetxattr(p, name, buf),
        }
    }
}

/// Fills `buf` with what `read` gives, growing it while the kernel says it is too small
/// (`ERANGE`), and returns how much it gave.
fn read_growing(buf: &mut Vec<u8>, read: impl Fn(&mut [u8]) -> rustix::io::Result<usize>) -> rustix::io::Result<usize> {
    loop {
        match read(&mut buf[..]) {
            Err(rustix::io::Errno::RANGE) if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            other => return other,
        }
    }
}

/// The extended attributes of an entry (`path` names it in errors), sorted by name, each
/// with the BLAKE3 of its value. Most files have none: that costs one call.
fn xattrs_of(of: XattrsOf<'_>, path: &Path) -> Result<Vec<(String, String)>> {
    let unsupported = |e: &rustix::io::Errno| *e == rustix::io::Errno::NOTSUP || *e == rustix::io::Errno::NODATA;
    let mut list = vec![0u8; 256];
    let n = match read_growing(&mut list, |b| of.list(b)) {
        Ok(n) => n,
        Err(e) if unsupported(&e) => return Ok(Vec::new()),
        Err(e) => return Err(std::io::Error::from(e)).with_context(|| format!("cannot list the xattrs of {}", path.display())),
    };
    let mut out = Vec::new();
    let mut value = vec![0u8; 256];
    for name in list[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name_os = std::ffi::OsStr::from_bytes(name);
        let got = match read_growing(&mut value, |b| of.get(name_os, b)) {
            Ok(got) => got,
            Err(e) if unsupported(&e) => continue, // removed meanwhile
            Err(e) => return Err(std::io::Error::from(e)).with_context(|| format!("cannot read xattr {} of {}", wire_name(name), path.display())),
        };
        out.push((wire_name(name), blake3::hash(&value[..got]).to_hex().to_string()));
    }
    out.sort();
    Ok(out)
}

/// Files this size and larger are hashed through a memory map of the page cache, which
/// spares copying every byte into a buffer first (in a full verify that copy cost about as
/// much CPU as the hashing); smaller ones are read.
const MAP_FROM: u64 = 256 * 1024;

/// BLAKE3 of a large file's content (one of [`MAP_FROM`] bytes or more), opened without
/// following a symlink, through a memory map.
fn hash_mapped(path: &Path) -> Result<String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot open {} to hash it", path.display()))?;
    // SAFETY: the map is read while this function holds it and the file is a snapshot's,
    // read-only: nothing truncates it under the map. (Only an admin making the snapshot
    // writable and truncating the file during a verify could, and a SIGBUS would end this
    // process: nothing is written, so nothing is left half done.)
    let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }.with_context(|| format!("cannot map {} to hash it", path.display()))?;
    Ok(blake3::hash(&map).to_hex().to_string())
}

/// BLAKE3 of the first `size` bytes of the open file `fd` (`path` names it in errors): all of
/// it, `size` being what its `fstat` said a moment ago and the snapshot read-only. Read
/// into `buf` (a worker's own, reused) with as few reads as the kernel allows, usually one.
fn hash_read(fd: BorrowedFd<'_>, size: u64, path: &Path, buf: &mut Vec<u8>) -> Result<String> {
    buf.resize(size as usize, 0);
    let mut got = 0;
    while got < buf.len() {
        match rustix::io::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(std::io::Error::from(e)).with_context(|| format!("cannot read {}", path.display())),
        }
    }
    Ok(blake3::hash(&buf[..got]).to_hex().to_string())
}

/// The hash of a directory: over its sorted entries (names, metadata, hashes).
fn dir_hash(entries: &[Entry]) -> String {
    blake3::hash(&serde_json::to_vec(entries).expect("entries serialize")).to_hex().to_string()
}

/// A file whose content is to be hashed: where its entry is, and where it is on disk.
struct Pending {
    dir: String,
    index: usize,
    path: PathBuf,
}

/// One piece of a [`Tree::compute`]: list a directory, or hash a file.
enum Job {
    List { at: String, path: PathBuf },
    Hash(Pending),
}

/// What one job found: a directory's listing (at its tree path), or a file's hash (where its
/// entry is: directory and index).
enum Done {
    Listed(String, Listed),
    Hashed(String, usize, String),
}

/// What the workers of a [`Tree::compute`] share: the jobs to do and how many are under way
/// (the walk is over when both are none), and what they found.
#[derive(Default)]
struct Walk {
    jobs: Vec<Job>,
    busy: usize,
    failed: Option<anyhow::Error>,
    dirs: HashMap<String, Vec<Entry>>,
    /// Each file's identity, by tree path, for the cache of the next verify.
    ids: HashMap<String, FileId>,
    hashes: Vec<(String, usize, String)>,
    hashed: usize,
    reused: usize,
}

/// What listing one directory found: its entries (large files to hash with an empty hash),
/// the jobs it makes (subdirectories, large files to hash), the files' identities, and how
/// many small files it hashed itself and how many content hashes the cache gave.
struct Listed {
    entries: Vec<Entry>,
    jobs: Vec<Job>,
    ids: Vec<(String, FileId)>,
    hashed: usize,
    reused: usize,
}

/// Lists the directory at `path` (tree path `at`): each entry's metadata, read relative to
/// the open directory and never following a symlink. A regular file is opened (`openat`,
/// `O_NOFOLLOW`) and its metadata and xattrs read through that descriptor; a small one
/// is hashed here and now, a large one becomes a job of its own.
fn list_dir(at: &str, path: &Path, cache: &Cache, buf: &mut Vec<u8>) -> Result<Listed> {
    let out = Listed { entries: Vec::new(), jobs: Vec::new(), ids: Vec::new(), hashed: 0, reused: 0 };
    let mut here = Lister { at, cache, buf, out };
    let cannot_list = || format!("cannot list {}", path.display());
    let dir_fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
        .map_err(std::io::Error::from)
        .with_context(cannot_list)?;
    let items = rustix::fs::Dir::read_from(&dir_fd).map_err(std::io::Error::from).with_context(cannot_list)?;
    for item in items {
        let item = item.map_err(std::io::Error::from).with_context(cannot_list)?;
        let raw = item.file_name();
        if matches!(raw.to_bytes(), b"." | b"..") {
            continue;
        }
        let name = wire_name(raw.to_bytes());
        let child_path = path.join(std::ffi::OsStr::from_bytes(raw.to_bytes()));
        let opened = match item.file_type() {
            rustix::fs::FileType::RegularFile => Some(open_file(dir_fd.as_fd(), raw, &child_path)?),
            _ => None,
        };
        let (entry, job) = match opened {
            Some((fd, st)) if kind_of(&st) == FileType::File => here.file_entry(fd.as_fd(), &st, name, child_path)?,
            // Not a regular file after all (the listing's type was stale), or not one at all.
            _ => {
                let st = rustix::fs::statat(dir_fd.as_fd(), raw, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(std::io::Error::from)
                    .with_context(|| format!("cannot read {}", child_path.display()))?;
                here.other_entry(dir_fd.as_fd(), raw, &st, name, child_path)?
            }
        };
        here.out.jobs.extend(job);
        here.out.entries.push(entry);
    }
    Ok(here.out)
}

/// Opens the regular file `name` of the directory `dir` for hashing, never following a
/// symlink (nor blocking on a fifo put there meanwhile), and stats it through the descriptor.
fn open_file(dir: BorrowedFd<'_>, name: &std::ffi::CStr, path: &Path) -> Result<(OwnedFd, Stat)> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, name, flags, Mode::empty())
        .map_err(std::io::Error::from)
        .with_context(|| format!("cannot open {} to hash it", path.display()))?;
    let st = rustix::fs::fstat(&fd).map_err(std::io::Error::from).with_context(|| format!("cannot read {}", path.display()))?;
    Ok((fd, st))
}

/// One directory's listing under way: its tree path, the cache of content hashes, the
/// worker's read buffer, and what it found so far.
struct Lister<'a> {
    at: &'a str,
    cache: &'a Cache,
    buf: &'a mut Vec<u8>,
    out: Listed,
}

impl Lister<'_> {
    /// The entry of the regular file open at `fd` (`st` its stat): its content hash from the
    /// cache when its identity is unchanged, else hashed here and now (small) or by a job of
    /// its own (large).
    fn file_entry(&mut self, fd: BorrowedFd<'_>, st: &Stat, name: String, child_path: PathBuf) -> Result<(Entry, Option<Job>)> {
        let meta = meta_of(st, xattrs_of(XattrsOf::Fd(fd), &child_path)?, None);
        let (child, id) = (join(self.at, &name), file_id(st));
        let cached = self.cache.files.get(&child).filter(|c| c.id == id).map(|c| c.hash.clone());
        self.out.ids.push((child, id));
        Ok(match cached {
            Some(hash) => {
                self.out.reused += 1;
                (Entry { name, meta, hash }, None)
            }
            // A small file is hashed here and now: a job of its own would cost more in handing
            // it over than in hashing it.
            None if meta.size < MAP_FROM => {
                self.out.hashed += 1;
                let hash = hash_read(fd, meta.size, &child_path, self.buf)?;
                (Entry { name, meta, hash }, None)
            }
            None => {
                let job = Job::Hash(Pending { dir: self.at.to_string(), index: self.out.entries.len(), path: child_path });
                (Entry { name, meta, hash: String::new() }, Some(job))
            }
        })
    }

    /// The entry of what is not a regular file (a directory: a job to list it; a symlink:
    /// the hash of its target; a device, fifo or socket: its metadata), or of a regular file
    /// the listing had no type for, as `st` (its `statat` in `dir`) says.
    fn other_entry(&mut self, dir: BorrowedFd<'_>, raw: &std::ffi::CStr, st: &Stat, name: String, child_path: PathBuf) -> Result<(Entry, Option<Job>)> {
        if kind_of(st) == FileType::File {
            // A filesystem that leaves `d_type` unknown: open it as a regular file after all.
            let (fd, st) = open_file(dir, raw, &child_path)?;
            if kind_of(&st) == FileType::File {
                return self.file_entry(fd.as_fd(), &st, name, child_path);
            }
        }
        let xattrs = xattrs_of(XattrsOf::Path(&child_path), &child_path)?;
        Ok(match kind_of(st) {
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(dir, raw, Vec::new())
                    .map_err(std::io::Error::from)
                    .with_context(|| format!("cannot read the symlink {}", child_path.display()))?;
                let target = wire_name(target.as_bytes());
                let hash = blake3::hash(target.as_bytes()).to_hex().to_string();
                (Entry { name, meta: meta_of(st, xattrs, Some(target)), hash }, None)
            }
            FileType::Dir => {
                let job = Job::List { at: join(self.at, &name), path: child_path };
                (Entry { name, meta: meta_of(st, xattrs, None), hash: String::new() }, Some(job)) // filled in bottom-up
            }
            _ => (Entry { name, meta: meta_of(st, xattrs, None), hash: String::new() }, None),
        })
    }
}

/// One worker of a [`Tree::compute`]: takes the next job until none is left and none is
/// under way (another's listing may still make more), or one failed.
fn work(walk: &Mutex<Walk>, changed: &Condvar, cache: &Cache) {
    let mut buf = Vec::with_capacity(MAP_FROM as usize);
    let mut shared = walk.lock().expect("walk lock");
    loop {
        if shared.failed.is_some() {
            break;
        }
        let Some(job) = shared.jobs.pop() else {
            if shared.busy == 0 {
                break;
            }
            shared = changed.wait(shared).expect("walk lock");
            continue;
        };
        shared.busy += 1;
        drop(shared);
        let done = match job {
            Job::List { at, path } => list_dir(&at, &path, cache, &mut buf).map(|listed| Done::Listed(at, listed)),
            Job::Hash(p) => hash_mapped(&p.path).map(|hash| Done::Hashed(p.dir, p.index, hash)),
        };
        let mut more = false;
        shared = walk.lock().expect("walk lock");
        shared.busy -= 1;
        match done {
            Ok(Done::Listed(at, listed)) => {
                more = !listed.jobs.is_empty();
                shared.jobs.extend(listed.jobs);
                shared.ids.extend(listed.ids);
                shared.hashed += listed.hashed;
                shared.reused += listed.reused;
                shared.dirs.insert(at, listed.entries);
            }
            Ok(Done::Hashed(dir, index, hash)) => {
                shared.hashed += 1;
                shared.hashes.push((dir, index, hash));
            }
            Err(e) => shared.failed = Some(e),
        }
        // Waiting workers wake for new jobs, or to end (the walk is over, or failed).
        if more || shared.busy == 0 || shared.failed.is_some() {
            changed.notify_all();
        }
    }
    changed.notify_all();
}

impl Tree {
    /// The hash tree of the snapshot at `root`, reusing content hashes from `cache` where a
    /// file's identity is unchanged (pass an empty cache for a full rehash), with `workers`
    /// threads listing directories and hashing files as they are found (metadata and
    /// contents both in parallel). Blocking: run it off the async runtime.
    pub fn compute(root: &Path, cache: &Cache, workers: usize) -> Result<Tree> {
        let root_st = rustix::fs::lstat(root).map_err(std::io::Error::from).with_context(|| format!("cannot read {}", root.display()))?;
        if kind_of(&root_st) != FileType::Dir {
            bail!("{} is not a directory", root.display());
        }
        let walk = Mutex::new(Walk { jobs: vec![Job::List { at: String::new(), path: root.to_path_buf() }], ..Walk::default() });
        let changed = Condvar::new();
        std::thread::scope(|s| {
            for _ in 0..workers.max(1) {
                s.spawn(|| work(&walk, &changed, cache));
            }
        });
        let walk = walk.into_inner().expect("walk lock");
        if let Some(e) = walk.failed {
            return Err(e);
        }
        let mut dirs = walk.dirs;
        for (dir, index, hash) in walk.hashes {
            dirs.get_mut(&dir).expect("listed")[index].hash = hash;
        }
        // Directories bottom-up: sort each, hash it, and put the hash into its parent.
        let mut order: Vec<String> = dirs.keys().cloned().collect();
        order.sort_by_key(|p| std::cmp::Reverse(if p.is_empty() { 0 } else { p.matches('/').count() + 1 }));
        let mut hashes: HashMap<String, String> = HashMap::new();
        for at in order {
            let entries = dirs.get_mut(&at).expect("walked");
            for e in entries.iter_mut().filter(|e| e.meta.kind == FileType::Dir) {
                e.hash = hashes.remove(&join(&at, &e.name)).expect("children before parents");
            }
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            hashes.insert(at, dir_hash(entries));
        }
        let root =
            Entry { name: String::new(), meta: meta_of(&root_st, xattrs_of(XattrsOf::Path(root), root)?, None), hash: hashes.remove("").expect("the root") };
        Ok(Tree { root, dirs, ids: walk.ids, hashed: walk.hashed, reused: walk.reused })
    }

    /// The entries of the directory at `path`, if it is one.
    pub fn dir(&self, path: &str) -> Option<&[Entry]> {
        self.dirs.get(path).map(Vec::as_slice)
    }

    /// One page of the directory at `path`: entries after `after` (by name), up to about
    /// `max_bytes` of serialized entries (at least one), and whether more follow.
    pub fn page(&self, path: &str, after: Option<&str>, max_bytes: usize) -> Option<(Vec<Entry>, bool)> {
        let entries = self.dir(path)?;
        let start = match after {
            Some(a) => entries.partition_point(|e| e.name.as_str() <= a),
            None => 0,
        };
        let mut out = Vec::new();
        let mut size = 0;
        for e in &entries[start..] {
            let len = serde_json::to_vec(e).map_or(0, |v| v.len()) + 1;
            if !out.is_empty() && size + len > max_bytes {
                return Some((out, true));
            }
            size += len;
            out.push(e.clone());
        }
        Some((out, false))
    }
}

/// The cache of content hashes of `tree`, taken of `snapshot`, for the next verify: each
/// file's hash with its identity as the walk found it.
pub fn cache_of(tree: &Tree, snapshot: &str) -> Cache {
    let mut files = HashMap::new();
    for (at, entries) in &tree.dirs {
        for e in entries.iter().filter(|e| e.meta.kind == FileType::File) {
            let path = join(at, &e.name);
            if let Some(id) = tree.ids.get(&path) {
                files.insert(path, CachedFile { id: *id, hash: e.hash.clone() });
            }
        }
    }
    Cache { snapshot: snapshot.to_string(), files }
}

/// Where the cache of a file set's trees lives on one side (`origin`, `replica`: a node may
/// hold both copies): `STATE_DIR/verify/FILESET/SIDE/`.
pub fn cache_dir(state_dir: &Path, fileset: &str, side: &str) -> PathBuf {
    state_dir.join("verify").join(fileset).join(side)
}

/// The newest cache kept in `dir` (any snapshot), or an empty one.
pub fn load_cache(dir: &Path) -> Cache {
    let Ok(read) = std::fs::read_dir(dir) else { return Cache::default() };
    let mut names: Vec<PathBuf> = read.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "tree")).collect();
    names.sort();
    names.last().and_then(|p| std::fs::read(p).ok()).and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// Keeps `cache` as the one cache in `dir` (`SNAPSHOT.tree`), replacing older ones.
pub fn save_cache(dir: &Path, cache: &Cache) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("{}.tree", cache.snapshot));
    let tmp = dir.join(format!(".{}.tree.tmp", cache.snapshot));
    std::fs::write(&tmp, serde_json::to_vec(cache)?).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.path() != path && e.path().extension().is_some_and(|x| x == "tree") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

/// One difference between the origin's and a replica's copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// Present on both, but differs (what differs, in words: `content`, `mode 0755 -> 0700`).
    Modified {
        path: String,
        what: Vec<String>,
    },
    OnlyOnOrigin {
        path: String,
    },
    OnlyOnReplica {
        path: String,
    },
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |p: &str| if p.is_empty() { ".".to_string() } else { p.escape_debug().to_string() };
        match self {
            Difference::Modified { path, what } => write!(f, "M {}: {}", shown(path), what.join(", ").escape_debug()),
            Difference::OnlyOnOrigin { path } => write!(f, "D {}: only on the origin", shown(path)),
            Difference::OnlyOnReplica { path } => write!(f, "A {}: only on the replica", shown(path)),
        }
    }
}

/// What differs between the origin's `o` and the replica's `r` of one entry, in words
/// (origin's value first): empty when equal. The content of directories is not compared here
/// (their entries are).
pub fn entry_differences(o: &Entry, r: &Entry) -> Vec<String> {
    let (a, b) = (&o.meta, &r.meta);
    let mut out = Vec::new();
    if a.kind != b.kind {
        return vec![format!("type {} -> {}", a.kind.word(), b.kind.word())];
    }
    if a.kind == FileType::File && o.hash != r.hash {
        out.push("content".to_string());
    }
    if a.mode != b.mode {
        out.push(format!("mode {:04o} -> {:04o}", a.mode, b.mode));
    }
    if (a.uid, a.gid) != (b.uid, b.gid) {
        out.push(format!("owner {}:{} -> {}:{}", a.uid, a.gid, b.uid, b.gid));
    }
    if a.size != b.size {
        out.push(format!("size {} -> {}", a.size, b.size));
    }
    if a.mtime != b.mtime {
        let t = |(s, ns): (i64, i64)| {
            chrono::DateTime::from_timestamp(s, ns as u32).map_or(format!("{s}.{ns:09}"), |t| t.format("%Y-%m-%d %H:%M:%S%.9f").to_string())
        };
        out.push(format!("mtime {} -> {}", t(a.mtime), t(b.mtime)));
    }
    if a.target != b.target {
        out.push(format!("target {} -> {}", a.target.as_deref().unwrap_or(""), b.target.as_deref().unwrap_or("")));
    }
    let xa: BTreeMap<&str, &str> = a.xattrs.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let xb: BTreeMap<&str, &str> = b.xattrs.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let mut names: Vec<&str> = xa.keys().chain(xb.keys()).copied().collect();
    names.sort();
    names.dedup();
    for n in names {
        match (xa.get(n), xb.get(n)) {
            (Some(x), Some(y)) if x == y => {}
            (Some(_), Some(_)) => out.push(format!("xattr {n}")),
            (Some(_), None) => out.push(format!("xattr {n} only on the origin")),
            (None, _) => out.push(format!("xattr {n} only on the replica")),
        }
    }
    out
}

/// Compares one directory (at `path`) as listed by the origin (`origin`) and a replica
/// (`replica`), both sorted by name: the differences, and the subdirectories present on both
/// whose hashes differ (to descend into).
pub fn compare_entries(path: &str, origin: &[Entry], replica: &[Entry]) -> (Vec<Difference>, Vec<String>) {
    let mut diffs = Vec::new();
    let mut descend = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < origin.len() || j < replica.len() {
        let order = match (origin.get(i), replica.get(j)) {
            (Some(o), Some(r)) => o.name.cmp(&r.name),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, _) => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                diffs.push(Difference::OnlyOnOrigin { path: join(path, &origin[i].name) });
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                diffs.push(Difference::OnlyOnReplica { path: join(path, &replica[j].name) });
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                let (o, r) = (&origin[i], &replica[j]);
                let child = join(path, &o.name);
                let what = entry_differences(o, r);
                if !what.is_empty() {
                    diffs.push(Difference::Modified { path: child.clone(), what });
                }
                if o.meta.kind == FileType::Dir && r.meta.kind == FileType::Dir && o.hash != r.hash {
                    descend.push(child);
                }
                i += 1;
                j += 1;
            }
        }
    }
    (diffs, descend)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn sample(dir: &Path) {
        std::fs::create_dir_all(dir.join("docs/deep")).unwrap();
        std::fs::write(dir.join("docs/a.txt"), "alpha").unwrap();
        std::fs::write(dir.join("docs/deep/b.txt"), "beta").unwrap();
        std::fs::write(dir.join("old.txt"), "old").unwrap();
        std::fs::write(dir.join("x"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(dir.join("x"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("docs/a.txt", dir.join("link")).unwrap();
        // A symlink out of the tree is read as a link, never followed.
        std::os::unix::fs::symlink("/etc/passwd", dir.join("escape")).unwrap();
    }

    /// Makes `b`'s mtimes equal to `a`'s for every path both have (a copy made by hand gets new
    /// ones).
    fn same_times(a: &Path, b: &Path) {
        let mut paths = vec![PathBuf::new()];
        while let Some(rel) = paths.pop() {
            let md = std::fs::symlink_metadata(a.join(&rel)).unwrap();
            if md.is_dir() {
                for e in std::fs::read_dir(a.join(&rel)).unwrap() {
                    paths.push(rel.join(e.unwrap().file_name()));
                }
            }
            let t = rustix::fs::Timestamps {
                last_access: rustix::fs::Timespec { tv_sec: md.atime(), tv_nsec: md.atime_nsec() as _ },
                last_modification: rustix::fs::Timespec { tv_sec: md.mtime(), tv_nsec: md.mtime_nsec() as _ },
            };
            // Paths only in `a` are left alone.
            let _ = rustix::fs::utimensat(rustix::fs::CWD, b.join(&rel), &t, rustix::fs::AtFlags::SYMLINK_NOFOLLOW);
        }
    }

    /// Compares two trees fully in memory, descending like `verify` does.
    fn compare(a: &Tree, b: &Tree) -> Vec<String> {
        let mut out = Vec::new();
        let root_diffs = entry_differences(&a.root, &b.root);
        if !root_diffs.is_empty() {
            out.push(Difference::Modified { path: String::new(), what: root_diffs }.to_string());
        }
        if a.root.hash == b.root.hash {
            return out;
        }
        let mut todo = vec![String::new()];
        while let Some(at) = todo.pop() {
            let (diffs, descend) = compare_entries(&at, a.dir(&at).unwrap(), b.dir(&at).unwrap());
            out.extend(diffs.iter().map(|d| d.to_string()));
            todo.extend(descend);
        }
        out.sort();
        out
    }

    fn pair() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        sample(&a);
        sample(&b);
        // Directory mtimes last: making entries changed them.
        same_times(&a, &b);
        (t, a, b)
    }

    #[test]
    fn equal_copies_have_equal_roots() {
        let (_t, a, b) = pair();
        let (ta, tb) = (Tree::compute(&a, &Cache::default(), 2).unwrap(), Tree::compute(&b, &Cache::default(), 2).unwrap());
        assert_eq!(ta.root, tb.root);
        assert_eq!(ta.hashed, 4);
        assert_eq!(compare(&ta, &tb), Vec::<String>::new());
        let escape = ta.dir("").unwrap().iter().find(|e| e.name == "escape").unwrap();
        assert_eq!(escape.meta.kind, FileType::Symlink);
        assert_eq!(escape.meta.target.as_deref(), Some("/etc/passwd"));
    }

    #[test]
    fn each_kind_of_difference_is_named_with_its_path() {
        let (_t, a, b) = pair();
        std::fs::write(b.join("docs/deep/b.txt"), "BETA").unwrap();
        std::fs::remove_file(b.join("old.txt")).unwrap();
        std::fs::write(b.join("extra"), "").unwrap();
        std::fs::set_permissions(b.join("x"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::remove_file(b.join("link")).unwrap();
        std::os::unix::fs::symlink("elsewhere", b.join("link")).unwrap();
        same_times(&a, &b);
        let (ta, tb) = (Tree::compute(&a, &Cache::default(), 2).unwrap(), Tree::compute(&b, &Cache::default(), 2).unwrap());
        let got = compare(&ta, &tb);
        assert_eq!(
            got,
            vec![
                "A extra: only on the replica",
                "D old.txt: only on the origin",
                "M docs/deep/b.txt: content",
                "M link: size 10 -> 9, target docs/a.txt -> elsewhere",
                "M x: mode 0755 -> 0700",
            ],
            "{got:#?}"
        );
    }

    #[test]
    fn a_type_change_is_one_difference() {
        let (_t, a, b) = pair();
        std::fs::remove_file(b.join("old.txt")).unwrap();
        std::fs::create_dir(b.join("old.txt")).unwrap();
        same_times(&a, &b);
        let (ta, tb) = (Tree::compute(&a, &Cache::default(), 1).unwrap(), Tree::compute(&b, &Cache::default(), 1).unwrap());
        assert_eq!(compare(&ta, &tb), vec!["M old.txt: type file -> directory"]);
    }

    #[test]
    fn xattr_differences_are_named() {
        let o = Entry {
            name: "f".into(),
            meta: Meta {
                kind: FileType::File,
                mode: 0o644,
                uid: 0,
                gid: 0,
                size: 1,
                mtime: (1, 0),
                xattrs: vec![("user.x".into(), "h1".into())],
                target: None,
            },
            hash: "c".into(),
        };
        let mut r = o.clone();
        r.meta.xattrs = vec![("user.x".into(), "h2".into()), ("user.y".into(), "h3".into())];
        assert_eq!(entry_differences(&o, &r), vec!["xattr user.x", "xattr user.y only on the replica"]);
        r.meta.xattrs.clear();
        assert_eq!(entry_differences(&o, &r), vec!["xattr user.x only on the origin"]);
    }

    #[test]
    fn the_cache_rehashes_only_changed_files() {
        let (t, a, _b) = pair();
        let full = Tree::compute(&a, &Cache::default(), 2).unwrap();
        let cache = cache_of(&full, "s1");
        let dir = cache_dir(t.path(), "projects", "origin");
        save_cache(&dir, &cache).unwrap();
        let loaded = load_cache(&dir);
        assert_eq!(loaded.files.len(), 4);
        std::fs::write(a.join("docs/a.txt"), "ALPHA").unwrap();
        let again = Tree::compute(&a, &loaded, 2).unwrap();
        assert_eq!((again.hashed, again.reused), (1, 3));
        assert_eq!(again.root, Tree::compute(&a, &Cache::default(), 2).unwrap().root);
        assert_ne!(again.root.hash, full.root.hash);
    }

    #[test]
    fn any_number_of_workers_builds_the_same_tree() {
        let t = tempfile::tempdir().unwrap();
        for d in 0..20 {
            let dir = t.path().join(format!("d{d}/sub{}", d % 3));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..15 {
                std::fs::write(dir.join(format!("f{f}")), format!("{d} {f}")).unwrap();
            }
        }
        let one = Tree::compute(t.path(), &Cache::default(), 1).unwrap();
        assert_eq!((one.hashed, one.reused, one.dirs.len()), (300, 0, 1 + 20 + 20));
        for workers in [2, 4] {
            let many = Tree::compute(t.path(), &Cache::default(), workers).unwrap();
            assert_eq!((many.root, many.hashed), (one.root.clone(), 300));
        }
        let cache = cache_of(&one, "s1");
        assert_eq!(cache.files.len(), 300);
        let again = Tree::compute(t.path(), &cache, 2).unwrap();
        assert_eq!((again.root, again.hashed, again.reused), (one.root, 0, 300));
    }

    #[test]
    fn mapped_and_read_files_hash_as_their_content() {
        let t = tempfile::tempdir().unwrap();
        let sizes = [0, 1, MAP_FROM as usize - 1, MAP_FROM as usize, 3 * MAP_FROM as usize + 7];
        let content = |size: usize| -> Vec<u8> { (0..size).map(|i| (i * 7 % 251) as u8).collect() };
        for size in sizes {
            std::fs::write(t.path().join(format!("f{size}")), content(size)).unwrap();
        }
        std::os::unix::fs::symlink("f1", t.path().join("link")).unwrap();
        nix::unistd::mkfifo(&t.path().join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let tree = Tree::compute(t.path(), &Cache::default(), 2).unwrap();
        let root = tree.dir("").unwrap();
        let entry = |name: &str| root.iter().find(|e| e.name == name).unwrap();
        for size in sizes {
            let e = entry(&format!("f{size}"));
            assert_eq!((e.meta.kind, e.meta.size, &e.hash), (FileType::File, size as u64, &blake3::hash(&content(size)).to_hex().to_string()), "{size} bytes");
        }
        let link = entry("link");
        assert_eq!((link.meta.kind, link.meta.target.as_deref()), (FileType::Symlink, Some("f1")), "a symlink is never followed");
        assert_eq!(entry("fifo").meta.kind, FileType::Special, "a fifo is listed, not opened");
        assert!(hash_mapped(&t.path().join("link")).is_err(), "a symlink is never followed");
    }

    #[test]
    fn names_and_paths_from_peers() {
        assert_eq!(wire_name(b"plain.txt"), "plain.txt");
        assert_eq!(wire_name(b"50%"), "50%25");
        assert_eq!(wire_name(b"a\xffb"), "a%FFb");
        assert_eq!(check_path(&["docs".into(), "deep".into()]).unwrap(), "docs/deep");
        assert_eq!(check_path(&[]).unwrap(), "");
        for bad in ["..", ".", "", "a/b", "/etc"] {
            assert!(check_path(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn pages_cover_a_directory_once() {
        let t = tempfile::tempdir().unwrap();
        for i in 0..300 {
            std::fs::write(t.path().join(format!("file-{i:04}")), "").unwrap();
        }
        let tree = Tree::compute(t.path(), &Cache::default(), 2).unwrap();
        let (mut all, mut after) = (Vec::new(), None::<String>);
        loop {
            let (page, more) = tree.page("", after.as_deref(), 4096).unwrap();
            assert!(serde_json::to_vec(&page).unwrap().len() < 4096 + 512);
            after = page.last().map(|e| e.name.clone());
            all.extend(page);
            if !more {
                break;
            }
        }
        assert_eq!(all, tree.dir("").unwrap());
        assert!(tree.page("nope", None, 4096).is_none());
    }
}
