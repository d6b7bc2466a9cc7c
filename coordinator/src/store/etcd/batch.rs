//! Batching of concurrent job writes into multi-key etcd transactions.
//!
//! etcd serves a few hundred sequential writes a second to one client but tens of thousands
//! of concurrent ones, and most of the cost of a write is per *transaction* (one raft
//! proposal, one WAL entry), not per key. So concurrent `create_job` and `update_job` calls
//! are not sent one transaction each: they are queued here and a batcher packs what is
//! waiting into one transaction — every item's compares, the leader fence once, and every
//! item's put — with up to [`MAX_IN_FLIGHT`] transactions in flight. A lone write goes out
//! at once (no timer), so a single client pays no extra latency; batches grow only while
//! earlier transactions are in flight.
//!
//! A batched transaction is all-or-nothing: when it succeeds every item got the
//! transaction's revision. When any compare fails, the whole transaction wrote nothing,
//! and each item is told to [`Outcome::Alone`]: the caller sends its write as a transaction
//! of its own, which finds out precisely which compare failed (already exists, conflict
//! with the real revision, lost fence). A conflict thus costs one extra round trip, and
//! correctness never depends on the batch.

use std::collections::HashSet;
use std::sync::{Arc, Weak};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{header_revision, EtcdStore, Inner};
use crate::store::{Revision, StoreError};

/// Most items in one transaction. etcd refuses a transaction with more than
/// `--max-txn-ops` (128 by default) compares or operations; an update has two compares
/// and the fence adds one.
pub const MAX_BATCH: usize = 48;
/// Most value bytes in one transaction (etcd's default request limit is 1.5 MiB).
pub const MAX_BATCH_BYTES: usize = 512 * 1024;
/// Most batched transactions in flight at once.
pub const MAX_IN_FLIGHT: usize = 2;

/// What a queued write asks for.
#[derive(Debug, Clone, Copy)]
pub enum WriteKind {
    /// Create-if-absent.
    Create,
    /// Compare-and-set against this `mod_revision`.
    Update {
        /// The revision the caller read.
        expected: Revision,
    },
}

/// The compares of one job write: create-if-absent, or compare-and-set (a missing key has
/// mod_revision 0, so an update also requires the key to exist). Used by batches and by
/// writes sent alone alike.
pub fn compares(key: &str, kind: WriteKind) -> Vec<Compare> {
    match kind {
        WriteKind::Create => vec![Compare::create_revision(key, CompareOp::Equal, 0)],
        WriteKind::Update { expected } => vec![
            Compare::create_revision(key, CompareOp::Greater, 0),
            Compare::mod_revision(key, CompareOp::Equal, expected),
        ],
    }
}

/// How a queued write ended.
#[derive(Debug)]
pub enum Outcome {
    /// Written, at this revision.
    Written(Revision),
    /// Not written: the caller must send it as a transaction of its own (a compare in its
    /// batch failed, or it was alone in its batch).
    Alone,
    /// The transaction failed (etcd unreachable, timeout...): nothing is known to be written.
    Failed(StoreError),
}

/// A job write waiting for a batch.
pub struct Queued {
    /// The job's key.
    pub key: String,
    /// The encoded record.
    pub value: Vec<u8>,
    /// Create or compare-and-set.
    pub kind: WriteKind,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Outcome>,
}

/// Starts the batcher of `store` and returns the queue feeding it. The batcher ends when
/// the queue's last sender (held by the store) is dropped.
pub fn start(inner: Weak<Inner>) -> mpsc::UnboundedSender<Queued> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(inner, rx));
    tx
}

async fn run(inner: Weak<Inner>, mut rx: mpsc::UnboundedReceiver<Queued>) {
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // An item that could not join the previous batch (its key was already in it).
    let mut carry: Option<Queued> = None;
    loop {
        let first = match carry.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        // Waiting for a free slot is what lets a batch grow under load.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let mut keys = HashSet::from([first.key.clone()]);
        let mut bytes = first.value.len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            let Ok(q) = rx.try_recv() else { break };
            // etcd refuses two puts of one key in a transaction.
            if !keys.insert(q.key.clone()) {
                carry = Some(q);
                break;
            }
            bytes += q.value.len();
            batch.push(q);
        }
        if batch.len() == 1 {
            for q in batch {
                let _ = q.reply.send(Outcome::Alone);
            }
            drop(permit);
            continue;
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            commit(EtcdStore { inner }, batch).await;
            drop(permit);
        });
    }
}

/// Sends one batch as one transaction and answers every item.
async fn commit(store: EtcdStore, batch: Vec<Queued>) {
    let fence = store.fence();
    let mut when = Vec::with_capacity(batch.len() * 2 + 1);
    let mut puts = Vec::with_capacity(batch.len());
    for q in &batch {
        when.extend(compares(&q.key, q.kind));
        puts.push(TxnOp::put(q.key.as_str(), q.value.clone(), None));
    }
    if let Some(f) = &fence {
        when.push(EtcdStore::fence_compare(f));
    }
    let txn = Txn::new().when(when).and_then(puts);
    let mut kv = store.inner.client.kv_client();
    store.count_job_write_txn();
    let result = store.call("write jobs", kv.txn(txn)).await;
    match result {
        Ok(resp) if resp.succeeded() => {
            let revision = header_revision(resp.header());
            for q in batch {
                let _ = q.reply.send(Outcome::Written(revision));
            }
        }
        Ok(_) => {
            for q in batch {
                let _ = q.reply.send(Outcome::Alone);
            }
        }
        Err(e) => {
            let message = match e {
                StoreError::Backend(message) => message,
                other => other.to_string(),
            };
            for q in batch {
                let _ = q
                    .reply
                    .send(Outcome::Failed(StoreError::Backend(message.clone())));
            }
        }
    }
}
