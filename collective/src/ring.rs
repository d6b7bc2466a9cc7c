//! [`Ring`]: the TCP ring backend of [`Collective`], for CPU ranks in separate processes (on
//! one worker or several).
//!
//! Setup: every rank listens on a port (its worker reports it), and the rendezvous hands
//! every rank the listen addresses of all ranks, its rank and the job attempt's token. Each
//! rank connects to its right neighbour (`rank + 1`) and accepts from its left one
//! (`rank - 1`); both sides exchange a handshake (magic, attempt token, rank, world size)
//! and refuse a peer whose attempt, world size or rank does not match, so ranks of an old
//! attempt can never join a new one. Connecting retries with backoff until
//! [`RingConfig::connect_timeout`].
//!
//! `all_reduce` copies the tensors into one host `f32` buffer (fusing them, as gradient
//! bucketing does), runs a ring reduce-scatter then a ring all-gather over `n` chunks of it
//! (each rank sends `2(n-1)/n` of the buffer, the bandwidth optimum), and copies the result
//! back into tensors on the inputs' devices. The chunks are cut into segments
//! ([`RingConfig::segment_bytes`]) that are pipelined: a sender thread forwards each segment
//! as soon as the receiving thread has reduced it, so sending, receiving and reducing
//! overlap. `broadcast` pipelines the segments along the chain `root → root+1 → …`;
//! `barrier` passes a token `n - 1` times around the ring.
//!
//! Every operation starts with a small header (sequence number, operation, length) that the
//! neighbours check against their own, so ranks that call different collectives fail with
//! an error instead of exchanging garbage. Every operation has a deadline
//! ([`RingConfig::op_timeout`]): a dead, stuck or absent peer turns into
//! [`CollectiveError::PeerTimeout`] or [`CollectiveError::PeerFailed`] naming the peer, and
//! a rank that fails shuts its sockets so that its neighbours fail at once too. After an
//! error the ring is broken: every later operation fails (the attempt must restart).
//!
//! Data travels in the host's byte order; all ranks of a job must share it (every platform
//! we run on is little-endian).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::{check_dtypes, check_rank, check_root, Collective, CollectiveError, ReduceOp};

/// First bytes of a handshake: identifies a Trainyard ring peer and the protocol version.
const MAGIC: &[u8; 8] = b"TYRING01";
/// Longest attempt token accepted in a handshake.
const MAX_TOKEN: usize = 1024;

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
    /// Size of the pipelined segments of a transfer, in bytes (default 256 KiB).
    pub segment_bytes: usize,
    /// Kernel send and receive buffer size of the sockets, in bytes (default 4 MiB; 0 leaves
    /// the kernel's autotuning alone).
    pub socket_buffer_bytes: usize,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(60),
            op_timeout: Duration::from_secs(30),
            segment_bytes: 256 * 1024,
            socket_buffer_bytes: 4 * 1024 * 1024,
        }
    }
}

/// The two connections of a rank of a world of at least two.
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

/// The TCP ring backend of [`Collective`]: one rank's connections to its two neighbours.
#[derive(Debug)]
pub struct Ring {
    rank: usize,
    world_size: usize,
    config: RingConfig,
    /// `None` in a world of one.
    links: Option<Links>,
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
        match (left, right) {
            (Ok(left), Ok(right)) => {
                ring.links = Some(Links { right, left });
                Ok(ring)
            }
            (l, r) if refused(&l) && !refused(&r) => Err(l.unwrap_err()),
            (_, Err(e)) => Err(e),
            (Err(e), _) => Err(e),
        }
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

    /// Records the error of an operation: the ring is broken, the neighbours are told by
    /// closing the sockets.
    fn fail(&mut self, e: CollectiveError) -> CollectiveError {
        if let Some(links) = &self.links {
            links.shutdown();
        }
        self.broken = Some(e.to_string());
        e
    }

    fn peers(&self) -> (usize, usize) {
        let n = self.world_size;
        ((self.rank + n - 1) % n, (self.rank + 1) % n)
    }

    fn segment_elems(&self) -> usize {
        (self.config.segment_bytes / 4).max(1)
    }

    /// Ring all-reduce of the segments; `chunks[c]` are the segment indices of chunk `c`.
    fn all_reduce_segments(
        &self,
        segs: &[Mutex<&mut [f32]>],
        seg_lens: &[usize],
        chunks: &[Range<usize>],
        header: [u8; 24],
        mean: bool,
        deadline: Instant,
    ) -> Result<(), CollectiveError> {
        const OP: &str = "all_reduce";
        let n = self.world_size;
        let r = self.rank;
        let (left_rank, right_rank) = self.peers();
        let links = self
            .links
            .as_ref()
            .expect("a world of several ranks has links");
        let timeout = self.config.op_timeout;
        let first_error: Mutex<Option<CollectiveError>> = Mutex::new(None);
        let record = |e: CollectiveError| {
            let mut first = first_error.lock().unwrap_or_else(|p| p.into_inner());
            if first.is_none() {
                *first = Some(e);
                links.shutdown();
            }
        };
        let (tx, rx) = mpsc::channel::<usize>();
        std::thread::scope(|s| {
            s.spawn(|| {
                let send = || -> Result<(), CollectiveError> {
                    let mut w = &links.right;
                    let err = |e| io_error(e, right_rank, OP, timeout);
                    set_deadline(&links.right, false, deadline, right_rank, OP, timeout)?;
                    w.write_all(&header).map_err(err)?;
                    let own = chunks[r].clone();
                    for i in own.chain(rx) {
                        set_deadline(&links.right, false, deadline, right_rank, OP, timeout)?;
                        let seg = segs[i].lock().unwrap_or_else(|p| p.into_inner());
                        w.write_all(bytemuck::cast_slice(&seg[..])).map_err(err)?;
                    }
                    Ok(())
                };
                if let Err(e) = send() {
                    record(e);
                }
            });
            let receive = || -> Result<(), CollectiveError> {
                let mut rd = &links.left;
                let err = |e| io_error(e, left_rank, OP, timeout);
                set_deadline(&links.left, true, deadline, left_rank, OP, timeout)?;
                let mut theirs = [0u8; 24];
                rd.read_exact(&mut theirs).map_err(err)?;
                check_header(&header, &theirs, left_rank, OP)?;
                let mut scratch = vec![0f32; seg_lens.iter().copied().max().unwrap_or(0)];
                let seg_len = |i: usize| seg_lens[i];
                let div = n as f32;
                // Reduce-scatter: at step s, receive chunk r-s-1 and add this rank's values.
                for step in 0..n - 1 {
                    let c = (r + 2 * n - step - 1) % n;
                    let last = step == n - 2;
                    for i in chunks[c].clone() {
                        set_deadline(&links.left, true, deadline, left_rank, OP, timeout)?;
                        // Read before locking: the sender may still hold the segment.
                        let buf = &mut scratch[..seg_len(i)];
                        rd.read_exact(bytemuck::cast_slice_mut(buf)).map_err(err)?;
                        let mut seg = segs[i].lock().unwrap_or_else(|p| p.into_inner());
                        if last && mean {
                            seg.iter_mut()
                                .zip(buf.iter())
                                .for_each(|(a, b)| *a = (*a + b) / div);
                        } else {
                            seg.iter_mut().zip(buf.iter()).for_each(|(a, b)| *a += b);
                        }
                        drop(seg);
                        // The sender forwards it at the next step (it fails on its own).
                        let _ = tx.send(i);
                    }
                }
                // All-gather: at step s, receive the reduced chunk r-s.
                for step in 0..n - 1 {
                    let c = (r + n - step) % n;
                    let last = step == n - 2;
                    for i in chunks[c].clone() {
                        set_deadline(&links.left, true, deadline, left_rank, OP, timeout)?;
                        // Read before locking: this rank's sender may not have sent its
                        // own values of the segment yet (the peer's come from them).
                        let buf = &mut scratch[..seg_len(i)];
                        rd.read_exact(bytemuck::cast_slice_mut(buf)).map_err(err)?;
                        let mut seg = segs[i].lock().unwrap_or_else(|p| p.into_inner());
                        seg.copy_from_slice(buf);
                        drop(seg);
                        if !last {
                            let _ = tx.send(i);
                        }
                    }
                }
                Ok(())
            };
            let result = receive();
            drop(tx);
            if let Err(e) = result {
                record(e);
            }
        });
        match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Broadcast of `segs` from `root` along the chain `root → root+1 → … → root-1`.
    fn broadcast_segments(
        &self,
        flat: &mut [f32],
        root: usize,
        header: [u8; 24],
        deadline: Instant,
    ) -> Result<(), CollectiveError> {
        const OP: &str = "broadcast";
        let (left_rank, right_rank) = self.peers();
        let links = self
            .links
            .as_ref()
            .expect("a world of several ranks has links");
        let timeout = self.config.op_timeout;
        let receives = self.rank != root;
        let sends = right_rank != root;
        let mut w = &links.right;
        let mut rd = &links.left;
        let werr = |e| io_error(e, right_rank, OP, timeout);
        let rerr = |e| io_error(e, left_rank, OP, timeout);
        if receives {
            set_deadline(&links.left, true, deadline, left_rank, OP, timeout)?;
            let mut theirs = [0u8; 24];
            rd.read_exact(&mut theirs).map_err(rerr)?;
            check_header(&header, &theirs, left_rank, OP)?;
        }
        if sends {
            set_deadline(&links.right, false, deadline, right_rank, OP, timeout)?;
            w.write_all(&header).map_err(werr)?;
        }
        for seg in flat.chunks_mut(self.segment_elems()) {
            if receives {
                set_deadline(&links.left, true, deadline, left_rank, OP, timeout)?;
                rd.read_exact(bytemuck::cast_slice_mut(seg)).map_err(rerr)?;
            }
            if sends {
                set_deadline(&links.right, false, deadline, right_rank, OP, timeout)?;
                w.write_all(bytemuck::cast_slice(seg)).map_err(werr)?;
            }
        }
        Ok(())
    }

    /// Barrier: `n - 1` rounds of a header passed to the right.
    fn barrier_rounds(&self, seq: u64, deadline: Instant) -> Result<(), CollectiveError> {
        const OP: &str = "barrier";
        let (left_rank, right_rank) = self.peers();
        let links = self
            .links
            .as_ref()
            .expect("a world of several ranks has links");
        let timeout = self.config.op_timeout;
        let mut w = &links.right;
        let mut rd = &links.left;
        for round in 0..self.world_size as u64 - 1 {
            let header = encode_header(seq, OP_BARRIER, round);
            set_deadline(&links.right, false, deadline, right_rank, OP, timeout)?;
            w.write_all(&header)
                .map_err(|e| io_error(e, right_rank, OP, timeout))?;
            set_deadline(&links.left, true, deadline, left_rank, OP, timeout)?;
            let mut theirs = [0u8; 24];
            rd.read_exact(&mut theirs)
                .map_err(|e| io_error(e, left_rank, OP, timeout))?;
            check_header(&header, &theirs, left_rank, OP)?;
        }
        Ok(())
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
        let host = to_host(tensors)?;
        let total: usize = host.iter().map(Vec::len).sum();
        let n = self.world_size;
        // Chunk c is [c*total/n, (c+1)*total/n), cut into segments.
        let seg_elems = self.segment_elems();
        let mut seg_lens = Vec::new();
        let mut chunks = Vec::with_capacity(n);
        for c in 0..n {
            let len = (c + 1) * total / n - c * total / n;
            let first = seg_lens.len();
            let mut left = len;
            while left > 0 {
                let l = left.min(seg_elems);
                seg_lens.push(l);
                left -= l;
            }
            chunks.push(first..seg_lens.len());
        }
        let mut flat = fuse(host);
        let mut segs = Vec::with_capacity(seg_lens.len());
        let mut rest = flat.as_mut_slice();
        for &len in &seg_lens {
            let (seg, tail) = rest.split_at_mut(len);
            segs.push(Mutex::new(seg));
            rest = tail;
        }
        let code = match op {
            ReduceOp::Sum => OP_SUM,
            ReduceOp::Mean => OP_MEAN,
        };
        let header = encode_header(seq, code, total as u64);
        let mean = op == ReduceOp::Mean;
        if let Err(e) = self.all_reduce_segments(&segs, &seg_lens, &chunks, header, mean, deadline)
        {
            return Err(self.fail(e));
        }
        drop(segs);
        from_host(tensors, flat)
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
        let host = to_host(tensors)?;
        let total: usize = host.iter().map(Vec::len).sum();
        let mut flat = fuse(host);
        let header = encode_header(seq, OP_BROADCAST | ((root as u64) << 8), total as u64);
        if let Err(e) = self.broadcast_segments(&mut flat, root, header, deadline) {
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

/// The tensors' values on the host, each flattened.
fn to_host(tensors: &[Tensor]) -> Result<Vec<Vec<f32>>, CollectiveError> {
    tensors
        .iter()
        .map(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
        .collect()
}

/// The concatenation of `host` (without a copy for a single tensor).
fn fuse(mut host: Vec<Vec<f32>>) -> Vec<f32> {
    if host.len() == 1 {
        return host.pop().expect("one tensor");
    }
    host.concat()
}

/// Tensors of the shapes and devices of `like`, with the values of `flat` in order (without
/// a copy for a single tensor).
fn from_host(like: &[Tensor], flat: Vec<f32>) -> Result<Vec<Tensor>, CollectiveError> {
    if let [t] = like {
        return Ok(vec![Tensor::from_vec(flat, t.shape(), t.device())?]);
    }
    let mut off = 0;
    like.iter()
        .map(|t| {
            let len = t.elem_count();
            let v = flat[off..off + len].to_vec();
            off += len;
            Ok(Tensor::from_vec(v, t.shape(), t.device())?)
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

/// Sets the socket's read (or write) timeout to what is left until `deadline`.
fn set_deadline(
    stream: &TcpStream,
    read: bool,
    deadline: Instant,
    peer: usize,
    op: &'static str,
    timeout: Duration,
) -> Result<(), CollectiveError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left < Duration::from_millis(1) {
        return Err(CollectiveError::PeerTimeout { peer, op, timeout });
    }
    let r = if read {
        stream.set_read_timeout(Some(left))
    } else {
        stream.set_write_timeout(Some(left))
    };
    r.map_err(|e| io_error(e, peer, op, timeout))
}

fn io_error(e: io::Error, peer: usize, op: &'static str, timeout: Duration) -> CollectiveError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            CollectiveError::PeerTimeout { peer, op, timeout }
        }
        io::ErrorKind::UnexpectedEof => CollectiveError::PeerFailed {
            peer,
            op,
            reason: "the peer closed the connection".into(),
        },
        _ => CollectiveError::PeerFailed {
            peer,
            op,
            reason: e.to_string(),
        },
    }
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
