//! The replica's spool: a queue between the network and `btrfs receive`/`zfs receive`.
//!
//! ```text
//! network -> SpoolWriter::push -> [ memory level | disk level ] -> SpoolReader -> receive
//! ```
//! Bytes arriving from the origin go into memory up to one limit, then, while the receive is
//! not reading (it asked for nothing for [`Limits::spill_after`]: a commit, a long clone),
//! into a file under `state_dir/spool` up to another limit; otherwise the writer waits
//! (back-pressure through QUIC or TCP flow control to the origin). A receive that reads all
//! along but more slowly than the network sends thus gets back-pressure, not the disk: going
//! through the file would gain no time (the receive is the slow side either way) and cost
//! each byte a write, a read back and writeback I/O on the CPU and disk the receive itself
//! needs (measured: most of a full send went through the file, and the kernel's writeback
//! workers used 0.7 CPU s more per 805 MB than the local pipe's). Whatever is in the spool
//! is acknowledged to the origin: it survives a cut connection, because the session that
//! owns the spool outlives it.
//!
//! Order is kept with one rule: data goes to memory only while the disk level is empty, so
//! everything in memory is older than everything on disk. The spool file is unlinked as
//! soon as it is created, so a crash can leave nothing behind; what the reader consumed is
//! punched out of it at once (so the disk level never holds more than its limit, even while
//! the reader never quite catches up), and it is truncated whenever the reader drains it.
//!
//! A disk level whose filesystem is full (ENOSPC) is not an error: the spool keeps what it
//! holds and takes no more on disk than that until the reader drained it, so the receive
//! goes on and the writer waits (nothing acknowledged is lost, nothing is resent).
//!
//! The memory level of every spool on this node draws from one [`MemoryBudget`]
//! (`spool_memory`): however many sessions run at once, together they hold no more than that
//! in RAM; past it, data goes to disk, and past that the writers wait.
//!
//! The reader reports the end of the stream only after [`SpoolWriter::finish`], which the
//! session calls once the origin's end marker and hash checked out. What comes back from the
//! disk level is checked first: the writer keeps a CRC32C of each record it wrote there (runs
//! of chunks up to [`DISK_READ`]), and a record that reads back otherwise fails the spool (a
//! spool file damaged on disk never reaches the receive). The memory level needs no check,
//! so no byte is hashed twice on its way through the replica: the session's BLAKE3 of the
//! stream is the one hash (it was once hashed again here, a third of the replica's CPU). A
//! failed or abandoned spool is a read error, never a clean short stream.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncRead;
use tokio::sync::Notify;
use tokio_util::io::StreamReader;

/// Largest read from the disk level, and the largest record whose CRC32C the writer keeps:
/// chunks written one after the other go into one record up to this size.
const DISK_READ: u64 = 1 << 20;

/// How long a writer waiting for room sleeps at most before it looks again: room freed in
/// the node-wide [`MemoryBudget`] by another spool's reader wakes no one in particular.
const BUDGET_RECHECK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct Limits {
    /// This spool's memory level, at most (it also needs room in `budget`).
    pub memory: usize,
    pub disk: u64,
    /// The memory all spools of the node share.
    pub budget: MemoryBudget,
    /// Data goes to the disk level only once the receive has asked for nothing this long
    /// (or never asked yet).
    pub spill_after: Duration,
}

/// The receive's pause after which the spool takes data on disk ([`Limits::spill_after`]).
pub const SPILL_AFTER: Duration = Duration::from_millis(200);

/// The bytes that all spools of a node together may hold in memory. A spool takes its share
/// as chunks enter its memory level and gives it back as its reader takes them (or when the
/// spool goes). When the whole node holds nothing in memory, one chunk always fits, so a
/// budget smaller than a chunk still lets streams through.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    limit: usize,
    used: Arc<std::sync::atomic::AtomicUsize>,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> MemoryBudget {
        MemoryBudget { limit, used: Arc::default() }
    }

    /// Bytes held in memory by all spools right now.
    pub fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Acquire)
    }

    fn fits(&self, len: usize) -> bool {
        let used = self.used();
        used == 0 || used + len <= self.limit
    }

    /// Takes `len` bytes of the budget if they fit.
    fn take(&self, len: usize) -> bool {
        use std::sync::atomic::Ordering;
        self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| (used == 0 || used + len <= self.limit).then_some(used + len)).is_ok()
    }

    fn give_back(&self, len: usize) {
        self.used.fetch_sub(len, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Makes a spool whose disk level (if any is allowed) lives in `dir`.
pub fn spool(limits: Limits, dir: PathBuf) -> (SpoolWriter, SpoolReader) {
    let shared = Arc::new(Shared {
        limits,
        dir,
        state: Mutex::new(State {
            memory: VecDeque::new(),
            memory_bytes: 0,
            file: None,
            disk_start: 0,
            disk_end: 0,
            records: VecDeque::new(),
            writing: false,
            disk_full_at: None,
            end: End::Open,
            reader_gone: false,
            last_pull: Instant::now(),
            pulled: false,
        }),
        to_reader: Notify::new(),
        to_writer: Notify::new(),
    });
    (SpoolWriter { shared: shared.clone() }, SpoolReader { shared })
}

struct Shared {
    limits: Limits,
    dir: PathBuf,
    state: Mutex<State>,
    /// Single reader and single writer: `notify_one` keeps a wake-up for a side not yet waiting.
    to_reader: Notify,
    to_writer: Notify,
}

struct State {
    memory: VecDeque<Bytes>,
    memory_bytes: usize,
    file: Option<Arc<File>>,
    /// The disk level holds file bytes `disk_start..disk_end`.
    disk_start: u64,
    disk_end: u64,
    /// Those bytes as the records written, in order, each with its CRC32C. Bounded: two
    /// records in a row hold more than [`DISK_READ`] (or the later one is the last), so
    /// there are at most `2 * spool_disk / DISK_READ + 1`.
    records: VecDeque<Record>,
    /// The writer is appending at `disk_end` outside the lock: the reader must not reset.
    writing: bool,
    /// The spool's filesystem was full when the disk level held this much: it holds no more
    /// until the reader drains it.
    disk_full_at: Option<u64>,
    end: End,
    reader_gone: bool,
    /// When the reader last asked for data (the receive's sign of life), and whether it ever
    /// did.
    last_pull: Instant,
    pulled: bool,
}

/// Bytes of the disk level written one after the other, and their CRC32C.
#[derive(Debug, Clone, Copy)]
struct Record {
    len: u64,
    crc: u32,
}

enum End {
    Open,
    /// Complete (the session checked the whole stream's hash).
    Finished,
    Failed(String),
}

/// Whether `e` says a filesystem is full (or over quota).
fn is_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(nix::libc::ENOSPC) | Some(nix::libc::EDQUOT))
}

/// Where the next chunk goes.
enum Level {
    Memory,
    Disk,
}

impl State {
    fn buffered(&self) -> u64 {
        self.memory_bytes as u64 + (self.disk_end - self.disk_start)
    }

    /// Whether `len` more bytes may go to this spool's memory level, budget aside: only while
    /// the disk level is empty (that keeps the order), and always one chunk when memory is
    /// empty.
    fn memory_fits(&self, len: usize, limits: &Limits) -> bool {
        self.disk_end == self.disk_start && (self.memory_bytes + len <= limits.memory || self.memory.is_empty())
    }

    /// Where `len` more bytes fit now, if anywhere (`memory`: they may go to memory, budget
    /// included); an error once the reader is gone (the receive ended early: its own error
    /// says why).
    fn level_for(&self, len: usize, limits: &Limits, memory: bool) -> io::Result<Option<Level>> {
        if self.reader_gone {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the receive stopped reading the spool"));
        }
        let disk_held = self.disk_end - self.disk_start;
        let disk_limit = self.disk_full_at.map_or(limits.disk, |full| full.min(limits.disk));
        let receive_paused = !self.pulled || self.last_pull.elapsed() >= limits.spill_after;
        if memory {
            Ok(Some(Level::Memory))
        } else if disk_held + len as u64 <= disk_limit && receive_paused {
            Ok(Some(Level::Disk))
        } else {
            Ok(None)
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("spool lock")
    }

    /// Waits for the reader to take something, or a while (room in the node's budget).
    async fn wait_for_room(&self) {
        let _ = tokio::time::timeout(BUDGET_RECHECK, self.to_writer.notified()).await;
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let held = self.state.get_mut().map(|st| st.memory_bytes).unwrap_or_else(|e| e.into_inner().memory_bytes);
        self.limits.budget.give_back(held);
    }
}

pub struct SpoolWriter {
    shared: Arc<Shared>,
}

impl SpoolWriter {
    /// Waits until `len` bytes fit, so that the next [`push`](Self::push) of that many
    /// does not wait. Cancel-safe, unlike `push`: a caller that must be able to give up
    /// waits here, then pushes without racing anything.
    pub async fn room(&self, len: usize) -> io::Result<()> {
        let limits = &self.shared.limits;
        loop {
            {
                let st = self.shared.lock();
                let memory = st.memory_fits(len, limits) && limits.budget.fits(len);
                if st.level_for(len, limits, memory)?.is_some() {
                    return Ok(());
                }
            }
            self.shared.wait_for_room().await;
        }
    }

    /// Appends `chunk`, waiting while both levels are full. Fails once the reader is gone.
    /// Not cancel-safe once it writes to disk: use [`room`](Self::room) for a wait that may
    /// be given up.
    pub async fn push(&self, chunk: Bytes) -> io::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let len = chunk.len();
        let limits = &self.shared.limits;
        loop {
            let (file, offset) = loop {
                {
                    let mut st = self.shared.lock();
                    // Budget taken here is held by the chunk in memory, or given back at once.
                    let memory = st.memory_fits(len, limits) && limits.budget.take(len);
                    let level = st.level_for(len, limits, memory);
                    if memory && !matches!(level, Ok(Some(Level::Memory))) {
                        limits.budget.give_back(len);
                    }
                    let level = level?;
                    if level.is_some() && st.buffered() == 0 {
                        // The receive has been idle until now: its wait starts here.
                        st.last_pull = Instant::now();
                    }
                    match level {
                        Some(Level::Memory) => {
                            st.memory_bytes += len;
                            st.memory.push_back(chunk);
                            drop(st);
                            self.shared.to_reader.notify_one();
                            return Ok(());
                        }
                        Some(Level::Disk) => {
                            let file = match &st.file {
                                Some(f) => Some(f.clone()),
                                None => match self.create_file() {
                                    Ok(f) => Some(st.file.insert(Arc::new(f)).clone()),
                                    Err(e) if is_full(&e) => {
                                        self.disk_full(&mut st, &e);
                                        None
                                    }
                                    Err(e) => return Err(e),
                                },
                            };
                            if let Some(file) = file {
                                st.writing = true;
                                break (file, st.disk_end);
                            }
                        }
                        None => {}
                    }
                }
                self.shared.wait_for_room().await;
            };
            let data = chunk.clone();
            let written =
                tokio::task::spawn_blocking(move || file.write_all_at(&data, offset).map(|()| crc32c::crc32c(&data))).await.map_err(io::Error::other)?;
            let mut st = self.shared.lock();
            st.writing = false;
            match written {
                Ok(crc) => {
                    st.disk_end = offset + len as u64;
                    match st.records.back_mut() {
                        Some(last) if last.len + len as u64 <= DISK_READ => {
                            last.crc = crc32c::crc32c_combine(last.crc, crc, len);
                            last.len += len as u64;
                        }
                        _ => st.records.push_back(Record { len: len as u64, crc }),
                    }
                    drop(st);
                    self.shared.to_reader.notify_one();
                    return Ok(());
                }
                // Whatever part of the chunk went in lies past `disk_end`: it is written over.
                Err(e) if is_full(&e) => self.disk_full(&mut st, &e),
                Err(e) => return Err(io::Error::new(e.kind(), format!("cannot write the spool in {}: {e}", self.shared.dir.display()))),
            }
        }
    }

    /// The disk level's filesystem is full: hold no more on disk than now, until drained.
    fn disk_full(&self, st: &mut State, e: &io::Error) {
        let held = st.disk_end - st.disk_start;
        if st.disk_full_at.is_none() {
            tracing::warn!(
                "the spool's filesystem ({}) is full: {e}; it keeps the {held} bytes it holds there, and takes more as the receive reads them",
                self.shared.dir.display()
            );
        }
        st.disk_full_at = Some(held);
    }

    fn create_file(&self) -> io::Result<File> {
        let dir = &self.shared.dir;
        std::fs::create_dir_all(dir).map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display())))?;
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{}-{n}.spool", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display())))?;
        // Unlinked at once: the space is freed when the spool goes, whatever way it goes.
        std::fs::remove_file(&path)?;
        Ok(file)
    }

    /// The stream is complete and checked: the reader may report its end once drained.
    pub fn finish(&self) {
        let mut st = self.shared.lock();
        if matches!(st.end, End::Open) {
            st.end = End::Finished;
        }
        drop(st);
        self.shared.to_reader.notify_one();
    }

    /// The stream will not be completed: the reader fails with `why` at once.
    pub fn fail(&self, why: impl Into<String>) {
        let mut st = self.shared.lock();
        if matches!(st.end, End::Open) {
            st.end = End::Failed(why.into());
        }
        drop(st);
        self.shared.to_reader.notify_one();
    }

    /// Bytes waiting for the receive.
    pub fn buffered(&self) -> u64 {
        self.shared.lock().buffered()
    }

    /// How long data has been waiting without the receive asking for any: the sign of a
    /// stuck receive. `None` while the spool is empty (then the network is the slow side).
    pub fn waiting(&self) -> Option<Duration> {
        let st = self.shared.lock();
        (st.buffered() > 0).then(|| st.last_pull.elapsed())
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        self.fail("the transfer was abandoned");
    }
}

pub struct SpoolReader {
    shared: Arc<Shared>,
}

impl SpoolReader {
    /// The next chunk in order; `None` at a finished end.
    pub async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            let disk = {
                let mut st = self.shared.lock();
                st.last_pull = Instant::now();
                st.pulled = true;
                if let End::Failed(why) = &st.end {
                    return Err(io::Error::other(why.clone()));
                }
                if let Some(chunk) = st.memory.pop_front() {
                    st.memory_bytes -= chunk.len();
                    self.shared.limits.budget.give_back(chunk.len());
                    drop(st);
                    self.shared.to_writer.notify_one();
                    return Ok(Some(chunk));
                }
                if let Some(record) = st.records.pop_front() {
                    // Taken out now: the writer starts a new record after it.
                    Some((st.file.clone().expect("a disk level has a file"), st.disk_start, record))
                } else if let End::Finished = &st.end {
                    return Ok(None);
                } else {
                    None
                }
            };
            let Some((file, offset, record)) = disk else {
                self.shared.to_reader.notified().await;
                continue;
            };
            let n = record.len;
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; n as usize];
                file.read_exact_at(&mut buf, offset)?;
                if crc32c::crc32c(&buf) != record.crc {
                    return Err(io::Error::other(format!(
                        "the spool file's bytes {offset}..{} read back otherwise than written (damaged on disk?)",
                        offset + n
                    )));
                }
                // Give the consumed range's blocks back now (best effort; the range is never read again).
                let punch = nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
                let _ = nix::fcntl::fallocate(&*file, punch, offset as i64, n as i64);
                Ok::<_, io::Error>(buf)
            })
            .await
            .map_err(io::Error::other)?;
            let mut st = self.shared.lock();
            let chunk = match read {
                Ok(chunk) => chunk,
                Err(e) => {
                    st.end = End::Failed(e.to_string());
                    return Err(e);
                }
            };
            st.disk_start += n;
            if st.disk_start == st.disk_end && !st.writing {
                // Drained: start the file over, giving its space back.
                st.disk_start = 0;
                st.disk_end = 0;
                st.disk_full_at = None; // its space is back: try the disk again
                if let Some(f) = &st.file {
                    let _ = f.set_len(0);
                }
            }
            drop(st);
            self.shared.to_writer.notify_one();
            return Ok(Some(Bytes::from(chunk)));
        }
    }

    /// The spool as a byte stream, for a backend's `receive`.
    pub fn into_async_read(self) -> impl AsyncRead + Send + Unpin {
        let chunks = futures::stream::unfold(self, |mut reader| async move {
            match reader.next_chunk().await {
                Ok(Some(chunk)) => Some((Ok(chunk), reader)),
                Ok(None) => None,
                Err(e) => Some((Err(e), reader)),
            }
        });
        StreamReader::new(Box::pin(chunks))
    }
}

impl Drop for SpoolReader {
    fn drop(&mut self) {
        self.shared.lock().reader_gone = true;
        self.shared.to_writer.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A spool that takes data on disk whenever memory is full, reading or not.
    fn limits(memory: usize, disk: u64) -> Limits {
        Limits { memory, disk, budget: MemoryBudget::new(usize::MAX), spill_after: Duration::ZERO }
    }

    #[tokio::test]
    async fn a_receive_that_keeps_reading_gets_back_pressure_not_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (w, mut r) = spool(Limits { spill_after: Duration::from_secs(3600), ..limits(1000, 1 << 20) }, dir.path().to_path_buf());
        // Before the receive asked for anything, memory is full and the rest goes to disk.
        for c in chunks(3, 1000) {
            w.push(c).await.unwrap();
        }
        assert_eq!(w.shared.lock().disk_end, 2000);
        // Once it reads (and has just asked), more waits for memory instead of going to disk.
        assert_eq!(r.next_chunk().await.unwrap().unwrap().len(), 1000);
        assert_eq!(r.next_chunk().await.unwrap().unwrap().len(), 2000, "the disk level, one record");
        w.push(Bytes::from_static(&[1; 1000])).await.unwrap();
        let blocked = tokio::time::timeout(Duration::from_millis(250), w.push(Bytes::from_static(&[2; 1000]))).await;
        assert!(blocked.is_err(), "memory is full and the receive is reading: the push waits");
        assert_eq!(w.shared.lock().disk_end, 0, "nothing more went to disk (the drained file started over)");
        // A receive that stops reading for `spill_after` lets the disk take data again.
        let (w, mut r) = spool(Limits { spill_after: Duration::from_millis(50), ..limits(1000, 1 << 20) }, dir.path().to_path_buf());
        w.push(Bytes::from_static(&[1; 1000])).await.unwrap();
        r.next_chunk().await.unwrap().unwrap();
        w.push(Bytes::from_static(&[1; 1000])).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.push(Bytes::from_static(&[2; 1000]))).await.expect("the receive paused: the disk takes it").unwrap();
        assert_eq!(w.shared.lock().disk_end, 1000);
    }

    fn chunks(n: usize, size: usize) -> Vec<Bytes> {
        (0..n).map(|i| Bytes::from(vec![(i % 251) as u8; size])).collect()
    }

    #[tokio::test]
    async fn a_spool_file_damaged_on_disk_is_no_clean_end() {
        let dir = tempfile::tempdir().unwrap();
        let (w, r) = spool(limits(100, 1 << 20), dir.path().to_path_buf());
        let data = chunks(20, 100);
        for c in &data {
            w.push(c.clone()).await.unwrap();
        }
        let file = w.shared.lock().file.clone().expect("most of it went to disk");
        file.write_all_at(b"X", 500).unwrap();
        w.finish();
        let err = r.into_async_read().read_to_end(&mut Vec::new()).await.unwrap_err();
        assert!(err.to_string().contains("damaged on disk"), "{err}");
    }

    #[tokio::test]
    async fn many_small_chunks_on_disk_make_few_records() {
        let dir = tempfile::tempdir().unwrap();
        let (w, r) = spool(limits(10, 1 << 30), dir.path().to_path_buf());
        for i in 0..3000u32 {
            w.push(Bytes::from(vec![i as u8; 1000])).await.unwrap();
        }
        assert_eq!(w.shared.lock().records.len(), 3, "3 MB of 1 KB chunks in records of up to 1 MiB");
        w.finish();
        let mut out = Vec::new();
        r.into_async_read().read_to_end(&mut out).await.unwrap();
        assert_eq!(out, (0..3000u32).flat_map(|i| vec![i as u8; 1000]).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn keeps_order_across_memory_and_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (w, r) = spool(limits(1000, 1 << 20), dir.path().to_path_buf());
        let data = chunks(200, 300);
        // Write everything before reading anything: most of it must go to disk.
        for c in &data {
            w.push(c.clone()).await.unwrap();
        }
        assert_eq!(w.buffered(), 60_000);
        assert!(w.shared.lock().memory_bytes <= 1000);
        w.finish();
        let mut out = Vec::new();
        r.into_async_read().read_to_end(&mut out).await.unwrap();
        assert_eq!(out, data.concat());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the spool file is unlinked");
    }

    #[tokio::test]
    async fn interleaved_reads_and_writes_keep_order() {
        let dir = tempfile::tempdir().unwrap();
        let (w, mut r) = spool(limits(700, 5000), dir.path().to_path_buf());
        let data = chunks(500, 100);
        let expected = data.concat();
        let writer = tokio::spawn(async move {
            for (i, c) in data.into_iter().enumerate() {
                w.push(c).await.unwrap();
                if i % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            w.finish();
            w
        });
        let mut out = Vec::new();
        let mut n = 0;
        while let Some(c) = r.next_chunk().await.unwrap() {
            out.extend_from_slice(&c);
            n += 1;
            if n % 3 == 0 {
                tokio::time::sleep(Duration::from_micros(50)).await;
            }
        }
        writer.await.unwrap();
        assert_eq!(out, expected);
    }

    #[tokio::test]
    async fn a_full_spool_makes_the_writer_wait() {
        let dir = tempfile::tempdir().unwrap();
        let (w, mut r) = spool(limits(100, 200), dir.path().to_path_buf());
        for c in chunks(3, 100) {
            w.push(c).await.unwrap();
        }
        let blocked = tokio::time::timeout(Duration::from_millis(100), w.push(Bytes::from_static(&[1; 100]))).await;
        assert!(blocked.is_err(), "memory and disk are full: the push must wait");
        assert!(w.waiting().is_some());
        // Freeing memory is not enough while older data waits on disk (order first).
        r.next_chunk().await.unwrap().unwrap();
        let blocked = tokio::time::timeout(Duration::from_millis(100), w.push(Bytes::from_static(&[1; 100]))).await;
        assert!(blocked.is_err());
        assert_eq!(r.next_chunk().await.unwrap().unwrap().len(), 200, "the disk level is read in one go");
        w.push(Bytes::from_static(&[1; 100])).await.unwrap();
    }

    #[tokio::test]
    async fn no_end_without_finish_and_failure_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (w, mut r) = spool(limits(1000, 0), dir.path().to_path_buf());
        w.push(Bytes::from_static(b"abc")).await.unwrap();
        assert_eq!(r.next_chunk().await.unwrap().unwrap(), Bytes::from_static(b"abc"));
        let pending = tokio::time::timeout(Duration::from_millis(50), r.next_chunk()).await;
        assert!(pending.is_err(), "an unfinished spool has no end yet");
        w.fail("checksum mismatch");
        assert!(r.next_chunk().await.unwrap_err().to_string().contains("checksum"));
        // Dropping a writer that never finished fails the stream too.
        let (w, mut r) = spool(limits(1000, 0), dir.path().to_path_buf());
        drop(w);
        assert!(r.next_chunk().await.unwrap_err().to_string().contains("abandoned"));
    }

    #[tokio::test]
    async fn the_disk_level_holds_no_more_than_its_limit_while_the_reader_lags() {
        let dir = tempfile::tempdir().unwrap();
        let (w, mut r) = spool(limits(1 << 10, 256 << 10), dir.path().to_path_buf());
        let writer = tokio::spawn(async move {
            for c in chunks(400, 16 << 10) {
                w.push(c).await.unwrap();
            }
            w.finish();
            w
        });
        let mut got = 0;
        let mut max_allocated = 0u64;
        while let Some(c) = r.next_chunk().await.unwrap() {
            got += c.len();
            if let Some(f) = r.shared.lock().file.clone() {
                use std::os::unix::fs::MetadataExt;
                max_allocated = max_allocated.max(f.metadata().unwrap().blocks() * 512);
            }
            tokio::time::sleep(Duration::from_micros(200)).await; // a reader a bit slower than the writer
        }
        writer.await.unwrap();
        assert_eq!(got, 400 * (16 << 10));
        // 6.25 MiB went through a 256 KiB disk level: the file never held much more than that.
        assert!(max_allocated <= 2 * (256 << 10) + (1 << 20), "the spool file grew to {max_allocated} bytes");
    }

    #[tokio::test]
    async fn an_idle_receive_is_not_waiting_until_data_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let (w, r) = spool(limits(1000, 0), dir.path().to_path_buf());
        r.shared.lock().last_pull = Instant::now() - Duration::from_secs(3600);
        assert!(w.waiting().is_none());
        w.push(Bytes::from_static(b"x")).await.unwrap();
        assert!(w.waiting().unwrap() < Duration::from_secs(60), "the hour of idling counted as waiting");
    }

    #[tokio::test]
    async fn a_gone_reader_fails_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (w, r) = spool(limits(10, 0), dir.path().to_path_buf());
        w.push(Bytes::from_static(b"0123456789")).await.unwrap();
        drop(r);
        assert_eq!(w.push(Bytes::from_static(b"x")).await.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test]
    async fn spools_share_the_node_memory_budget() {
        let dir = tempfile::tempdir().unwrap();
        let budget = MemoryBudget::new(300);
        let shared = |disk| Limits { memory: 1000, disk, budget: budget.clone(), spill_after: Duration::ZERO };
        let (a, mut ra) = spool(shared(0), dir.path().to_path_buf());
        let (b, rb) = spool(shared(1 << 20), dir.path().to_path_buf());
        let (c, _rc) = spool(shared(0), dir.path().to_path_buf());
        for chunk in chunks(3, 100) {
            a.push(chunk).await.unwrap();
        }
        assert_eq!(budget.used(), 300);
        // b has a disk level: its data goes there instead of memory.
        b.push(Bytes::from_static(&[2; 100])).await.unwrap();
        assert_eq!((b.shared.lock().memory_bytes, budget.used()), (0, 300));
        // c has none: it waits until a's reader frees some of the budget.
        let blocked = tokio::time::timeout(Duration::from_millis(250), c.push(Bytes::from_static(&[3; 100]))).await;
        assert!(blocked.is_err(), "the node's budget is used up: the push must wait");
        ra.next_chunk().await.unwrap().unwrap();
        tokio::time::timeout(Duration::from_secs(2), c.push(Bytes::from_static(&[3; 100]))).await.expect("room was freed").unwrap();
        assert_eq!(budget.used(), 300);
        // A spool that goes gives its share back.
        drop((a, ra));
        assert_eq!(budget.used(), 100);
        drop(rb);
    }
}
