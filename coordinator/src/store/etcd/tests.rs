//! Tests of the etcd backend. URL parsing runs everywhere; everything else needs a real
//! etcd named by `TRAINYARD_ETCD_ENDPOINTS` (`scripts/etcd.sh up` starts one). Without it
//! these tests print a notice and pass — unless `CI` or `TRAINYARD_REQUIRE_ETCD=1` is set,
//! where a missing etcd fails them. Each test works under its own random key prefix
//! (`/trainyard-test/<uuid>`), so tests never see each other's keys.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use trainyard_proto::{CheckpointInfo, Job, JobState, Worker};

use super::*;
use crate::store::conformance as suite_fns;

/// Environment variable with the test etcd's endpoints (comma-separated).
const ENDPOINTS_ENV: &str = "TRAINYARD_ETCD_ENDPOINTS";

fn truthy(var: &str) -> bool {
    std::env::var(var)
        .map(|v| {
            let v = v.trim().to_ascii_lowercase();
            !v.is_empty() && v != "0" && v != "false" && v != "no"
        })
        .unwrap_or(false)
}

/// The endpoints of the test etcd; `None` (after a notice) when there is none and none is
/// required; a panic when `CI` or `TRAINYARD_REQUIRE_ETCD` asks for one.
fn etcd_endpoints() -> Option<Vec<String>> {
    let endpoints: Vec<String> = std::env::var(ENDPOINTS_ENV)
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if !endpoints.is_empty() {
        return Some(endpoints);
    }
    if truthy("TRAINYARD_REQUIRE_ETCD") || truthy("CI") {
        panic!(
            "{ENDPOINTS_ENV} is not set, but CI / TRAINYARD_REQUIRE_ETCD=1 require the etcd \
             tests to run: start etcd with `eval \"$(scripts/etcd.sh up)\"` and rerun"
        );
    }
    eprintln!(
        "NOTICE: etcd store test skipped: {ENDPOINTS_ENV} is not set \
         (run `eval \"$(scripts/etcd.sh up)\"` to run it)"
    );
    None
}

/// What a conformance test keeps beside its store: a second, independent connection to the
/// same prefix, handed out as the "reopened" store.
pub(super) struct TestCtx {
    reopened: Mutex<Option<EtcdStore>>,
}

fn test_config(endpoints: Vec<String>) -> EtcdConfig {
    let mut config = EtcdConfig::new(endpoints);
    config.prefix = format!("/trainyard-test/{}", uuid::Uuid::new_v4().simple());
    config.startup_retry = Some(Duration::from_secs(10));
    config
}

/// A store under a fresh prefix, or `None` when etcd tests are skipped.
async fn test_store() -> Option<(EtcdStore, TestCtx)> {
    let config = test_config(etcd_endpoints()?);
    let store = EtcdStore::connect(config.clone())
        .await
        .expect("connecting to the test etcd");
    let reopened = EtcdStore::connect(config)
        .await
        .expect("connecting to the test etcd again");
    Some((
        store,
        TestCtx {
            reopened: Mutex::new(Some(reopened)),
        },
    ))
}

crate::store_conformance_tests!(
    match test_store().await {
        Some(pair) => pair,
        None => return,
    },
    |ctx: &TestCtx| ctx.reopened.lock().unwrap().take()
);

// ---------------------------------------------------------------------------------------
// URL parsing (no etcd needed)

#[test]
fn parses_endpoints_prefix_and_defaults() {
    let c = EtcdConfig::from_url("etcd://10.0.0.1:2379,etcd-2,[::1]:23790/team-a/").unwrap();
    assert_eq!(
        c.endpoints,
        [
            "http://10.0.0.1:2379",
            "http://etcd-2:2379",
            "http://[::1]:23790"
        ]
    );
    assert_eq!(c.prefix, "/team-a");
    assert_eq!(c.user, None);
    assert_eq!(c.tls, None);
    let c = EtcdConfig::from_url("etcd://127.0.0.1:23790").unwrap();
    assert_eq!(c.prefix, DEFAULT_PREFIX);
}

#[test]
fn parses_user_password_and_tls() {
    let c = EtcdConfig::from_url(
        "etcd+https://root:p%40ss:w@h1:2379,h2:2379/x?ca=/etc/ca.pem&cert=/c.pem&key=/k.pem",
    )
    .unwrap();
    assert_eq!(c.endpoints, ["https://h1:2379", "https://h2:2379"]);
    assert_eq!(c.user, Some(("root".into(), "p@ss:w".into())));
    assert_eq!(
        c.tls,
        Some(EtcdTls {
            ca: "/etc/ca.pem".into(),
            identity: Some(("/c.pem".into(), "/k.pem".into())),
        })
    );
    assert!(
        !format!("{c:?}").contains("p@ss"),
        "Debug never shows the password"
    );
}

#[test]
fn rejects_bad_urls_naming_the_problem() {
    let cases = [
        ("etcd://", "no etcd endpoint"),
        ("etcd:///prefix", "no etcd endpoint"),
        ("etcd://h1,,h2", "stray comma"),
        ("etcd://h1:http", "port \"http\""),
        ("etcd://h1:0", "port \"0\""),
        ("etcd://h1//x", "empty path segment"),
        ("etcd://h1?ca=/ca.pem", "use etcd+https://"),
        ("etcd://h1?timeout=3", "unknown parameter \"timeout\""),
        ("etcd+https://h1", "needs ?ca="),
        ("etcd+https://h1?ca=/ca.pem&cert=/c.pem", "together"),
        ("etcd://@h1", "user before '@' is empty"),
        ("etcd://u:%zz@h1", "percent-encoding"),
        ("etcds://h1", "expected etcd://"),
    ];
    for (url, want) in cases {
        match EtcdConfig::from_url(url) {
            Err(StoreError::BadUrl { reason, .. }) => {
                assert!(reason.contains(want), "{url}: {reason:?} lacks {want:?}")
            }
            other => panic!("{url}: expected BadUrl, got {other:?}"),
        }
    }
}

#[test]
fn store_url_picks_the_backend_and_hides_passwords() {
    use crate::store::{redact_url, StoreUrl};
    assert!(matches!(
        StoreUrl::parse("etcd://h1:2379,h2:2379/p"),
        Ok(StoreUrl::Etcd(_))
    ));
    match StoreUrl::parse("mysql://u:secret@h/db") {
        Err(e @ StoreError::BadUrl { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("unknown scheme"), "{msg}");
            assert!(!msg.contains("secret"), "{msg}");
        }
        other => panic!("expected BadUrl, got {other:?}"),
    }
    match StoreUrl::parse("etcd://u:secret@h1:99999") {
        Err(e) => assert!(!e.to_string().contains("secret"), "{e}"),
        Ok(_) => panic!("port 99999 accepted"),
    }
    assert_eq!(
        redact_url("etcd://root:pw@h1:2379,h2/p?x=1"),
        "etcd://root:***@h1:2379,h2/p?x=1"
    );
    assert_eq!(redact_url("etcd://h1:2379/p"), "etcd://h1:2379/p");
    assert_eq!(redact_url("file:///a/b.redb"), "file:///a/b.redb");
}

#[test]
fn prefix_end_is_the_next_key() {
    assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
    assert_eq!(prefix_end("ab"), b"ac".to_vec());
}

#[tokio::test]
async fn unreachable_etcd_is_retried_then_reported() {
    // Nothing listens on port 1: every attempt fails fast; the retry window bounds it.
    let mut config = EtcdConfig::new(vec!["http://127.0.0.1:1".into()]);
    config.connect_timeout = Duration::from_millis(300);
    config.request_timeout = Duration::from_millis(300);
    config.startup_retry = Some(Duration::from_millis(900));
    let started = std::time::Instant::now();
    let err = EtcdStore::connect(config).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("unreachable"), "{msg}");
    assert!(msg.contains("127.0.0.1:1"), "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "gave up in time"
    );
}

// ---------------------------------------------------------------------------------------
// Against a real etcd

/// Captures this thread's log output (for asserting on warnings).
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

async fn put_raw(s: &EtcdStore, key: &str, value: Vec<u8>) {
    let mut kv = s.client().kv_client();
    kv.put(key, value, None).await.unwrap();
}

#[tokio::test]
async fn corrupt_records_are_skipped_and_reported_with_their_key() {
    let Some((s, _ctx)) = test_store().await else {
        return;
    };
    let logs = LogBuf::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let start = s.current_revision().await.unwrap() + 1;
    s.create_job(suite_fns::job("job-a", JobState::Pending))
        .await
        .unwrap();
    let bad_key = format!("{}jobs/job-b", s.root());
    put_raw(&s, &bad_key, b"\xff\xff\xff not protobuf".to_vec()).await;
    // Valid protobuf under the wrong key.
    let mismatched_key = format!("{}jobs/job-c", s.root());
    let other = suite_fns::job("job-zzz", JobState::Pending);
    put_raw(&s, &mismatched_key, other.encode_to_vec()).await;
    s.create_job(suite_fns::job("job-d", JobState::Running))
        .await
        .unwrap();

    let page = s.list_jobs(&JobQuery::default()).await.unwrap();
    let ids: Vec<&str> = page.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, ["job-a", "job-d"], "corrupt records skipped");
    let logged = logs.text();
    assert!(logged.contains(&bad_key), "key reported: {logged}");
    assert!(logged.contains(&mismatched_key), "key reported: {logged}");
    assert!(logged.contains("does not decode"), "{logged}");

    match s.get_job("job-b").await {
        Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, bad_key),
        other => panic!("expected Corrupt, got {other:?}"),
    }

    // A watch skips them too.
    let mut watch = s.watch_jobs(start).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let c = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push(c.job.id);
    }
    assert_eq!(seen, ["job-a", "job-d"]);

    // Checkpoints and workers.
    s.record_checkpoint(CheckpointInfo {
        job_id: "job-a".into(),
        step: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let bad_cp = format!("{}checkpoints/job-a/{:020}", s.root(), 2);
    put_raw(&s, &bad_cp, b"\xff\xff".to_vec()).await;
    let steps: Vec<u64> = s
        .list_checkpoints("job-a")
        .await
        .unwrap()
        .iter()
        .map(|c| c.step)
        .collect();
    assert_eq!(steps, [1]);
    let bad_worker = format!("{}workers/w-bad", s.root());
    put_raw(&s, &bad_worker, b"\xff\xff".to_vec()).await;
    assert!(s.list_workers().await.unwrap().is_empty());
    let logged = logs.text();
    assert!(logged.contains(&bad_cp), "{logged}");
    assert!(logged.contains(&bad_worker), "{logged}");
}

#[tokio::test]
async fn keys_follow_the_documented_layout() {
    let Some((s, _ctx)) = test_store().await else {
        return;
    };
    let job = s
        .create_job(suite_fns::job("job-k", JobState::Pending))
        .await
        .unwrap();
    s.record_checkpoint(CheckpointInfo {
        job_id: "job-k".into(),
        step: 7,
        ..Default::default()
    })
    .await
    .unwrap();
    s.register_worker(
        Worker {
            id: "w-k".into(),
            ..Default::default()
        },
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let mut kv = s.client().kv_client();
    let root = s.root().to_string();
    assert!(root.starts_with("/trainyard-test/") && root.ends_with("/v1/"));

    let resp = kv.get(format!("{root}jobs/job-k"), None).await.unwrap();
    let stored = &resp.kvs()[0];
    assert_eq!(
        stored.mod_revision(),
        job.revision,
        "revision = mod_revision"
    );
    assert_eq!(stored.lease(), 0);
    assert_eq!(Job::decode(stored.value()).unwrap().record_version, 1);

    let cp_key = format!("{root}checkpoints/job-k/00000000000000000007");
    let resp = kv.get(cp_key, None).await.unwrap();
    assert_eq!(resp.kvs().len(), 1);

    let resp = kv.get(format!("{root}workers/w-k"), None).await.unwrap();
    assert_ne!(resp.kvs()[0].lease(), 0, "the worker key is lease-bound");
}

#[tokio::test]
async fn update_with_revision_zero_never_creates() {
    let Some((s, _ctx)) = test_store().await else {
        return;
    };
    let r = s
        .update_job(suite_fns::job("job-ghost", JobState::Pending), 0)
        .await;
    assert_eq!(r, Err(StoreError::NotFound("job-ghost".into())));
    assert_eq!(s.get_job("job-ghost").await.unwrap(), None);
}

#[tokio::test]
async fn prefixes_isolate_stores() {
    let Some((a, _ca)) = test_store().await else {
        return;
    };
    let Some((b, _cb)) = test_store().await else {
        return;
    };
    a.create_job(suite_fns::job("job-1", JobState::Pending))
        .await
        .unwrap();
    assert!(b
        .list_jobs(&JobQuery::default())
        .await
        .unwrap()
        .jobs
        .is_empty());
    assert_eq!(b.get_job("job-1").await.unwrap(), None);
    b.create_job(suite_fns::job("job-1", JobState::Running))
        .await
        .expect("same id under another prefix");
}

#[tokio::test]
async fn compacted_revision_is_a_typed_error() {
    let Some((s, _ctx)) = test_store().await else {
        return;
    };
    s.create_job(suite_fns::job("job-x", JobState::Pending))
        .await
        .unwrap();
    // Compact away revision 1 only: no other test ever watches from before 2 (a fresh
    // prefix's current_revision is the cluster's, >= 1), so this is safe in parallel.
    let mut kv = s.client().kv_client();
    if let Err(e) = kv.compact(2, None).await {
        assert!(
            e.to_string().contains("compacted"),
            "compact failed for another reason: {e}"
        );
    }
    match s.watch_jobs(1).await {
        Err(StoreError::Compacted { requested, oldest }) => {
            assert_eq!(requested, 1);
            assert!(oldest >= 2, "oldest {oldest}");
        }
        Err(e) => panic!("expected Compacted, got {e}"),
        Ok(_) => panic!("expected Compacted, got a watch"),
    }
    // A watch from a revision that is still there works.
    let from = s.current_revision().await.unwrap();
    let mut w = s.watch_jobs(from).await.unwrap();
    let c = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(c.job.id, "job-x");
    assert_eq!(c.kind, ChangeKind::Created);
}

#[tokio::test]
async fn lease_lost_in_etcd_is_reported_by_expire_workers() {
    let Some((s, _ctx)) = test_store().await else {
        return;
    };
    let ttl = Duration::from_secs(30);
    for id in ["w-hb", "w-silent", "w-ok"] {
        s.register_worker(
            Worker {
                id: id.into(),
                ..Default::default()
            },
            ttl,
        )
        .await
        .unwrap();
    }
    assert!(s.keep_alive("w-ok").await.unwrap());
    assert!(
        s.keep_alive("w-hb").await.unwrap(),
        "opens the keep-alive stream"
    );
    // Someone (etcd's own expiry while we could not reach it, an operator) drops the leases.
    let lease_of = |id: &str| lock(&s.inner.leases).get(id).map(|r| r.lease_id).unwrap();
    let mut lease = s.client().lease_client();
    lease.revoke(lease_of("w-hb")).await.unwrap();
    lease.revoke(lease_of("w-silent")).await.unwrap();

    // A heartbeat finds out at once...
    assert!(!s.keep_alive("w-hb").await.unwrap());
    // ...a silent worker at the next remote check (at most a second apart).
    tokio::time::sleep(REMOTE_EXPIRY_CHECK + Duration::from_millis(100)).await;
    let dead: Vec<String> = s
        .expire_workers()
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(dead, ["w-hb", "w-silent"]);
    let alive: Vec<String> = s
        .list_workers()
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(alive, ["w-ok"]);
    assert!(s.keep_alive("w-ok").await.unwrap());
    tokio::time::sleep(REMOTE_EXPIRY_CHECK + Duration::from_millis(100)).await;
    assert!(
        s.expire_workers().await.unwrap().is_empty(),
        "reported once"
    );
}

#[tokio::test]
async fn open_by_url_connects_to_etcd() {
    let Some(endpoints) = etcd_endpoints() else {
        return;
    };
    let hosts: Vec<&str> = endpoints
        .iter()
        .map(|e| e.trim_start_matches("http://"))
        .collect();
    let prefix = format!("/trainyard-test/{}", uuid::Uuid::new_v4().simple());
    let url = format!("etcd://{}{prefix}", hosts.join(","));
    let store = crate::store::open(&url).await.unwrap();
    let job = store
        .create_job(suite_fns::job("job-url", JobState::Pending))
        .await
        .unwrap();
    assert!(job.revision > 0);
    // Same prefix through a direct connection: the job is there.
    let mut config = EtcdConfig::new(endpoints);
    config.prefix = prefix;
    let direct = EtcdStore::connect(config).await.unwrap();
    assert_eq!(direct.get_job("job-url").await.unwrap(), Some(job));
}

/// A checkpoint record of `job_id` at `step`.
fn checkpoint(job_id: &str, step: u64) -> CheckpointInfo {
    CheckpointInfo {
        job_id: job_id.into(),
        step,
        attempt: 1,
        ..Default::default()
    }
}

#[tokio::test]
async fn fenced_writes_fail_with_not_leader_once_the_leader_key_changes() {
    let Some((s, _ctx)) = test_store().await else {
        return;
    };
    let leader_key = format!("{}leader/fence-test", s.root());
    let mut kv = s.client().kv_client();
    kv.put(leader_key.as_str(), "coordinator-a", None)
        .await
        .unwrap();
    let term = kv.get(leader_key.as_str(), None).await.unwrap().kvs()[0].create_revision();
    s.set_fence(Some(Fence {
        key: leader_key.clone().into_bytes(),
        create_revision: term,
    }));

    // While the fence holds, writes go through and compare-and-set works as before.
    let created = s
        .create_job(suite_fns::job("job-1", JobState::Pending))
        .await
        .expect("a fenced create while leading");
    let updated = s
        .update_job(
            suite_fns::job("job-1", JobState::Scheduled),
            created.revision,
        )
        .await
        .expect("a fenced update while leading");
    let stale = s
        .update_job(suite_fns::job("job-1", JobState::Running), created.revision)
        .await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "a stale revision is still a conflict, not a lost fence: {stale:?}"
    );
    assert_eq!(
        s.create_job(suite_fns::job("job-1", JobState::Pending))
            .await,
        Err(StoreError::AlreadyExists("job-1".into()))
    );
    s.record_checkpoint(checkpoint("job-1", 10))
        .await
        .expect("a fenced checkpoint while leading");

    // Another coordinator wins: the election key is deleted and created again (new term).
    kv.delete(leader_key.as_str(), None).await.unwrap();
    kv.put(leader_key.as_str(), "coordinator-b", None)
        .await
        .unwrap();
    let not_leader = StoreError::NotLeader {
        key: leader_key.clone(),
        term,
    };
    let before = s.current_revision().await.unwrap();
    assert_eq!(
        s.create_job(suite_fns::job("job-2", JobState::Pending))
            .await,
        Err(not_leader.clone())
    );
    assert_eq!(
        s.update_job(suite_fns::job("job-1", JobState::Running), updated.revision)
            .await,
        Err(not_leader.clone())
    );
    assert_eq!(
        s.record_checkpoint(checkpoint("job-1", 20)).await,
        Err(not_leader.clone())
    );
    assert_eq!(
        s.delete_checkpoint("job-1", 10).await,
        Err(not_leader.clone()),
        "a deposed leader's retention deletes nothing"
    );
    // Nothing was written.
    assert_eq!(s.current_revision().await.unwrap(), before);
    assert_eq!(s.get_job("job-2").await.unwrap(), None);
    let job1 = s
        .get_job("job-1")
        .await
        .unwrap()
        .expect("job-1 is still there");
    assert_eq!(job1.revision, updated.revision);
    assert_eq!(job1.state(), JobState::Scheduled);
    let steps: Vec<u64> = s
        .list_checkpoints("job-1")
        .await
        .unwrap()
        .iter()
        .map(|c| c.step)
        .collect();
    assert_eq!(steps, vec![10]);

    // A missing election key also fails the fence.
    kv.delete(leader_key.as_str(), None).await.unwrap();
    assert_eq!(
        s.update_job(suite_fns::job("job-1", JobState::Running), updated.revision)
            .await,
        Err(not_leader)
    );

    // Without a fence (stepped down, single node) writes are unconditional again.
    s.set_fence(None);
    s.update_job(suite_fns::job("job-1", JobState::Running), updated.revision)
        .await
        .expect("an unfenced update");
}

// ---------------------------------------------------------------------------------------
// Batched writes (store/etcd/batch.rs)

#[tokio::test]
async fn concurrent_writes_share_transactions_and_conflicts_stay_precise() {
    let Some((s, _ctx)) = test_store().await else {
        return;
    };
    let s = Arc::new(s);
    const N: usize = 64;
    let txns_before = s.job_write_transactions();
    let creates = (0..N).map(|i| {
        let s = s.clone();
        async move {
            s.create_job(suite_fns::job(&format!("job-b{i:03}"), JobState::Pending))
                .await
        }
    });
    let created: Vec<Job> = futures::future::join_all(creates)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("every create succeeds");
    let txns = s.job_write_transactions() - txns_before;
    eprintln!("{N} concurrent creates took {txns} etcd transactions");
    assert!(
        (txns as usize) < N / 2,
        "{N} concurrent creates should share transactions, took {txns}"
    );
    for j in &created {
        let stored = s.get_job(&j.id).await.unwrap().expect("stored");
        assert_eq!(stored.revision, j.revision, "{}: the stored revision", j.id);
    }

    // Half the updates are stale (expected revision off by one): in a batch with fresh
    // ones they must fail alone, with the key's real revision, and the fresh ones succeed.
    let updates = created.iter().enumerate().map(|(i, j)| {
        let s = s.clone();
        let (id, rev) = (j.id.clone(), j.revision);
        async move {
            let expected = if i % 2 == 0 { rev } else { rev - 1 };
            let r = s
                .update_job(suite_fns::job(&id, JobState::Scheduled), expected)
                .await;
            (i, rev, r)
        }
    });
    for (i, rev, r) in futures::future::join_all(updates).await {
        if i % 2 == 0 {
            let j = r.unwrap_or_else(|e| panic!("fresh update {i} failed: {e}"));
            assert!(j.revision > rev);
        } else {
            match r {
                Err(StoreError::Conflict {
                    expected, actual, ..
                }) => {
                    assert_eq!(expected, rev - 1);
                    assert_eq!(actual, rev, "the conflict names the real revision");
                }
                other => panic!("stale update {i}: expected a conflict, got {other:?}"),
            }
        }
    }
    for (i, j) in created.iter().enumerate() {
        let stored = s.get_job(&j.id).await.unwrap().expect("stored");
        let want = if i % 2 == 0 {
            JobState::Scheduled
        } else {
            JobState::Pending
        };
        assert_eq!(stored.state(), want, "{}", j.id);
    }

    // Concurrent creates of one id (in one batch or not): exactly one wins.
    let dupes = (0..8).map(|_| {
        let s = s.clone();
        async move {
            s.create_job(suite_fns::job("job-dup", JobState::Pending))
                .await
        }
    });
    let results = futures::future::join_all(dupes).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    assert!(results
        .iter()
        .filter(|r| r.is_err())
        .all(|r| matches!(r, Err(StoreError::AlreadyExists(_)))));
}

#[tokio::test]
async fn batched_writes_respect_the_fence() {
    let Some((s, _ctx)) = test_store().await else {
        return;
    };
    let leader_key = format!("{}leader/batch-fence", s.root());
    let mut kv = s.client().kv_client();
    kv.put(leader_key.as_str(), "a", None).await.unwrap();
    let term = kv.get(leader_key.as_str(), None).await.unwrap().kvs()[0].create_revision();
    s.set_fence(Some(Fence {
        key: leader_key.clone().into_bytes(),
        create_revision: term,
    }));
    kv.delete(leader_key.as_str(), None).await.unwrap();
    kv.put(leader_key.as_str(), "b", None).await.unwrap();
    let s = Arc::new(s);
    let before = s.current_revision().await.unwrap();
    let creates = (0..32).map(|i| {
        let s = s.clone();
        async move {
            s.create_job(suite_fns::job(&format!("job-f{i}"), JobState::Pending))
                .await
        }
    });
    for r in futures::future::join_all(creates).await {
        assert!(
            matches!(r, Err(StoreError::NotLeader { .. })),
            "a batched write under a lost fence: {r:?}"
        );
    }
    assert_eq!(
        s.current_revision().await.unwrap(),
        before,
        "nothing written"
    );
}
