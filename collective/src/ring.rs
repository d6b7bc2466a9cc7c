//! [`Ring`]: the TCP ring backend of [`Collective`], for CPU ranks in separate processes (on
//! one worker or several), with a shared-memory fast path for ranks that share a host.
//!
//! Setup: every rank listens on a port (its worker reports it), and the rendezvous hands
//! every rank the listen addresses of all ranks, its rank and the job attempt's token. Each
//! rank connects to its right neighbour (`rank + 1`) and accepts from its left one
//! (`rank - 1`); both sides exchange a handshake (magic, attempt token, rank, world size)
//! and refuse a peer whose attempt, world size or rank does not match, so ranks of an old
//! attempt can never join a new one. Connecting retries with backoff until
//! [`RingConfig::connect_timeout`]. Then the ranks find out whether they all share one host
//! (rank 0 creates a shared-memory segment and sends its name and a random token around the
//! ring; every rank that can map it and read the token says so), and if they do and
//! [`RingConfig::shared_memory`] is on everywhere, `all_reduce` runs through shared memory
//! (see the `shm` module: per rank about 4 bytes of memory traffic per byte reduced, no
//! kernel copies, one futex barrier per megabyte); otherwise, and for `broadcast` and
//! `barrier`, the TCP ring.
//!
//! TCP `all_reduce` reads the tensors where they are (CPU tensors are borrowed, others
//! copied to the host), fuses them as one buffer (as gradient bucketing does), and runs a
//! ring reduce-scatter then a ring all-gather over `n` chunks of it (each rank sends
//! `2(n-1)/n` of the buffer, the bandwidth optimum) into a new buffer that becomes the
//! results (one allocation per call, no copy of the input: this rank's own values are sent
//! and added straight from the input). The steps are pipelined at byte granularity on one
//! thread per rank (the `sock` module): non-blocking sockets and `poll(2)`; whatever is ready
//! is sent, whatever arrives is reduced from a small reused scratch buffer into the result
//! (or read straight into place in the all-gather) and becomes ready to forward, so sending,
//! receiving and reducing overlap without helper threads, locks, or system calls beyond the
//! reads and writes. `broadcast` pipelines the same way along the chain
//! `root → root+1 → …`; `barrier` passes a token `n - 1` times around the ring.
//!
//! The results of a call with several tensors are views of one buffer (candle tensors are
//! immutable, so sharing is safe; a kept small result keeps the whole buffer alive).
//!
//! Every operation starts with a small header (sequence number, operation, length) that the
//! neighbours (over TCP) or all ranks (in shared memory) check against their own, so ranks
//! that call different collectives fail with an error instead of exchanging garbage. Every
//! operation has a deadline ([`RingConfig::op_timeout`]): a dead, stuck or absent peer turns
//! into [`CollectiveError::PeerTimeout`] or [`CollectiveError::PeerFailed`] naming the peer,
//! and a rank that fails shuts its sockets (and raises the shared abort flag) so that the
//! other ranks fail at once too. After an error the ring is broken: every later operation
//! fails (the attempt must restart).
//!
//! Data travels in the host's byte order; all ranks of a job must share it (every platform
//! we run on is little-endian).

#[cfg(target_os = "linux")]
mod shm;
mod sock;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{CpuStorage, Storage, Tensor};

use crate::{check_dtypes, check_rank, check_root, Collective, CollectiveError, ReduceOp};
use sock::{Apply, Block, Peer, Transfer};

/// First bytes of a handshake: identifies a Trainyard ring peer and the protocol version.
const MAGIC: &[u8; 8] = b"TYRING02";
/// Longest attempt token accepted in a handshake.
const MAX_TOKEN: usize = 1024;
/// Longest shared-memory segment name accepted at connect time.
const MAX_SHM_NAME: usize = 4096;

const OP_SUM: u64 = 1;
const OP_MEAN: u64 = 2;
const OP_BROADCAST: u64 = 3;
const OP_BARRIER: u64 = 4;

/// Settings of a [`Ring`].
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// How long [`Ring::connect`] waits for its neighbours (default 60 s).
    pub connect_timeout: Duration,
    /// Deadline of every collective (default 30 s): a peer that has not done its part by
    /// then is reported as [`CollectiveError::PeerTimeout`].
    pub op_timeout: Duration,
    /// Largest piece of data one socket read or write moves, in bytes (default 256 KiB): the
    /// granularity of the TCP pipeline and the size of the scratch buffer reductions read
    /// into.
    pub segment_bytes: usize,
    /// Kernel send and receive buffer size of the sockets, in bytes (default 4 MiB; 0 leaves
    /// the kernel's autotuning alone).
    pub socket_buffer_bytes: usize,
    /// Whether `all_reduce` may run through shared memory when every rank of the ring is on
    /// this host (default true; Linux only). It is used only if all ranks allow it and can
    /// map the segment rank 0 creates in `/dev/shm` (about 3 MiB per rank, freed when the
    /// last rank drops its ring); otherwise everything goes over TCP.
    pub shared_memory: bool,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(60),
            op_timeout: Duration::from_secs(30),
            segment_bytes: 256 * 1024,
            socket_buffer_bytes: 4 * 1024 * 1024,
            shared_memory: true,
        }
    }
}

/// The two connections of a rank of a world of at least two (non-blocking after connect).
#[derive(Debug)]
struct Links {
    /// To `rank + 1`: this rank writes to it.
    right: TcpStream,
    /// From `rank - 1`: this rank reads from it.
    left: TcpStream,
}

impl Links {
    fn shutdown(&self) {
        let _ = self.right.shutdown(Shutdown::Both);
        let _ = self.left.shutdown(Shutdown::Both);
    }
}

/// The TCP ring backend of [`Collective`]: one rank's connections to its two neighbours (and,
/// when all ranks share a host, a shared-memory segment for `all_reduce`).
#[derive(Debug)]
pub struct Ring {
    rank: usize,
    world_size: usize,
    config: RingConfig,
    /// `None` in a world of one.
    links: Option<Links>,
    /// The shared-memory segment, when every rank is on this host.
    #[cfg(target_os = "linux")]
    shm: Option<shm::Shm>,
    /// Reused by TCP reductions (received values, before they are added).
    scratch: Vec<f32>,
    /// Sequence number of the next collective.
    seq: u64,
    /// Set by the first failed collective: the ring cannot be used any more.
    broken: Option<String>,
}

/// A peer's handshake.
#[derive(Debug)]
struct Hello {
    attempt: String,
    rank: usize,
    world_size: usize,
}

impl Ring {
    /// Joins the ring of `addrs.len()` ranks as `rank`, with `listener` bound to (the port
    /// of) `addrs[rank]`, for the job attempt `attempt`. Returns once both neighbours are
    /// connected and have passed the handshake; fails with
    /// [`CollectiveError::HandshakeRefused`] if a neighbour belongs to another attempt or
    /// world, and with [`CollectiveError::PeerTimeout`] if a neighbour is not there within
    /// [`RingConfig::connect_timeout`].
    pub fn connect(
        addrs: &[SocketAddr],
        rank: usize,
        listener: TcpListener,
        attempt: &str,
        config: RingConfig,
    ) -> Result<Self, CollectiveError> {
        let n = addrs.len();
        check_rank(rank, n)?;
        if attempt.len() > MAX_TOKEN {
            return Err(CollectiveError::Transport(format!(
                "attempt token is {} bytes long, at most {MAX_TOKEN} are allowed",
                attempt.len()
            )));
        }
        let mut ring = Self {
            rank,
            world_size: n,
            config,
            links: None,
            #[cfg(target_os = "linux")]
            shm: None,
            scratch: Vec::new(),
            seq: 0,
            broken: None,
        };
        if n == 1 {
            return Ok(ring);
        }
        let cfg = &ring.config;
        let deadline = Instant::now() + cfg.connect_timeout;
        let (left_rank, right_rank) = ((rank + n - 1) % n, (rank + 1) % n);
        let me = Hello {
            attempt: attempt.to_string(),
            rank,
            world_size: n,
        };
        let cancel = AtomicBool::new(false);
        let (left, right) = std::thread::scope(|s| {
            let acceptor =
                s.spawn(|| accept_left(&listener, left_rank, &me, cfg, deadline, &cancel));
            let right = connect_right(addrs[right_rank], right_rank, &me, cfg, deadline);
            if right.is_err() {
                cancel.store(true, Ordering::Relaxed);
            }
            let left = acceptor.join().expect("ring accept thread panicked");
            (left, right)
        });
        let refused = |r: &Result<TcpStream, CollectiveError>| {
            matches!(r, Err(CollectiveError::HandshakeRefused { .. }))
        };
        let links = match (left, right) {
            (Ok(left), Ok(right)) => Links { right, left },
            (l, r) if refused(&l) && !refused(&r) => return Err(l.unwrap_err()),
            (_, Err(e)) => return Err(e),
            (Err(e), _) => return Err(e),
        };
        let nonblocking = |s: &TcpStream, peer| {
            s.set_nonblocking(true).map_err(|e| {
                Peer {
                    rank: peer,
                    op: "connect",
                    timeout: cfg.connect_timeout,
                }
                .io(e)
            })
        };
        nonblocking(&links.left, left_rank)?;
        nonblocking(&links.right, right_rank)?;
        let shared = negotiate_shared_memory(&links, rank, n, cfg, deadline);
        if shared.is_err() {
            links.shutdown();
        }
        #[cfg(target_os = "linux")]
        {
            ring.shm = shared?;
        }
        #[cfg(not(target_os = "linux"))]
        shared?;
        ring.links = Some(links);
        Ok(ring)
    }

    /// Whether `all_reduce` runs through shared memory (every rank is on this host).
    pub fn uses_shared_memory(&self) -> bool {
        #[cfg(target_os = "linux")]
        return self.shm.is_some();
        #[cfg(not(target_os = "linux"))]
        return false;
    }

    /// The deadline of an operation that starts now, or the error of a broken ring.
    fn start(&mut self) -> Result<(Instant, u64), CollectiveError> {
        if let Some(why) = &self.broken {
            return Err(CollectiveError::Transport(format!(
                "the ring is broken by an earlier error: {why}"
            )));
        }
        self.seq += 1;
        Ok((Instant::now() + self.config.op_timeout, self.seq))
    }

    /// Records the error of an operation: the ring is broken, the other ranks are told by
    /// closing the sockets (and raising the shared-memory abort flag).
    fn fail(&mut self, e: CollectiveError) -> CollectiveError {
        if let Some(links) = &self.links {
            links.shutdown();
        }
        #[cfg(target_os = "linux")]
        if let Some(shm) = &self.shm {
            shm.abort();
        }
        self.broken = Some(e.to_string());
        e
    }

    /// The left and right neighbours as [`Peer`]s of the operation `op`.
    fn peers(&self, op: &'static str) -> (Peer, Peer) {
        let n = self.world_size;
        let timeout = self.config.op_timeout;
        let peer = |rank| Peer { rank, op, timeout };
        (peer((self.rank + n - 1) % n), peer((self.rank + 1) % n))
    }

    /// Writes `header` to the right neighbour and checks the left neighbour's against it.
    fn exchange_headers(
        &self,
        links: &Links,
        header: &[u8; 24],
        (left, right): (Peer, Peer),
        deadline: Instant,
    ) -> Result<(), CollectiveError> {
        sock::write_all(&links.right, header, deadline, right)?;
        let mut theirs = [0u8; 24];
        sock::read_exact(&links.left, &mut theirs, deadline, left)?;
        check_header(header, &theirs, left.rank, left.op)
    }

    /// TCP ring all-reduce of `parts` into a new buffer: reduce-scatter then all-gather,
    /// pipelined.
    fn tcp_all_reduce(
        &mut self,
        parts: &Parts<'_>,
        header: [u8; 24],
        mean: bool,
        deadline: Instant,
    ) -> Result<Vec<f32>, CollectiveError> {
        let (n, r) = (self.world_size, self.rank);
        let (left, right) = self.peers("all_reduce");
        let links = self
            .links
            .as_ref()
            .expect("a world of several ranks has links");
        self.exchange_headers(links, &header, (left, right), deadline)?;
        let total = parts.len();
        let chunk = |c: usize| c * total / n..(c + 1) * total / n;
        // Reduce-scatter: at step s, receive chunk r-s-1 and add this rank's values (the
        // last step leaves this rank with the full sums of chunk r+1); all-gather: at step s,
        // receive the summed chunk r-s. Each received block but the last is forwarded.
        let mut recvs = Vec::with_capacity(2 * (n - 1));
        for step in 0..n - 1 {
            let apply = if step == n - 2 && mean {
                Apply::AddDivide(n as f32)
            } else {
                Apply::Add
            };
            recvs.push(Block {
                range: chunk((r + 2 * n - step - 1) % n),
                apply,
            });
        }
        for step in 0..n - 1 {
            recvs.push(Block {
                range: chunk((r + n - step) % n),
                apply: Apply::Copy,
            });
        }
        let mut sends = vec![chunk(r)];
        sends.extend(recvs[..recvs.len() - 1].iter().map(|b| b.range.clone()));
        // Zeros (fresh pages from the allocator, usually) rather than a copy of the input:
        // the transfer reads this rank's values from the input, and writes every element.
        let mut flat = vec![0f32; total];
        let transfer = Transfer {
            input: Some(parts),
            sends: &sends,
            recvs: &recvs,
            ready_ahead: chunk(r).len(),
        };
        transfer.run(
            &mut flat,
            (&links.right, right),
            (&links.left, left),
            self.config.segment_bytes,
            &mut self.scratch,
            deadline,
        )?;
        Ok(flat)
    }

    /// Shared-memory all-reduce of `parts` into a new buffer.
    #[cfg(target_os = "linux")]
    fn shm_all_reduce(
        &mut self,
        parts: &Parts<'_>,
        header: [u8; 24],
        mean: bool,
        deadline: Instant,
    ) -> Result<Vec<f32>, CollectiveError> {
        let (left, right) = self.peers("all_reduce");
        let links = self
            .links
            .as_ref()
            .expect("a world of several ranks has links");
        let shm = self.shm.as_mut().expect("shared memory is set up");
        let mut sockets_moved = || sockets_moved(links);
        let mut diagnose = || diagnose_links(links, &header, left, right);
        let mut wait = shm::Wait {
            deadline,
            timeout: self.config.op_timeout,
            op: "all_reduce",
            left: left.rank,
            sockets_moved: &mut sockets_moved,
            diagnose: &mut diagnose,
        };
        let total = parts.len();
        let mut out: Vec<f32> = Vec::with_capacity(total);
        shm.all_reduce(
            parts,
            &mut out.spare_capacity_mut()[..total],
            header,
            mean,
            &mut wait,
        )?;
        // SAFETY: a successful all-reduce has written every one of the `total` elements.
        unsafe { out.set_len(total) };
        Ok(out)
    }

    /// Broadcast of `flat` from `root` along the chain `root → root+1 → … → root-1`.
    fn broadcast_flat(
        &mut self,
        flat: &mut [f32],
        root: usize,
        header: [u8; 24],
        deadline: Instant,
    ) -> Result<(), CollectiveError> {
        let (left, right) = self.peers("broadcast");
        let links = self
            .links
            .as_ref()
            .expect("a world of several ranks has links");
        let receives = self.rank != root;
        let sends = right.rank != root;
        if receives {
            let mut theirs = [0u8; 24];
            sock::read_exact(&links.left, &mut theirs, deadline, left)?;
            check_header(&header, &theirs, left.rank, left.op)?;
        }
        if sends {
            sock::write_all(&links.right, &header, deadline, right)?;
        }
        let all = 0..flat.len();
        let recvs = if receives {
            vec![Block {
                range: all.clone(),
                apply: Apply::Copy,
            }]
        } else {
            Vec::new()
        };
        let sends = if sends { vec![all.clone()] } else { Vec::new() };
        let transfer = Transfer {
            input: None,
            sends: &sends,
            recvs: &recvs,
            ready_ahead: if receives { 0 } else { all.len() },
        };
        transfer.run(
            flat,
            (&links.right, right),
            (&links.left, left),
            self.config.segment_bytes,
            &mut self.scratch,
            deadline,
        )
    }

    /// Barrier: `n - 1` rounds of a header passed to the right.
    fn barrier_rounds(&self, seq: u64, deadline: Instant) -> Result<(), CollectiveError> {
        let (left, right) = self.peers("barrier");
        let links = self
            .links
            .as_ref()
            .expect("a world of several ranks has links");
        for round in 0..self.world_size as u64 - 1 {
            let header = encode_header(seq, OP_BARRIER, round);
            self.exchange_headers(links, &header, (left, right), deadline)?;
        }
        Ok(())
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Ranks still waiting in shared memory learn at once that this one is gone (over TCP
        // they see the sockets close).
        #[cfg(target_os = "linux")]
        if let Some(shm) = &self.shm {
            shm.abort();
        }
    }
}

impl Collective for Ring {
    fn backend(&self) -> &'static str {
        "ring"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(
        &mut self,
        tensors: &[Tensor],
        op: ReduceOp,
    ) -> Result<Vec<Tensor>, CollectiveError> {
        check_dtypes(tensors)?;
        let (deadline, seq) = self.start()?;
        if self.world_size == 1 {
            return Ok(tensors.iter().map(Tensor::detach).collect());
        }
        let sources = HostSource::of(tensors)?;
        let parts = Parts::new(&sources);
        let code = match op {
            ReduceOp::Sum => OP_SUM,
            ReduceOp::Mean => OP_MEAN,
        };
        let header = encode_header(seq, code, parts.len() as u64);
        let mean = op == ReduceOp::Mean;
        #[cfg(target_os = "linux")]
        if self.shm.is_some() {
            let result = self.shm_all_reduce(&parts, header, mean, deadline);
            drop(parts);
            drop(sources);
            return match result {
                Ok(flat) => from_host(tensors, flat),
                Err(e) => Err(self.fail(e)),
            };
        }
        let result = self.tcp_all_reduce(&parts, header, mean, deadline);
        drop(parts);
        drop(sources);
        match result {
            Ok(flat) => from_host(tensors, flat),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn broadcast(
        &mut self,
        tensors: &[Tensor],
        root: usize,
    ) -> Result<Vec<Tensor>, CollectiveError> {
        check_root(root, self.world_size)?;
        check_dtypes(tensors)?;
        let (deadline, seq) = self.start()?;
        if self.world_size == 1 {
            return Ok(tensors.iter().map(Tensor::detach).collect());
        }
        let sources = HostSource::of(tensors)?;
        let mut flat = Parts::new(&sources).to_vec();
        drop(sources);
        let header = encode_header(seq, OP_BROADCAST | ((root as u64) << 8), flat.len() as u64);
        if let Err(e) = self.broadcast_flat(&mut flat, root, header, deadline) {
            return Err(self.fail(e));
        }
        from_host(tensors, flat)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let (deadline, seq) = self.start()?;
        if self.world_size == 1 {
            return Ok(());
        }
        self.barrier_rounds(seq, deadline).map_err(|e| self.fail(e))
    }
}

/// Whether either neighbour's socket has something to read or hung up, without waiting.
#[cfg(target_os = "linux")]
fn sockets_moved(links: &Links) -> bool {
    let mut fds = [
        sock::pollfd(&links.left, libc::POLLIN | libc::POLLRDHUP),
        sock::pollfd(&links.right, libc::POLLIN | libc::POLLRDHUP),
    ];
    // SAFETY: `fds` is a valid array of two pollfds; a timeout of 0 does not block.
    unsafe { libc::poll(fds.as_mut_ptr(), 2, 0) > 0 }
}

/// Why a neighbour's socket moved during a shared-memory collective (where nothing travels
/// over TCP): the left one sent a header (it runs another collective) or closed, or the
/// right one closed.
#[cfg(target_os = "linux")]
fn diagnose_links(links: &Links, ours: &[u8; 24], left: Peer, right: Peer) -> CollectiveError {
    let mut fds = [
        sock::pollfd(&links.left, libc::POLLIN | libc::POLLRDHUP),
        sock::pollfd(&links.right, libc::POLLIN | libc::POLLRDHUP),
    ];
    // SAFETY: as in `sockets_moved`.
    unsafe { libc::poll(fds.as_mut_ptr(), 2, 0) };
    if fds[0].revents == 0 {
        return right.closed();
    }
    let mut theirs = [0u8; 24];
    let mut got = 0;
    // The header may still be on its way: give it a moment.
    let until = Instant::now() + Duration::from_millis(100);
    while got < theirs.len() {
        match (&links.left).read(&mut theirs[got..]) {
            Ok(0) => return left.closed(),
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fd = [sock::pollfd(&links.left, libc::POLLIN)];
                if !sock::poll(&mut fd, until).unwrap_or(false) {
                    break;
                }
            }
            Err(e) => return left.io(e),
        }
    }
    if got == theirs.len() {
        if let Err(e) = check_header(ours, &theirs, left.rank, left.op) {
            return e;
        }
    }
    left.failed("ranks disagree: the peer sent data during a shared-memory all_reduce".into())
}

/// Decides, with every rank, whether `all_reduce` runs through shared memory: rank 0 creates
/// a segment and sends its name and token around the ring, each rank maps it if it can
/// (and may), and the verdict (all could) goes around a second time. Rank 0 unlinks the
/// segment once it is back (every rank has mapped it by then, or never will).
#[cfg(target_os = "linux")]
fn negotiate_shared_memory(
    links: &Links,
    rank: usize,
    n: usize,
    cfg: &RingConfig,
    deadline: Instant,
) -> Result<Option<shm::Shm>, CollectiveError> {
    let (left, right) = negotiation_peers(rank, n, cfg);
    if rank == 0 {
        let created = if cfg.shared_memory {
            shm::Shm::create(n).ok()
        } else {
            None
        };
        let (name, token) = match &created {
            Some((_, path, token)) => (path.to_string_lossy().into_owned(), token.to_vec()),
            None => (String::new(), vec![0u8; shm::TOKEN_BYTES]),
        };
        let rounds = (|| -> Result<bool, CollectiveError> {
            write_offer(links, created.is_some(), &name, &token, right, deadline)?;
            let (all, _, _) = read_offer(links, left, deadline)?;
            sock::write_all(&links.right, &[all as u8], deadline, right)?;
            let mut echo = [0u8; 1];
            sock::read_exact(&links.left, &mut echo, deadline, left)?;
            Ok(all)
        })();
        if let Some((_, path, _)) = &created {
            let _ = std::fs::remove_file(path);
        }
        let all = rounds?;
        Ok(created.filter(|_| all).map(|(shm, _, _)| shm))
    } else {
        let (ok, name, token) = read_offer(links, left, deadline)?;
        let mapped = if ok && cfg.shared_memory {
            shm::Shm::open(std::path::Path::new(&name), &token, rank, n).ok()
        } else {
            None
        };
        write_offer(links, mapped.is_some(), &name, &token, right, deadline)?;
        let mut verdict = [0u8; 1];
        sock::read_exact(&links.left, &mut verdict, deadline, left)?;
        sock::write_all(&links.right, &verdict, deadline, right)?;
        Ok(mapped.filter(|_| verdict[0] == 1))
    }
}

/// Off Linux there is no shared-memory path; the ranks still run the negotiation (rank 0
/// offers nothing), so that every platform speaks the same protocol.
#[cfg(not(target_os = "linux"))]
fn negotiate_shared_memory(
    links: &Links,
    rank: usize,
    n: usize,
    cfg: &RingConfig,
    deadline: Instant,
) -> Result<(), CollectiveError> {
    let (left, right) = negotiation_peers(rank, n, cfg);
    if rank == 0 {
        write_offer(links, false, "", &[0u8; 16], right, deadline)?;
        read_offer(links, left, deadline)?;
        sock::write_all(&links.right, &[0], deadline, right)?;
        sock::read_exact(&links.left, &mut [0u8; 1], deadline, left)?;
    } else {
        let (_, name, token) = read_offer(links, left, deadline)?;
        write_offer(links, false, &name, &token, right, deadline)?;
        let mut verdict = [0u8; 1];
        sock::read_exact(&links.left, &mut verdict, deadline, left)?;
        sock::write_all(&links.right, &verdict, deadline, right)?;
    }
    Ok(())
}

fn negotiation_peers(rank: usize, n: usize, cfg: &RingConfig) -> (Peer, Peer) {
    let peer = |rank| Peer {
        rank,
        op: "connect",
        timeout: cfg.connect_timeout,
    };
    (peer((rank + n - 1) % n), peer((rank + 1) % n))
}

/// Sends a shared-memory offer: whether every rank so far can use it, the segment's name and
/// its token.
fn write_offer(
    links: &Links,
    ok: bool,
    name: &str,
    token: &[u8],
    right: Peer,
    deadline: Instant,
) -> Result<(), CollectiveError> {
    let mut msg = Vec::with_capacity(5 + name.len() + token.len());
    msg.push(ok as u8);
    msg.extend_from_slice(&(name.len() as u16).to_le_bytes());
    msg.extend_from_slice(name.as_bytes());
    msg.extend_from_slice(&(token.len() as u16).to_le_bytes());
    msg.extend_from_slice(token);
    sock::write_all(&links.right, &msg, deadline, right)
}

/// Reads a shared-memory offer from the left neighbour.
fn read_offer(
    links: &Links,
    left: Peer,
    deadline: Instant,
) -> Result<(bool, String, Vec<u8>), CollectiveError> {
    let mut head = [0u8; 3];
    sock::read_exact(&links.left, &mut head, deadline, left)?;
    let len = u16::from_le_bytes([head[1], head[2]]) as usize;
    if len > MAX_SHM_NAME {
        return Err(left.failed(format!("shared memory name of {len} bytes is too long")));
    }
    let mut name = vec![0u8; len];
    sock::read_exact(&links.left, &mut name, deadline, left)?;
    let mut tlen = [0u8; 2];
    sock::read_exact(&links.left, &mut tlen, deadline, left)?;
    let tlen = u16::from_le_bytes(tlen) as usize;
    if tlen > 64 {
        return Err(left.failed(format!("shared memory token of {tlen} bytes is too long")));
    }
    let mut token = vec![0u8; tlen];
    sock::read_exact(&links.left, &mut token, deadline, left)?;
    let name = String::from_utf8(name)
        .map_err(|_| left.failed("shared memory name is not UTF-8".into()))?;
    Ok((head[0] == 1, name, token))
}

/// A tensor's values on the host: borrowed from its CPU storage when it is contiguous, else
/// copied out.
enum HostSource<'t> {
    Borrowed(candle_core::StorageRef<'t>, Range<usize>),
    Owned(Vec<f32>),
}

impl<'t> HostSource<'t> {
    fn of(tensors: &'t [Tensor]) -> Result<Vec<Self>, CollectiveError> {
        tensors
            .iter()
            .map(|t| {
                let borrowed = {
                    let (storage, layout) = t.storage_and_layout();
                    let cpu_f32 = matches!(&*storage, Storage::Cpu(CpuStorage::F32(_)));
                    match (cpu_f32, layout.contiguous_offsets()) {
                        (true, Some((a, b))) => Some(HostSource::Borrowed(storage, a..b)),
                        _ => None,
                    }
                };
                Ok(match borrowed {
                    Some(b) => b,
                    None => HostSource::Owned(t.flatten_all()?.to_vec1::<f32>()?),
                })
            })
            .collect()
    }

    fn values(&self) -> &[f32] {
        match self {
            HostSource::Borrowed(storage, range) => match &**storage {
                Storage::Cpu(CpuStorage::F32(v)) => &v[range.clone()],
                // `of` borrows only f32 CPU storage.
                _ => &[],
            },
            HostSource::Owned(v) => v,
        }
    }
}

/// The concatenation of several host slices (the fused tensors), without copying them.
#[derive(Debug)]
struct Parts<'a> {
    parts: Vec<&'a [f32]>,
    /// Index of each part's first element in the concatenation.
    starts: Vec<usize>,
    len: usize,
}

impl<'a> Parts<'a> {
    fn new(sources: &'a [HostSource<'_>]) -> Self {
        let parts: Vec<&[f32]> = sources.iter().map(HostSource::values).collect();
        let mut starts = Vec::with_capacity(parts.len());
        let mut len = 0;
        for p in &parts {
            starts.push(len);
            len += p.len();
        }
        Self { parts, starts, len }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Calls `f(index, values)` for the pieces of `range` of the concatenation, in order
    /// (`index`: the piece's first element in the concatenation).
    fn for_each(&self, range: Range<usize>, mut f: impl FnMut(usize, &[f32])) {
        if range.is_empty() {
            return;
        }
        let mut i = self.starts.partition_point(|&s| s <= range.start) - 1;
        let mut at = range.start;
        while at < range.end {
            let (p, s) = (self.parts[i], self.starts[i]);
            let end = (s + p.len()).min(range.end);
            if end > at {
                f(at, &p[at - s..end - s]);
                at = end;
            }
            i += 1;
        }
    }

    /// The values from element `at` to the end of the part holding it.
    fn from(&self, at: usize) -> &'a [f32] {
        if at >= self.len {
            return &[];
        }
        let i = self.starts.partition_point(|&s| s <= at) - 1;
        &self.parts[i][at - self.starts[i]..]
    }

    fn to_vec(&self) -> Vec<f32> {
        let mut v = Vec::with_capacity(self.len);
        self.for_each(0..self.len, |_, p| v.extend_from_slice(p));
        v
    }
}

/// Tensors of the shapes and devices of `like`, with the values of `flat` in order: one
/// tensor over `flat` (no copy on the CPU), and each result a view of its part.
fn from_host(like: &[Tensor], flat: Vec<f32>) -> Result<Vec<Tensor>, CollectiveError> {
    if let [t] = like {
        return Ok(vec![Tensor::from_vec(flat, t.shape(), t.device())?]);
    }
    let Some(first) = like.first() else {
        return Ok(Vec::new());
    };
    let len = flat.len();
    let all = Tensor::from_vec(flat, len, first.device())?;
    let mut off = 0;
    like.iter()
        .map(|t| {
            let n = t.elem_count();
            let part = all.narrow(0, off, n)?.reshape(t.shape())?;
            off += n;
            if t.device().same_device(first.device()) {
                Ok(part)
            } else {
                Ok(part.to_device(t.device())?)
            }
        })
        .collect()
}

fn encode_header(seq: u64, op: u64, len: u64) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[..8].copy_from_slice(&seq.to_le_bytes());
    h[8..16].copy_from_slice(&op.to_le_bytes());
    h[16..].copy_from_slice(&len.to_le_bytes());
    h
}

fn describe_header(h: &[u8; 24]) -> String {
    let word = |i: usize| u64::from_le_bytes(h[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let (seq, op, len) = (word(0), word(1), word(2));
    let name = match op & 0xff {
        OP_SUM => "all_reduce(sum)".to_string(),
        OP_MEAN => "all_reduce(mean)".to_string(),
        OP_BROADCAST => format!("broadcast(root {})", op >> 8),
        OP_BARRIER => "barrier".to_string(),
        other => format!("unknown operation {other}"),
    };
    format!("collective #{seq} {name} of {len}")
}

/// Checks that the left neighbour runs the same collective as this rank.
fn check_header(
    ours: &[u8; 24],
    theirs: &[u8; 24],
    peer: usize,
    op: &'static str,
) -> Result<(), CollectiveError> {
    if ours == theirs {
        return Ok(());
    }
    Err(CollectiveError::PeerFailed {
        peer,
        op,
        reason: format!(
            "ranks disagree: rank {peer} runs {}, this rank {}",
            describe_header(theirs),
            describe_header(ours)
        ),
    })
}

fn configure(stream: &TcpStream, cfg: &RingConfig) -> io::Result<()> {
    stream.set_nodelay(true)?;
    if cfg.socket_buffer_bytes > 0 {
        let sock = socket2::SockRef::from(stream);
        // Best effort: the kernel caps the sizes (net.core.wmem_max / rmem_max).
        let _ = sock.set_send_buffer_size(cfg.socket_buffer_bytes);
        let _ = sock.set_recv_buffer_size(cfg.socket_buffer_bytes);
    }
    Ok(())
}

fn write_hello(stream: &mut TcpStream, h: &Hello) -> io::Result<()> {
    let mut msg = Vec::with_capacity(24 + h.attempt.len());
    msg.extend_from_slice(MAGIC);
    msg.extend_from_slice(&(h.attempt.len() as u16).to_le_bytes());
    msg.extend_from_slice(h.attempt.as_bytes());
    msg.extend_from_slice(&(h.rank as u32).to_le_bytes());
    msg.extend_from_slice(&(h.world_size as u32).to_le_bytes());
    stream.write_all(&msg)
}

/// Reads a handshake; `Ok(Err(why))` if the bytes are not a valid one.
fn read_hello(stream: &mut TcpStream) -> io::Result<Result<Hello, String>> {
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Ok(Err("not a Trainyard ring peer (bad magic)".into()));
    }
    let mut len = [0u8; 2];
    stream.read_exact(&mut len)?;
    let len = u16::from_le_bytes(len) as usize;
    if len > MAX_TOKEN {
        return Ok(Err(format!("attempt token of {len} bytes is too long")));
    }
    let mut token = vec![0u8; len];
    stream.read_exact(&mut token)?;
    let mut nums = [0u8; 8];
    stream.read_exact(&mut nums)?;
    let Ok(attempt) = String::from_utf8(token) else {
        return Ok(Err("attempt token is not UTF-8".into()));
    };
    Ok(Ok(Hello {
        attempt,
        rank: u32::from_le_bytes(nums[..4].try_into().expect("4 bytes")) as usize,
        world_size: u32::from_le_bytes(nums[4..].try_into().expect("4 bytes")) as usize,
    }))
}

/// Why a peer's handshake does not fit this rank's, if it does not.
fn mismatch(theirs: &Hello, me: &Hello, expected_rank: usize) -> Option<String> {
    if theirs.attempt != me.attempt {
        Some(format!(
            "job attempt {:?} of rank {} does not match this rank's attempt {:?}",
            theirs.attempt, theirs.rank, me.attempt
        ))
    } else if theirs.world_size != me.world_size {
        Some(format!(
            "world size {} of rank {} does not match this rank's world size {}",
            theirs.world_size, theirs.rank, me.world_size
        ))
    } else if theirs.rank != expected_rank {
        Some(format!(
            "rank {} connected where rank {expected_rank} was expected",
            theirs.rank
        ))
    } else {
        None
    }
}

/// Accepts the left neighbour: refuses (and keeps waiting past) peers whose handshake does
/// not match.
fn accept_left(
    listener: &TcpListener,
    left_rank: usize,
    me: &Hello,
    cfg: &RingConfig,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<TcpStream, CollectiveError> {
    let fail = |reason: String| CollectiveError::PeerFailed {
        peer: left_rank,
        op: "accept",
        reason,
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| fail(e.to_string()))?;
    if cfg.socket_buffer_bytes > 0 {
        let _ = socket2::SockRef::from(listener).set_recv_buffer_size(cfg.socket_buffer_bytes);
    }
    let mut last_refusal: Option<String> = None;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(match last_refusal {
                Some(reason) => CollectiveError::HandshakeRefused {
                    peer: left_rank,
                    reason,
                },
                None => fail("cancelled: connecting to the right neighbour failed".into()),
            });
        }
        match listener.accept() {
            Ok((mut stream, addr)) => {
                let handshake = (|| -> io::Result<Option<String>> {
                    stream.set_nonblocking(false)?;
                    configure(&stream, cfg)?;
                    let left = deadline.saturating_duration_since(Instant::now());
                    stream.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                    stream.set_write_timeout(Some(left.max(Duration::from_millis(1))))?;
                    let why = match read_hello(&mut stream)? {
                        Err(why) => Some(why),
                        Ok(theirs) => mismatch(&theirs, me, left_rank),
                    };
                    match &why {
                        None => {
                            stream.write_all(&[0])?;
                            write_hello(&mut stream, me)?;
                        }
                        Some(why) => {
                            let bytes = &why.as_bytes()[..why.len().min(MAX_TOKEN)];
                            stream.write_all(&[1])?;
                            stream.write_all(&(bytes.len() as u16).to_le_bytes())?;
                            stream.write_all(bytes)?;
                        }
                    }
                    Ok(why)
                })();
                match handshake {
                    Ok(None) => return Ok(stream),
                    Ok(Some(why)) => last_refusal = Some(format!("{addr}: {why}")),
                    Err(e) => last_refusal = Some(format!("{addr}: handshake failed: {e}")),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(e.to_string())),
        }
        if Instant::now() >= deadline {
            return Err(match last_refusal {
                Some(reason) => CollectiveError::HandshakeRefused {
                    peer: left_rank,
                    reason: format!("{reason} (no valid peer connected in time)"),
                },
                None => CollectiveError::PeerTimeout {
                    peer: left_rank,
                    op: "accept",
                    timeout: cfg.connect_timeout,
                },
            });
        }
    }
}

/// Connects to the right neighbour, retrying with backoff until `deadline`.
fn connect_right(
    addr: SocketAddr,
    right_rank: usize,
    me: &Hello,
    cfg: &RingConfig,
    deadline: Instant,
) -> Result<TcpStream, CollectiveError> {
    let mut backoff = Duration::from_millis(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(CollectiveError::PeerTimeout {
                peer: right_rank,
                op: "connect",
                timeout: cfg.connect_timeout,
            });
        }
        if let Ok(stream) = TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(2))) {
            match handshake_right(stream, right_rank, me, cfg, deadline) {
                // A reset or timeout in the handshake may be a peer that is restarting.
                Err(CollectiveError::PeerFailed { .. }) => {}
                result => return result,
            }
        }
        std::thread::sleep(backoff.min(left));
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

fn handshake_right(
    mut stream: TcpStream,
    right_rank: usize,
    me: &Hello,
    cfg: &RingConfig,
    deadline: Instant,
) -> Result<TcpStream, CollectiveError> {
    let fail = |e: io::Error| CollectiveError::PeerFailed {
        peer: right_rank,
        op: "handshake",
        reason: e.to_string(),
    };
    configure(&stream, cfg).map_err(fail)?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left)).map_err(fail)?;
    stream.set_write_timeout(Some(left)).map_err(fail)?;
    write_hello(&mut stream, me).map_err(fail)?;
    let mut status = [0u8; 1];
    stream.read_exact(&mut status).map_err(fail)?;
    if status[0] != 0 {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).map_err(fail)?;
        let mut why = vec![0u8; u16::from_le_bytes(len) as usize];
        stream.read_exact(&mut why).map_err(fail)?;
        return Err(CollectiveError::HandshakeRefused {
            peer: right_rank,
            reason: format!(
                "rank {right_rank} refused: {}",
                String::from_utf8_lossy(&why)
            ),
        });
    }
    match read_hello(&mut stream).map_err(fail)? {
        Err(why) => Err(CollectiveError::HandshakeRefused {
            peer: right_rank,
            reason: why,
        }),
        Ok(theirs) => match mismatch(&theirs, me, right_rank) {
            Some(why) => Err(CollectiveError::HandshakeRefused {
                peer: right_rank,
                reason: why,
            }),
            None => Ok(stream),
        },
    }
}

#[cfg(test)]
mod tests;
