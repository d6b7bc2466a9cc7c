//! Socket I/O of the TCP ring: non-blocking sockets driven by `poll(2)` with a deadline, and
//! [`Transfer`], the single-threaded engine that pipelines a ring step's sending, receiving
//! and reducing.
//!
//! One thread per rank does all three: it writes whatever part of the outgoing stream is
//! ready, reads whatever has arrived (reducing it straight from a small, cache-resident
//! scratch buffer into the accumulation buffer, or reading it straight into place when it is
//! final), and sleeps in `poll` only when neither socket can make progress. Forwarding is
//! element-granular: a reduced element can be sent as soon as it is written. There is no
//! helper thread to start, hand segments to or lock against.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::Parts;
use crate::CollectiveError;

/// The rank at the other end of a socket and the operation running, for errors.
#[derive(Debug, Clone, Copy)]
pub(super) struct Peer {
    /// The peer's rank.
    pub rank: usize,
    /// The collective, e.g. `all_reduce`.
    pub op: &'static str,
    /// The operation's timeout (reported in [`CollectiveError::PeerTimeout`]).
    pub timeout: Duration,
}

impl Peer {
    /// The peer made no progress before the deadline.
    pub fn timed_out(&self) -> CollectiveError {
        CollectiveError::PeerTimeout {
            peer: self.rank,
            op: self.op,
            timeout: self.timeout,
        }
    }

    /// The peer closed the connection.
    pub fn closed(&self) -> CollectiveError {
        self.failed("the peer closed the connection".into())
    }

    /// The connection with the peer failed for `reason`.
    pub fn failed(&self, reason: String) -> CollectiveError {
        CollectiveError::PeerFailed {
            peer: self.rank,
            op: self.op,
            reason,
        }
    }

    /// An I/O error on the connection with the peer.
    pub fn io(&self, e: io::Error) -> CollectiveError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => self.timed_out(),
            io::ErrorKind::UnexpectedEof => self.closed(),
            _ => self.failed(e.to_string()),
        }
    }
}

/// Waits until one of `fds` has an event or `deadline` passes (`Ok(false)`).
pub(super) fn poll(fds: &mut [libc::pollfd], deadline: Instant) -> io::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        // Round up: a timeout of 0 ms would spin.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfds.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc > 0 {
            return Ok(true);
        }
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// A pollfd for `stream` waiting for `events`.
pub(super) fn pollfd(stream: &TcpStream, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd: stream.as_raw_fd(),
        events,
        revents: 0,
    }
}

/// Waits until `stream` is ready for `events`, or fails with the peer's timeout.
fn wait(
    stream: &TcpStream,
    events: libc::c_short,
    deadline: Instant,
    peer: Peer,
) -> Result<(), CollectiveError> {
    let mut fds = [pollfd(stream, events)];
    match poll(&mut fds, deadline) {
        Ok(true) => Ok(()),
        Ok(false) => Err(peer.timed_out()),
        Err(e) => Err(peer.io(e)),
    }
}

/// Writes all of `buf` to the non-blocking `stream` before `deadline`.
pub(super) fn write_all(
    stream: &TcpStream,
    mut buf: &[u8],
    deadline: Instant,
    peer: Peer,
) -> Result<(), CollectiveError> {
    while !buf.is_empty() {
        match (&*stream).write(buf) {
            Ok(0) => return Err(peer.closed()),
            Ok(k) => buf = &buf[k..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(stream, libc::POLLOUT, deadline, peer)?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(peer.io(e)),
        }
    }
    Ok(())
}

/// Fills `buf` from the non-blocking `stream` before `deadline`.
pub(super) fn read_exact(
    stream: &TcpStream,
    mut buf: &mut [u8],
    deadline: Instant,
    peer: Peer,
) -> Result<(), CollectiveError> {
    while !buf.is_empty() {
        match (&*stream).read(buf) {
            Ok(0) => return Err(peer.closed()),
            Ok(k) => buf = &mut buf[k..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(stream, libc::POLLIN, deadline, peer)?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(peer.io(e)),
        }
    }
    Ok(())
}

/// What a received block does to the buffer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Apply {
    /// The received values replace the buffer's.
    Copy,
    /// The received values are added to the buffer's.
    Add,
    /// The received values are added, and the sums divided by the given divisor.
    AddDivide(f32),
}

/// A block of the receive stream: elements `range` of the buffer, applied with `apply`.
#[derive(Debug, Clone)]
pub(super) struct Block {
    /// The buffer's elements the block covers.
    pub range: Range<usize>,
    /// How the received values are applied.
    pub apply: Apply,
}

/// One pipelined transfer over a buffer: the blocks `sends` go to the right neighbour, in
/// order, while the blocks `recvs` come from the left one. The first `ready_ahead` elements
/// of the send stream are ready at once; each later element becomes ready when the receive
/// stream has applied one more element (a ring forwards what it has just reduced, so block
/// `k + 1` of `sends` is block `k` of `recvs`).
///
/// With `input`, the buffer starts out as zeros and this rank's own values come from
/// `input` instead (saving a copy of the whole input): the first send block is read from
/// it, and `Add` blocks store `input + received`. Every element a later send block reads
/// must then have been received first, as in a ring all-reduce.
#[derive(Debug)]
pub(super) struct Transfer<'a> {
    /// Where this rank's own values are, when not in the buffer.
    pub input: Option<&'a Parts<'a>>,
    /// The send stream, as element ranges of the buffer.
    pub sends: &'a [Range<usize>],
    /// The receive stream.
    pub recvs: &'a [Block],
    /// Elements of the send stream that do not wait for received ones.
    pub ready_ahead: usize,
}

/// Progress through a stream of blocks, in bytes.
#[derive(Debug, Default)]
struct Cursor {
    /// Current block.
    block: usize,
    /// Bytes of the current block done.
    pos: usize,
    /// Bytes of the whole stream done.
    total: usize,
}

impl Cursor {
    /// Moves `k` bytes on; past the end of a block of `len` bytes, on to the next block.
    fn advance(&mut self, k: usize, len: usize) {
        self.pos += k;
        self.total += k;
        if self.pos == len {
            self.block += 1;
            self.pos = 0;
        }
    }
}

/// `dst[i] = (own[i] + received[i])`, divided by `div` if given, for `i < own.len()`.
fn add(dst: &mut [f32], own: &[f32], received: &[f32], div: Option<f32>) {
    let n = own.len();
    let pairs = dst[..n].iter_mut().zip(own.iter().zip(&received[..n]));
    match div {
        Some(d) => pairs.for_each(|(o, (a, b))| *o = (a + b) / d),
        None => pairs.for_each(|(o, (a, b))| *o = a + b),
    }
}

fn bytes(range: &Range<usize>) -> Range<usize> {
    range.start * 4..range.end * 4
}

impl Transfer<'_> {
    /// Runs the transfer over `buf`, writing to `right` and reading from `left` (both
    /// non-blocking), moving at most `piece` bytes per system call; `scratch` is reused
    /// across calls for reductions. Fails with the neighbour's error, or with
    /// [`CollectiveError::PeerTimeout`] naming the neighbour waited for at `deadline`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        buf: &mut [f32],
        right: (&TcpStream, Peer),
        left: (&TcpStream, Peer),
        piece: usize,
        scratch: &mut Vec<f32>,
        deadline: Instant,
    ) -> Result<(), CollectiveError> {
        // Any size works (reads and writes may end inside an element anyway); the scratch
        // buffer takes a piece after up to 3 bytes left over from the last one.
        let piece = piece.max(64);
        if scratch.len() < piece / 4 + 2 {
            scratch.resize(piece / 4 + 2, 0.0);
        }
        let send_total: usize = self.sends.iter().map(|r| r.len() * 4).sum();
        let recv_total: usize = self.recvs.iter().map(|b| b.range.len() * 4).sum();
        let mut sent = Cursor::default();
        let mut recvd = Cursor::default();
        // Bytes read into `scratch` but not applied yet (less than one element).
        let mut pending = 0usize;
        loop {
            while sent.block < self.sends.len() && self.sends[sent.block].is_empty() {
                sent.block += 1;
            }
            while recvd.block < self.recvs.len() && self.recvs[recvd.block].range.is_empty() {
                recvd.block += 1;
            }
            let mut progress = false;
            // Send what is ready.
            let ready = (self.ready_ahead * 4 + recvd.total).min(send_total);
            let can_send = sent.total < ready;
            if can_send {
                let r = bytes(&self.sends[sent.block]);
                let len = (r.len() - sent.pos).min(ready - sent.total).min(piece);
                let from = r.start + sent.pos;
                let bytes_out: &[u8] = match self.input {
                    // The first block comes from the input: its values at `from`, up to the
                    // end of the tensor holding them.
                    // (A write may have ended inside an element.)
                    Some(input) if sent.block == 0 => {
                        let p: &[u8] = bytemuck::cast_slice(input.from(from / 4));
                        let p = &p[from % 4..];
                        &p[..len.min(p.len())]
                    }
                    _ => &bytemuck::cast_slice(&buf[..])[from..from + len],
                };
                match (&*right.0).write(bytes_out) {
                    Ok(0) => return Err(right.1.closed()),
                    Ok(k) => {
                        sent.advance(k, r.len());
                        progress = true;
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => return Err(right.1.io(e)),
                }
            }
            // Receive and apply what has arrived.
            if recvd.total < recv_total {
                let block = &self.recvs[recvd.block];
                let r = bytes(&block.range);
                let got = match block.apply {
                    Apply::Copy => {
                        let into: &mut [u8] = bytemuck::cast_slice_mut(&mut buf[..]);
                        let at = r.start + recvd.pos;
                        let len = (r.len() - recvd.pos).min(piece);
                        (&*left.0).read(&mut into[at..at + len])
                    }
                    Apply::Add | Apply::AddDivide(_) => {
                        let into: &mut [u8] = bytemuck::cast_slice_mut(&mut scratch[..]);
                        let len = (r.len() - recvd.pos - pending).min(piece);
                        (&*left.0).read(&mut into[pending..pending + len])
                    }
                };
                match got {
                    Ok(0) => return Err(left.1.closed()),
                    Ok(k) => {
                        progress = true;
                        if block.apply == Apply::Copy {
                            recvd.advance(k, r.len());
                        } else {
                            let have = pending + k;
                            let whole = have / 4;
                            let first = block.range.start + recvd.pos / 4;
                            let dst = &mut buf[first..first + whole];
                            let src = &scratch[..whole];
                            let div = match block.apply {
                                Apply::AddDivide(d) => Some(d),
                                _ => None,
                            };
                            match self.input {
                                Some(input) => input.for_each(first..first + whole, |at, own| {
                                    let (d, s) = (&mut dst[at - first..], &src[at - first..]);
                                    add(d, own, s, div);
                                }),
                                None => {
                                    // The buffer holds this rank's values: add in place.
                                    match div {
                                        Some(d) => dst
                                            .iter_mut()
                                            .zip(src)
                                            .for_each(|(a, b)| *a = (*a + b) / d),
                                        None => dst.iter_mut().zip(src).for_each(|(a, b)| *a += b),
                                    }
                                }
                            }
                            pending = have - whole * 4;
                            if pending > 0 {
                                let s: &mut [u8] = bytemuck::cast_slice_mut(&mut scratch[..]);
                                s.copy_within(whole * 4..have, 0);
                            }
                            recvd.advance(whole * 4, r.len());
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => return Err(left.1.io(e)),
                }
            }
            let receiving = recvd.total < recv_total;
            if !receiving && sent.total == send_total {
                return Ok(());
            }
            if progress {
                continue;
            }
            // Neither socket moved: sleep until one can. The right neighbour hanging up
            // matters only while there is something left to send it.
            let sending = sent.total < send_total;
            let ready = (self.ready_ahead * 4 + recvd.total).min(send_total);
            let mut out_events = 0;
            if sending {
                out_events = libc::POLLRDHUP;
                if sent.total < ready {
                    out_events |= libc::POLLOUT;
                }
            }
            let mut fds = [pollfd(right.0, out_events), pollfd(left.0, libc::POLLIN)];
            // Waits only on the sockets that matter (a hung-up socket would wake `poll`
            // at once, for ever).
            let fds = match (sending, receiving) {
                (true, true) => &mut fds[..],
                (true, false) => &mut fds[..1],
                _ => &mut fds[1..],
            };
            match poll(fds, deadline) {
                Ok(true) => {
                    let r = fds[0].revents;
                    if sending
                        && r & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
                        && r & libc::POLLOUT == 0
                    {
                        return Err(right.1.closed());
                    }
                }
                Ok(false) => {
                    return Err(if receiving {
                        left.1.timed_out()
                    } else {
                        right.1.timed_out()
                    })
                }
                Err(e) => return Err(left.1.io(e)),
            }
        }
    }
}
