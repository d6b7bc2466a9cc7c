//! The rank-process side of a job attempt's rendezvous, and connecting the communicator.
//!
//! A rank publishes entries as [`RankMessage::Rendezvous`] event lines (its worker reports
//! them; the coordinator pushes them to every rank of the attempt), and receives every
//! rank's entries as lines on its stdin ([`crate::protocol::rendezvous_line`]), collected
//! in a [`Mailbox`]. [`connect`] builds the rank's communicator from them:
//!
//! * world of one: [`Local`] (no rendezvous);
//! * CUDA device (feature `cuda`): NCCL; rank 0 creates the unique id and publishes it as
//!   `nccl/id`, the others wait for it;
//! * otherwise the TCP [`Ring`]: every rank listens on a free port, publishes
//!   `ring/addr/<rank>` = `<worker's collective host>:<port>`, waits for all ranks'
//!   addresses and joins the ring with the attempt's token (`<job id>/<attempt>`), so ranks
//!   of an old attempt can never join a new one.
//!
//! Every wait has a deadline and watches the rank's stop flag: a rank whose peers never
//! show up fails with an error naming the missing ranks instead of hanging.

use std::collections::HashMap;
use std::io::BufRead;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use trainyard_collective::{Collective, Local, Ring, RingConfig};
use trainyard_jobs::JobError;
use trainyard_proto::RendezvousEntry;

use crate::protocol::{parse_rendezvous_line, RankMessage, COLLECTIVE_HOST_ENV};

/// Environment variable: seconds a rank waits for its peers at the rendezvous and when
/// connecting (default 60).
pub const RENDEZVOUS_TIMEOUT_ENV: &str = "TRAINYARD_RENDEZVOUS_TIMEOUT_S";
/// Environment variable: seconds any one collective may wait for a peer before the attempt
/// fails (default 30; a peer that dies is noticed at once, through its closed sockets).
pub const COLLECTIVE_TIMEOUT_ENV: &str = "TRAINYARD_COLLECTIVE_TIMEOUT_S";

const DEFAULT_RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a waiting rank looks at its stop flag.
const POLL: Duration = Duration::from_millis(100);

/// The rendezvous entries this rank has received, by key.
#[derive(Debug, Default)]
pub struct Mailbox {
    entries: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

impl Mailbox {
    /// An empty mailbox.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<u8>>> {
        match self.entries.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Records an entry (the first value of a key wins) and wakes waiters.
    pub fn put(&self, entry: RendezvousEntry) {
        self.lock().entry(entry.key).or_insert(entry.value);
        self.changed.notify_all();
    }

    /// Reads rendezvous lines from `input` until it ends, ignoring other lines.
    pub fn feed(&self, input: impl BufRead) {
        for line in input.lines() {
            let Ok(line) = line else { break };
            match parse_rendezvous_line(&line) {
                Some(entry) => self.put(entry),
                None if line.trim().is_empty() => {}
                None => {
                    tracing::debug!(%line, "ignoring a stdin line that is not a rendezvous entry")
                }
            }
        }
    }

    /// Reads the process's stdin into the mailbox on a background thread.
    pub fn read_stdin(self: &Arc<Self>) {
        let mailbox = self.clone();
        let spawned = std::thread::Builder::new()
            .name("trainyard-rendezvous".into())
            .spawn(move || mailbox.feed(std::io::stdin().lock()));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the rendezvous reader");
        }
    }

    /// The values of `keys`, once all are present; fails when `timeout` passes (naming
    /// what is missing) or `stop` is set.
    pub fn wait_all(
        &self,
        keys: &[String],
        timeout: Duration,
        stop: &AtomicBool,
    ) -> Result<Vec<Vec<u8>>, JobError> {
        let deadline = Instant::now() + timeout;
        let mut entries = self.lock();
        loop {
            if keys.iter().all(|k| entries.contains_key(k)) {
                return Ok(keys.iter().map(|k| entries[k].clone()).collect());
            }
            if stop.load(Ordering::SeqCst) {
                return Err(JobError::Stopped);
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<&str> = keys
                    .iter()
                    .filter(|k| !entries.contains_key(*k))
                    .map(String::as_str)
                    .collect();
                return Err(JobError::Other(format!(
                    "rendezvous: no {} after {timeout:?} (did the other ranks start? see \
                     `trainyard logs`)",
                    missing.join(", ")
                )));
            }
            let wait = POLL.min(deadline - now);
            entries = match self.changed.wait_timeout(entries, wait) {
                Ok((g, _)) => g,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

/// What [`connect`] needs from the rank.
pub struct Rendezvous<'a> {
    /// Job id and attempt, joined into the ring's attempt token.
    pub job_id: &'a str,
    /// The attempt number.
    pub attempt: u32,
    /// This rank.
    pub rank: usize,
    /// The world size.
    pub world_size: usize,
    /// Received entries.
    pub mailbox: &'a Mailbox,
    /// Publishes one entry (an event line to the agent).
    pub publish: &'a dyn Fn(RankMessage),
    /// The rank's stop flag.
    pub stop: &'a AtomicBool,
}

fn seconds_from_env(name: &str, default: Duration) -> Duration {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(default)
}

/// The key under which `rank` publishes its ring address.
pub fn ring_key(rank: usize) -> String {
    format!("ring/addr/{rank}")
}

/// The key of rank 0's NCCL unique id.
pub const NCCL_ID_KEY: &str = "nccl/id";

/// Connects this rank to its attempt's other ranks on `device` (see the module docs).
pub fn connect(
    r: &Rendezvous<'_>,
    device: &candle_core::Device,
) -> Result<Box<dyn Collective>, JobError> {
    if r.world_size <= 1 {
        return Ok(Box::new(Local::new()));
    }
    let timeout = seconds_from_env(RENDEZVOUS_TIMEOUT_ENV, DEFAULT_RENDEZVOUS_TIMEOUT);
    if device.is_cuda() {
        return connect_nccl(r, device, timeout);
    }
    let host = std::env::var(COLLECTIVE_HOST_ENV)
        .ok()
        .filter(|h| !h.trim().is_empty())
        .unwrap_or_else(|| "127.0.0.1".to_string());
    let bind: SocketAddr = if host.contains(':') {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
    };
    let listener = TcpListener::bind(bind)
        .map_err(|e| JobError::Other(format!("ring: cannot listen on {bind}: {e}")))?;
    let port = listener
        .local_addr()
        .map_err(|e| JobError::Other(format!("ring: listener address: {e}")))?
        .port();
    let mine = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    (r.publish)(RankMessage::Rendezvous {
        key: ring_key(r.rank),
        value_hex: hex::encode(mine.as_bytes()),
    });
    let keys: Vec<String> = (0..r.world_size).map(ring_key).collect();
    let values = r.mailbox.wait_all(&keys, timeout, r.stop)?;
    let mut addrs = Vec::with_capacity(values.len());
    for (rank, value) in values.iter().enumerate() {
        let text = String::from_utf8_lossy(value);
        let addr = text
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                JobError::Other(format!(
                    "rendezvous: rank {rank}'s ring address {text:?} does not resolve"
                ))
            })?;
        addrs.push(addr);
    }
    let config = RingConfig {
        connect_timeout: timeout,
        op_timeout: seconds_from_env(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT),
        ..RingConfig::default()
    };
    let token = format!("{}/{}", r.job_id, r.attempt);
    let ring = Ring::connect(&addrs, r.rank, listener, &token, config)?;
    tracing::info!(rank = r.rank, world = r.world_size, "joined the TCP ring");
    Ok(Box::new(ring))
}

#[cfg(feature = "cuda")]
fn connect_nccl(
    r: &Rendezvous<'_>,
    device: &candle_core::Device,
    timeout: Duration,
) -> Result<Box<dyn Collective>, JobError> {
    use trainyard_collective::{nccl::Nccl, NcclId};
    if r.rank == 0 {
        let id = Nccl::create_id()?;
        (r.publish)(RankMessage::Rendezvous {
            key: NCCL_ID_KEY.to_string(),
            value_hex: id.to_hex(),
        });
    }
    let values = r
        .mailbox
        .wait_all(&[NCCL_ID_KEY.to_string()], timeout, r.stop)?;
    let id = NcclId::from_bytes(&values[0])?;
    let comm = Nccl::new(device, r.rank, r.world_size, &id)?;
    tracing::info!(
        rank = r.rank,
        world = r.world_size,
        "joined the NCCL communicator"
    );
    Ok(Box::new(comm))
}

#[cfg(not(feature = "cuda"))]
fn connect_nccl(
    _r: &Rendezvous<'_>,
    _device: &candle_core::Device,
    _timeout: Duration,
) -> Result<Box<dyn Collective>, JobError> {
    Err(JobError::Other(
        "a CUDA device without the cuda feature cannot happen".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::rendezvous_line;
    use candle_core::{Device, Tensor};
    use trainyard_collective::ReduceOp;

    static NO_STOP: AtomicBool = AtomicBool::new(false);

    #[test]
    fn mailbox_reads_lines_and_waits_with_a_deadline() {
        let m = Mailbox::new();
        let input = format!(
            "{}\nnoise\n\n{}\n",
            rendezvous_line(&RendezvousEntry {
                key: "a".into(),
                value: b"1".to_vec()
            }),
            rendezvous_line(&RendezvousEntry {
                key: "b".into(),
                value: b"2".to_vec()
            }),
        );
        m.feed(input.as_bytes());
        let v = m
            .wait_all(&["b".into(), "a".into()], Duration::from_secs(1), &NO_STOP)
            .unwrap();
        assert_eq!(v, vec![b"2".to_vec(), b"1".to_vec()]);
        let started = Instant::now();
        let err = m
            .wait_all(
                &["a".into(), "c".into()],
                Duration::from_millis(200),
                &NO_STOP,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("no c after"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        // The first value of a key wins.
        m.put(RendezvousEntry {
            key: "a".into(),
            value: b"other".to_vec(),
        });
        let v = m
            .wait_all(&["a".into()], Duration::from_secs(1), &NO_STOP)
            .unwrap();
        assert_eq!(v, vec![b"1".to_vec()]);
    }

    #[test]
    fn a_stop_request_ends_the_wait() {
        static STOP: AtomicBool = AtomicBool::new(true);
        let m = Mailbox::new();
        let err = m
            .wait_all(&["x".into()], Duration::from_secs(30), &STOP)
            .unwrap_err();
        assert!(matches!(err, JobError::Stopped));
    }

    #[test]
    fn a_world_of_one_needs_no_rendezvous() {
        let m = Mailbox::new();
        let publish = |_m: RankMessage| panic!("nothing to publish");
        let r = Rendezvous {
            job_id: "j",
            attempt: 1,
            rank: 0,
            world_size: 1,
            mailbox: &m,
            publish: &publish,
            stop: &NO_STOP,
        };
        let c = connect(&r, &Device::Cpu).unwrap();
        assert_eq!(c.backend(), "local");
    }

    /// Three ranks, each publishing into a shared "coordinator" that delivers every entry
    /// to every mailbox, connect a real TCP ring and all-reduce.
    #[test]
    fn ranks_rendezvous_and_all_reduce_over_tcp() {
        let n = 3;
        let mailboxes: Vec<Arc<Mailbox>> = (0..n).map(|_| Mailbox::new()).collect();
        let threads: Vec<_> = (0..n)
            .map(|rank| {
                let all = mailboxes.clone();
                std::thread::spawn(move || {
                    let mine = all[rank].clone();
                    let publish = move |m: RankMessage| {
                        let RankMessage::Rendezvous { key, value_hex } = m else {
                            return;
                        };
                        for mb in &all {
                            mb.put(RendezvousEntry {
                                key: key.clone(),
                                value: hex::decode(&value_hex).unwrap(),
                            });
                        }
                    };
                    let r = Rendezvous {
                        job_id: "job",
                        attempt: 4,
                        rank,
                        world_size: n,
                        mailbox: &mine,
                        publish: &publish,
                        stop: &NO_STOP,
                    };
                    let mut c = connect(&r, &Device::Cpu).unwrap();
                    assert_eq!(c.backend(), "ring");
                    let t = Tensor::new(&[rank as f32 + 1.0, 10.0], &Device::Cpu).unwrap();
                    let out = c.all_reduce(&[t], ReduceOp::Sum).unwrap();
                    out[0].to_vec1::<f32>().unwrap()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), vec![6.0, 30.0]);
        }
    }
}
