//! Streams: producer, consumer groups, claim, dead letters, idempotency, shutdown.
//! Every test runs on the standalone server and on the cluster.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aether_redis::stream::{ConsumerOptions, StartFrom, StreamMessage};
use aether_redis::{Error, Redis};
use serde::{Deserialize, Serialize};

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
        assert!(matches!(
            streams.replay_dead_letter("s", "nope").await,
            Err(Error::InvalidInput { .. })
        ));
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
}
