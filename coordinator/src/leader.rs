//! Leadership: which coordinator schedules and writes.
//!
//! With the embedded store a coordinator is alone and always the leader (term 1). With
//! etcd, every coordinator campaigns in the etcd election `<root>leader` (e.g.
//! `/trainyard/v1/leader`) under a lease with a short TTL ([`LEASE_TTL_S`]) that it keeps
//! alive every [`KEEPALIVE_EVERY`]; the value is the coordinator's advertised address. A
//! leader that dies stops renewing, etcd deletes its key when the lease runs out, and the
//! next campaigner wins. The election key's create revision is the leader's **term**: it
//! only grows, so it serves as a fencing token on every command sent to workers.
//!
//! A leader that cannot renew its lease for longer than the TTL (minus a margin) steps
//! down on its own, before etcd could have elected another one; so does a leader whose
//! election key is no longer the leading one (checked every 500 ms).
//!
//! While it leads, [`Leadership::key`] and [`Leadership::term`] make the store fence
//! ([`Leadership::fence`], [`crate::store::StateStore::set_fence`]): every job write is a
//! transaction that also compares the election key's create revision with the term, so a
//! deposed leader that has not noticed yet cannot write a job record.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use etcd_client::{Client, ResignOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// TTL of the leader lease, in seconds.
pub const LEASE_TTL_S: i64 = 2;
/// How often the leader (and a campaigner) renews its lease.
pub const KEEPALIVE_EVERY: Duration = Duration::from_millis(500);
/// How often a follower looks up who leads.
const OBSERVE_EVERY: Duration = Duration::from_millis(500);
/// A leader that has not renewed its lease for this long steps down (TTL minus a margin).
const STEP_DOWN_AFTER: Duration = Duration::from_millis(1500);
/// Timeout of one etcd call made by the elector.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Who leads, as seen by this coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Leadership {
    /// Whether this coordinator is the leader.
    pub is_leader: bool,
    /// The leader's advertised address (`host:port`), if known.
    pub leader_addr: Option<String>,
    /// The fencing token of the current leader's term (0 when unknown).
    pub term: u64,
    /// This coordinator's election key while it leads (`None` otherwise, and with the
    /// embedded store): with [`Leadership::term`] it is the store fence
    /// ([`crate::store::Fence`]) that makes a deposed leader's writes fail.
    pub key: Option<Vec<u8>>,
    /// Whether the store answered the elector lately. False while etcd is unreachable (the
    /// coordinator reports NOT_SERVING then); always true with the embedded store.
    pub store_reachable: bool,
}

impl Leadership {
    /// The store fence of this leadership: `Some` only while leading under an election key.
    pub fn fence(&self) -> Option<crate::store::Fence> {
        match (&self.key, self.is_leader) {
            (Some(key), true) => Some(crate::store::Fence {
                key: key.clone(),
                create_revision: self.term as i64,
            }),
            _ => None,
        }
    }
}

/// Why the elector could not start.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// An etcd call failed.
    #[error("leader election: {0}")]
    Etcd(#[from] etcd_client::Error),
}

/// The leadership of a single-node coordinator (embedded store): always the leader, term 1.
pub fn single_node(addr: &str) -> watch::Receiver<Leadership> {
    // The sender drops at once: this leadership never changes.
    watch::channel(Leadership {
        is_leader: true,
        leader_addr: Some(addr.to_string()),
        term: 1,
        key: None,
        store_reachable: true,
    })
    .1
}

/// A running etcd election for this coordinator.
#[derive(Debug)]
pub struct Elector {
    rx: watch::Receiver<Leadership>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Elector {
    /// Starts campaigning for `name` (the election key) with `addr` as the value.
    pub fn start(client: Client, name: String, addr: String) -> Self {
        let (tx, rx) = watch::channel(Leadership::default());
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(client, name, addr, tx, stop_rx));
        Self {
            rx,
            stop,
            task: Some(task),
        }
    }

    /// The leadership watch.
    pub fn watch(&self) -> watch::Receiver<Leadership> {
        self.rx.clone()
    }

    /// Resigns (when leading) and stops campaigning, so that another coordinator takes over
    /// at once instead of after the lease TTL.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        }
    }
}

impl Drop for Elector {
    /// Dropped without [`Elector::stop`]: stops renewing the lease, so another coordinator
    /// takes over once it runs out.
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn run(
    mut client: Client,
    name: String,
    addr: String,
    tx: watch::Sender<Leadership>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    while !*stop.borrow() {
        match term_once(&mut client, &name, &addr, &tx, &mut stop).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => {
                tx.send_if_modified(|l| {
                    let was = l.store_reachable || l.is_leader;
                    l.store_reachable = false;
                    l.is_leader = false;
                    l.key = None;
                    was
                });
                tracing::warn!(error = %e, "leader election failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        tx.send_if_modified(|l| {
            let was = l.is_leader;
            l.is_leader = false;
            l.key = None;
            was
        });
    }
    tracing::debug!("leader elector stopped");
}

async fn call<T>(
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, etcd_client::Error> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(etcd_client::Error::Internal("etcd call timed out".into())),
    }
}

/// One lease: campaign (following the current leader meanwhile), lead until the lease is
/// lost or `stop`, then resign. Returns Ok after a clean step-down.
async fn term_once(
    client: &mut Client,
    name: &str,
    addr: &str,
    tx: &watch::Sender<Leadership>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), etcd_client::Error> {
    let lease = call(client.lease_grant(LEASE_TTL_S, None)).await?.id();
    let (mut keeper, mut acks) = call(client.lease_keep_alive(lease)).await?;
    tx.send_if_modified(|l| {
        let was = l.store_reachable;
        l.store_reachable = true;
        !was
    });
    // etcd renews the lease when it receives a keep-alive: an answer proves the lease
    // lives until (send time + TTL), so measure from the send, not from the answer.
    let mut renewed = Instant::now();
    let mut sent: VecDeque<Instant> = VecDeque::new();
    let mut ticker = tokio::time::interval(KEEPALIVE_EVERY);
    let mut observe = tokio::time::interval(OBSERVE_EVERY);
    let mut campaigner = client.clone();
    let campaign = campaigner.campaign(name, addr, lease);
    tokio::pin!(campaign);
    // Campaign: wait to win, keeping the lease alive and publishing who leads meanwhile.
    let key = loop {
        tokio::select! {
            won = &mut campaign => {
                let won = won?;
                match won.leader() {
                    Some(k) => break k.clone(),
                    None => return Err(etcd_client::Error::Internal("campaign returned no leader key".into())),
                }
            }
            _ = ticker.tick() => {
                keeper.keep_alive().await?;
                sent.push_back(Instant::now());
            }
            ack = acks.message() => {
                match ack? {
                    Some(r) if r.ttl() > 0 => renewed = sent.pop_front().unwrap_or(renewed),
                    _ => return Err(etcd_client::Error::Internal("lease lost while campaigning".into())),
                }
            }
            _ = observe.tick() => {
                let answer = call(client.leader(name)).await;
                let reachable = answer.is_ok();
                let leader = answer.ok().and_then(|r| {
                    r.kv().map(|kv| (kv.value_str().unwrap_or_default().to_string(), kv.create_revision() as u64))
                });
                tx.send_if_modified(|l| {
                    let new = Leadership { is_leader: false, leader_addr: leader.as_ref().map(|x| x.0.clone()), term: leader.as_ref().map_or(l.term, |x| x.1), key: None, store_reachable: reachable };
                    let changed = *l != new;
                    *l = new;
                    changed
                });
            }
            _ = stop.changed() => {
                let _ = call(client.lease_revoke(lease)).await;
                return Ok(());
            }
        }
        if renewed.elapsed() > Duration::from_secs(LEASE_TTL_S as u64) {
            return Err(etcd_client::Error::Internal(
                "lease expired while campaigning".into(),
            ));
        }
    };
    let term = key.rev().max(0) as u64;
    tracing::info!(term, addr, "became the leader");
    tx.send_replace(Leadership {
        is_leader: true,
        leader_addr: Some(addr.to_string()),
        term,
        key: Some(key.key().to_vec()),
        store_reachable: true,
    });
    // Lead: renew the lease; step down as soon as it cannot be renewed in time.
    let outcome = loop {
        tokio::select! {
            _ = ticker.tick() => {
                match keeper.keep_alive().await {
                    Ok(()) => sent.push_back(Instant::now()),
                    Err(e) => tracing::warn!(error = %e, "renewing the leader lease failed"),
                }
            }
            ack = acks.message() => {
                match ack {
                    Ok(Some(r)) if r.ttl() > 0 => renewed = sent.pop_front().unwrap_or(renewed),
                    Ok(_) => break Err(etcd_client::Error::Internal("the leader lease expired".into())),
                    Err(e) => break Err(e),
                }
            }
            _ = observe.tick() => {
                // The election key must still be ours: if it was deleted or replaced behind
                // our back, another coordinator may lead (and our store fence fails).
                if let Ok(r) = call(client.leader(name)).await {
                    if r.kv().map(|kv| kv.create_revision()) != Some(term as i64) {
                        break Err(etcd_client::Error::Internal(
                            "the election key is no longer this coordinator's".into(),
                        ));
                    }
                }
            }
            _ = stop.changed() => break Ok(()),
        }
        if renewed.elapsed() > STEP_DOWN_AFTER {
            break Err(etcd_client::Error::Internal(
                "the leader lease could not be renewed in time".into(),
            ));
        }
    };
    tx.send_modify(|l| {
        l.is_leader = false;
        l.key = None;
        // Losing the lease means etcd did not answer in time.
        l.store_reachable = outcome.is_ok();
    });
    match &outcome {
        Ok(()) => tracing::info!(term, "resigning leadership"),
        Err(e) => tracing::warn!(term, error = %e, "lost leadership"),
    }
    let _ = call(client.resign(Some(ResignOptions::new().with_leader(key)))).await;
    let _ = call(client.lease_revoke(lease)).await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_node_always_leads_in_term_1() {
        let rx = single_node("127.0.0.1:7800");
        let l = rx.borrow().clone();
        assert!(l.is_leader);
        assert_eq!(l.term, 1);
        assert_eq!(l.leader_addr.as_deref(), Some("127.0.0.1:7800"));
    }
}
