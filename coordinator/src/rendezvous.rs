//! Rendezvous of a job attempt's ranks through the coordinator.
//!
//! A rank publishes small entries (a [`RendezvousEntry`]: the address its TCP ring listener
//! is on, or rank 0's NCCL unique id) as a rank event; the coordinator keeps the entries of
//! the job's current attempt and pushes each new one to every worker that runs a rank of
//! that attempt, which hands it to exactly those rank processes. Entries of an older
//! attempt are refused when they arrive (the report is for a stale attempt) and the set is
//! cleared when the attempt ends, so a restarted attempt starts its rendezvous afresh and
//! its ranks can never pick up an old attempt's addresses.

use std::collections::{BTreeMap, BTreeSet};

use trainyard_proto::{worker_command, RendezvousEntry, RendezvousUpdate};

use crate::state::{JobEntry, WorkerEntry};

/// Longest key accepted.
pub const MAX_KEY_BYTES: usize = 256;
/// Largest value accepted (an NCCL id is 128 bytes, an address a few dozen).
pub const MAX_VALUE_BYTES: usize = 4096;
/// Most entries one attempt may hold, beyond four per rank.
pub const EXTRA_ENTRIES: usize = 16;

/// Checks an entry against the limits and records it in the job's current attempt.
/// Republishing a key with the same value is accepted (a retried report); a different
/// value for a key already set is refused, since ranks may already have used the first.
pub fn accept(entry: &mut JobEntry, e: &RendezvousEntry) -> Result<(), String> {
    if e.key.is_empty() || e.key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "key must be 1 to {MAX_KEY_BYTES} bytes long, got {}",
            e.key.len()
        ));
    }
    if e.key.chars().any(char::is_whitespace) {
        return Err("key must not contain whitespace".into());
    }
    if e.value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "value is {} bytes, at most {MAX_VALUE_BYTES} are allowed",
            e.value.len()
        ));
    }
    if let Some(old) = entry.rendezvous.get(&e.key) {
        return if *old == e.value {
            Ok(())
        } else {
            Err("the key is already set to another value in this attempt".into())
        };
    }
    let limit = entry.world_size() as usize * 4 + EXTRA_ENTRIES;
    if entry.rendezvous.len() >= limit {
        return Err(format!("the attempt already holds {limit} entries"));
    }
    entry.rendezvous.insert(e.key.clone(), e.value.clone());
    Ok(())
}

/// Pushes `e` to every alive worker that runs a rank of the job's current attempt (once
/// per worker, whatever its number of ranks).
pub fn fan_out(workers: &BTreeMap<String, WorkerEntry>, entry: &JobEntry, e: RendezvousEntry) {
    let update = RendezvousUpdate {
        job_id: entry.job.id.clone(),
        attempt: entry.job.attempt,
        entries: vec![e],
        leader_term: 0,
    };
    let mut sent = BTreeSet::new();
    for p in &entry.job.placement {
        if !sent.insert(p.worker_id.as_str()) {
            continue;
        }
        if let Some(w) = workers.get(&p.worker_id) {
            w.send(worker_command::Command::Rendezvous(update.clone()));
        }
    }
}

/// Every entry of the job's current attempt, as one update (for a worker whose command
/// stream was reopened), or `None` when there are none.
pub fn snapshot(entry: &JobEntry) -> Option<RendezvousUpdate> {
    if entry.rendezvous.is_empty() {
        return None;
    }
    Some(RendezvousUpdate {
        job_id: entry.job.id.clone(),
        attempt: entry.job.attempt,
        entries: entry
            .rendezvous
            .iter()
            .map(|(key, value)| RendezvousEntry {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
        leader_term: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_proto::{Job, JobSpec};

    fn job(ranks: u32) -> JobEntry {
        JobEntry::new(Job {
            id: "j1".into(),
            attempt: 2,
            spec: Some(JobSpec {
                ranks,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn e(key: &str, value: &[u8]) -> RendezvousEntry {
        RendezvousEntry {
            key: key.into(),
            value: value.to_vec(),
        }
    }

    #[test]
    fn entries_are_kept_and_a_key_cannot_change() {
        let mut j = job(2);
        accept(&mut j, &e("ring/addr/0", b"127.0.0.1:1")).unwrap();
        // A retried report with the same value is fine.
        accept(&mut j, &e("ring/addr/0", b"127.0.0.1:1")).unwrap();
        let err = accept(&mut j, &e("ring/addr/0", b"127.0.0.1:2")).unwrap_err();
        assert!(err.contains("already set"), "{err}");
        let snap = snapshot(&j).unwrap();
        assert_eq!(snap.attempt, 2);
        assert_eq!(snap.entries, vec![e("ring/addr/0", b"127.0.0.1:1")]);
    }

    #[test]
    fn limits_are_enforced() {
        let mut j = job(1);
        assert!(accept(&mut j, &e("", b"x")).unwrap_err().contains("key"));
        assert!(accept(&mut j, &e("a b", b"x"))
            .unwrap_err()
            .contains("whitespace"));
        let big = vec![0u8; MAX_VALUE_BYTES + 1];
        assert!(accept(&mut j, &e("k", &big)).unwrap_err().contains("value"));
        for i in 0..(4 + EXTRA_ENTRIES) {
            accept(&mut j, &e(&format!("k{i}"), b"v")).unwrap();
        }
        let err = accept(&mut j, &e("one-more", b"v")).unwrap_err();
        assert!(err.contains("entries"), "{err}");
        assert!(snapshot(&job(1)).is_none());
    }
}
