//! Directories held open by file descriptor, never reached through a symlink.
//!
//! A replica's directories hold things a hostile origin shaped: `btrfs receive` creates
//! whatever names, symlinks and subvolumes its stream says. And a path is only as safe as
//! every directory on it: whoever can write to one of them can swap a component for a
//! symlink between our check and our use. So the replica side never acts on a path string:
//!
//! - [`open_trusted`] walks the replica path from `/` one component at a time, opening each
//!   relative to its parent with `O_NOFOLLOW` and checking who owns it and who may write to
//!   it ([`trust_problem`]); missing components are created the same way (`mkdirat`).
//! - A [`SafeDir`] is such an open directory. Everything below it (opening a child, listing,
//!   renaming, the `latest` symlink, removing leftovers, deleting subvolumes) is relative to
//!   its fd with no-follow semantics: a symlink found where a directory was expected is
//!   refused or removed as a symlink, never followed.
//!
//! libbtrfsutil only takes paths. It is given `/proc/self/fd/N` (N an fd we opened and
//! checked): the kernel resolves that magic link to the very directory behind the fd, not
//! by walking names again, so nobody can redirect it. See [`SafeDir::proc_path`].

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, Stat};
use rustix::io::Errno;

/// `st_ino` of a subvolume's root directory on btrfs (`BTRFS_FIRST_FREE_OBJECTID`): no
/// other directory has it.
const SUBVOLUME_ROOT_INO: u64 = 256;
/// `statfs.f_type` of btrfs.
const BTRFS_SUPER_MAGIC: u32 = 0x9123_683E;

/// Where a directory sits on the replica path, which decides how strict [`trust_problem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A directory above the replica directory (`/`, `/srv`, ...).
    Ancestor,
    /// The replica directory itself and its staging directory: snapship's own.
    Own,
}

/// What is wrong, if anything, with a directory owned by `uid` with permission bits `mode`
/// in `role`, for a daemon running as `euid`. `None`: nobody but root and us can change it.
///
/// A directory that others may write to lets them rename what is in it and put a symlink in
/// its place. The one exception is a sticky ancestor such as `/tmp`: there only an entry's
/// owner may rename or remove it, and the next component is checked to be ours.
pub(crate) fn trust_problem(uid: u32, mode: u32, euid: u32, role: Role) -> Option<String> {
    if uid != 0 && uid != euid {
        return Some(format!("is owned by uid {uid}, not by root or the user snapship runs as (uid {euid})"));
    }
    let writable_by_others = mode & 0o022 != 0;
    let sticky = mode & 0o1000 != 0;
    if writable_by_others && !(role == Role::Ancestor && sticky) {
        return Some(format!("is writable by its group or by others (mode {:04o})", mode & 0o7777));
    }
    None
}

/// The components of `path` below `/`, which must be a plain absolute path (no `..`): the
/// walk of [`open_trusted`] descends them one by one.
pub(crate) fn plain_components(path: &Path) -> Result<Vec<&OsStr>> {
    if !path.is_absolute() {
        bail!("replica path {} must be absolute", path.display());
    }
    let mut out = Vec::new();
    for component in path.components() {
        match component {
            Component::RootDir => {}
            Component::Normal(name) => out.push(name),
            Component::CurDir | Component::ParentDir | Component::Prefix(_) => {
                bail!("replica path {} must be a plain absolute path (no `.` or `..`)", path.display())
            }
        }
    }
    Ok(out)
}

/// A single name inside a directory: not empty, no `/`, not `.` or `..`. Every name handed to
/// the `*at` calls (and appended to a `/proc/self/fd/N` path) is checked to be one.
fn single_name(name: &OsStr) -> Result<&OsStr> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.contains(&b'/') || bytes.contains(&0) || name == "." || name == ".." {
        bail!("{name:?} is not a plain file name");
    }
    Ok(name)
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The error for a directory that fails [`trust_problem`]: names it, says why it matters and
/// what to run.
fn untrusted(path: &Path, problem: &str) -> anyhow::Error {
    let owner = if euid() == 0 { "root:".to_string() } else { euid().to_string() };
    anyhow!(
        "refusing {p} (on the replica path): it {problem}. Whoever can write there could swap in a symlink and redirect what \
         snapship receives or deletes. Fix it with `chown {owner} {p} && chmod go-w {p}`",
        p = path.display()
    )
}

/// Opens the directory at `path`, checking `/` and every directory down to it with
/// [`trust_problem`] (the last one as [`Role::Own`]) and refusing any symlink on the way.
/// Missing directories are created (mode 0755) when `create`, else the answer is `None`.
pub(crate) fn open_trusted(path: &Path, create: bool) -> Result<Option<SafeDir>> {
    let names = plain_components(path)?;
    if names.is_empty() {
        bail!("the replica path cannot be / itself");
    }
    let root = rustix::fs::openat(rustix::fs::CWD, "/", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).context("cannot open /")?;
    let mut dir = SafeDir { fd: root, path: PathBuf::from("/") };
    dir.check(Role::Ancestor)?;
    for (i, name) in names.iter().enumerate() {
        let last = i + 1 == names.len();
        let open = |dir: &SafeDir| if last { dir.open_dir(name) } else { dir.open_path(name) };
        let child = match open(&dir)? {
            Some(child) => child,
            None if create => {
                dir.mkdir(name, 0o755)?;
                open(&dir)?.ok_or_else(|| anyhow!("{} vanished right after it was created", dir.shown(name).display()))?
            }
            None => return Ok(None),
        };
        child.check(if last { Role::Own } else { Role::Ancestor })?;
        dir = child;
    }
    Ok(Some(dir))
}

/// An open directory, reached without following any symlink, and the path it was reached
/// by (for messages, and for `btrfs receive`, which only takes a path: see `receive_into`).
#[derive(Debug)]
pub(crate) struct SafeDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl SafeDir {
    /// The path this directory was reached by, for messages and for `btrfs receive`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of a child, for messages.
    pub fn shown(&self, name: impl AsRef<OsStr>) -> PathBuf {
        self.path.join(name.as_ref())
    }

    /// A path that names exactly this open directory: `/proc/self/fd/N`. Opening it makes the
    /// kernel follow the fd's own reference to the directory (a "magic link"), not a walk of
    /// names, so a symlink planted anywhere since cannot redirect it. For path-only APIs
    /// (libbtrfsutil); valid as long as `self` lives.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// [`Self::proc_path`] of a child: the parent is pinned by the fd and the last component
    /// is a single name, which the kernel looks up in that directory.
    pub fn proc_path_of(&self, name: &OsStr) -> Result<PathBuf> {
        Ok(self.proc_path().join(single_name(name)?))
    }

    pub fn stat(&self) -> Result<Stat> {
        rustix::fs::fstat(&self.fd).with_context(|| format!("cannot stat {}", self.path.display()))
    }

    /// Checks owner and mode of this directory with [`trust_problem`].
    pub fn check(&self, role: Role) -> Result<()> {
        let st = self.stat()?;
        match trust_problem(st.st_uid, st.st_mode, euid(), role) {
            Some(problem) => Err(untrusted(&self.path, &problem)),
            None => Ok(()),
        }
    }

    /// What `name` is, without following a symlink; `None` when it does not exist.
    pub fn stat_of(&self, name: &OsStr) -> Result<Option<Stat>> {
        match rustix::fs::statat(&self.fd, single_name(name)?, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot stat {}", self.shown(name).display())),
        }
    }

    /// Creates directory `name` with `mode` (exactly: the umask is undone) unless something
    /// is there already. Returns whether it made it.
    pub fn mkdir(&self, name: &OsStr, mode: u32) -> Result<bool> {
        match rustix::fs::mkdirat(&self.fd, single_name(name)?, Mode::from_raw_mode(mode)) {
            Ok(()) => {}
            Err(Errno::EXIST) => return Ok(false),
            Err(e) => return Err(e).with_context(|| format!("cannot create directory {}", self.shown(name).display())),
        }
        // The umask may have taken bits away; never adds any. Set them through an fd of the
        // directory just made (a symlink swapped in since is refused by the open).
        if let Some(dir) = self.open_dir(name)? {
            rustix::fs::fchmod(&dir.fd, Mode::from_raw_mode(mode)).with_context(|| format!("cannot chmod {}", dir.path.display()))?;
        }
        Ok(true)
    }

    /// Opens child directory `name` for reading, refusing a symlink or anything that is not a
    /// directory; `None` when it does not exist.
    pub fn open_dir(&self, name: &OsStr) -> Result<Option<SafeDir>> {
        self.open_child(name, OFlags::RDONLY)
    }

    /// Like [`Self::open_dir`], but only as a handle for further `*at` calls (`O_PATH`): no read
    /// permission needed, as for ancestors a non-root daemon may only traverse.
    fn open_path(&self, name: &OsStr) -> Result<Option<SafeDir>> {
        self.open_child(name, OFlags::PATH)
    }

    fn open_child(&self, name: &OsStr, access: OFlags) -> Result<Option<SafeDir>> {
        let shown = self.shown(name);
        let Some(st) = self.stat_of(name)? else { return Ok(None) };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {}
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(&self.fd, name, Vec::new()).map(|t| t.to_string_lossy().into_owned()).unwrap_or_default();
                bail!(
                    "{} is a symbolic link (to {target:?}); snapship never follows symlinks here. Remove it, or if it is the \
                     replica path, write the real directory in the policy",
                    shown.display()
                );
            }
            other => bail!("{} is not a directory but a {other:?}; move it away", shown.display()),
        }
        // O_NOFOLLOW: should a symlink replace the directory since the stat, this fails.
        let fd = rustix::fs::openat(&self.fd, name, access | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
            .with_context(|| format!("cannot open {}", shown.display()))?;
        Ok(Some(SafeDir { fd, path: shown }))
    }

    /// Makes a new directory `name` with mode 0700 and opens it; `None` when the name is
    /// taken (a directory that existed before is never used).
    pub fn fresh_dir(&self, name: &OsStr) -> Result<Option<SafeDir>> {
        if !self.mkdir(name, 0o700)? {
            return Ok(None);
        }
        let dir = self.open_dir(name)?.ok_or_else(|| anyhow!("{} vanished right after it was created", self.shown(name).display()))?;
        dir.check(Role::Own)?;
        Ok(Some(dir))
    }

    /// Opens (creating with mode 0600) regular file `name` for writing; a symlink is refused.
    pub fn open_file(&self, name: &OsStr) -> Result<File> {
        let fd =
            rustix::fs::openat(&self.fd, single_name(name)?, OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::from_raw_mode(0o600))
                .with_context(|| format!("cannot open {} (a symlink there is refused: remove it)", self.shown(name).display()))?;
        Ok(File::from(fd))
    }

    /// The first bytes (at most 64) of regular file `name`, as text; `None` when it does not
    /// exist, is not a regular file (a symlink is not followed) or is not text.
    pub fn read_small(&self, name: &OsStr) -> Result<Option<String>> {
        let fd = match rustix::fs::openat(&self.fd, single_name(name)?, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::LOOP) => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", self.shown(name).display())),
        };
        if FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) != FileType::RegularFile {
            return Ok(None);
        }
        let mut buf = [0u8; 64];
        let n = rustix::io::read(&fd, &mut buf).with_context(|| format!("cannot read {}", self.shown(name).display()))?;
        Ok(std::str::from_utf8(&buf[..n]).ok().map(str::to_string))
    }

    /// The names in this directory (without `.` and `..`), in directory order.
    pub fn entries(&self) -> Result<Vec<OsString>> {
        let what = || format!("cannot list {}", self.path.display());
        let mut out = Vec::new();
        for entry in rustix::fs::Dir::read_from(&self.fd).with_context(what)? {
            let entry = entry.with_context(what)?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name != "." && name != ".." {
                out.push(name.to_os_string());
            }
        }
        Ok(out)
    }

    /// Renames `name` to `to_name` in `to`, failing if `to_name` exists (a rename onto an
    /// existing empty directory would otherwise replace it). Neither name is followed.
    pub fn rename_new(&self, name: &OsStr, to: &SafeDir, to_name: &OsStr) -> Result<()> {
        rustix::fs::renameat_with(&self.fd, single_name(name)?, &to.fd, single_name(to_name)?, RenameFlags::NOREPLACE)
            .with_context(|| format!("cannot move {} to {}", self.shown(name).display(), to.shown(to_name).display()))
    }

    /// Renames `name` over `to_name` in this directory (atomically replacing it: the `latest`
    /// swap). A symlink at `to_name` is replaced, not followed.
    pub fn rename_over(&self, name: &OsStr, to_name: &OsStr) -> Result<()> {
        rustix::fs::renameat(&self.fd, single_name(name)?, &self.fd, single_name(to_name)?)
            .with_context(|| format!("cannot replace {} with {}", self.shown(to_name).display(), self.shown(name).display()))
    }

    /// Creates symlink `name` pointing to `target`; `Ok(false)` when `name` is taken.
    pub fn symlink(&self, target: &OsStr, name: &OsStr) -> Result<bool> {
        match rustix::fs::symlinkat(target, &self.fd, single_name(name)?) {
            Ok(()) => Ok(true),
            Err(Errno::EXIST) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot create symlink {}", self.shown(name).display())),
        }
    }

    /// Removes `name` if it is not a directory (a file, a symlink: the link itself).
    pub fn unlink(&self, name: &OsStr) -> Result<()> {
        rustix::fs::unlinkat(&self.fd, single_name(name)?, AtFlags::empty()).with_context(|| format!("cannot remove {}", self.shown(name).display()))
    }

    /// Whether this directory is the root of a btrfs subvolume: on btrfs, with the inode
    /// number only a subvolume root has (what libbtrfsutil's `is_subvolume` checks too, here
    /// on the fd).
    pub fn is_subvolume_root(&self) -> Result<bool> {
        let fs = rustix::fs::fstatfs(&self.fd).with_context(|| format!("cannot statfs {}", self.path.display()))?;
        Ok(fs.f_type as u32 == BTRFS_SUPER_MAGIC && self.stat()?.st_ino == SUBVOLUME_ROOT_INO)
    }

    /// Whether subvolumes sit anywhere inside this subvolume (the kernel's list of the root
    /// references it holds, `BTRFS_IOC_GET_SUBVOL_ROOTREF`; needs no privilege).
    pub fn has_nested_subvolumes(&self) -> Result<bool> {
        let mut args = RootrefArgs { min_treeid: 0, rootref: [[0; 2]; 255], num_items: 0, align: [0; 7] };
        // SAFETY: the opcode is the kernel's _IOWR(0x94, 61, struct btrfs_ioctl_get_subvol_rootref_args)
        // and `RootrefArgs` has that struct's layout (checked in size below).
        let result = unsafe { rustix::ioctl::ioctl(&self.fd, rustix::ioctl::Updater::<GET_SUBVOL_ROOTREF, RootrefArgs>::new(&mut args)) };
        match result {
            Ok(()) => Ok(args.num_items > 0),
            // More than one buffer of them.
            Err(Errno::OVERFLOW) => Ok(true),
            Err(e) => Err(e).with_context(|| format!("cannot list the subvolumes inside {}", self.path.display())),
        }
    }

    /// What the kernel holds for the subvolume whose root this directory is: one
    /// `BTRFS_IOC_GET_SUBVOL_INFO` on the fd (needs no privilege). It reads the subvolume's
    /// root item in memory, so `ctransid` is already the value the next commit writes (a
    /// tree search, libbtrfsutil's way as root, sees it only after that commit).
    pub fn subvolume_info(&self) -> Result<SubvolumeInfo> {
        // SAFETY: the opcode is the kernel's _IOR(0x94, 60, struct btrfs_ioctl_get_subvol_info_args)
        // and `SubvolInfoArgs` has that struct's layout (checked in size below).
        let args = unsafe { rustix::ioctl::ioctl(&self.fd, rustix::ioctl::Getter::<GET_SUBVOL_INFO, SubvolInfoArgs>::new()) }.map_err(|e| {
            let hint = if e == Errno::NOTTY { " (it needs Linux 4.18 or later)" } else { "" };
            anyhow!("cannot read subvolume {}: {e}{hint}", self.path.display())
        })?;
        let uuid = |bytes: [u8; 16]| Some(uuid::Uuid::from_bytes(bytes)).filter(|u| !u.is_nil());
        Ok(SubvolumeInfo {
            uuid: uuid::Uuid::from_bytes(args.uuid),
            parent_uuid: uuid(args.parent_uuid),
            received_uuid: uuid(args.received_uuid),
            ctransid: args.ctransid,
            read_only: args.flags & ROOT_SUBVOL_RDONLY != 0,
        })
    }

    /// Removes `name` and everything below it without following any symlink: files and
    /// symlinks are unlinked, directories emptied and removed, subvolumes deleted (nested
    /// ones first). Nothing there is fine.
    pub fn remove_all(&self, name: &OsStr) -> Result<()> {
        let Some(st) = self.stat_of(name)? else { return Ok(()) };
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return self.unlink(name);
        }
        let Some(top) = self.open_dir(name)? else { return Ok(()) };
        if top.is_subvolume_root()? {
            return self.delete_subvolume(name, &top);
        }
        let shown = top.path.clone();
        top.sweep(Sweep::Everything)?;
        rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR).with_context(|| format!("cannot remove {}", shown.display()))
    }

    /// Walks the tree below this directory, depth first, doing `what`.
    ///
    /// A hostile stream can make a tree deeper than the fds a process may hold (or than a
    /// stack of recursive calls), so the walk holds one directory open at a time: it goes down
    /// by `openat(name, O_NOFOLLOW)`, and back up by `..` (never a symlink; and nobody but
    /// root and us can move these directories around), keeping only names in memory.
    fn sweep(self, what: Sweep) -> Result<()> {
        // Per level: the directory's name in its parent, and its subdirectories still to visit.
        let mut levels: Vec<(OsString, Vec<OsString>)> = vec![(OsString::new(), self.visit(what)?)];
        let mut current = self;
        loop {
            let (_, pending) = levels.last_mut().expect("the top level stays until the end");
            if let Some(next) = pending.pop() {
                if let Some(child) = current.open_dir(&next)? {
                    levels.push((next, child.visit(what)?));
                    current = child;
                }
                continue;
            }
            let (done, _) = levels.pop().expect("not empty");
            if levels.is_empty() {
                return Ok(());
            }
            let parent = current.open_parent()?;
            if what == Sweep::Everything {
                rustix::fs::unlinkat(&parent.fd, &done, AtFlags::REMOVEDIR).with_context(|| format!("cannot remove {}", current.path.display()))?;
            }
            current = parent;
        }
    }

    /// One directory's share of [`Self::sweep`]: deletes the subvolumes in it, and with
    /// [`Sweep::Everything`] unlinks all that is not a directory; returns the plain
    /// subdirectories, to visit next.
    fn visit(&self, what: Sweep) -> Result<Vec<OsString>> {
        let mut subdirs = Vec::new();
        for entry in self.entries()? {
            let Some(st) = self.stat_of(&entry)? else { continue };
            if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                if what == Sweep::Everything {
                    self.unlink(&entry)?;
                }
                continue;
            }
            let Some(child) = self.open_dir(&entry)? else { continue };
            if child.is_subvolume_root()? {
                self.delete_subvolume(&entry, &child)?;
            } else {
                subdirs.push(entry);
            }
        }
        Ok(subdirs)
    }

    /// The parent directory, through `..`.
    fn open_parent(&self) -> Result<SafeDir> {
        let fd = rustix::fs::openat(&self.fd, "..", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
            .with_context(|| format!("cannot open the parent of {}", self.path.display()))?;
        let path = self.path.parent().map(Path::to_path_buf).unwrap_or_else(|| self.path.clone());
        Ok(SafeDir { fd, path })
    }

    /// Deletes subvolume `name` (already opened as `child` and found to be a subvolume root).
    ///
    /// libbtrfsutil is given `/proc/self/fd/N/name`: it opens the parent part (our pinned
    /// directory) and passes the last part to the kernel's subvolume-destroy ioctl, which looks
    /// the name up in that directory and refuses anything that is not a subvolume: no symlink
    /// is followed. (Its recursive mode is not used: that opens the name with plain `openat`,
    /// which would follow a symlink.) A subvolume holding others cannot be deleted; those are
    /// found here, by fd, and deleted first, which needs the holder writable.
    pub fn delete_subvolume(&self, name: &OsStr, child: &SafeDir) -> Result<()> {
        let path = self.proc_path_of(name)?;
        let shown = self.shown(name);
        match libbtrfsutil::delete_subvolume(&path) {
            Ok(()) => return Ok(()),
            Err(e) if e.errno() == Errno::NOTEMPTY.raw_os_error() => {}
            Err(e) => return Err(anyhow!("cannot delete subvolume {}: {e} ({})", shown.display(), e.os_error())),
        }
        tracing::warn!(path = %shown.display(), "deleting the subvolumes nested in it first");
        libbtrfsutil::set_subvolume_read_only(child.proc_path(), false)
            .map_err(|e| anyhow!("cannot make {} writable to empty it: {e} ({})", shown.display(), e.os_error()))?;
        child.reopen()?.sweep(Sweep::SubvolumesOnly)?;
        libbtrfsutil::delete_subvolume(&path).map_err(|e| anyhow!("cannot delete subvolume {}: {e} ({})", shown.display(), e.os_error()))
    }

    /// A second fd on this directory.
    fn reopen(&self) -> Result<SafeDir> {
        let fd = rustix::fs::openat(&self.fd, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        Ok(SafeDir { fd, path: self.path.clone() })
    }
}

/// What [`SafeDir::sweep`] does in the tree it walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sweep {
    /// Removes all of it.
    Everything,
    /// Deletes the subvolumes in it, leaves the rest.
    SubvolumesOnly,
}

/// `struct btrfs_ioctl_get_subvol_rootref_args` of linux/btrfs.h.
#[repr(C)]
struct RootrefArgs {
    /// In: the smallest subvolume id to report; out: where to continue.
    min_treeid: u64,
    /// Out: (subvolume id, directory inode it sits in).
    rootref: [[u64; 2]; 255],
    num_items: u8,
    align: [u8; 7],
}
const _: () = assert!(std::mem::size_of::<RootrefArgs>() == 4096);
const GET_SUBVOL_ROOTREF: rustix::ioctl::Opcode = rustix::ioctl::opcode::read_write::<RootrefArgs>(0x94, 61);

/// A subvolume as [`SafeDir::subvolume_info`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubvolumeInfo {
    pub uuid: uuid::Uuid,
    pub parent_uuid: Option<uuid::Uuid>,
    /// The origin snapshot's uuid, for a received one (`None` when nil).
    pub received_uuid: Option<uuid::Uuid>,
    /// The transaction that last changed the subvolume's content.
    pub ctransid: u64,
    pub read_only: bool,
}

/// `struct btrfs_ioctl_timespec` of linux/btrfs.h.
#[repr(C)]
struct IoctlTimespec {
    sec: u64,
    nsec: u32,
}

/// `struct btrfs_ioctl_get_subvol_info_args` of linux/btrfs.h.
#[repr(C)]
struct SubvolInfoArgs {
    treeid: u64,
    name: [u8; 256],
    parent_id: u64,
    dirid: u64,
    generation: u64,
    flags: u64,
    uuid: [u8; 16],
    parent_uuid: [u8; 16],
    received_uuid: [u8; 16],
    ctransid: u64,
    otransid: u64,
    stransid: u64,
    rtransid: u64,
    times: [IoctlTimespec; 4],
    reserved: [u64; 8],
}
const _: () = assert!(std::mem::size_of::<SubvolInfoArgs>() == 504);
const GET_SUBVOL_INFO: rustix::ioctl::Opcode = rustix::ioctl::opcode::read::<SubvolInfoArgs>(0x94, 60);
/// `BTRFS_ROOT_SUBVOL_RDONLY`, in a root item's flags.
const ROOT_SUBVOL_RDONLY: u64 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_must_be_root_or_us() {
        assert_eq!(trust_problem(0, 0o40755, 1000, Role::Own), None);
        assert_eq!(trust_problem(1000, 0o40700, 1000, Role::Own), None);
        let problem = trust_problem(1001, 0o40755, 1000, Role::Own).unwrap();
        assert!(problem.contains("owned by uid 1001"), "{problem}");
        assert!(trust_problem(1001, 0o40755, 0, Role::Ancestor).is_some());
    }

    #[test]
    fn writable_by_others_is_refused_except_a_sticky_ancestor() {
        for mode in [0o40775, 0o40757, 0o40777] {
            assert!(trust_problem(0, mode, 0, Role::Own).is_some(), "{mode:o}");
            assert!(trust_problem(0, mode, 0, Role::Ancestor).is_some(), "{mode:o}");
        }
        // /tmp: others may create, but not rename or remove what is not theirs.
        assert_eq!(trust_problem(0, 0o41777, 0, Role::Ancestor), None);
        // Never the replica or staging directory itself.
        let problem = trust_problem(0, 0o41777, 0, Role::Own).unwrap();
        assert!(problem.contains("writable by its group or by others (mode 1777)"), "{problem}");
    }

    #[test]
    fn replica_paths_are_plain_and_absolute() {
        assert_eq!(plain_components(Path::new("/srv/backup/x")).unwrap(), ["srv", "backup", "x"]);
        assert_eq!(plain_components(Path::new("/srv//backup/")).unwrap(), ["srv", "backup"]);
        assert!(plain_components(Path::new("srv/backup")).is_err());
        assert!(plain_components(Path::new("/srv/../etc")).is_err());
    }

    #[test]
    fn names_for_at_calls_are_single_components() {
        for bad in ["", ".", "..", "a/b", "/etc"] {
            assert!(single_name(OsStr::new(bad)).is_err(), "{bad:?}");
        }
        assert!(single_name(OsStr::new(".snapship-staging")).is_ok());
    }

    /// A scratch directory below the system temp dir, opened the way the replica is.
    fn scratch(test: &str) -> (tempfile::TempDir, SafeDir) {
        let tmp = tempfile::Builder::new().prefix(test).tempdir().unwrap();
        let dir = open_trusted(tmp.path(), false).unwrap().unwrap();
        (tmp, dir)
    }

    #[test]
    fn missing_directories_are_created_one_by_one() {
        let (tmp, _) = scratch("safe-dir-create");
        let path = tmp.path().join("a/b/c");
        assert!(open_trusted(&path, false).unwrap().is_none());
        let dir = open_trusted(&path, true).unwrap().unwrap();
        assert_eq!(dir.path(), path);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o755);
    }

    #[test]
    fn a_symlink_anywhere_on_the_path_is_refused_and_not_followed() {
        let (tmp, _) = scratch("safe-dir-symlink");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, tmp.path().join("link")).unwrap();
        for path in [tmp.path().join("link"), tmp.path().join("link/replica")] {
            let err = open_trusted(&path, true).unwrap_err().to_string();
            assert!(err.contains("is a symbolic link") && err.contains("link"), "{err}");
        }
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "something was created through the link");
    }

    #[test]
    fn a_world_writable_replica_directory_is_refused_with_the_fix() {
        let (tmp, _) = scratch("safe-dir-mode");
        let path = tmp.path().join("replica");
        std::fs::create_dir(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = open_trusted(&path, false).unwrap_err().to_string();
        assert!(err.contains(&format!("refusing {} (on the replica path)", path.display())), "{err}");
        assert!(err.contains("chmod go-w"), "{err}");
    }

    #[test]
    fn read_small_reads_only_a_regular_file_and_never_follows_a_symlink() {
        let (tmp, dir) = scratch("safe-dir-read");
        std::fs::write(tmp.path().join("seal"), "1234\n").unwrap();
        std::fs::write(tmp.path().join("outside"), "999").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("outside"), tmp.path().join("link")).unwrap();
        std::fs::create_dir(tmp.path().join("dir")).unwrap();
        nix::unistd::mkfifo(&tmp.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(dir.read_small(OsStr::new("seal")).unwrap().as_deref(), Some("1234\n"));
        for name in ["link", "dir", "fifo", "missing"] {
            assert_eq!(dir.read_small(OsStr::new(name)).unwrap(), None, "{name}");
        }
        assert!(dir.read_small(OsStr::new("../seal")).is_err(), "a path is not a name");
    }

    #[test]
    fn remove_all_removes_symlinks_not_what_they_point_to() {
        let (tmp, dir) = scratch("safe-dir-remove");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("marker"), "keep").unwrap();
        let junk = tmp.path().join("junk");
        std::fs::create_dir_all(junk.join("deep")).unwrap();
        std::os::unix::fs::symlink(&outside, junk.join("to-dir")).unwrap();
        std::os::unix::fs::symlink(outside.join("marker"), junk.join("deep/to-file")).unwrap();
        std::fs::write(junk.join("file"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, tmp.path().join("top-link")).unwrap();
        dir.remove_all(OsStr::new("junk")).unwrap();
        dir.remove_all(OsStr::new("top-link")).unwrap();
        dir.remove_all(OsStr::new("never-was")).unwrap();
        assert!(!junk.exists() && std::fs::symlink_metadata(tmp.path().join("top-link")).is_err());
        assert_eq!(std::fs::read_to_string(outside.join("marker")).unwrap(), "keep");
    }

    #[test]
    fn remove_all_handles_trees_deeper_than_a_path_can_name() {
        let (tmp, dir) = scratch("safe-dir-deep");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("marker"), "keep").unwrap();
        dir.mkdir(OsStr::new("deep"), 0o755).unwrap();
        let mut current = dir.open_dir(OsStr::new("deep")).unwrap().unwrap();
        for i in 0..3000 {
            current.mkdir(OsStr::new("d"), 0o755).unwrap();
            if i % 500 == 0 {
                current.mkdir(OsStr::new("side"), 0o755).unwrap();
                let side = current.open_dir(OsStr::new("side")).unwrap().unwrap();
                assert!(side.symlink(outside.as_os_str(), OsStr::new("out")).unwrap());
            }
            current = current.open_dir(OsStr::new("d")).unwrap().unwrap();
        }
        drop(current);
        dir.remove_all(OsStr::new("deep")).unwrap();
        assert_eq!(dir.entries().unwrap(), [OsString::from("outside")]);
        assert_eq!(std::fs::read_to_string(outside.join("marker")).unwrap(), "keep");
    }

    #[test]
    fn fresh_dirs_are_0700_and_never_reused() {
        let (tmp, dir) = scratch("safe-dir-fresh");
        let made = dir.fresh_dir(OsStr::new("rx")).unwrap().unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(made.path()).unwrap().permissions().mode() & 0o7777, 0o700);
        assert!(dir.fresh_dir(OsStr::new("rx")).unwrap().is_none());
        std::os::unix::fs::symlink(tmp.path(), tmp.path().join("planted")).unwrap();
        assert!(dir.fresh_dir(OsStr::new("planted")).unwrap().is_none());
    }

    #[test]
    fn renames_never_replace_and_the_lock_file_refuses_a_symlink() {
        let (tmp, dir) = scratch("safe-dir-rename");
        std::fs::create_dir(tmp.path().join("a")).unwrap();
        std::fs::create_dir(tmp.path().join("b")).unwrap();
        assert!(dir.rename_new(OsStr::new("a"), &dir, OsStr::new("b")).is_err());
        dir.rename_new(OsStr::new("a"), &dir, OsStr::new("c")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", tmp.path().join(".lock")).unwrap();
        assert!(dir.open_file(OsStr::new(".lock")).is_err());
        // `latest`-style swap: a symlink over a symlink replaces the link itself.
        assert!(dir.symlink(OsStr::new("c"), OsStr::new("tmp-link")).unwrap());
        assert!(!dir.symlink(OsStr::new("c"), OsStr::new("tmp-link")).unwrap());
        dir.rename_over(OsStr::new("tmp-link"), OsStr::new(".lock")).unwrap();
        assert_eq!(std::fs::read_link(tmp.path().join(".lock")).unwrap(), Path::new("c"));
        assert_eq!(dir.entries().unwrap().len(), 3);
    }

    /// A loop-mounted btrfs in a temporary directory, for the tests that need subvolumes;
    /// `None` (the test skips) without root or btrfs-progs. Unmounted on drop.
    struct LoopFs {
        tmp: tempfile::TempDir,
    }

    impl LoopFs {
        fn new(test: &str) -> Option<LoopFs> {
            let have_tools = std::process::Command::new("mkfs.btrfs").arg("--version").output().is_ok_and(|o| o.status.success());
            if !nix::unistd::geteuid().is_root() || !have_tools {
                eprintln!("SKIPPED {test}: needs root and btrfs-progs");
                return None;
            }
            // Under the test scratch directory when there is one: `scripts/with-scratch.sh`
            // sweeps mounts a killed test left there.
            let base = std::env::var_os("SNAPSHIP_TEST_TMP").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
            let tmp = tempfile::Builder::new().prefix(test).tempdir_in(base).unwrap();
            let (image, mnt) = (tmp.path().join("fs.img"), tmp.path().join("mnt"));
            std::fs::create_dir(&mnt).unwrap();
            let run = |cmd: &mut std::process::Command| assert!(cmd.output().unwrap().status.success(), "{cmd:?} failed");
            run(std::process::Command::new("truncate").arg("-s").arg("128M").arg(&image));
            run(std::process::Command::new("mkfs.btrfs").arg("-q").arg(&image));
            run(std::process::Command::new("mount").arg("-o").arg("loop").arg(&image).arg(&mnt));
            Some(LoopFs { tmp })
        }

        fn mnt(&self) -> PathBuf {
            self.tmp.path().join("mnt")
        }
    }

    impl Drop for LoopFs {
        fn drop(&mut self) {
            for _ in 0..50 {
                if std::process::Command::new("umount").arg(self.mnt()).status().is_ok_and(|s| s.success()) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let _ = std::process::Command::new("umount").arg("-l").arg(self.mnt()).status();
        }
    }

    #[test]
    fn subvolumes_are_recognised_and_removed_with_the_ones_nested_in_them() {
        let Some(fs) = LoopFs::new("safe-dir-subvolumes") else { return };
        let mnt = fs.mnt();
        let create = |path: &Path| libbtrfsutil::create_subvolume(path).unwrap();
        let outer = mnt.join("outer");
        create(&outer);
        std::fs::create_dir(outer.join("dir")).unwrap();
        create(&outer.join("dir/inner"));
        std::fs::write(mnt.join("marker"), "keep").unwrap();
        std::os::unix::fs::symlink(mnt.join("marker"), outer.join("dir/inner/link")).unwrap();
        libbtrfsutil::set_subvolume_read_only(&outer, true).unwrap();
        create(&mnt.join("plain"));

        let dir = open_trusted(&mnt, false).unwrap().unwrap();
        let outer_dir = dir.open_dir(OsStr::new("outer")).unwrap().unwrap();
        assert!(outer_dir.is_subvolume_root().unwrap());
        assert!(outer_dir.has_nested_subvolumes().unwrap());
        assert!(!outer_dir.open_dir(OsStr::new("dir")).unwrap().unwrap().is_subvolume_root().unwrap());
        let plain = dir.open_dir(OsStr::new("plain")).unwrap().unwrap();
        assert!(plain.is_subvolume_root().unwrap() && !plain.has_nested_subvolumes().unwrap());

        // Read-only and holding another subvolume: still removed, by fd, without following
        // the symlink inside.
        dir.remove_all(OsStr::new("outer")).unwrap();
        assert!(std::fs::symlink_metadata(&outer).is_err());
        assert_eq!(std::fs::read_to_string(mnt.join("marker")).unwrap(), "keep");
        dir.remove_all(OsStr::new("plain")).unwrap();
        assert_eq!(dir.entries().unwrap(), [OsString::from("marker")]);
    }
}
