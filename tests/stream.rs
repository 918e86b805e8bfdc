//! Streams: producer, consumer groups, claim, dead letters, idempotency, shutdown.
//! Every test runs on the standalone server and on the cluster.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aether_redis::stream::{ConsumerOptions, StartFrom, StreamMessage, Streams};
use aether_redis::{Error, Redis};
use serde::{Deserialize, Serialize};

mod support;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Job {
    n: i64,
}

/// Short timings so that claims and retries happen within a second.
fn fast() -> ConsumerOptions {
    ConsumerOptions::default()
        .with_block(Duration::from_millis(100))
        .with_claim_min_idle(Duration::from_millis(400))
        .with_claim_interval(Duration::from_millis(100))
        .with_batch(10)
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn raw(redis: &Redis, cmd: &redis::Cmd) -> redis::Value {
    let mut conn = redis.connection().await.unwrap();
    cmd.query_async(&mut conn).await.unwrap()
}

/// Counts handler runs per message id.
#[derive(Default, Clone)]
struct Seen(Arc<Mutex<HashMap<String, (u64, i64)>>>);

impl Seen {
    fn record(&self, msg: &StreamMessage<Job>) {
        let mut map = self.0.lock().unwrap();
        let e = map.entry(msg.id.clone()).or_insert((0, msg.payload.n));
        e.0 += 1;
    }
    fn runs(&self) -> u64 {
        self.0.lock().unwrap().values().map(|v| v.0).sum()
    }
    fn distinct(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn max_runs(&self) -> u64 {
        self.0
            .lock()
            .unwrap()
            .values()
            .map(|v| v.0)
            .max()
            .unwrap_or(0)
    }
}

/// (delivery count the handler was given, `XPENDING` count when it finished).
type DeliveryCounts = (u64, Option<u64>);
/// An `XRANGE` entry with its fields as raw bytes.
type RawStreamEntry = (String, HashMap<Vec<u8>, Vec<u8>>);
/// An extended `XPENDING` row: id, consumer, idle ms, deliveries.
type PendingRow = (String, String, u64, u64);

/// Claims after 1.5 s idle, checked every 50 ms: the slow handlers below outlast that, and a
/// heartbeat (every 500 ms) would have to be a whole second late for a wrong claim.
fn slow_claims() -> ConsumerOptions {
    fast()
        .with_claim_min_idle(Duration::from_millis(1500))
        .with_claim_interval(Duration::from_millis(50))
}

/// The group's delivery count of `id` (`XPENDING`); `None` once it is no longer pending.
async fn pending_count(redis: &Redis, stream: &str, group: &str, id: &str) -> Option<u64> {
    let reply = raw(
        redis,
        redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg(id)
            .arg(id)
            .arg(1),
    )
    .await;
    let redis::Value::Array(rows) = reply else {
        panic!("XPENDING: {reply:?}")
    };
    let row = rows.into_iter().next()?;
    let redis::Value::Array(row) = row else {
        panic!("XPENDING row: {row:?}")
    };
    match row[3] {
        redis::Value::Int(n) => Some(n as u64),
        ref other => panic!("XPENDING count: {other:?}"),
    }
}

/// The consumer `id` is pending for (`XPENDING`); `None` once it is no longer pending.
async fn owner(redis: &Redis, stream: &str, group: &str, id: &str) -> Option<String> {
    let rows: Vec<PendingRow> = support::query(
        redis,
        redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg(id)
            .arg(id)
            .arg(1),
    )
    .await;
    rows.into_iter().next().map(|r| r.1)
}

/// A handler that records delivery counts and, on delivery 1 of `Job { n: 1 }`, waits for
/// `release` and fails; everything else succeeds.
fn gated_handler(
    release: Arc<tokio::sync::Notify>,
    deliveries: Arc<Mutex<Vec<u64>>>,
) -> impl Fn(StreamMessage<Job>) -> HandlerFuture + Send + Sync + 'static {
    move |msg: StreamMessage<Job>| {
        let (release, deliveries) = (release.clone(), deliveries.clone());
        Box::pin(async move {
            deliveries.lock().unwrap().push(msg.delivery_count);
            if msg.delivery_count == 1 && msg.payload.n == 1 {
                release.notified().await;
                return Err(std::io::Error::other("the first delivery fails"));
            }
            Ok(())
        })
    }
}

/// Creates the group `workers` on stream `name` (from the beginning) and publishes one `Job`
/// (`n` = 1) to it; returns the message id.
async fn group_with_one_message(streams: &Streams, name: &str) -> String {
    streams
        .create_group(name, "workers", StartFrom::Beginning)
        .await
        .unwrap();
    streams
        .producer::<Job>(name)
        .unwrap()
        .publish(&Job { n: 1 })
        .await
        .unwrap()
}

async fn pending(redis: &Redis, name: &str, group: &str) -> u64 {
    redis
        .streams()
        .group_info(name, group)
        .await
        .unwrap()
        .unwrap()
        .pending
}

/// Appends `count` entries `payload {"n":0}` to `key` in one script (fast for large counts).
async fn fill(redis: &Redis, key: &str, count: u64) {
    fill_with(redis, key, count, &[]).await;
}

/// [`fill`] with `extra` field/value pairs in every entry (e.g. one `idem` key for all).
async fn fill_with(redis: &Redis, key: &str, count: u64, extra: &[(&str, &str)]) {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg("for i = 1, tonumber(ARGV[1]) do redis.call('XADD', KEYS[1], '*', 'payload', ARGV[2], unpack(ARGV, 3)) end")
        .arg(1).arg(key).arg(count).arg("{\"n\":0}");
    for (field, value) in extra {
        cmd.arg(*field).arg(*value);
    }
    raw(redis, &cmd).await;
}

/// `XADD key * <fields>`, field names as raw bytes; returns the id.
async fn xadd(redis: &Redis, key: &str, fields: &[(&[u8], &[u8])]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    match raw(redis, &cmd).await {
        redis::Value::BulkString(id) => String::from_utf8(id).unwrap(),
        other => panic!("XADD: {other:?}"),
    }
}

aether_redis::contract_tests! {
    async fn publish_consume_ack_and_group_metrics(redis) {
        let streams = redis.streams();
        let producer = streams.producer::<Job>("orders").unwrap();
        assert!(streams.create_group("orders", "billing", StartFrom::New).await.unwrap());
        let ids = producer.publish_many(&(0..20).map(|n| Job { n }).collect::<Vec<_>>()).await.unwrap();
        assert_eq!(ids.len(), 20);
        producer.publish(&Job { n: 20 }).await.unwrap();
        let info = streams.group_info("orders", "billing").await.unwrap().unwrap();
        assert_eq!(info.lag, Some(21));
        assert_eq!(info.pending, 0);

        let seen = Seen::default();
        let s = seen.clone();
        let consumer = streams
            .consumer::<Job>("orders", "billing", fast().with_concurrency(4))
            .unwrap();
        assert!(consumer.name().contains(&std::process::id().to_string()));
        let running = consumer.spawn(move |msg: StreamMessage<Job>| {
            let s = s.clone();
            async move {
                assert_eq!(msg.delivery_count, 1);
                s.record(&msg);
                Ok::<_, std::io::Error>(())
            }
        });
        wait_for("21 processed", Duration::from_secs(10), || running.metrics().processed == 21).await;
        let info = streams.group_info("orders", "billing").await.unwrap().unwrap();
        assert_eq!((info.lag, info.pending, info.consumers), (Some(0), 0, 1));
        let metrics = running.shutdown().await.unwrap();
        assert_eq!(metrics.processed, 21);
        assert_eq!((metrics.errors, metrics.already_acked, metrics.in_flight), (0, 0, 0));
        assert_eq!((seen.distinct(), seen.max_runs()), (21, 1));
        let mut values: Vec<i64> = seen.0.lock().unwrap().values().map(|v| v.1).collect();
        values.sort();
        assert_eq!(values, (0..21).collect::<Vec<_>>());
        assert_eq!(streams.len("orders").await.unwrap(), 21);
    }

    async fn groups_start_where_documented_and_existing_groups_are_tolerated(redis) {
        let streams = redis.streams();
        let task = streams.producer::<Job>(aether_redis::stream::TASK_EVENTS).unwrap();
        let hook = streams.producer::<Job>(aether_redis::stream::WEBHOOK_EVENTS).unwrap();
        task.publish(&Job { n: 1 }).await.unwrap();
        hook.publish(&Job { n: 1 }).await.unwrap();
        streams.ensure_default_groups().await.unwrap();
        streams.ensure_default_groups().await.unwrap();
        let t = streams.group_info("task_events", "task_workers").await.unwrap().unwrap();
        let w = streams.group_info("webhook_events", "webhook_workers").await.unwrap().unwrap();
        assert_eq!(t.lag, Some(1), "task_workers starts at the beginning");
        assert_eq!(w.lag, Some(0), "webhook_workers starts at new messages");
        assert!(!streams.create_group("task_events", "task_workers", StartFrom::New).await.unwrap());
        assert!(streams.group_info("task_events", "nobody").await.unwrap().is_none());
        assert!(streams.group_info("no_such_stream", "g").await.unwrap().is_none());
    }

    async fn bad_input_is_a_typed_error(redis) {
        let streams = redis.streams();
        for bad in ["", "a:b", "a{b}", "a*", "a b"] {
            assert!(matches!(streams.producer::<Job>(bad), Err(Error::InvalidInput { .. })), "{bad:?}");
        }
        assert!(matches!(
            streams.consumer::<Job>("s", "g:x", ConsumerOptions::default()),
            Err(Error::InvalidInput { .. })
        ));
        for options in [
            ConsumerOptions::default().with_batch(0),
            ConsumerOptions::default().with_concurrency(0),
            ConsumerOptions::default().with_max_retries(0),
            ConsumerOptions::default().with_block(Duration::ZERO),
            ConsumerOptions::default().with_consumer_name("a:b"),
        ] {
            assert!(matches!(streams.consumer::<Job>("s", "g", options), Err(Error::InvalidInput { .. })));
        }
        let producer = streams.producer::<Job>("s").unwrap();
        assert!(matches!(
            producer.publish_idempotent(&Job { n: 1 }, "k*").await,
            Err(Error::InvalidInput { .. })
        ));
        for dead_id in ["nope", "17", "17-", "+17-0"] {
            assert!(matches!(
                streams.replay_dead_letter("s", dead_id).await,
                Err(Error::InvalidInput { what: "stream entry id", .. })
            ), "{dead_id:?}");
        }
        // A TTL Redis would refuse after the XADD is refused before anything is sent, so that
        // no retry can add a copy.
        let forever = producer.clone().with_idempotency_ttl(Duration::MAX);
        for _ in 0..2 {
            assert!(matches!(
                forever.publish_idempotent(&Job { n: 1 }, "k1").await,
                Err(Error::InvalidInput { what: "idempotency TTL", .. })
            ));
        }
        assert_eq!(streams.len("s").await.unwrap(), 0);
    }

    async fn idempotent_publish_adds_once_under_concurrent_retries(redis) {
        let producer = redis.streams().producer::<Job>("payments").unwrap();
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let p = producer.clone();
            tasks.push(tokio::spawn(async move { p.publish_idempotent(&Job { n: 7 }, "pay-1").await.unwrap() }));
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        assert_eq!(results.iter().filter(|r| !r.duplicate).count(), 1);
        assert!(results.iter().all(|r| r.id == results[0].id));
        assert_eq!(redis.streams().len("payments").await.unwrap(), 1);
        let other = producer.publish_idempotent(&Job { n: 8 }, "pay-2").await.unwrap();
        assert!(!other.duplicate);
        assert_ne!(other.id, results[0].id);
        let key = producer.keys().producer_idempotency("pay-1");
        let ttl = raw(&redis, redis::cmd("PTTL").arg(&key)).await;
        let ttl = match ttl { redis::Value::Int(t) => t, other => panic!("{other:?}") };
        assert!(ttl > 23 * 3600 * 1000 && ttl <= 24 * 3600 * 1000, "{ttl}");
    }

    async fn crashed_consumer_work_is_redelivered_with_count_two(redis) {
        let streams = redis.streams();
        let producer = streams.producer::<Job>("crash").unwrap();
        streams.create_group("crash", "workers", StartFrom::Beginning).await.unwrap();
        producer.publish_many(&(0..20).map(|n| Job { n }).collect::<Vec<_>>()).await.unwrap();

        // The first consumer takes a batch of 5 and hangs on every message.
        let started: Arc<Mutex<Option<Instant>>> = Arc::default();
        let held = Seen::default();
        let (st, h) = (started.clone(), held.clone());
        let first = streams
            .consumer::<Job>("crash", "workers", fast().with_batch(5).with_concurrency(4).with_consumer_name("doomed"))
            .unwrap()
            .spawn(move |msg: StreamMessage<Job>| {
                let (st, h) = (st.clone(), h.clone());
                async move {
                    st.lock().unwrap().get_or_insert_with(Instant::now);
                    h.record(&msg);
                    std::future::pending::<()>().await;
                    Ok::<_, std::io::Error>(())
                }
            });
        wait_for("the doomed consumer to hold 4 messages", Duration::from_secs(10), || held.distinct() == 4).await;
        first.abort();
        let crashed_at = started.lock().unwrap().unwrap();
        let doomed: Vec<String> = held.0.lock().unwrap().keys().cloned().collect();

        let seen = Seen::default();
        let counts: Arc<Mutex<HashMap<String, (u64, Instant)>>> = Arc::default();
        let (s, c) = (seen.clone(), counts.clone());
        let second = streams
            .consumer::<Job>("crash", "workers", fast())
            .unwrap()
            .spawn(move |msg: StreamMessage<Job>| {
                let (s, c) = (s.clone(), c.clone());
                async move {
                    s.record(&msg);
                    c.lock().unwrap().insert(msg.id.clone(), (msg.delivery_count, Instant::now()));
                    Ok::<_, std::io::Error>(())
                }
            });
        wait_for("all 20 processed", Duration::from_secs(15), || seen.distinct() == 20).await;
        let counts = counts.lock().unwrap().clone();
        // claim_min_idle + one claim interval, plus scheduling slack for a loaded machine.
        let bound = Duration::from_millis(400 + 100) + Duration::from_secs(2);
        for id in &doomed {
            let (count, at) = counts[id];
            assert_eq!(count, 2, "{id}");
            assert!(at.duration_since(crashed_at) <= bound, "{id} redelivered after {:?}", at.duration_since(crashed_at));
        }
        // The fifth entry of the doomed batch was read but never started: also redelivered.
        assert_eq!(counts.values().filter(|(c, _)| *c == 2).count(), 5);
        let metrics = second.shutdown().await.unwrap();
        assert_eq!(metrics.processed, 20);
        assert_eq!(metrics.claimed, 5);
        assert_eq!(seen.max_runs(), 1);
        assert_eq!(streams.group_info("crash", "workers").await.unwrap().unwrap().pending, 0);
    }

    async fn poison_message_is_dead_lettered_after_max_retries_and_replayed(redis) {
        let streams = redis.streams();
        let producer = streams.producer::<Job>("poison").unwrap();
        streams.create_group("poison", "workers", StartFrom::Beginning).await.unwrap();
        let poison_id = producer.publish(&Job { n: -1 }).await.unwrap();
        producer.publish_many(&(0..100).map(|n| Job { n }).collect::<Vec<_>>()).await.unwrap();

        let attempts = Arc::new(AtomicU64::new(0));
        let cured = Arc::new(AtomicBool::new(false));
        let replayed: Arc<Mutex<Option<StreamMessage<Job>>>> = Arc::default();
        let seen = Seen::default();
        let (a, cu, r, s) = (attempts.clone(), cured.clone(), replayed.clone(), seen.clone());
        let running = streams
            .consumer::<Job>("poison", "workers", fast().with_max_retries(3))
            .unwrap()
            .spawn(move |msg: StreamMessage<Job>| {
                let (a, cu, r, s) = (a.clone(), cu.clone(), r.clone(), s.clone());
                async move {
                    if msg.payload.n < 0 {
                        if !cu.load(Ordering::SeqCst) {
                            a.fetch_add(1, Ordering::SeqCst);
                            return Err(format!("poison payload {}", msg.payload.n));
                        }
                        *r.lock().unwrap() = Some(msg);
                        return Ok(());
                    }
                    s.record(&msg);
                    Ok(())
                }
            });
        wait_for("dead letter", Duration::from_secs(15), || running.metrics().dead_lettered == 1).await;
        wait_for("100 healthy", Duration::from_secs(15), || seen.distinct() == 100).await;
        assert_eq!(attempts.load(Ordering::SeqCst), 3);
        assert_eq!(running.metrics().retried, 2);
        assert_eq!(seen.max_runs(), 1);
        let dead = streams.dead_letters("poison", 10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].original_id, poison_id);
        assert_eq!(dead[0].delivery_count, 3);
        assert_eq!(dead[0].group, "workers");
        assert_eq!(dead[0].consumer, running.name());
        assert!(dead[0].error.contains("poison payload -1"), "{}", dead[0].error);
        assert_eq!(dead[0].payload::<Job>().unwrap(), Job { n: -1 });
        wait_for("no pending", Duration::from_secs(5), || running.metrics().processed == 100).await;
        assert_eq!(streams.group_info("poison", "workers").await.unwrap().unwrap().pending, 0);

        cured.store(true, Ordering::SeqCst);
        let new_id = streams.replay_dead_letter("poison", &dead[0].id).await.unwrap().unwrap();
        wait_for("replayed message handled", Duration::from_secs(10), || replayed.lock().unwrap().is_some()).await;
        let msg = replayed.lock().unwrap().clone().unwrap();
        assert_eq!((msg.id.as_str(), msg.replay_of.as_deref(), msg.delivery_count), (new_id.as_str(), Some(poison_id.as_str()), 1));
        assert!(streams.dead_letters("poison", 10).await.unwrap().is_empty());
        assert_eq!(streams.replay_dead_letter("poison", &dead[0].id).await.unwrap(), None);
        let metrics = running.shutdown().await.unwrap();
        assert_eq!((metrics.processed, metrics.dead_lettered, metrics.errors), (101, 1, 0));
    }

    async fn undecodable_payload_is_dead_lettered_and_replay_is_atomic(redis) {
        let streams = redis.streams();
        let keys = streams.keys("garbage").unwrap();
        streams.create_group("garbage", "workers", StartFrom::Beginning).await.unwrap();
        raw(&redis, redis::cmd("XADD").arg(keys.stream()).arg("*").arg("payload").arg("{not json")).await;
        raw(&redis, redis::cmd("XADD").arg(keys.stream()).arg("*").arg("other").arg("x")).await;
        let runs = Arc::new(AtomicU64::new(0));
        let r = runs.clone();
        let running = streams
            .consumer::<Job>("garbage", "workers", fast().with_max_retries(1))
            .unwrap()
            .spawn(move |_msg: StreamMessage<Job>| {
                r.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, std::io::Error>(()) }
            });
        wait_for("2 dead letters", Duration::from_secs(10), || running.metrics().dead_lettered == 2).await;
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        running.shutdown().await.unwrap();
        let mut dead = streams.dead_letters("garbage", 10).await.unwrap();
        // Both failed concurrently: order the dead letters by their original id.
        dead.sort_by(|a, b| a.original_id.cmp(&b.original_id));
        assert!(dead[0].error.contains("cannot decode"), "{}", dead[0].error);
        assert!(dead[1].error.contains("no `payload` field"), "{}", dead[1].error);
        assert!(matches!(dead[0].payload::<Job>(), Err(Error::Decode { .. })));

        let mut replays = Vec::new();
        for _ in 0..8 {
            let (s, id) = (streams.clone(), dead[0].id.clone());
            replays.push(tokio::spawn(async move { s.replay_dead_letter("garbage", &id).await.unwrap() }));
        }
        let mut won = 0;
        for r in replays {
            won += usize::from(r.await.unwrap().is_some());
        }
        assert_eq!(won, 1, "exactly one concurrent replay moves the dead letter");
        assert_eq!(streams.dead_letters("garbage", 10).await.unwrap().len(), 1);
        assert_eq!(streams.len("garbage").await.unwrap(), 3);
        assert_eq!(streams.replay_dead_letters("garbage", 10).await.unwrap().len(), 1);
        assert!(streams.dead_letters("garbage", 10).await.unwrap().is_empty());
        assert_eq!(streams.trim_dead_letters("garbage", Duration::ZERO).await.unwrap(), 0);
    }

    async fn a_message_with_more_fields_than_a_script_takes_is_dead_lettered_and_replayed_whole(redis) {
        // 5000 fields: past the about 8000 arguments a Lua `unpack` can pass to one command.
        let streams = redis.streams();
        let keys = streams.keys("wide").unwrap();
        streams.create_group("wide", "workers", StartFrom::Beginning).await.unwrap();
        let mut xadd = redis::cmd("XADD");
        xadd.arg(keys.stream()).arg("*").arg("payload").arg(r#"{"n":7}"#);
        for i in 0..5000 {
            xadd.arg(format!("f{i}")).arg(format!("v{i}"));
        }
        raw(&redis, &xadd).await;
        let runs = Arc::new(AtomicU64::new(0));
        let r = runs.clone();
        let running = streams
            .consumer::<Job>("wide", "workers", fast().with_max_retries(1))
            .unwrap()
            .spawn(move |_msg: StreamMessage<Job>| {
                r.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(std::io::Error::other("bounced")) }
            });
        wait_for("the dead letter", Duration::from_secs(10), || running.metrics().dead_lettered == 1).await;
        running.shutdown().await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let dead = streams.dead_letters("wide", 10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].problem, None);
        assert_eq!(dead[0].fields.len(), 5001);
        assert_eq!(dead[0].fields[5000], ("f4999".to_owned(), b"v4999".to_vec()));
        assert_eq!(dead[0].payload::<Job>().unwrap(), Job { n: 7 });
        assert!(dead[0].error.contains("bounced"), "{}", dead[0].error);
        let pending: redis::Value = raw(&redis, redis::cmd("XPENDING").arg(keys.stream()).arg("workers")).await;
        assert!(matches!(&pending, redis::Value::Array(p) if p.first() == Some(&redis::Value::Int(0))), "{pending:?}");

        let replays: Vec<_> = (0..4)
            .map(|_| {
                let (s, id) = (streams.clone(), dead[0].id.clone());
                tokio::spawn(async move { s.replay_dead_letter("wide", &id).await.unwrap() })
            })
            .collect();
        let mut won = 0;
        for r in replays {
            won += usize::from(r.await.unwrap().is_some());
        }
        assert_eq!(won, 1, "exactly one concurrent replay moves the dead letter");
        assert!(streams.dead_letters("wide", 10).await.unwrap().is_empty());
        let entries: redis::Value = raw(&redis, redis::cmd("XRANGE").arg(keys.stream()).arg("-").arg("+")).await;
        let redis::Value::Array(entries) = entries else { panic!("{entries:?}") };
        assert_eq!(entries.len(), 2, "the original and its replay");
        let redis::Value::Array(replayed) = &entries[1] else { panic!() };
        let redis::Value::Array(fields) = &replayed[1] else { panic!() };
        // payload, 5000 fields, replay_of.
        assert_eq!(fields.len(), 2 * 5002);
    }

    async fn duplicate_delivery_of_a_handled_message_skips_the_handler(redis) {
        let streams = redis.streams();
        let producer = streams.producer::<Job>("dups").unwrap();
        let keys = streams.keys("dups").unwrap();
        streams.create_group("dups", "workers", StartFrom::Beginning).await.unwrap();
        for n in 0..5 {
            producer.publish(&Job { n }).await.unwrap();
            producer.publish_idempotent(&Job { n: 100 + n }, &format!("k{n}")).await.unwrap();
        }
        let seen = Seen::default();
        let s = seen.clone();
        let running = streams
            .consumer::<Job>("dups", "workers", fast())
            .unwrap()
            .spawn(move |msg: StreamMessage<Job>| {
                let s = s.clone();
                async move { s.record(&msg); Ok::<_, std::io::Error>(()) }
            });
        wait_for("10 processed", Duration::from_secs(10), || running.metrics().processed == 10).await;
        // Every message is delivered again (a group reset), and a producer without
        // deduplication sends k0 a second time under a new id.
        raw(&redis, redis::cmd("XGROUP").arg("SETID").arg(keys.stream()).arg("workers").arg("0")).await;
        raw(&redis, redis::cmd("XADD").arg(keys.stream()).arg("*").arg("payload").arg("{\"n\":100}").arg("idem").arg("k0")).await;
        wait_for("11 duplicates", Duration::from_secs(10), || running.metrics().duplicates == 11).await;
        let metrics = running.shutdown().await.unwrap();
        assert_eq!(metrics.processed, 10);
        assert_eq!(seen.runs(), 10);
        assert_eq!(seen.max_runs(), 1);
        assert_eq!(streams.group_info("dups", "workers").await.unwrap().unwrap().pending, 0);
        // Records carry the idempotency TTL (24 h by default).
        let record = keys.processed("workers", Some("k0"), "");
        let ttl = raw(&redis, redis::cmd("PTTL").arg(&record)).await;
        assert!(matches!(ttl, redis::Value::Int(t) if t > 23 * 3600 * 1000), "{ttl:?}");
    }

    async fn thousands_of_twins_of_one_record_are_acked_in_one_go(redis) {
        // One read of 9000 messages that share one idempotency key: one handler run, 8999
        // twins acked with it. More ids than one Lua `unpack` can take (about 8000).
        let streams = redis.streams();
        let keys = streams.keys("twins").unwrap();
        streams.create_group("twins", "workers", StartFrom::Beginning).await.unwrap();
        fill_with(&redis, keys.stream(), 9000, &[("idem", "same")]).await;
        let seen = Seen::default();
        let s = seen.clone();
        let running = streams
            .consumer::<Job>("twins", "workers", fast().with_batch(10_000))
            .unwrap()
            .spawn(move |msg: StreamMessage<Job>| {
                let s = s.clone();
                async move { s.record(&msg); Ok::<_, std::io::Error>(()) }
            });
        wait_for("8999 duplicates", Duration::from_secs(20), || running.metrics().duplicates == 8999).await;
        let metrics = running.shutdown().await.unwrap();
        assert_eq!((metrics.processed, metrics.duplicates, metrics.errors), (1, 8999, 0));
        assert_eq!(seen.runs(), 1);
        assert_eq!(pending(&redis, "twins", "workers").await, 0);
    }

    async fn trimmed_pending_entries_are_cleared_and_never_handled(redis) {
        let streams = redis.streams();
        let producer = streams.producer::<Job>("trimmed").unwrap();
        let keys = streams.keys("trimmed").unwrap();
        streams.create_group("trimmed", "workers", StartFrom::Beginning).await.unwrap();
        producer.publish_many(&(0..10).map(|n| Job { n }).collect::<Vec<_>>()).await.unwrap();
        // A consumer reads everything and dies; then the stream is trimmed under its PEL.
        raw(&redis, redis::cmd("XREADGROUP").arg("GROUP").arg("workers").arg("ghost")
            .arg("COUNT").arg(100).arg("STREAMS").arg(keys.stream()).arg(">")).await;
        raw(&redis, redis::cmd("XTRIM").arg(keys.stream()).arg("MAXLEN").arg(0)).await;
        assert_eq!(streams.group_info("trimmed", "workers").await.unwrap().unwrap().pending, 10);

        let seen = Seen::default();
        let s = seen.clone();
        let running = streams
            .consumer::<Job>("trimmed", "workers", fast())
            .unwrap()
            .spawn(move |msg: StreamMessage<Job>| {
                let s = s.clone();
                async move { s.record(&msg); Ok::<_, std::io::Error>(()) }
            });
        wait_for("10 cleared", Duration::from_secs(10), || running.metrics().cleared == 10).await;
        assert_eq!(seen.runs(), 0);
        assert_eq!(streams.group_info("trimmed", "workers").await.unwrap().unwrap().pending, 0);
        producer.publish(&Job { n: 42 }).await.unwrap();
        wait_for("the next message", Duration::from_secs(10), || seen.runs() == 1).await;
        let metrics = running.shutdown().await.unwrap();
        assert_eq!((metrics.cleared, metrics.processed, metrics.claimed, metrics.errors), (10, 1, 0, 0));
    }

    async fn idle_entries_behind_a_long_live_front_of_the_pending_list_are_claimed(redis) {
        // 200 entries held by a live consumer (kept fresh) fill the front of the pending list;
        // behind them, 10 entries of a dead one. A claim pass scans at most 100 entries with
        // batch 1, so passes must go on from where the last one stopped.
        let streams = redis.streams();
        let producer = streams.producer::<Job>("deep-pel").unwrap();
        let keys = streams.keys("deep-pel").unwrap();
        let stream = keys.stream().to_owned();
        streams.create_group("deep-pel", "workers", StartFrom::Beginning).await.unwrap();
        producer.publish_many(&(0..210).map(|n| Job { n }).collect::<Vec<_>>()).await.unwrap();
        let read = |consumer: &'static str, count: usize| {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP").arg("workers").arg(consumer).arg("COUNT").arg(count)
                .arg("STREAMS").arg(&stream).arg(">");
            cmd
        };
        let live_reply = raw(&redis, &read("live", 200)).await;
        raw(&redis, &read("dead", 10)).await;
        // [[stream, [[id, fields], ..]]]
        let live_ids: Vec<String> = match live_reply {
            redis::Value::Array(streams) => streams.into_iter().flat_map(|s| match s {
                redis::Value::Array(mut pair) if pair.len() == 2 => match pair.pop() {
                    Some(redis::Value::Array(entries)) => entries.into_iter().filter_map(|e| match e {
                        redis::Value::Array(mut e) if !e.is_empty() => match e.swap_remove(0) {
                            redis::Value::BulkString(id) => String::from_utf8(id).ok(),
                            _ => None,
                        },
                        _ => None,
                    }).collect::<Vec<_>>(),
                    _ => Vec::new(),
                },
                _ => Vec::new(),
            }).collect(),
            other => panic!("XREADGROUP answered {other:?}"),
        };
        assert_eq!(live_ids.len(), 200);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let fresh = {
            let redis = redis.clone();
            let stream = stream.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut cmd = redis::cmd("XCLAIM");
                    cmd.arg(&stream).arg("workers").arg("live").arg(0).arg(&live_ids).arg("JUSTID");
                    raw(&redis, &cmd).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let seen = Seen::default();
        let s = seen.clone();
        let running = streams
            .consumer::<Job>("deep-pel", "workers", fast().with_batch(1))
            .unwrap()
            .spawn(move |msg: StreamMessage<Job>| {
                let s = s.clone();
                async move { s.record(&msg); Ok::<_, std::io::Error>(()) }
            });
        wait_for("the dead consumer's 10", Duration::from_secs(10), || seen.distinct() == 10).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        fresh.await.unwrap();
        running.shutdown().await.unwrap();
        let handled: Vec<i64> = { let mut n: Vec<i64> = seen.0.lock().unwrap().values().map(|v| v.1).collect(); n.sort(); n };
        assert_eq!(handled, (200..210).collect::<Vec<i64>>());
    }

    async fn idle_consumer_blocks_without_errors_or_stalling_the_handle(redis) {
        let streams = redis.streams();
        let producer = streams.producer::<Job>("quiet").unwrap();
        let seen = Seen::default();
        let s = seen.clone();
        let options = ConsumerOptions::default()
            .with_block(Duration::from_millis(150))
            .with_claim_min_idle(Duration::from_secs(60));
        let running = streams
            .consumer::<Job>("quiet", "workers", options)
            .unwrap()
            .spawn(move |msg: StreamMessage<Job>| {
                let s = s.clone();
                async move { s.record(&msg); Ok::<_, std::io::Error>(()) }
            });
        // Across ~10 block periods, the shared connection keeps answering.
        let key = streams.keys("quiet").unwrap().stream().to_owned() + "-side";
        let started = Instant::now();
        let mut round_trips = 0;
        while started.elapsed() < Duration::from_millis(1500) {
            let mut conn = redis.connection().await.unwrap();
            let _: () = redis::cmd("SET").arg(&key).arg(round_trips).query_async(&mut conn).await.unwrap();
            let v: i64 = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
            assert_eq!(v, round_trips);
            redis.health().await.unwrap();
            round_trips += 1;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert!(round_trips > 10);
        assert_eq!(running.metrics().errors, 0);
        producer.publish(&Job { n: 1 }).await.unwrap();
        wait_for("a message after the idle time", Duration::from_secs(5), || seen.runs() == 1).await;
        let metrics = running.shutdown().await.unwrap();
        assert_eq!((metrics.errors, metrics.processed), (0, 1));
        let _: () = redis::cmd("DEL").arg(&key).query_async(&mut redis.connection().await.unwrap()).await.unwrap();
    }

    async fn graceful_shutdown_loses_nothing_and_acks_nothing_twice(redis) {
        let streams = redis.streams();
        let producer = streams.producer::<Job>("shutdown").unwrap();
        streams.create_group("shutdown", "workers", StartFrom::Beginning).await.unwrap();
        producer.publish_many(&(0..60).map(|n| Job { n }).collect::<Vec<_>>()).await.unwrap();
        let seen = Seen::default();
        let handler = |s: Seen| move |msg: StreamMessage<Job>| {
            let s = s.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(40)).await;
                s.record(&msg);
                Ok::<_, std::io::Error>(())
            }
        };
        let first = streams
            .consumer::<Job>("shutdown", "workers", fast().with_batch(20).with_concurrency(4))
            .unwrap()
            .spawn(handler(seen.clone()));
        wait_for("some progress", Duration::from_secs(10), || first.metrics().processed >= 8).await;
        assert!(first.metrics().in_flight > 0);
        let by_first = first.shutdown().await.unwrap();
        assert_eq!(by_first.in_flight, 0);
        assert_eq!(by_first.processed, seen.runs(), "every finished handler was acked");
        assert_eq!(by_first.already_acked, 0);
        assert!(by_first.processed < 60);

        let second = streams
            .consumer::<Job>("shutdown", "workers", fast())
            .unwrap()
            .spawn(handler(seen.clone()));
        wait_for("all 60", Duration::from_secs(15), || seen.distinct() == 60).await;
        let by_second = second.shutdown().await.unwrap();
        assert_eq!(seen.max_runs(), 1, "no message handled twice");
        assert_eq!(by_first.processed + by_second.processed, 60);
        assert_eq!(by_second.already_acked, 0);
        assert_eq!(streams.group_info("shutdown", "workers").await.unwrap().unwrap().pending, 0);
    }

    async fn graceful_shutdown_gives_unstarted_messages_back_without_counting_a_delivery(redis) {
        // One delivery each: a message queued but never started at shutdown would be
        // dead-lettered by the next consumer's claim if that delivery counted.
        let streams = redis.streams();
        let producer = streams.producer::<Job>("handback").unwrap();
        let key = streams.keys("handback").unwrap().stream().to_owned();
        streams.create_group("handback", "workers", StartFrom::Beginning).await.unwrap();
        producer.publish_many(&(0..60).map(|n| Job { n }).collect::<Vec<_>>()).await.unwrap();
        let seen = Seen::default();
        let counts = Arc::new(Mutex::new(Vec::new()));
        let handler = |s: Seen, counts: Arc<Mutex<Vec<u64>>>| move |msg: StreamMessage<Job>| {
            let (s, counts) = (s.clone(), counts.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(40)).await;
                counts.lock().unwrap().push(msg.delivery_count);
                s.record(&msg);
                Ok::<_, std::io::Error>(())
            }
        };
        let first = streams
            .consumer::<Job>("handback", "workers", fast().with_batch(20).with_concurrency(4).with_max_retries(1))
            .unwrap();
        let first_name = first.name().to_owned();
        let first = first.spawn(handler(seen.clone(), counts.clone()));
        wait_for("some progress", Duration::from_secs(10), || first.metrics().processed >= 8).await;
        let by_first = first.shutdown().await.unwrap();
        assert_eq!(by_first.processed, seen.runs(), "every finished handler was acked");
        assert_eq!(by_first.errors, 0);
        // What the first consumer left pending was never started: given back with no delivery
        // counted, and idle enough for the next claim.
        let rows: Vec<PendingRow> = support::query(
            &redis,
            redis::cmd("XPENDING").arg(&key).arg("workers").arg("-").arg("+").arg(100),
        )
        .await;
        assert!(!rows.is_empty(), "some queued messages never started");
        for (id, consumer, idle, deliveries) in &rows {
            assert_eq!(consumer, &first_name);
            assert_eq!(*deliveries, 0, "{id} was never handled");
            assert!(*idle >= 400, "{id} is idle for {idle} ms only");
        }

        let second = streams
            .consumer::<Job>("handback", "workers", fast().with_max_retries(1))
            .unwrap()
            .spawn(handler(seen.clone(), counts.clone()));
        wait_for("all 60", Duration::from_secs(15), || seen.distinct() == 60).await;
        let by_second = second.shutdown().await.unwrap();
        assert_eq!(seen.max_runs(), 1, "no message handled twice");
        assert_eq!(by_first.processed + by_second.processed, 60);
        assert_eq!(by_second.claimed, rows.len() as u64);
        assert_eq!((by_second.dead_lettered, by_second.already_acked), (0, 0));
        assert!(counts.lock().unwrap().iter().all(|&n| n == 1), "every handler saw delivery 1");
        assert!(streams.dead_letters("handback", 100).await.unwrap().is_empty());
        assert_eq!(streams.group_info("handback", "workers").await.unwrap().unwrap().pending, 0);
    }

    async fn a_group_that_vanishes_under_a_running_consumer_is_re_created_without_loss(redis) {
        // `webhook_workers` starts at new messages (`$`): re-created there, it would skip what
        // was published while it was gone.
        let streams = redis.streams();
        let producer = streams.producer::<Job>("vanishing").unwrap();
        let key = streams.keys("vanishing").unwrap().stream().to_owned();
        let group = aether_redis::stream::WEBHOOK_WORKERS;
        let seen = Seen::default();
        let s = seen.clone();
        let running = streams
            .consumer::<Job>("vanishing", group, fast())
            .unwrap()
            .spawn(move |msg: StreamMessage<Job>| {
                let s = s.clone();
                async move { s.record(&msg); Ok::<_, std::io::Error>(()) }
            });
        let group_exists = || async { streams.group_info("vanishing", group).await.unwrap().is_some() };
        let started = Instant::now();
        while !group_exists().await {
            assert!(started.elapsed() < Duration::from_secs(5), "the group was never created");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let handled = |n: i64| seen.0.lock().unwrap().values().any(|v| v.1 == n);
        // The stream deleted and re-created by a producer's XADD in one step, the group gone
        // with it: first before this consumer read anything, then after it has.
        for n in [1, 2] {
            let mut tx = redis::pipe();
            tx.atomic()
                .cmd("DEL").arg(&key).ignore()
                .cmd("XADD").arg(&key).arg("*").arg("payload").arg(format!("{{\"n\":{n}}}")).ignore();
            let mut conn = redis.connection().await.unwrap();
            let () = tx.query_async(&mut conn).await.unwrap();
            wait_for("the message published as the stream was re-created", Duration::from_secs(5), || handled(n)).await;
        }
        // The group destroyed on the live stream, a message published before it is back.
        let mut tx = redis::pipe();
        tx.atomic()
            .cmd("XGROUP").arg("DESTROY").arg(&key).arg(group).ignore()
            .cmd("XADD").arg(&key).arg("*").arg("payload").arg("{\"n\":3}").ignore();
        let mut conn = redis.connection().await.unwrap();
        let () = tx.query_async(&mut conn).await.unwrap();
        wait_for("the message published while the group was gone", Duration::from_secs(5), || handled(3)).await;
        // Deleted with nothing to re-create it: the consumer does (MKSTREAM), after its last read.
        raw(&redis, redis::cmd("DEL").arg(&key)).await;
        let started = Instant::now();
        while !group_exists().await {
            assert!(started.elapsed() < Duration::from_secs(5), "the group was never re-created");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        producer.publish(&Job { n: 4 }).await.unwrap();
        wait_for("a message published after the re-creation", Duration::from_secs(5), || handled(4)).await;
        let metrics = running.shutdown().await.unwrap();
        assert_eq!((seen.distinct(), seen.max_runs()), (4, 1), "each message handled once");
        assert_eq!(metrics.processed, 4);
        assert_eq!(streams.group_info("vanishing", group).await.unwrap().unwrap().pending, 0);
    }

    async fn a_group_destroyed_before_a_consumer_read_anything_is_not_replayed_from_the_start(redis) {
        // A long retained history the group had skipped (`$`): a consumer that has read nothing
        // re-creates the group where it stood when the consumer started, not at `0`.
        let streams = redis.streams();
        let producer = streams.producer::<Job>("history").unwrap();
        let key = streams.keys("history").unwrap().stream().to_owned();
        let group = aether_redis::stream::WEBHOOK_WORKERS;
        producer.publish_many(&(0..50).map(|n| Job { n }).collect::<Vec<_>>()).await.unwrap();
        let seen = Seen::default();
        let s = seen.clone();
        let running = streams
            .consumer::<Job>("history", group, fast())
            .unwrap()
            .spawn(move |msg: StreamMessage<Job>| {
                let s = s.clone();
                async move { s.record(&msg); Ok::<_, std::io::Error>(()) }
            });
        let started = Instant::now();
        while streams.group_info("history", group).await.unwrap().is_none() {
            assert!(started.elapsed() < Duration::from_secs(5), "the group was never created");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut tx = redis::pipe();
        tx.atomic()
            .cmd("XGROUP").arg("DESTROY").arg(&key).arg(group).ignore()
            .cmd("XADD").arg(&key).arg("*").arg("payload").arg("{\"n\":100}").ignore();
        let mut conn = redis.connection().await.unwrap();
        let () = tx.query_async(&mut conn).await.unwrap();
        wait_for("the message published while the group was gone", Duration::from_secs(5), || seen.distinct() >= 1).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        running.shutdown().await.unwrap();
        let handled: Vec<i64> = seen.0.lock().unwrap().values().map(|v| v.1).collect();
        assert_eq!(handled, [100], "the skipped history was delivered");
    }

    async fn idle_consumers_without_pending_entries_are_removed(redis) {
        let streams = redis.streams();
        let producer = streams.producer::<Job>("members").unwrap();
        let keys = streams.keys("members").unwrap();
        streams.create_group("members", "workers", StartFrom::Beginning).await.unwrap();
        producer.publish(&Job { n: 1 }).await.unwrap();
        raw(&redis, redis::cmd("XREADGROUP").arg("GROUP").arg("workers").arg("busy")
            .arg("COUNT").arg(1).arg("STREAMS").arg(keys.stream()).arg(">")).await;
        raw(&redis, redis::cmd("XGROUP").arg("CREATECONSUMER").arg(keys.stream()).arg("workers").arg("gone")).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(streams.remove_idle_consumers("members", "workers", Duration::from_secs(60)).await.unwrap().is_empty());
        let removed = streams.remove_idle_consumers("members", "workers", Duration::from_millis(20)).await.unwrap();
        assert_eq!(removed, vec!["gone".to_owned()]);
        let left = streams.consumers("members", "workers").await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!((left[0].name.as_str(), left[0].pending), ("busy", 1));
    }

    async fn a_panicking_handler_fails_only_its_message_and_its_worker_goes_on(redis) {
        let streams = redis.streams();
        let producer = streams.producer::<Job>("panics").unwrap();
        streams.create_group("panics", "workers", StartFrom::Beginning).await.unwrap();
        let bad = producer.publish(&Job { n: -1 }).await.unwrap();
        producer.publish_many(&(0..30).map(|n| Job { n }).collect::<Vec<_>>()).await.unwrap();
        let seen = Seen::default();
        let s = seen.clone();
        // One worker: everything after the panic is handled by the worker that saw it.
        let running = streams
            .consumer::<Job>("panics", "workers", fast().with_max_retries(2).with_concurrency(1))
            .unwrap()
            .spawn(move |msg: StreamMessage<Job>| {
                let s = s.clone();
                async move {
                    s.record(&msg);
                    tokio::task::yield_now().await;
                    assert!(msg.payload.n >= 0, "poison payload");
                    Ok::<_, std::io::Error>(())
                }
            });
        wait_for("dead letter", Duration::from_secs(15), || running.metrics().dead_lettered == 1).await;
        wait_for("30 healthy", Duration::from_secs(15), || running.metrics().processed == 30).await;
        let dead = streams.dead_letters("panics", 10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!((dead[0].original_id.as_str(), dead[0].delivery_count), (bad.as_str(), 2));
        assert!(dead[0].error.contains("panicked"), "{}", dead[0].error);
        assert_eq!(seen.runs(), 32);
        let metrics = running.shutdown().await.unwrap();
        assert_eq!(
            (metrics.processed, metrics.dead_lettered, metrics.retried, metrics.errors, metrics.in_flight),
            (30, 1, 1, 0, 0)
        );
        assert_eq!(streams.group_info("panics", "workers").await.unwrap().unwrap().pending, 0);
    }

    async fn a_handler_slower_than_claim_min_idle_fails_once_and_is_redelivered_once(redis) {
        let streams = redis.streams();
        let producer = streams.producer::<Job>("slow_fail").unwrap();
        streams.create_group("slow_fail", "workers", StartFrom::Beginning).await.unwrap();
        producer.publish(&Job { n: 1 }).await.unwrap();
        let deliveries: Arc<Mutex<Vec<u64>>> = Arc::default();
        let d = deliveries.clone();
        let running = streams
            .consumer::<Job>("slow_fail", "workers", slow_claims().with_max_retries(3))
            .unwrap()
            .spawn(move |msg: StreamMessage<Job>| {
                let d = d.clone();
                async move {
                    d.lock().unwrap().push(msg.delivery_count);
                    if msg.delivery_count == 1 {
                        // Over two claim_min_idle periods while this consumer holds the message.
                        tokio::time::sleep(Duration::from_millis(3500)).await;
                        return Err("the first attempt fails, slowly".to_owned());
                    }
                    Ok(())
                }
            });
        wait_for("an outcome", Duration::from_secs(30), || {
            let m = running.metrics();
            m.processed + m.dead_lettered > 0
        })
        .await;
        // Time for a wrong claim or dead letter to show.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let metrics = running.shutdown().await.unwrap();
        assert_eq!(*deliveries.lock().unwrap(), vec![1, 2], "delivery counts seen by the handler");
        assert_eq!(
            (metrics.processed, metrics.retried, metrics.dead_lettered, metrics.claimed),
            (1, 1, 0, 1)
        );
        assert!(streams.dead_letters("slow_fail", 10).await.unwrap().is_empty());
        assert_eq!(pending(&redis, "slow_fail", "workers").await, 0);
    }

    async fn slow_running_and_queued_messages_keep_their_delivery_count(redis) {
        let streams = redis.streams();
        let producer = streams.producer::<Job>("slow_ok").unwrap();
        let stream = streams.keys("slow_ok").unwrap().stream().to_owned();
        streams.create_group("slow_ok", "workers", StartFrom::Beginning).await.unwrap();
        producer.publish_many(&(0..4).map(|n| Job { n }).collect::<Vec<_>>()).await.unwrap();
        let seen = Seen::default();
        let counts: Arc<Mutex<Vec<DeliveryCounts>>> = Arc::default();
        let (s, c, r) = (seen.clone(), counts.clone(), redis.clone());
        // Two workers for four messages: two of them wait 1.6 s in the queue, then run 1.6 s.
        let running = streams
            .consumer::<Job>("slow_ok", "workers", slow_claims().with_batch(4).with_concurrency(2))
            .unwrap()
            .spawn(move |msg: StreamMessage<Job>| {
                let (s, c, r, stream) = (s.clone(), c.clone(), r.clone(), stream.clone());
                async move {
                    s.record(&msg);
                    tokio::time::sleep(Duration::from_millis(1600)).await;
                    let now = pending_count(&r, &stream, "workers", &msg.id).await;
                    c.lock().unwrap().push((msg.delivery_count, now));
                    Ok::<_, std::io::Error>(())
                }
            });
        wait_for("4 processed", Duration::from_secs(30), || running.metrics().processed == 4).await;
        let metrics = running.shutdown().await.unwrap();
        let counts = counts.lock().unwrap().clone();
        assert_eq!(counts, vec![(1, Some(1)); 4], "(delivered as, XPENDING count at the end)");
        assert_eq!((metrics.processed, metrics.claimed, metrics.dead_lettered), (4, 0, 0));
        assert_eq!((seen.distinct(), seen.max_runs()), (4, 1));
    }

    async fn two_consumers_never_take_each_others_slow_messages(redis) {
        let streams = redis.streams();
        let producer = streams.producer::<Job>("slow_pair").unwrap();
        streams.create_group("slow_pair", "workers", StartFrom::Beginning).await.unwrap();
        producer.publish_many(&(0..4).map(|n| Job { n }).collect::<Vec<_>>()).await.unwrap();
        let seen = Seen::default();
        let started = Arc::new(AtomicU64::new(0));
        let handler = |s: Seen, st: Arc<AtomicU64>| move |msg: StreamMessage<Job>| {
            let (s, st) = (s.clone(), st.clone());
            async move {
                st.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2000)).await;
                s.record(&msg);
                Ok::<_, std::io::Error>(())
            }
        };
        // Two workers for four messages: two run 2 s, two wait as long in the queue, and the
        // first consumer's loop waits with them (no claim pass of its own meanwhile).
        let first = streams
            .consumer::<Job>("slow_pair", "workers",
                slow_claims().with_batch(4).with_concurrency(2).with_consumer_name("first"))
            .unwrap()
            .spawn(handler(seen.clone(), started.clone()));
        wait_for("the first consumer to start 2", Duration::from_secs(10), || {
            started.load(Ordering::SeqCst) == 2
        })
        .await;
        let second = streams
            .consumer::<Job>("slow_pair", "workers", slow_claims().with_consumer_name("second"))
            .unwrap()
            .spawn(handler(seen.clone(), started.clone()));
        wait_for("4 processed", Duration::from_secs(30), || {
            first.metrics().processed + second.metrics().processed >= 4
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (a, b) = (first.shutdown().await.unwrap(), second.shutdown().await.unwrap());
        assert_eq!((seen.distinct(), seen.max_runs()), (4, 1), "each message handled once");
        assert_eq!((a.processed, b.processed, b.claimed), (4, 0, 0));
        assert_eq!(a.dead_lettered + b.dead_lettered, 0);
        assert!(streams.dead_letters("slow_pair", 10).await.unwrap().is_empty());
    }

    async fn non_utf8_field_names_fail_only_their_own_entry(redis) {
        let streams = redis.streams();
        let keys = streams.keys("bytes").unwrap();
        let key = keys.stream();
        streams.create_group("bytes", "workers", StartFrom::Beginning).await.unwrap();
        let job = |n: i64| format!("{{\"n\":{n}}}").into_bytes();
        xadd(&redis, key, &[(b"payload", &job(0))]).await;
        let claimed = xadd(&redis, key, &[(b"\xff\xfe", b"x"), (b"payload", &job(-1))]).await;
        // A consumer that dies holding both: they come back through XAUTOCLAIM.
        raw(&redis, redis::cmd("XREADGROUP").arg("GROUP").arg("workers").arg("ghost")
            .arg("COUNT").arg(2).arg("STREAMS").arg(key).arg(">")).await;
        for n in 1..=5 {
            xadd(&redis, key, &[(b"payload", &job(n))]).await;
        }
        let read = xadd(&redis, key, &[(b"caf\xe9", b"y"), (b"payload", &job(-2))]).await;
        xadd(&redis, key, &[(b"payload", &job(6))]).await;

        let seen = Seen::default();
        let s = seen.clone();
        let running = streams
            .consumer::<Job>("bytes", "workers", fast().with_max_retries(3))
            .unwrap()
            .spawn(move |msg: StreamMessage<Job>| {
                let s = s.clone();
                async move { s.record(&msg); Ok::<_, std::io::Error>(()) }
            });
        wait_for("7 healthy and 2 dead letters", Duration::from_secs(15), || {
            seen.distinct() == 7 && running.metrics().dead_lettered == 2
        })
        .await;
        let metrics = running.shutdown().await.unwrap();
        assert_eq!((metrics.processed, metrics.errors), (7, 0));
        let mut values: Vec<i64> = seen.0.lock().unwrap().values().map(|v| v.1).collect();
        values.sort();
        assert_eq!(values, (0..=6).collect::<Vec<_>>());
        let mut dead = streams.dead_letters("bytes", 10).await.unwrap();
        dead.sort_by(|a, b| a.original_id.cmp(&b.original_id));
        assert_eq!(dead.len(), 2);
        for (d, id, name, exact, value, n) in [
            (&dead[0], &claimed, "\\xff\\xfe", &b"\xff\xfe"[..], &b"x"[..], -1),
            (&dead[1], &read, "caf\\xe9", b"caf\xe9", b"y", -2),
        ] {
            assert_eq!(&d.original_id, id);
            assert!(d.error.contains("not UTF-8") && d.error.contains(name), "{}", d.error);
            assert_eq!(d.fields[0], (name.to_owned(), value.to_vec()), "the name, shown escaped");
            assert_eq!(d.payload::<Job>().unwrap(), Job { n });
            // Listed with a problem (its name is not UTF-8), so a bulk replay leaves it alone.
            assert!(d.problem.as_deref().is_some_and(|p| p.contains("not UTF-8")), "{:?}", d.problem);
            // The dead letter holds the original bytes, not their escaped form.
            let stored: Vec<RawStreamEntry> = support::query(
                &redis,
                redis::cmd("XRANGE").arg(keys.dead()).arg(&d.id).arg(&d.id),
            ).await;
            assert!(stored[0].1.contains_key(exact), "{:?}", stored[0].1.keys().collect::<Vec<_>>());
        }
        assert_eq!(pending(&redis, "bytes", "workers").await, 0);
        assert!(streams.replay_dead_letters("bytes", 10).await.unwrap().is_empty());
        // Replayed by id, the message is the original one, byte for byte.
        let new_id = streams.replay_dead_letter("bytes", &dead[0].id).await.unwrap().unwrap();
        let replayed: Vec<RawStreamEntry> = support::query(
            &redis,
            redis::cmd("XRANGE").arg(key).arg(&new_id).arg(&new_id),
        ).await;
        assert_eq!(replayed[0].1.get(&b"\xff\xfe"[..]).map(Vec::as_slice), Some(&b"x"[..]));
    }

    async fn out_of_range_options_are_typed_errors_and_the_bounds_work(redis) {
        let streams = redis.streams();
        let year = Duration::from_secs(365 * 24 * 3600);
        let d = ConsumerOptions::default;
        for (options, option) in [
            (d().with_block(Duration::MAX), "block"),
            (d().with_block(year + Duration::from_millis(1)), "block"),
            (d().with_claim_min_idle(Duration::MAX), "claim_min_idle"),
            (d().with_claim_interval(Duration::MAX), "claim_interval"),
            (d().with_handler_timeout(Duration::MAX), "handler_timeout"),
            (d().with_handler_timeout(Duration::ZERO), "handler_timeout"),
            (d().with_dead_letter_retention(Duration::MAX), "dead_letter_retention"),
            (d().with_dead_letter_retention(Duration::ZERO), "dead_letter_retention"),
            (d().with_idempotency_ttl(Some(Duration::MAX)), "idempotency_ttl"),
            (d().with_remove_idle_consumers_after(Some(Duration::MAX)), "remove_idle_consumers_after"),
        ] {
            match streams.consumer::<Job>("bounds", "workers", options) {
                Err(Error::InvalidInput { what, reason }) => {
                    assert_eq!(what, option, "{reason}");
                    assert!(reason.contains("1 year"), "{reason}");
                }
                other => panic!("{option}: {other:?}"),
            }
        }
        // Every duration at the bound: the consumer runs, handles and shuts down.
        let options = d()
            .with_block(year)
            .with_claim_min_idle(year)
            .with_claim_interval(year)
            .with_handler_timeout(year)
            .with_dead_letter_retention(year)
            .with_idempotency_ttl(Some(year))
            .with_remove_idle_consumers_after(Some(year));
        let seen = Seen::default();
        let s = seen.clone();
        let running = streams.consumer::<Job>("bounds", "workers", options).unwrap().spawn(
            move |msg: StreamMessage<Job>| {
                let s = s.clone();
                async move { s.record(&msg); Ok::<_, std::io::Error>(()) }
            },
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let id = streams.producer::<Job>("bounds").unwrap().publish(&Job { n: 1 }).await.unwrap();
        wait_for("the message", Duration::from_secs(10), || running.metrics().processed == 1).await;
        let metrics = running.shutdown().await.unwrap();
        assert_eq!((metrics.processed, metrics.errors), (1, 0));
        let record = streams.keys("bounds").unwrap().processed("workers", None, &id);
        let ttl = raw(&redis, redis::cmd("PTTL").arg(&record)).await;
        assert!(matches!(ttl, redis::Value::Int(t) if t > 364 * 24 * 3600 * 1000), "{ttl:?}");
    }

    async fn racing_consumers_dead_letter_each_message_exactly_once(redis) {
        let streams = redis.streams();
        let producer = streams.producer::<Job>("race").unwrap();
        let key = streams.keys("race").unwrap().stream().to_owned();
        streams.create_group("race", "workers", StartFrom::Beginning).await.unwrap();
        let ids = producer.publish_many(&(0..40).map(|n| Job { n }).collect::<Vec<_>>()).await.unwrap();
        // Read by a consumer that died, with a delivery count past max_retries: every live
        // consumer's claim pass wants to dead-letter them, and with 1 ms claim_min_idle they
        // claim them from each other while doing so.
        raw(&redis, redis::cmd("XREADGROUP").arg("GROUP").arg("workers").arg("ghost")
            .arg("COUNT").arg(100).arg("STREAMS").arg(&key).arg(">")).await;
        raw(&redis, redis::cmd("XCLAIM").arg(&key).arg("workers").arg("ghost").arg(0).arg(&ids)
            .arg("RETRYCOUNT").arg(10).arg("JUSTID")).await;
        let runs = Arc::new(AtomicU64::new(0));
        let options = fast()
            .with_claim_min_idle(Duration::from_millis(1))
            .with_claim_interval(Duration::from_millis(10))
            .with_max_retries(3);
        let consumers: Vec<_> = (0..4)
            .map(|_| {
                let r = runs.clone();
                streams.consumer::<Job>("race", "workers", options.clone()).unwrap().spawn(
                    move |_msg: StreamMessage<Job>| {
                        r.fetch_add(1, Ordering::SeqCst);
                        async { Ok::<_, std::io::Error>(()) }
                    },
                )
            })
            .collect();
        wait_for("40 dead letters", Duration::from_secs(15), || {
            consumers.iter().map(|c| c.metrics().dead_lettered).sum::<u64>() >= 40
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut total = 0;
        for c in consumers {
            total += c.shutdown().await.unwrap().dead_lettered;
        }
        assert_eq!(total, 40);
        let dead = streams.dead_letters("race", 100).await.unwrap();
        let originals: std::collections::HashSet<&str> =
            dead.iter().map(|d| d.original_id.as_str()).collect();
        assert_eq!((dead.len(), originals.len()), (40, 40), "each message dead-lettered once");
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        assert_eq!(pending(&redis, "race", "workers").await, 0);
    }

    async fn processed_records_and_acks_are_seen_together(redis) {
        let streams = redis.streams();
        let producer = streams.producer::<Job>("acked").unwrap();
        let keys = streams.keys("acked").unwrap();
        streams.create_group("acked", "workers", StartFrom::Beginning).await.unwrap();
        let ids = producer.publish_many(&(0..300).map(|n| Job { n }).collect::<Vec<_>>()).await.unwrap();
        let records: Vec<String> = ids.iter().map(|id| keys.processed("workers", None, id)).collect();
        // An observer reading the pending list and every record in one transaction: a record
        // written without its XACK in the same step would show as "recorded and still pending".
        let stop = Arc::new(AtomicBool::new(false));
        let observer = {
            let (redis, stop, key, ids, records) =
                (redis.clone(), stop.clone(), keys.stream().to_owned(), ids.clone(), records.clone());
            tokio::spawn(async move {
                let (mut rounds, mut torn) = (0u64, Vec::new());
                while !stop.load(Ordering::SeqCst) {
                    let mut pipe = redis::pipe();
                    pipe.atomic()
                        .cmd("XPENDING").arg(&key).arg("workers").arg("-").arg("+").arg(1000)
                        .cmd("MGET").arg(&records);
                    let mut conn = redis.connection().await.unwrap();
                    let (rows, found): (Vec<PendingRow>, Vec<Option<String>>) =
                        pipe.query_async(&mut conn).await.unwrap();
                    let pending: std::collections::HashSet<String> =
                        rows.into_iter().map(|r| r.0).collect();
                    for (id, record) in ids.iter().zip(found) {
                        if record.is_some() && pending.contains(id) {
                            torn.push(id.clone());
                        }
                    }
                    rounds += 1;
                }
                (rounds, torn)
            })
        };
        let running = streams
            .consumer::<Job>("acked", "workers", fast().with_batch(20).with_concurrency(8))
            .unwrap()
            .spawn(|_msg: StreamMessage<Job>| async { Ok::<_, std::io::Error>(()) });
        wait_for("300 processed", Duration::from_secs(15), || running.metrics().processed == 300).await;
        stop.store(true, Ordering::SeqCst);
        let (rounds, torn) = observer.await.unwrap();
        running.shutdown().await.unwrap();
        assert!(rounds > 0);
        assert!(torn.is_empty(), "recorded but still pending: {torn:?} ({rounds} rounds)");
        let found: Vec<Option<String>> =
            support::query(&redis, redis::cmd("MGET").arg(&records)).await;
        assert!(found.iter().zip(&ids).all(|(f, id)| f.as_deref() == Some(id.as_str())));
        assert_eq!(pending(&redis, "acked", "workers").await, 0);
    }

    async fn idle_consumer_removal_racing_a_read_drops_no_pending_entry(redis) {
        let streams = redis.streams();
        let producer = streams.producer::<Job>("removal").unwrap();
        let key = streams.keys("removal").unwrap().stream().to_owned();
        streams.create_group("removal", "workers", StartFrom::Beginning).await.unwrap();
        producer.publish_many(&(0..60).map(|n| Job { n }).collect::<Vec<_>>()).await.unwrap();
        // The reads come from a client of their own, as another consumer process's would.
        let mut reader = redis.dedicated().await.unwrap();
        let mut reads = 0;
        for round in 0..60 {
            let name = format!("v{round}");
            raw(&redis, redis::cmd("XGROUP").arg("CREATECONSUMER").arg(&key).arg("workers").arg(&name)).await;
            tokio::time::sleep(Duration::from_millis(30)).await;
            // The consumer is idle past the threshold with nothing pending, and reads meanwhile.
            let mut read = redis::cmd("XREADGROUP");
            read.arg("GROUP").arg("workers").arg(&name).arg("COUNT").arg(1)
                .arg("STREAMS").arg(&key).arg(">");
            let (removed, got) = tokio::join!(
                streams.remove_idle_consumers("removal", "workers", Duration::from_millis(20)),
                read.query_async::<redis::Value>(&mut reader),
            );
            removed.unwrap();
            let mut strings = Vec::new();
            support::flatten(got.unwrap(), &mut strings);
            reads += usize::from(!strings.is_empty());
        }
        assert_eq!(reads, 60);
        assert_eq!(pending(&redis, "removal", "workers").await, 60, "a removal dropped a read entry");
    }

    async fn a_stalled_consumer_never_takes_back_a_message_another_claimed(redis) {
        let streams = redis.streams();
        let key = streams.keys("lease").unwrap().stream().to_owned();
        let id = group_with_one_message(&streams, "lease").await;
        let (release, deliveries) = (Arc::new(tokio::sync::Notify::new()), Arc::default());
        // Heartbeat every 300 ms; no claim pass of A's own during the test (the first one runs
        // at start, before the message is read).
        let options = fast()
            .with_claim_min_idle(Duration::from_millis(900))
            .with_claim_interval(Duration::from_secs(3600))
            .with_max_retries(1)
            .with_consumer_name("a");
        let a = streams
            .consumer::<Job>("lease", "workers", options)
            .unwrap()
            .spawn(gated_handler(release.clone(), Arc::clone(&deliveries)));
        wait_for("A to run the message", Duration::from_secs(10), || {
            a.metrics().in_flight == 1
        })
        .await;
        assert_eq!(owner(&redis, &key, "workers", &id).await.as_deref(), Some("a"));
        // A stalled past claim_min_idle and B claimed the message (as B's XAUTOCLAIM would).
        raw(&redis, redis::cmd("XCLAIM").arg(&key).arg("workers").arg("b").arg(0).arg(&id)).await;
        wait_for("A's heartbeat to see the lease lost", Duration::from_secs(10), || {
            a.metrics().lost == 1
        })
        .await;
        // Two more heartbeats: none moves the message back to A.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(owner(&redis, &key, "workers", &id).await.as_deref(), Some("b"), "taken back");
        // A's handler fails at max_retries: the failure is B's to decide, not A's.
        release.notify_one();
        wait_for("A's handler to end", Duration::from_secs(10), || a.metrics().in_flight == 0).await;
        let metrics = a.shutdown().await.unwrap();
        assert_eq!((metrics.dead_lettered, metrics.lost, metrics.errors), (0, 1, 0));
        assert!(streams.dead_letters("lease", 10).await.unwrap().is_empty());
        assert_eq!(owner(&redis, &key, "workers", &id).await.as_deref(), Some("b"));
        assert_eq!(pending_count(&redis, &key, "workers", &id).await, Some(2));
    }

    async fn a_queued_message_another_consumer_claimed_is_never_started(redis) {
        // One worker: message 1 blocks it while message 2 waits in the queue, held. B claims
        // message 2 meanwhile; once A's heartbeat sees that, A must not run it.
        let streams = redis.streams();
        let key = streams.keys("queued").unwrap().stream().to_owned();
        streams.create_group("queued", "workers", StartFrom::Beginning).await.unwrap();
        let producer = streams.producer::<Job>("queued").unwrap();
        producer.publish(&Job { n: 1 }).await.unwrap();
        let second = producer.publish(&Job { n: 2 }).await.unwrap();
        let release = Arc::new(tokio::sync::Notify::new());
        let started: Arc<Mutex<Vec<i64>>> = Arc::default();
        let (r, s) = (release.clone(), started.clone());
        let options = fast()
            .with_concurrency(1)
            .with_claim_min_idle(Duration::from_millis(900))
            .with_claim_interval(Duration::from_secs(3600))
            .with_consumer_name("a");
        let a = streams.consumer::<Job>("queued", "workers", options).unwrap().spawn(
            move |msg: StreamMessage<Job>| {
                let (r, s) = (r.clone(), s.clone());
                Box::pin(async move {
                    s.lock().unwrap().push(msg.payload.n);
                    if msg.payload.n == 1 {
                        r.notified().await;
                    }
                    Ok::<(), std::io::Error>(())
                }) as HandlerFuture
            },
        );
        wait_for("A to run message 1", Duration::from_secs(10), || a.metrics().in_flight == 1).await;
        raw(&redis, redis::cmd("XCLAIM").arg(&key).arg("workers").arg("b").arg(0).arg(&second)).await;
        wait_for("A's heartbeat to see the lease lost", Duration::from_secs(10), || {
            a.metrics().lost == 1
        })
        .await;
        release.notify_one();
        wait_for("message 1 processed", Duration::from_secs(10), || a.metrics().processed == 1).await;
        let metrics = a.shutdown().await.unwrap();
        assert_eq!(*started.lock().unwrap(), [1], "A ran a message B holds");
        assert_eq!((metrics.processed, metrics.lost), (1, 1));
        assert_eq!(owner(&redis, &key, "workers", &second).await.as_deref(), Some("b"));
    }

    async fn a_message_deleted_while_its_handler_runs_is_counted_as_cleared(redis) {
        let streams = redis.streams();
        let key = streams.keys("deleted").unwrap().stream().to_owned();
        streams.create_group("deleted", "workers", StartFrom::Beginning).await.unwrap();
        let producer = streams.producer::<Job>("deleted").unwrap();
        let id = producer.publish(&Job { n: 1 }).await.unwrap();
        let (release, deliveries) = (Arc::new(tokio::sync::Notify::new()), Arc::default());
        // Heartbeat every 300 ms; max_retries 1: before the fix a failure would be dead-lettered
        // if the message were still pending, and silently dropped since the heartbeat cleared it.
        let options = fast()
            .with_claim_min_idle(Duration::from_millis(900))
            .with_max_retries(1);
        let running = streams
            .consumer::<Job>("deleted", "workers", options)
            .unwrap()
            .spawn(gated_handler(release.clone(), Arc::clone(&deliveries)));
        wait_for("the handler", Duration::from_secs(10), || running.metrics().in_flight == 1).await;
        raw(&redis, redis::cmd("XDEL").arg(&key).arg(&id)).await;
        wait_for("the deletion to be seen", Duration::from_secs(10), || {
            running.metrics().cleared == 1
        })
        .await;
        release.notify_one();
        wait_for("the handler to end", Duration::from_secs(10), || running.metrics().in_flight == 0).await;
        // The consumer goes on with the next message.
        producer.publish(&Job { n: 2 }).await.unwrap();
        wait_for("the next message", Duration::from_secs(10), || running.metrics().processed == 1).await;
        let metrics = running.shutdown().await.unwrap();
        assert_eq!(
            (metrics.cleared, metrics.dead_lettered, metrics.retried, metrics.lost, metrics.errors),
            (1, 0, 0, 0, 0)
        );
        assert!(streams.dead_letters("deleted", 10).await.unwrap().is_empty());
        assert_eq!(pending(&redis, "deleted", "workers").await, 0);
    }

    async fn a_handler_that_never_returns_is_cancelled_after_handler_timeout(redis) {
        let streams = redis.streams();
        streams.create_group("hung", "workers", StartFrom::Beginning).await.unwrap();
        streams.producer::<Job>("hung").unwrap().publish(&Job { n: 1 }).await.unwrap();
        let deliveries: Arc<Mutex<Vec<u64>>> = Arc::default();
        let d = deliveries.clone();
        let running = streams
            .consumer::<Job>("hung", "workers", fast().with_handler_timeout(Duration::from_millis(300)))
            .unwrap()
            .spawn(move |msg: StreamMessage<Job>| {
                let d = d.clone();
                async move {
                    d.lock().unwrap().push(msg.delivery_count);
                    if msg.delivery_count == 1 {
                        std::future::pending::<()>().await;
                    }
                    Ok::<_, std::io::Error>(())
                }
            });
        wait_for("the redelivery handled", Duration::from_secs(15), || running.metrics().processed == 1).await;
        let metrics = running.shutdown().await.unwrap();
        assert_eq!(*deliveries.lock().unwrap(), vec![1, 2]);
        assert_eq!((metrics.retried, metrics.processed, metrics.claimed, metrics.in_flight), (1, 1, 1, 0));
        assert_eq!(pending(&redis, "hung", "workers").await, 0);
    }

    async fn malformed_dead_letters_are_reported_and_paged_past(redis) {
        let streams = redis.streams();
        let keys = streams.keys("foreign").unwrap();
        // Entries someone else wrote into the dead-letter stream: no metadata, and one whose
        // field name is not UTF-8; then one well-formed dead letter.
        fill(&redis, keys.dead(), 150).await;
        xadd(&redis, keys.dead(), &[(b"\xff", b"x"), (b"payload", b"{\"n\":8}")]).await;
        let good = xadd(&redis, keys.dead(), &[
            (b"payload", b"{\"n\":1}"), (b"dl:original_id", b"5-0"), (b"dl:delivery_count", b"3"),
            (b"dl:error", b"boom"), (b"dl:group", b"g"), (b"dl:consumer", b"c"),
            (b"dl:failed_at", b"7"),
        ]).await;
        let listed = streams.dead_letters("foreign", 500).await.unwrap();
        assert_eq!(listed.len(), 152);
        assert!(listed[..151].iter().all(|d| d.problem.is_some()));
        let problem = listed[0].problem.as_deref().unwrap();
        assert!(problem.contains("dl:original_id"), "{problem}");
        let problem = listed[150].problem.as_deref().unwrap();
        assert!(problem.contains("not UTF-8"), "{problem}");
        let last = &listed[151];
        assert_eq!((last.id.as_str(), last.problem.as_deref()), (good.as_str(), None));
        assert_eq!((last.original_id.as_str(), last.delivery_count, last.failed_at), ("5-0", 3, 7));
        assert_eq!(last.fields, vec![("payload".to_owned(), b"{\"n\":1}".to_vec())]);

        // A replay of one passes the 151 it cannot replay, over more than one page.
        let replayed = streams.replay_dead_letters("foreign", 1).await.unwrap();
        assert_eq!(replayed.len(), 1);
        let entries: Vec<String> = {
            let mut out = Vec::new();
            support::flatten(raw(&redis, redis::cmd("XRANGE").arg(keys.stream()).arg("-").arg("+")).await, &mut out);
            out
        };
        assert_eq!(entries, vec![replayed[0].clone(), "payload".into(), "{\"n\":1}".into(), "replay_of".into(), "5-0".into()]);
        assert_eq!(streams.dead_letters("foreign", 500).await.unwrap().len(), 151);
    }
}

/// A server of the test's own, and a handle on it whose response timeout is 300 ms.
async fn own_server(test: &str) -> (aether_redis::testkit::LocalServer, Redis) {
    let server = tokio::task::spawn_blocking(|| {
        aether_redis::testkit::LocalServer::start(aether_redis::testkit::LocalOptions::default())
    })
    .await
    .unwrap()
    .unwrap();
    let mut config = server.config();
    config.response_timeout = Duration::from_millis(300);
    config.key_prefix = aether_redis::testkit::namespace(test);
    (server, Redis::connect(config).await.unwrap())
}

type HandlerFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), std::io::Error>> + Send>>;

/// A handler that stalls the server for 1.5 s (`CLIENT PAUSE`) on its first run, so that the
/// ack of its message times out; counts its runs.
fn pausing_handler(
    redis: &Redis,
    runs: Arc<AtomicU64>,
) -> impl Fn(StreamMessage<Job>) -> HandlerFuture + Send + Sync + 'static {
    let redis = redis.clone();
    move |_msg: StreamMessage<Job>| {
        let (redis, runs) = (redis.clone(), runs.clone());
        Box::pin(async move {
            if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                support::pause_all(&redis, 1500).await;
            }
            Ok(())
        })
    }
}

/// An ack that times out (the outcome unknown, but `SET` + `XACK` is safe to repeat) is retried
/// until it succeeds: the message is neither left pending nor handled again after a claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_ack_is_retried_and_the_message_not_handled_again() {
    let (_server, redis) = own_server("a_timed_out_ack_is_retried").await;
    let streams = redis.streams();
    let id = group_with_one_message(&streams, "acks").await;
    let runs = Arc::new(AtomicU64::new(0));
    let running = streams
        .consumer::<Job>("acks", "workers", fast())
        .unwrap()
        .spawn(pausing_handler(&redis, runs.clone()));
    wait_for("the ack", Duration::from_secs(15), || {
        running.metrics().processed == 1
    })
    .await;
    // Past the pause, claim_min_idle (400 ms) and a few claim passes: a dropped ack would have
    // been claimed and handled again by now.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let metrics = running.shutdown().await.unwrap();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "handled again after a failed ack"
    );
    assert_eq!((metrics.processed, metrics.claimed), (1, 0));
    assert!(metrics.errors >= 1, "the ack did time out: {metrics:?}");
    assert_eq!(pending(&redis, "acks", "workers").await, 0);
    let record = streams
        .keys("acks")
        .unwrap()
        .processed("workers", None, &id);
    let stored: Option<String> = support::query(&redis, redis::cmd("GET").arg(&record)).await;
    assert_eq!(stored, Some(id));
}

/// Shutdown waits for an ack that is being retried, instead of leaving its message pending for
/// another consumer to handle again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_an_ack_that_is_being_retried() {
    let (_server, redis) = own_server("shutdown_finishes_an_ack").await;
    let streams = redis.streams();
    streams
        .create_group("acks", "workers", StartFrom::Beginning)
        .await
        .unwrap();
    streams
        .producer::<Job>("acks")
        .unwrap()
        .publish(&Job { n: 1 })
        .await
        .unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let running = streams
        .consumer::<Job>("acks", "workers", fast())
        .unwrap()
        .spawn(pausing_handler(&redis, runs.clone()));
    wait_for("the handler", Duration::from_secs(10), || {
        running.metrics().in_flight == 0 && runs.load(Ordering::SeqCst) == 1
    })
    .await;
    let started = Instant::now();
    let metrics = running.shutdown().await.unwrap();
    assert_eq!(
        metrics.processed, 1,
        "shutdown gave up on the ack: {metrics:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(pending(&redis, "acks", "workers").await, 0);
}

/// Every command line MONITOR shows on the server at 127.0.0.1:`port` until one contains
/// `marker`.
async fn monitor(port: u16, marker: &'static str) -> tokio::task::JoinHandle<Vec<String>> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut lines = tokio::io::BufReader::new(stream);
    lines.get_mut().write_all(b"MONITOR\r\n").await.unwrap();
    let mut ok = String::new();
    lines.read_line(&mut ok).await.unwrap();
    assert_eq!(ok, "+OK\r\n");
    tokio::spawn(async move {
        let mut seen = Vec::new();
        loop {
            let mut line = String::new();
            assert!(
                lines.read_line(&mut line).await.unwrap() > 0,
                "MONITOR closed"
            );
            if line.contains(marker) {
                return seen;
            }
            seen.push(line);
        }
    })
}

/// Dead-letter timestamps and the retention cutoff come from the server's clock: no command the
/// consumer or `trim_dead_letters` sends carries a time of the client's (MONITOR shows every
/// argument), so a consumer whose clock is off can neither trim dead letters early nor keep
/// them too long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_times_come_from_the_server_clock() {
    let (server, redis) = own_server("dead_letter_times").await;
    let streams = redis.streams();
    let id = group_with_one_message(&streams, "clock").await;
    let commands = monitor(server.port(), "end-of-test-marker").await;
    let running = streams
        .consumer::<Job>("clock", "workers", fast().with_max_retries(1))
        .unwrap()
        .spawn(|_msg: StreamMessage<Job>| async { Err::<(), _>("always fails".to_owned()) });
    wait_for("the dead letter", Duration::from_secs(10), || {
        running.metrics().dead_lettered == 1
    })
    .await;
    running.shutdown().await.unwrap();
    streams
        .trim_dead_letters("clock", Duration::from_secs(3600))
        .await
        .unwrap();
    let _: String = support::query(&redis, redis::cmd("ECHO").arg("end-of-test-marker")).await;
    let commands = commands.await.unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Any number within ten days of now, alone or as an `<ms>-0` stream id, would be a client
    // time (the cutoff of a 7-day retention, or a timestamp), except the message's own id,
    // which the server made. Commands that scripts run (source `lua`) carry the server's time.
    let client_times: Vec<&String> = commands
        .iter()
        .filter(|line| !line.contains(" lua]"))
        .filter(|line| {
            line.split('"').any(|arg| {
                let ms = arg.strip_suffix("-0").unwrap_or(arg);
                arg != id
                    && ms
                        .parse::<i64>()
                        .is_ok_and(|ms| (ms - now_ms).abs() < 10 * 24 * 3600 * 1000)
            })
        })
        .collect();
    assert!(
        commands.iter().any(|l| l.contains("dl:error")),
        "the dead-letter script was not seen: {commands:?}"
    );
    assert!(
        client_times.is_empty(),
        "client clock on the wire: {client_times:?}"
    );
    let dead = streams.dead_letters("clock", 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        (dead[0].failed_at - now_ms).abs() < 60_000,
        "{}",
        dead[0].failed_at
    );
}

/// While acks fail (the server over `maxmemory` refuses the ack script's `SET`, but not
/// `XREADGROUP`), the consumer stops reading: a bounded number of handler runs, not the whole
/// backlog; once memory is back, every message is acked, each handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_acks_stop_the_reads_until_they_go_through() {
    let (_server, redis) = own_server("failing_acks_stop_the_reads").await;
    let streams = redis.streams();
    streams
        .create_group("oom", "workers", StartFrom::Beginning)
        .await
        .unwrap();
    let key = streams.keys("oom").unwrap().stream().to_owned();
    fill(&redis, &key, 300).await;
    let seen = Seen::default();
    let (s, r, full) = (
        seen.clone(),
        redis.clone(),
        Arc::new(AtomicBool::new(false)),
    );
    let (batch, concurrency) = (10u64, 2u64);
    let running = streams
        .consumer::<Job>(
            "oom",
            "workers",
            fast()
                .with_batch(batch as usize)
                .with_concurrency(concurrency as usize),
        )
        .unwrap()
        .spawn(move |msg: StreamMessage<Job>| {
            let (s, r, full) = (s.clone(), r.clone(), full.clone());
            async move {
                // The first handler fills the server up (the group exists by then): every ack
                // from here on is refused.
                if !full.swap(true, Ordering::SeqCst) {
                    let _: () =
                        support::query(&r, redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(1))
                            .await;
                }
                s.record(&msg);
                Ok::<_, std::io::Error>(())
            }
        });
    wait_for("failing acks", Duration::from_secs(10), || {
        running.metrics().errors >= 3
    })
    .await;
    // Many block periods: an unthrottled consumer reads and handles all 300 meanwhile.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let runs = seen.runs();
    // At most the hold limit (2 × batch + concurrency) plus the batch read just under it.
    assert!(
        runs <= 3 * batch + concurrency,
        "{runs} handler runs while acks failed"
    );
    assert_eq!(running.metrics().processed, 0);
    let _: () = support::query(
        &redis,
        redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(0),
    )
    .await;
    wait_for("all 300 acked", Duration::from_secs(20), || {
        running.metrics().processed == 300
    })
    .await;
    let metrics = running.shutdown().await.unwrap();
    assert_eq!((seen.distinct(), seen.max_runs()), (300, 1));
    assert_eq!((metrics.processed, metrics.claimed), (300, 0));
    assert_eq!(pending(&redis, "oom", "workers").await, 0);
}

/// Adds to `dead` a dead letter of `Job { n }`, first published as `original` and failed in
/// `group`, as the consumer writes one; returns its id.
async fn dead_letter(redis: &Redis, dead: &str, n: i64, original: &str, group: &str) -> String {
    let payload = format!("{{\"n\":{n}}}");
    xadd(
        redis,
        dead,
        &[
            (b"payload", payload.as_bytes()),
            (b"dl:original_id", original.as_bytes()),
            (b"dl:delivery_count", b"3"),
            (b"dl:error", b"boom"),
            (b"dl:group", group.as_bytes()),
            (b"dl:consumer", b"c"),
            (b"dl:failed_at", b"0"),
        ],
    )
    .await
}

/// A replay never trims the source stream, even one past the producers' default cap. On a
/// server of its own: filling 100 250 entries blocks the server for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_dead_letter_never_trims_the_source_stream() {
    let (_server, redis) = own_server("replaying_a_dead_letter_never_trims").await;
    let streams = redis.streams();
    let keys = streams.keys("long").unwrap();
    // More than the producers' default cap (MAXLEN ~ 100000), none of them read yet; in
    // slices, each well within the response timeout.
    for _ in 0..25 {
        fill(&redis, keys.stream(), 4_010).await;
    }
    let mut dead = Vec::new();
    for n in 1..=2 {
        dead.push(dead_letter(&redis, keys.dead(), n, "1-1", "g").await);
    }
    let before = streams.len("long").await.unwrap();
    assert_eq!(before, 100_250);
    assert!(
        streams
            .replay_dead_letter("long", &dead[0])
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        streams.replay_dead_letters("long", 10).await.unwrap().len(),
        1
    );
    assert_eq!(
        streams.len("long").await.unwrap(),
        before + 2,
        "replay trimmed the stream"
    );
}

/// With scripting disabled, the script-backed maintenance calls are refused with
/// `Error::Unsupported` before anything is sent, and replays take the script-free transaction:
/// each dead letter moved once, with the fields the script would write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_scripting_maintenance_is_refused_and_replays_go_without_scripts() {
    let (_server, redis) = support::redis_without_scripting().await;
    let streams = redis.streams();
    let keys = streams.keys("plain").unwrap();
    assert!(
        streams
            .create_group("plain", "workers", StartFrom::Beginning)
            .await
            .unwrap()
    );
    let err = streams
        .remove_idle_consumers("plain", "workers", Duration::from_millis(1))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
    let err = streams
        .trim_dead_letters("plain", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");

    let mut dead = Vec::new();
    for n in 1..=3 {
        dead.push(dead_letter(&redis, keys.dead(), n, &format!("{n}-0"), "workers").await);
    }
    let first = streams
        .replay_dead_letter("plain", &dead[0])
        .await
        .unwrap()
        .expect("the dead letter is replayed");
    assert_eq!(
        streams.replay_dead_letter("plain", &dead[0]).await.unwrap(),
        None,
        "a dead letter is moved once"
    );
    let rest = streams.replay_dead_letters("plain", 10).await.unwrap();
    assert_eq!(rest.len(), 2);
    assert!(streams.dead_letters("plain", 10).await.unwrap().is_empty());
    let entries: Vec<RawStreamEntry> = support::query(
        &redis,
        redis::cmd("XRANGE").arg(keys.stream()).arg("-").arg("+"),
    )
    .await;
    let ids: Vec<&str> = entries.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, [first.as_str(), rest[0].as_str(), rest[1].as_str()]);
    for (n, (_, fields)) in (1..=3).zip(&entries) {
        let expected: HashMap<Vec<u8>, Vec<u8>> = [
            (b"payload".to_vec(), format!("{{\"n\":{n}}}").into_bytes()),
            (b"replay_of".to_vec(), format!("{n}-0").into_bytes()),
        ]
        .into_iter()
        .collect();
        assert_eq!(fields, &expected);
    }
}
