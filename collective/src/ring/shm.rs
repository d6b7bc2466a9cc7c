//! Same-host fast path of the ring's all-reduce: a shared-memory segment that every rank
//! maps, with a futex barrier.
//!
//! Rank 0 creates a file in `/dev/shm` at connect time and sends its name and a random token
//! around the ring; every rank maps it and checks the token, so the path is taken only when
//! all ranks really share the host (and the file is unlinked once all have mapped it, so
//! nothing is left behind). The segment holds a control page (token, abort word, barrier
//! counter, and per rank its operation header and barrier epoch) and, per rank, two input
//! staging buffers of one window each and two result buffers of one chunk each.
//!
//! All-reduce of `T` elements, in windows of at most [`WINDOW_BYTES`], window `k` using
//! staging buffer `k % 2`; chunk `c` of a window is `[c·L/n, (c+1)·L/n)`:
//!
//! 1. copy-in: each rank copies every chunk but its own from its input tensors into its
//!    input buffer `k % 2`;
//! 2. barrier;
//! 3. reduce: rank `r` sums chunk `r` over its own input and the other ranks' input buffers
//!    straight into its output, and copies the sums into its result buffer `k % 2`;
//! 4. copy-in of the next window (into the other input buffer), barrier;
//! 5. gather: rank `r` copies every other chunk's sums from its owner's result buffer.
//!
//! That is one barrier per window plus one, and per rank about `4·T` bytes of memory traffic
//! with no kernel copies, against the TCP ring's four copies through the kernel. Double
//! buffering makes one barrier per window safe: a buffer is written again only two barriers
//! after it was last read (input buffers are read before the barrier that follows their
//! copy-in, result buffers after it).
//!
//! Failure semantics are the TCP ring's: every wait has the operation's deadline (a rank
//! that does not arrive is reported as [`CollectiveError::PeerTimeout`] naming it), ranks
//! publish their operation header (sequence number, operation, length) and check everyone's
//! after the first barrier, and a rank that fails or leaves sets the abort word and wakes
//! everyone. While waiting, a rank also checks its TCP connections (which stay open) every
//! few milliseconds, so a killed neighbour (whose sockets the kernel closes) or a neighbour
//! that runs another collective over TCP is noticed at once.
//!
//! The segment is allocated in full when it is created (`posix_fallocate`), so a full
//! `/dev/shm` means the TCP path, never a `SIGBUS` later.

use std::fs::OpenOptions;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Parts;
use crate::CollectiveError;

/// Largest window of an all-reduce staged at once, in bytes per rank (each rank's segment
/// holds two).
pub(super) const WINDOW_BYTES: usize = 1 << 20;
/// Length of the random token that proves a segment is the one rank 0 created.
pub(super) const TOKEN_BYTES: usize = 16;
/// Where the segments live.
const SHM_DIR: &str = "/dev/shm";
/// How often a waiting rank checks its sockets and the deadline.
const CHECK_EVERY: Duration = Duration::from_millis(5);

const OFF_TOKEN: usize = 0;
const OFF_ABORT: usize = 64;
const OFF_COUNTER: usize = 128;
const OFF_SLEEPERS: usize = 132;
const OFF_RANKS: usize = 192;
/// Bytes of a rank's control record: header (3 × u64) and barrier epoch (u32).
const RANK_CTRL: usize = 64;
const PAGE: usize = 4096;

/// A mapped segment.
#[derive(Debug)]
pub(super) struct Shm {
    base: *mut u8,
    len: usize,
    rank: usize,
    n: usize,
    /// Elements per window.
    window: usize,
    /// Barriers this rank has arrived at (wrapping).
    epoch: u32,
}

// SAFETY: the mapping is owned by this value and only accessed through it (plus atomics and
// the barrier protocol for what other ranks share); moving it to another thread is fine.
unsafe impl Send for Shm {}

/// A random token for a new segment.
fn random_token() -> io::Result<[u8; TOKEN_BYTES]> {
    let mut token = [0u8; TOKEN_BYTES];
    let mut filled = 0;
    while filled < TOKEN_BYTES {
        // SAFETY: writes at most `TOKEN_BYTES - filled` bytes into `token[filled..]`.
        let rc = unsafe {
            libc::getrandom(token[filled..].as_mut_ptr().cast(), TOKEN_BYTES - filled, 0)
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            filled += rc as usize;
        }
    }
    Ok(token)
}

fn segment_len(n: usize, window: usize) -> usize {
    data_offset(n) + n * slot_bytes(window, n)
}

fn data_offset(n: usize) -> usize {
    (OFF_RANKS + n * RANK_CTRL).div_ceil(PAGE) * PAGE
}

/// Elements of a result buffer: the largest chunk of a window.
fn result_len(window: usize, n: usize) -> usize {
    window.div_ceil(n)
}

/// Bytes of a rank's buffers: two inputs of a window, two results of a chunk.
fn slot_bytes(window: usize, n: usize) -> usize {
    (2 * window + 2 * result_len(window, n)) * 4
}

/// Allocates the file's blocks now, so that touching the mapping later cannot fail.
fn allocate(file: &std::fs::File, len: usize) -> io::Result<()> {
    // SAFETY: plain system call on an open file descriptor.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

fn map(file: &std::fs::File, len: usize) -> io::Result<*mut u8> {
    // SAFETY: a fresh shared mapping of `len` bytes of `file` (which is at least that long);
    // the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

impl Shm {
    /// Creates and maps a segment for a world of `n` (as rank 0); returns it with its path
    /// (to unlink once every rank has mapped it) and token.
    pub fn create(n: usize) -> io::Result<(Self, PathBuf, [u8; TOKEN_BYTES])> {
        let token = random_token()?;
        let path = Path::new(SHM_DIR).join(format!(
            "trainyard-ring-{}-{}",
            std::process::id(),
            hex::encode(token)
        ));
        let window = WINDOW_BYTES / 4;
        let len = segment_len(n, window);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let mapped = file
            .set_len(len as u64)
            .and_then(|()| allocate(&file, len))
            .and_then(|()| map(&file, len));
        let base = match mapped {
            Ok(base) => base,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let shm = Self {
            base,
            len,
            rank: 0,
            n,
            window,
            epoch: 0,
        };
        // SAFETY: the token field lies in the mapping, which nobody else has opened yet.
        unsafe { std::ptr::copy_nonoverlapping(token.as_ptr(), base.add(OFF_TOKEN), TOKEN_BYTES) };
        Ok((shm, path, token))
    }

    /// Maps the segment at `path` as `rank` of `n`, if it holds `token` (else an error).
    pub fn open(path: &Path, token: &[u8], rank: usize, n: usize) -> io::Result<Self> {
        let window = WINDOW_BYTES / 4;
        let len = segment_len(n, window);
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        if file.metadata()?.len() != len as u64 {
            return Err(io::Error::other("shared memory segment has the wrong size"));
        }
        let base = map(&file, len)?;
        let shm = Self {
            base,
            len,
            rank,
            n,
            window,
            epoch: 0,
        };
        // SAFETY: the token field lies in the mapping; rank 0 wrote it before sending it.
        let theirs = unsafe { std::slice::from_raw_parts(base.add(OFF_TOKEN), TOKEN_BYTES) };
        if theirs != token {
            return Err(io::Error::other("shared memory segment has another token"));
        }
        Ok(shm)
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off.is_multiple_of(4) && off + 4 <= self.len);
        // SAFETY: in bounds, aligned (the mapping is page-aligned), and only ever accessed
        // atomically by every rank.
        unsafe { &*self.base.add(off).cast::<AtomicU32>() }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= self.len);
        // SAFETY: as for `u32_at`.
        unsafe { &*self.base.add(off).cast::<AtomicU64>() }
    }

    fn abort_word(&self) -> &AtomicU32 {
        self.u32_at(OFF_ABORT)
    }

    fn counter(&self) -> &AtomicU32 {
        self.u32_at(OFF_COUNTER)
    }

    fn sleepers(&self) -> &AtomicU32 {
        self.u32_at(OFF_SLEEPERS)
    }

    fn header_word(&self, rank: usize, i: usize) -> &AtomicU64 {
        self.u64_at(OFF_RANKS + rank * RANK_CTRL + 8 * i)
    }

    fn epoch_of(&self, rank: usize) -> &AtomicU32 {
        self.u32_at(OFF_RANKS + rank * RANK_CTRL + 24)
    }

    /// Input buffer `parity` of `rank` (a window).
    fn staging(&self, rank: usize, parity: usize) -> *mut f32 {
        let off =
            data_offset(self.n) + rank * slot_bytes(self.window, self.n) + parity * self.window * 4;
        debug_assert!(off + self.window * 4 <= self.len);
        // SAFETY: in bounds of the mapping (see `segment_len`).
        unsafe { self.base.add(off).cast() }
    }

    /// Result buffer `parity` of `rank` (a chunk).
    fn result(&self, rank: usize, parity: usize) -> *mut f32 {
        let rl = result_len(self.window, self.n);
        let off = data_offset(self.n)
            + rank * slot_bytes(self.window, self.n)
            + (2 * self.window + parity * rl) * 4;
        debug_assert!(off + rl * 4 <= self.len);
        // SAFETY: in bounds of the mapping (see `segment_len`).
        unsafe { self.base.add(off).cast() }
    }

    /// Tells every rank that this one failed or left: their waits end with an error.
    pub fn abort(&self) {
        let _ = self.abort_word().compare_exchange(
            0,
            self.rank as u32 + 1,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        futex_wake(self.counter());
    }

    /// The rank that aborted, if one did.
    fn aborted_by(&self) -> Option<usize> {
        match self.abort_word().load(Ordering::SeqCst) {
            0 => None,
            r => Some(r as usize - 1),
        }
    }

    /// Waits until every rank has arrived at this rank's next barrier.
    fn barrier(&mut self, w: &mut Wait<'_>) -> Result<(), CollectiveError> {
        self.epoch = self.epoch.wrapping_add(1);
        let target = self.epoch.wrapping_mul(self.n as u32);
        let reached = |v: u32| v.wrapping_sub(target) as i32 >= 0;
        self.epoch_of(self.rank).store(self.epoch, Ordering::SeqCst);
        let v = self
            .counter()
            .fetch_add(1, Ordering::SeqCst)
            .wrapping_add(1);
        if v == target {
            if self.sleepers().load(Ordering::SeqCst) > 0 {
                futex_wake(self.counter());
            }
            return Ok(());
        }
        // Spin briefly (a peer on the other core is often almost there), then yield, then
        // sleep on the futex in short slices that check the deadline and the sockets.
        for i in 0..SPINS + YIELDS {
            if reached(self.counter().load(Ordering::Acquire)) {
                return Ok(());
            }
            if i < SPINS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let mut next_check = Instant::now();
        loop {
            // Arrival first: a rank that has passed this barrier may already have moved on
            // (started a TCP collective, or dropped its ring), which is not a failure.
            if reached(self.counter().load(Ordering::SeqCst)) {
                return Ok(());
            }
            if let Some(r) = self.aborted_by() {
                return Err(w.aborted(r));
            }
            let now = Instant::now();
            if now >= w.deadline {
                // Name a rank that has not arrived.
                let late = (1..self.n)
                    .map(|d| (self.rank + self.n - d) % self.n)
                    .find(|&q| {
                        (self
                            .epoch_of(q)
                            .load(Ordering::SeqCst)
                            .wrapping_sub(self.epoch) as i32)
                            < 0
                    })
                    .unwrap_or(w.left);
                return Err(CollectiveError::PeerTimeout {
                    peer: late,
                    op: w.op,
                    timeout: w.timeout,
                });
            }
            if now >= next_check {
                // A neighbour's socket moved: unless the barrier was reached meanwhile (then
                // it is the neighbour's next collective), the neighbour failed or disagrees.
                if (w.sockets_moved)() && !reached(self.counter().load(Ordering::SeqCst)) {
                    return Err((w.diagnose)());
                }
                next_check = now + CHECK_EVERY;
            }
            self.sleepers().fetch_add(1, Ordering::SeqCst);
            let v = self.counter().load(Ordering::SeqCst);
            if !reached(v) && self.aborted_by().is_none() {
                let slice = CHECK_EVERY.min(w.deadline.saturating_duration_since(now));
                futex_wait(self.counter(), v, slice);
            }
            self.sleepers().fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// All-reduce (sum, or mean with `mean`) of `input` into `out` (same length), with the
    /// operation `header` that every rank must share.
    pub fn all_reduce(
        &mut self,
        input: &Parts<'_>,
        out: &mut [MaybeUninit<f32>],
        header: [u8; 24],
        mean: bool,
        w: &mut Wait<'_>,
    ) -> Result<(), CollectiveError> {
        let (n, r) = (self.n, self.rank);
        let total = input.len();
        debug_assert_eq!(out.len(), total);
        let word = |i: usize| u64::from_le_bytes(header[i * 8..i * 8 + 8].try_into().unwrap());
        for i in 0..3 {
            self.header_word(r, i).store(word(i), Ordering::SeqCst);
        }
        // At least one window, so that even an empty all-reduce has a barrier after the
        // header check (a rank must not overwrite its header while others read it).
        let windows = total.div_ceil(self.window).max(1);
        let wl = self.window;
        let window = |k: usize| k * wl..((k + 1) * wl).min(total);
        let chunk = |len: usize, c: usize| c * len / n..(c + 1) * len / n;
        self.copy_in(input, window(0), 0);
        self.barrier(w)?;
        for q in 0..n {
            if q == r {
                continue;
            }
            let mut theirs = [0u8; 24];
            for i in 0..3 {
                let v = self.header_word(q, i).load(Ordering::SeqCst);
                theirs[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
            }
            super::check_header(&header, &theirs, q, w.op)?;
        }
        for k in 0..windows {
            let win = window(k);
            let parity = k % 2;
            let own = chunk(win.len(), r);
            self.reduce(input, out, win.start, own, parity, mean);
            if k + 1 < windows {
                self.copy_in(input, window(k + 1), 1 - parity);
            }
            self.barrier(w)?;
            for c in (0..n).filter(|&c| c != r) {
                let ch = chunk(win.len(), c);
                let dst = &mut out[win.start + ch.start..win.start + ch.end];
                // SAFETY: result buffer `parity` of rank `c` holds the sums of its chunk
                // (`ch.len() <= result_len`); it is written again only after the next barrier.
                let src = unsafe {
                    std::slice::from_raw_parts(
                        self.result(c, parity).cast::<MaybeUninit<f32>>(),
                        ch.len(),
                    )
                };
                dst.copy_from_slice(src);
            }
        }
        Ok(())
    }

    /// Copies every chunk of window `win` but this rank's own from `input` into staging
    /// buffer `parity`.
    fn copy_in(&self, input: &Parts<'_>, win: std::ops::Range<usize>, parity: usize) {
        let (n, r) = (self.n, self.rank);
        let len = win.len();
        let own = r * len / n..(r + 1) * len / n;
        let base = self.staging(r, parity);
        for range in [0..own.start, own.end..len] {
            let range = win.start + range.start..win.start + range.end;
            input.for_each(range.clone(), |at, part| {
                // SAFETY: `at - win.start + part.len() <= len <= window`: inside this rank's
                // staging buffer, which no other rank reads before the next barrier.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        part.as_ptr(),
                        base.add(at - win.start),
                        part.len(),
                    )
                };
            });
        }
    }

    /// Sums chunk `own` of the window starting at `start` over this rank's input and the
    /// other ranks' input buffers `parity` into `out`, and copies the sums into this rank's
    /// result buffer `parity`.
    fn reduce(
        &self,
        input: &Parts<'_>,
        out: &mut [MaybeUninit<f32>],
        start: usize,
        own: std::ops::Range<usize>,
        parity: usize,
        mean: bool,
    ) {
        const BLOCK: usize = 2048;
        let (n, r) = (self.n, self.rank);
        let div = n as f32;
        let others: Vec<*const f32> = (0..n)
            .filter(|&q| q != r)
            .map(|q| self.staging(q, parity).cast_const())
            .collect();
        let mine = self.result(r, parity);
        let range = start + own.start..start + own.end;
        input.for_each(range, |at, part| {
            for (b, mine_part) in part.chunks(BLOCK).enumerate() {
                let g = at + b * BLOCK; // global index of the block
                let w = g - start; // index in the window
                let len = mine_part.len();
                let dst = &mut out[g..g + len];
                // SAFETY (all three): the other ranks' chunk `own` of buffer `parity` is
                // complete (they copied it in before the barrier) and not written before the
                // next barrier; `w + len <= window`.
                let src = |i: usize| unsafe { std::slice::from_raw_parts(others[i].add(w), len) };
                for ((d, a), b) in dst.iter_mut().zip(mine_part).zip(src(0)) {
                    d.write(a + b);
                }
                // SAFETY: every element of `dst` was just written.
                let dst = unsafe { &mut *(dst as *mut [MaybeUninit<f32>] as *mut [f32]) };
                for i in 1..others.len() {
                    dst.iter_mut().zip(src(i)).for_each(|(d, s)| *d += s);
                }
                if mean {
                    dst.iter_mut().for_each(|d| *d /= div);
                }
                // SAFETY: this rank's result buffer (`w - own.start + len <= result_len`),
                // read by others only after the next barrier.
                unsafe {
                    std::ptr::copy_nonoverlapping(dst.as_ptr(), mine.add(w - own.start), len)
                };
            }
        });
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping this value owns; nothing refers to it afterwards.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Spins before yielding, and yields before sleeping, in a barrier.
const SPINS: usize = 200;
const YIELDS: usize = 8;

/// What a barrier needs to know to fail well.
pub(super) struct Wait<'a> {
    /// The deadline of the operation.
    pub deadline: Instant,
    /// The operation's timeout (for errors).
    pub timeout: Duration,
    /// The operation (for errors).
    pub op: &'static str,
    /// The left neighbour (blamed when no other rank can be).
    pub left: usize,
    /// Whether a neighbour's socket has something to read or hung up (checked without
    /// waiting; nothing travels over TCP during a shared-memory collective).
    pub sockets_moved: &'a mut dyn FnMut() -> bool,
    /// The error that explains a socket's movement (a neighbour that closed, or that runs
    /// another collective), called only when the barrier has not been reached.
    pub diagnose: &'a mut dyn FnMut() -> CollectiveError,
}

impl Wait<'_> {
    fn aborted(&self, rank: usize) -> CollectiveError {
        CollectiveError::PeerFailed {
            peer: rank,
            op: self.op,
            reason: format!("rank {rank} failed or left the ring"),
        }
    }
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT on a valid, aligned u32 of a shared mapping, with a valid timeout;
    // it only reads the word. Spurious returns are handled by the caller's loop.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a valid, aligned u32; wakes every waiter.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}
