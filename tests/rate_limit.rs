//! RateLimiter: exactness under concurrency, server clock, cost/peek/reset, tier parsing,
//! hostile ids, interoperability with the documented TypeScript counter, failure policies with
//! the circuit breaker, and the hardened server.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aether_redis::rate_limit::{
    Algorithm, BreakerSettings, BreakerState, DecisionSource, FailurePolicy, RateLimiter,
    RateLimiterConfig, Tier, TierName,
};
use aether_redis::testkit::{LocalCluster, LocalOptions, LocalServer};
use aether_redis::{Config, Error, Redis};

mod support;
use support::{pttl, query};

const ALGORITHMS: [Algorithm; 3] = [
    Algorithm::Gcra,
    Algorithm::FixedWindow,
    Algorithm::SlidingWindow,
];

/// A limiter with one custom tier `t`: `limit` per `window` with `algorithm`. Its timeout is
/// generous: these tests are about what Redis decides, and on a loaded test machine 64 tasks on
/// one key can exceed the 500 ms default without anything being wrong (the fault tests set their
/// own timeouts).
fn limiter(redis: &Redis, algorithm: Algorithm, limit: u64, window: Duration) -> RateLimiter {
    let tier = Tier::new(limit, window).unwrap().with_algorithm(algorithm);
    redis
        .rate_limiter_with(
            RateLimiterConfig::default()
                .tier(TierName::custom("t"), tier)
                .timeout(Duration::from_secs(10)),
        )
        .unwrap()
}

/// Server time in µs.
async fn server_time_us(redis: &Redis) -> i64 {
    let mut conn = redis.connection().await.unwrap();
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    secs * 1_000_000 + micros
}

/// 64 tasks × 500 checks on one key; returns how many were admitted.
async fn hammer(limiter: &RateLimiter, user: &str) -> u64 {
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let limiter = limiter.clone();
        let user = user.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0u64;
            for _ in 0..500 {
                let d = limiter
                    .check(&user, "api", &TierName::custom("t"))
                    .await
                    .unwrap();
                assert_eq!(d.source, DecisionSource::Redis, "{d:?}");
                if d.allowed {
                    admitted += 1;
                    assert!(d.retry_after.is_none());
                } else {
                    assert!(d.retry_after.is_some_and(|r| r > Duration::ZERO));
                }
            }
            admitted
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

/// 64 tasks checking one key until `run` has passed; returns how many were admitted and when
/// (client clock) the last check that was then denied was called.
async fn hammer_for(limiter: &RateLimiter, user: &str, run: Duration) -> (u64, Instant) {
    let deadline = Instant::now() + run;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let limiter = limiter.clone();
        let user = user.to_owned();
        tasks.push(tokio::spawn(async move {
            let (mut admitted, mut last_denied) = (0u64, None);
            loop {
                let called = Instant::now();
                if called >= deadline {
                    return (admitted, last_denied);
                }
                let d = limiter
                    .check(&user, "api", &TierName::custom("t"))
                    .await
                    .unwrap();
                assert_eq!(d.source, DecisionSource::Redis, "{d:?}");
                if d.allowed {
                    admitted += 1;
                } else {
                    last_denied = Some(called);
                }
            }
        }));
    }
    let (mut total, mut last_denied) = (0, None);
    for t in tasks {
        let (admitted, denied) = t.await.unwrap();
        total += admitted;
        last_denied = last_denied.max(denied);
    }
    (total, last_denied.expect("the run saturated the limiter"))
}

aether_redis::contract_tests! {
    async fn fixed_window_admits_exactly_the_limit_under_concurrency(redis) {
        let window = Duration::from_secs(3600);
        let limiter = limiter(&redis, Algorithm::FixedWindow, 100, window);
        let admitted = hammer(&limiter, "u1").await;
        assert_eq!(admitted, 100);
        let key = limiter.key("u1", "api").unwrap();
        let ttl = pttl(&redis, &key).await;
        assert!(ttl > 0 && ttl <= 3_600_000, "{ttl}");
        // Every hit counted, denied ones too (the documented counter).
        let mut conn = redis.connection().await.unwrap();
        let count: u64 = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
        assert_eq!(count, 64 * 500);
    }

    async fn gcra_admits_exactly_burst_plus_elapsed_over_period(redis) {
        // 200 per second: period 5 ms, burst 200; a run of about a second refills ~200.
        let (burst, period_us) = (200u64, 5_000i64);
        let limiter = limiter(&redis, Algorithm::Gcra, burst, Duration::from_secs(1));
        let t = TierName::custom("t");
        let key = limiter.key("u1", "api").unwrap();
        let tat = |redis: Redis, key: String| async move {
            let v: i64 = query(&redis, redis::cmd("HGET").arg(&key).arg("tat")).await;
            v
        };
        // The first check takes the whole burst, so that the key lives ~1 s (a single admission
        // would leave it 5 ms, and a stall would reset tat): the run starts at server time
        // t0 = tat - burst × period, exactly.
        assert!(limiter.check_n("u1", "api", &t, burst).await.unwrap().allowed);
        let t0 = tat(redis.clone(), key.clone()).await - burst as i64 * period_us;
        let (admitted, last_denied_call) = hammer_for(&limiter, "u1", Duration::from_secs(1)).await;
        let ended = server_time_us(&redis).await;
        let after = Instant::now();
        let admitted = admitted + burst;
        // Each admission moves tat by one period: the server admitted exactly what we counted.
        assert_eq!(tat(redis.clone(), key.clone()).await, t0 + admitted as i64 * period_us);
        // GCRA's bound: an admission at server time t needs admitted <= burst + floor((t - t0) /
        // period), so over the run (t <= ended) never more than `upper`. A denial at t means
        // admitted > burst - 1 + (t - t0) / period; the last denied check ran on the server no
        // earlier than `ended` minus the client time from its call to TIME's reply.
        let upper = burst + ((ended - t0) / period_us) as u64;
        let last_denied_at = ended - i64::try_from((after - last_denied_call).as_micros()).unwrap();
        let lower = burst + ((last_denied_at - t0) / period_us) as u64;
        assert!(
            (lower..=upper).contains(&admitted),
            "admitted {admitted}, GCRA allows {lower}..={upper} over {} µs",
            ended - t0
        );
        assert!(upper - burst >= 100, "the run refilled only {} periods", upper - burst);
        let ttl = pttl(&redis, &key).await;
        assert!(ttl > 0 && ttl <= 1_000, "{ttl}");
    }

    async fn concurrent_checks_on_one_key_share_calls_and_keep_their_own_decisions(redis) {
        let t = TierName::custom("t");
        for algorithm in ALGORITHMS {
            let limiter = limiter(&redis, algorithm, 10, Duration::from_secs(3600));
            let user = format!("batch-{algorithm}");
            let checks: Vec<_> = (0..64)
                .map(|_| {
                    let (limiter, user, t) = (limiter.clone(), user.clone(), t.clone());
                    tokio::spawn(async move { limiter.check(&user, "api", &t).await.unwrap() })
                })
                .collect();
            let mut decisions = Vec::new();
            for check in checks {
                decisions.push(check.await.unwrap());
            }
            // Each admitted check saw its own place in the order, as if sent alone.
            let mut remaining: Vec<u64> =
                decisions.iter().filter(|d| d.allowed).map(|d| d.remaining).collect();
            remaining.sort_unstable();
            assert_eq!(remaining, (0..10).collect::<Vec<u64>>(), "{algorithm}");
            assert!(
                decisions.iter().filter(|d| !d.allowed).all(|d| d.remaining == 0),
                "{algorithm}: a denied check saw quota left"
            );
            let stats = limiter.stats();
            assert!(stats.redis_calls < 64 && stats.batched_checks > 0, "{algorithm}: {stats:?}");
            if algorithm == Algorithm::FixedWindow {
                let key = limiter.key(&user, "api").unwrap();
                let count: u64 = query(&redis, redis::cmd("GET").arg(&key)).await;
                assert_eq!(count, 64, "denied hits count, batched or not");
            }
        }
    }

    async fn batched_fixed_window_counts_reach_each_caller_as_its_own(redis) {
        // Distinct costs make the mapping visible: sorted by what they saw, the callers' counts
        // must step up by exactly each caller's own cost, from a fresh counter.
        let t = TierName::custom("t");
        let limiter = limiter(&redis, Algorithm::FixedWindow, 100_000, Duration::from_secs(3600));
        let checks: Vec<_> = (0..64u64)
            .map(|i| {
                let (limiter, t) = (limiter.clone(), t.clone());
                let cost = i % 7 + 1;
                tokio::spawn(async move {
                    (cost, limiter.check_n("mapping", "api", &t, cost).await.unwrap())
                })
            })
            .collect();
        let mut seen = Vec::new();
        for check in checks {
            let (cost, d) = check.await.unwrap();
            assert!(d.allowed);
            seen.push((100_000 - d.remaining, cost));
        }
        seen.sort_unstable();
        let mut total = 0;
        for (count, cost) in seen {
            total += cost;
            assert_eq!(count, total, "a caller got another caller's count");
        }
        assert!(limiter.stats().batched_checks > 0);
    }

    async fn batched_costs_are_decided_in_order_and_never_over_admit(redis) {
        let t = TierName::custom("t");
        for algorithm in ALGORITHMS {
            let limiter = limiter(&redis, algorithm, 20, Duration::from_secs(3600));
            let user = format!("costs-{algorithm}");
            let checks: Vec<_> = (0..48u64)
                .map(|i| {
                    let (limiter, user, t) = (limiter.clone(), user.clone(), t.clone());
                    let cost = i % 3 + 1;
                    tokio::spawn(async move {
                        (cost, limiter.check_n(&user, "api", &t, cost).await.unwrap())
                    })
                })
                .collect();
            let mut admitted_cost = 0;
            for check in checks {
                let (cost, d) = check.await.unwrap();
                if d.allowed {
                    admitted_cost += cost;
                }
            }
            assert!(admitted_cost <= 20, "{algorithm}: {admitted_cost}");
            if algorithm == Algorithm::FixedWindow {
                // Denied hits count too: the counter is the sum of every cost (96).
                let key = limiter.key(&user, "api").unwrap();
                let count: u64 = query(&redis, redis::cmd("GET").arg(&key)).await;
                assert_eq!(count, 96);
            } else {
                // A denied check consumes nothing: the quota left is exactly what no admitted
                // check took.
                let after = limiter.peek(&user, "api", &t).await.unwrap();
                assert_eq!(admitted_cost + after.remaining, 20, "{algorithm}");
            }
        }
    }

    async fn garbled_script_state_is_refused_not_read_as_a_fresh_limit(redis) {
        // A hash field another writer garbled must not reset the limit.
        let t = TierName::custom("t");
        let window = Duration::from_secs(60);
        let cases: [(Algorithm, &[(&str, &str)]); 7] = [
            (Algorithm::Gcra, &[("tat", "soon")]),
            (Algorithm::Gcra, &[("tat", "inf")]),
            (Algorithm::Gcra, &[("tat", "nan")]),
            (Algorithm::Gcra, &[("tat", "1e300")]),
            (Algorithm::SlidingWindow, &[("start", "x"), ("cur", "1")]),
            (Algorithm::SlidingWindow, &[("start", "0"), ("cur", "many")]),
            (Algorithm::SlidingWindow, &[("start", "0"), ("prev", "-5")]),
        ];
        for (algorithm, fields) in cases {
            let limiter = limiter(&redis, algorithm, 10, window);
            let key = limiter.key("u", "e").unwrap();
            let mut hset = redis::cmd("HSET");
            hset.arg(&key);
            for (f, v) in fields {
                hset.arg(*f).arg(*v);
            }
            let _: i64 = query(&redis, &hset).await;
            let _: i64 = query(&redis, redis::cmd("EXPIRE").arg(&key).arg(900)).await;
            let before = support::contents(&redis, &key).await;
            for (what, result) in [
                ("check", limiter.check("u", "e", &t).await),
                ("peek", limiter.peek("u", "e", &t).await),
            ] {
                let err = result.unwrap_err();
                assert!(matches!(err, Error::Server(_)), "{algorithm} {what} {fields:?}: {err:?}");
                assert!(err.to_string().contains("garbled state"), "{algorithm} {what}: {err}");
            }
            assert_eq!(support::contents(&redis, &key).await, before, "{algorithm} {fields:?}");
            let ttl: i64 = query(&redis, redis::cmd("TTL").arg(&key)).await;
            assert!(ttl > 800, "{algorithm} {fields:?}: TTL cut to {ttl}");
            limiter.reset("u", "e").await.unwrap();
            assert!(limiter.check("u", "e", &t).await.unwrap().allowed);
            limiter.reset("u", "e").await.unwrap();
        }
    }

    async fn algorithms_meeting_on_one_key_refuse_and_leave_the_state_alone(redis) {
        let t = TierName::custom("t");
        let window = Duration::from_secs(60);
        let fixed = limiter(&redis, Algorithm::FixedWindow, 10, window);
        let key = fixed.key("u", "e").unwrap();
        let wrongtype = |what: &str, result: aether_redis::Result<_>| {
            let err = result.unwrap_err();
            assert!(matches!(err, Error::Server(_)), "{what}: {err:?}");
            assert!(err.to_string().contains("WRONGTYPE"), "{what}: {err}");
        };
        // The key's contents and absolute expiry (PEXPIRETIME, so "unchanged" is exact).
        let state = || async {
            let contents = support::contents(&redis, &key).await;
            let expires: i64 = query(&redis, redis::cmd("PEXPIRETIME").arg(&key)).await;
            (contents, expires)
        };
        for algorithm in [Algorithm::Gcra, Algorithm::SlidingWindow] {
            let script_tier = limiter(&redis, algorithm, 10, window);
            // The documented TypeScript counter (INCR, EXPIRE on the first hit), which another
            // service may enforce a security limit with: refused, neither reset nor touched.
            for _ in 0..3 {
                let hits: i64 = query(&redis, redis::cmd("INCR").arg(&key)).await;
                if hits == 1 {
                    let _: i64 = query(&redis, redis::cmd("EXPIRE").arg(&key).arg(900)).await;
                }
            }
            let before = state().await;
            assert_eq!(before.0, ("string".to_owned(), vec!["3".to_owned()]));
            wrongtype(&format!("{algorithm} peek"), script_tier.peek("u", "e", &t).await);
            wrongtype(&format!("{algorithm} check"), script_tier.check("u", "e", &t).await);
            assert_eq!(state().await, before, "{algorithm} changed the counter");
            // The fixed window still counts on it.
            assert_eq!(fixed.check("u", "e", &t).await.unwrap().remaining, 6);
            fixed.reset("u", "e").await.unwrap();

            // The other way: the fixed window refuses the script's hash instead of overwriting it.
            assert!(script_tier.check("u", "e", &t).await.unwrap().allowed);
            let before = state().await;
            assert_eq!(before.0.0, "hash", "{algorithm}");
            assert!(before.1 > 0, "{algorithm}: no TTL");
            wrongtype(&format!("fixed window on {algorithm}"), fixed.check("u", "e", &t).await);
            wrongtype(&format!("fixed-window peek on {algorithm}"), fixed.peek("u", "e", &t).await);
            assert_eq!(state().await, before, "the fixed window changed the {algorithm} hash");
            assert_eq!(script_tier.peek("u", "e", &t).await.unwrap().remaining, 9, "{algorithm}");
            fixed.reset("u", "e").await.unwrap();
        }

        // GCRA and the sliding window both keep hashes: each refuses the other's instead of
        // reading it as "no state" (which would cut the TTL and reset the count mid-window).
        let gcra = limiter(&redis, Algorithm::Gcra, 10, window);
        let sliding = limiter(&redis, Algorithm::SlidingWindow, 10, window);
        for (owner, intruder, name) in [(&sliding, &gcra, "GCRA on sliding"), (&gcra, &sliding, "sliding on GCRA")] {
            for _ in 0..3 {
                assert!(owner.check("u", "e", &t).await.unwrap().allowed);
            }
            let before = state().await;
            wrongtype(&format!("{name} peek"), intruder.peek("u", "e", &t).await);
            wrongtype(&format!("{name} check"), intruder.check("u", "e", &t).await);
            assert_eq!(state().await, before, "{name} changed the state");
            assert_eq!(owner.peek("u", "e", &t).await.unwrap().remaining, 7, "{name}");
            owner.reset("u", "e").await.unwrap();
        }
    }

    async fn gcra_refills_one_per_period(redis) {
        // 5 per 10 s: period 2 s, burst 5 (long enough that the last two checks, back to back,
        // fall in one period even on a loaded machine).
        let limiter = limiter(&redis, Algorithm::Gcra, 5, Duration::from_secs(10));
        let t = TierName::custom("t");
        for i in 0..5 {
            assert!(limiter.check("u", "e", &t).await.unwrap().allowed, "check {i}");
        }
        let denied = limiter.check("u", "e", &t).await.unwrap();
        assert!(!denied.allowed);
        let wait = denied.retry_after.unwrap();
        assert!(wait <= Duration::from_secs(2), "{wait:?}");
        tokio::time::sleep(wait + Duration::from_millis(5)).await;
        assert!(limiter.check("u", "e", &t).await.unwrap().allowed);
        assert!(!limiter.check("u", "e", &t).await.unwrap().allowed);
    }

    async fn sliding_window_admits_exactly_the_limit_under_concurrency(redis) {
        let limiter = limiter(&redis, Algorithm::SlidingWindow, 100, Duration::from_secs(3600));
        let admitted = hammer(&limiter, "u1").await;
        assert_eq!(admitted, 100);
        let key = limiter.key("u1", "api").unwrap();
        let ttl = pttl(&redis, &key).await;
        assert!(ttl > 0 && ttl <= 2 * 3_600_000, "{ttl}");
    }

    async fn cost_peek_and_reset(redis) {
        for algorithm in ALGORITHMS {
            let limiter = limiter(&redis, algorithm, 10, Duration::from_secs(600));
            let t = TierName::custom("t");
            let user = format!("u-{algorithm}");
            let fresh = limiter.peek(&user, "e", &t).await.unwrap();
            assert!(fresh.allowed);
            assert_eq!(fresh.remaining, 10, "{algorithm}");
            let d = limiter.check_n(&user, "e", &t, 4).await.unwrap();
            assert!(d.allowed);
            assert_eq!(d.remaining, 6, "{algorithm}");
            // Peeking twice consumes nothing.
            for _ in 0..2 {
                let p = limiter.peek(&user, "e", &t).await.unwrap();
                assert!(p.allowed);
                assert_eq!(p.remaining, 6, "{algorithm}");
            }
            let d = limiter.check_n(&user, "e", &t, 6).await.unwrap();
            assert!(d.allowed, "{algorithm}");
            assert_eq!(d.remaining, 0);
            let d = limiter.check(&user, "e", &t).await.unwrap();
            assert!(!d.allowed, "{algorithm}");
            assert!(d.retry_after.is_some());
            let p = limiter.peek(&user, "e", &t).await.unwrap();
            assert!(!p.allowed, "{algorithm}");
            // A cost beyond the tier's capacity can never pass: rejected, nothing sent.
            for bad in [0, 11] {
                assert!(
                    matches!(
                        limiter.check_n(&user, "e", &t, bad).await,
                        Err(Error::InvalidInput { .. })
                    ),
                    "{algorithm} cost {bad}"
                );
            }
            assert!(limiter.reset(&user, "e").await.unwrap());
            assert!(!limiter.reset(&user, "e").await.unwrap());
            let d = limiter.check(&user, "e", &t).await.unwrap();
            assert!(d.allowed);
            assert_eq!(d.remaining, 9, "{algorithm}");
        }
    }

    async fn every_key_has_a_ttl_and_the_documented_name(redis) {
        let mut conn = redis.connection().await.unwrap();
        for (algorithm, kind) in [
            (Algorithm::Gcra, "hash"),
            (Algorithm::FixedWindow, "string"),
            (Algorithm::SlidingWindow, "hash"),
        ] {
            let limiter = limiter(&redis, algorithm, 3, Duration::from_secs(60));
            let user = format!("user-{algorithm}");
            for _ in 0..5 {
                limiter.check(&user, "send", &TierName::custom("t")).await.unwrap();
            }
            let key = limiter.key(&user, "send").unwrap();
            assert_eq!(key, format!("{}rate-limit:{user}:send", redis.keys().prefix()));
            let kind_now: String = redis::cmd("TYPE").arg(&key).query_async(&mut conn).await.unwrap();
            assert_eq!(kind_now, kind, "{algorithm}");
            let ttl = pttl(&redis, &key).await;
            assert!(ttl > 0 && ttl <= 120_000, "{algorithm}: {ttl}");
        }
    }

    async fn hostile_ids_and_unknown_tiers_are_rejected(redis) {
        let limiter = limiter(&redis, Algorithm::Gcra, 3, Duration::from_secs(60));
        let t = TierName::custom("t");
        let long = "x".repeat(513);
        for (user, endpoint) in [
            ("a:b", "e"),
            ("{tag}", "e"),
            ("*", "e"),
            ("u", "a?"),
            ("", "e"),
            ("u", ""),
            ("u", "two words"),
            (long.as_str(), "e"),
        ] {
            assert!(
                matches!(limiter.check(user, endpoint, &t).await, Err(Error::InvalidInput { .. })),
                "{user:?} {endpoint:?}"
            );
            assert!(matches!(limiter.peek(user, endpoint, &t).await, Err(Error::InvalidInput { .. })));
            assert!(matches!(limiter.reset(user, endpoint).await, Err(Error::InvalidInput { .. })));
        }
        let err = limiter.check("u", "e", &TierName::custom("nope")).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
        assert!(err.to_string().contains("nope"), "{err}");
        assert_eq!(limiter.stats().redis_calls, 0);
        // Custom tier names go into headers: checked when the limiter is built.
        for bad in ["two words", "q\"uote", "", "auth"] {
            let tier = Tier::new(3, Duration::from_secs(60)).unwrap();
            let err = redis
                .rate_limiter_with(RateLimiterConfig::default().tier(TierName::custom(bad), tier))
                .unwrap_err();
            assert!(matches!(err, Error::InvalidInput { .. }), "{bad:?}: {err:?}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    async fn fixed_window_shares_the_typescript_counter(redis) {
        let limiter = limiter(&redis, Algorithm::FixedWindow, 5, Duration::from_secs(900));
        let t = TierName::custom("t");
        let key = limiter.key("ts-user", "login").unwrap();
        let mut conn = redis.connection().await.unwrap();
        // The documented TypeScript checkRateLimit: INCR, then EXPIRE on the first hit.
        let ts_check = |mut conn: aether_redis::pool::Connection, key: String| async move {
            let current: i64 = redis::cmd("INCR").arg(&key).query_async(&mut conn).await.unwrap();
            if current == 1 {
                let _: i64 = redis::cmd("EXPIRE").arg(&key).arg(900).query_async(&mut conn).await.unwrap();
            }
            current <= 5
        };
        assert!(ts_check(conn.clone(), key.clone()).await);
        assert!(ts_check(conn.clone(), key.clone()).await);
        let d = limiter.check("ts-user", "login", &t).await.unwrap();
        assert!(d.allowed);
        assert_eq!(d.remaining, 2);
        assert!(ts_check(conn.clone(), key.clone()).await);
        let p = limiter.peek("ts-user", "login", &t).await.unwrap();
        assert_eq!(p.remaining, 1);
        // getRateLimitStatus: GET + TTL.
        let current: i64 = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
        assert_eq!(current, 4);
        assert!(limiter.check("ts-user", "login", &t).await.unwrap().allowed);
        assert!(!ts_check(conn.clone(), key.clone()).await);
        assert!(!limiter.check("ts-user", "login", &t).await.unwrap().allowed);

        // A TypeScript client that crashed between INCR and EXPIRE left a counter without TTL:
        // the next check gives it the window.
        let orphan = limiter.key("crashed", "login").unwrap();
        let _: i64 = redis::cmd("INCR").arg(&orphan).query_async(&mut conn).await.unwrap();
        assert_eq!(pttl(&redis, &orphan).await, -1);
        let d = limiter.check("crashed", "login", &t).await.unwrap();
        assert_eq!(d.remaining, 3);
        let ttl = pttl(&redis, &orphan).await;
        assert!(ttl > 0 && ttl <= 900_000, "{ttl}");
    }

    async fn headers_from_a_real_decision(redis) {
        let limiter = limiter(&redis, Algorithm::FixedWindow, 2, Duration::from_secs(60));
        let t = TierName::custom("t");
        let ok = limiter.check("h", "e", &t).await.unwrap();
        let h = ok.headers();
        assert_eq!(h.policy, "\"t\";q=2;w=60");
        assert!(h.rate_limit.starts_with("\"t\";r=1;t="), "{}", h.rate_limit);
        assert_eq!(h.retry_after, None);
        limiter.check("h", "e", &t).await.unwrap();
        let denied = limiter.check("h", "e", &t).await.unwrap();
        let h = denied.headers();
        let retry: u64 = h.retry_after.unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
        // GCRA has no per-window cap: its policy says how much it admits at once.
        let gcra = self::limiter(&redis, Algorithm::Gcra, 2, Duration::from_secs(60));
        let d = gcra.check("h", "gcra", &t).await.unwrap();
        assert_eq!(d.headers().policy, "\"t\";q=2;w=60;aether-burst=2");
        let sliding = self::limiter(&redis, Algorithm::SlidingWindow, 2, Duration::from_secs(60));
        let d = sliding.check("h", "sliding", &t).await.unwrap();
        assert_eq!(d.headers().policy, "\"t\";q=2;w=60");
    }

    async fn default_tier_comes_from_the_connection_config(redis) {
        let limiter = redis.rate_limiter_with(RateLimiterConfig::default()).unwrap();
        let tier = limiter.tier(&TierName::Default).unwrap();
        assert_eq!(tier.limit(), 100);
        // The test environment's TTL row for rate-limit: 30 s.
        assert_eq!(tier.window(), Duration::from_secs(30));
        assert_eq!(limiter.tier(&TierName::Auth).unwrap().failure_policy(), FailurePolicy::FailClosed);
        let d = limiter.check("d", "e", &TierName::Default).await.unwrap();
        assert_eq!((d.allowed, d.remaining), (true, 99));
    }
}

#[tokio::test]
async fn default_tier_honours_redis_rate_limit_variables() {
    let server = tokio::task::spawn_blocking(aether_redis::testkit::shared_server)
        .await
        .unwrap()
        .unwrap();
    let vars = [
        ("REDIS_RATE_LIMIT_MAX", "7".to_owned()),
        ("REDIS_RATE_LIMIT_WINDOW", "45".to_owned()),
        ("REDIS_PORT", server.config.port.to_string()),
        ("REDIS_HOST", server.config.host.clone()),
    ];
    let config = Config::from_lookup(|k| {
        vars.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    })
    .unwrap();
    let redis = Redis::connect(config).await.unwrap();
    let limiter = redis
        .rate_limiter_with(RateLimiterConfig::default())
        .unwrap();
    let tier = limiter.tier(&TierName::Default).unwrap();
    assert_eq!((tier.limit(), tier.window()), (7, Duration::from_secs(45)));
}

#[test]
fn malformed_tier_variables_name_the_variable() {
    for (var, value) in [
        ("RATE_LIMIT_GENERAL", "120"),
        ("RATE_LIMIT_AUTH", "0,60"),
        ("RATE_LIMIT_MFA", "a,b"),
        ("RATE_LIMIT_FINANCIAL", "20,"),
        // Tier::new's bounds: digits only, and at most one per microsecond.
        ("RATE_LIMIT_GENERAL", "+5,60"),
        ("RATE_LIMIT_SENSITIVE", "1000000000,1"),
    ] {
        let err =
            RateLimiterConfig::from_lookup(|k| (k == var).then(|| value.to_owned())).unwrap_err();
        assert_eq!(err.variable(), var, "{err}");
    }
    let ok = RateLimiterConfig::from_lookup(|k| (k == "RATE_LIMIT_ADMIN").then(|| "50,10".into()))
        .unwrap();
    let admin = ok.get(&TierName::Admin).unwrap();
    assert_eq!(
        (admin.limit(), admin.window()),
        (50, Duration::from_secs(10))
    );
}

async fn start(options: LocalOptions) -> LocalServer {
    tokio::task::spawn_blocking(move || LocalServer::start(options))
        .await
        .unwrap()
        .unwrap()
}

/// `host:port` of the connection `redis` sends its commands on (as MONITOR shows it).
async fn client_addr(redis: &Redis) -> String {
    let info: String = query(redis, redis::cmd("CLIENT").arg("INFO")).await;
    info.split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))
        .unwrap()
        .to_owned()
}

/// Every command MONITOR shows from now until `marker` is echoed, as `(client addr, args)`;
/// commands run inside scripts (source `lua`) are left out.
async fn monitor(
    server: &LocalServer,
    marker: &'static str,
) -> tokio::task::JoinHandle<Vec<(String, String)>> {
    monitor_port(server.port(), marker).await
}

/// [`monitor`] of the server on 127.0.0.1:`port`.
async fn monitor_port(
    port: u16,
    marker: &'static str,
) -> tokio::task::JoinHandle<Vec<(String, String)>> {
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
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                lines.read_line(&mut line).await.unwrap() > 0,
                "MONITOR closed"
            );
            // +<time> [<db> <addr>] "CMD" "arg" ...
            let (Some(open), Some(close)) = (line.find(" ["), line.find("] ")) else {
                panic!("unexpected MONITOR line {line:?}");
            };
            let source = &line[open + 2..close];
            let (_, addr) = source.split_once(' ').unwrap();
            let args = line[close + 2..].trim_end().to_owned();
            if args.contains(marker) {
                return seen;
            }
            if addr != "lua" {
                seen.push((addr.to_owned(), args));
            }
        }
    })
}

/// Decisions use the server's clock only. Two limiters whose clocks are 10 s apart (−5 s and
/// +5 s) on separate keys send exactly the same commands apart from the key name, captured with
/// MONITOR on a server of the test's own and told apart by connection. Had a client clock
/// reached the wire (an argument, a `PEXPIREAT`, a script input), the lists would differ; equal
/// admitted totals alone could not show that, since the offset only moves the local fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_client_clocks_send_identical_commands_and_admit_the_same_totals() {
    let server = start(LocalOptions::default()).await;
    let make = skewed_limiter;
    let (ahead_redis, behind_redis, other) = (
        Redis::connect(server.config()).await.unwrap(),
        Redis::connect(server.config()).await.unwrap(),
        Redis::connect(server.config()).await.unwrap(),
    );
    let (ahead, behind) = (make(&ahead_redis, 5_000), make(&behind_redis, -5_000));
    let (ahead_addr, behind_addr) = (
        client_addr(&ahead_redis).await,
        client_addr(&behind_redis).await,
    );
    assert_ne!(ahead_addr, behind_addr);
    // Warm up: the scripts are cached, so neither side meets NOSCRIPT while monitored.
    for algorithm in ALGORITHMS {
        let tier = TierName::custom(format!("t-{algorithm}"));
        ahead
            .check("warm-ahead", algorithm.to_string().as_str(), &tier)
            .await
            .unwrap();
        behind
            .check("warm-behind", algorithm.to_string().as_str(), &tier)
            .await
            .unwrap();
    }

    const DONE: &str = "skew-test-done";
    let capture = monitor(&server, DONE).await;
    let keys = check_both_sides(&ahead, &behind).await;
    let _: String = query(&other, redis::cmd("ECHO").arg(DONE)).await;
    let seen = capture.await.unwrap();

    // Each side's commands, with its keys replaced by one name per algorithm.
    let side = |addr: &str, pick: fn(&(String, String, Algorithm)) -> &String| -> Vec<String> {
        seen.iter()
            .filter(|(from, _)| from == addr)
            .map(|(_, args)| {
                keys.iter().fold(args.clone(), |args, k| {
                    args.replace(&format!("\"{}\"", pick(k)), &format!("\"<key {}>\"", k.2))
                })
            })
            .collect()
    };
    let sent_ahead = side(&ahead_addr, |k| &k.0);
    let sent_behind = side(&behind_addr, |k| &k.1);
    // 3 algorithms × (30 checks + 1 peek); a fixed-window check is several commands.
    assert!(sent_ahead.len() >= 3 * 31, "{sent_ahead:#?}");
    assert!(
        sent_ahead
            .iter()
            .all(|c| !c.contains("ahead-") && !c.contains("behind-")),
        "{sent_ahead:#?}"
    );
    assert_eq!(sent_ahead, sent_behind, "a client clock reached the wire");
}

/// A limiter whose clock runs `offset_ms` off, with a tier `t-<algorithm>` of 20 per hour for
/// each algorithm.
fn skewed_limiter(redis: &Redis, offset_ms: i64) -> RateLimiter {
    let mut config = RateLimiterConfig::default().with_clock_offset(offset_ms);
    for algorithm in ALGORITHMS {
        let tier = Tier::new(20, Duration::from_secs(3600))
            .unwrap()
            .with_algorithm(algorithm);
        config = config.tier(TierName::custom(format!("t-{algorithm}")), tier);
    }
    redis.rate_limiter_with(config).unwrap()
}

/// 30 checks and a peek per algorithm on each skewed limiter (keys `ahead-<algorithm>` and
/// `behind-<algorithm>`): both admit exactly the tier's 20 and peek alike. Returns each
/// algorithm's two full keys.
async fn check_both_sides(
    ahead: &RateLimiter,
    behind: &RateLimiter,
) -> Vec<(String, String, Algorithm)> {
    let mut keys = Vec::new();
    for algorithm in ALGORITHMS {
        let tier = TierName::custom(format!("t-{algorithm}"));
        let (a, b) = (format!("ahead-{algorithm}"), format!("behind-{algorithm}"));
        let (mut admitted_ahead, mut admitted_behind) = (0, 0);
        for _ in 0..30 {
            admitted_ahead += u64::from(ahead.check(&a, "e", &tier).await.unwrap().allowed);
            admitted_behind += u64::from(behind.check(&b, "e", &tier).await.unwrap().allowed);
        }
        let (pa, pb) = (
            ahead.peek(&a, "e", &tier).await.unwrap(),
            behind.peek(&b, "e", &tier).await.unwrap(),
        );
        assert_eq!(
            (pa.allowed, pa.remaining),
            (pb.allowed, pb.remaining),
            "{algorithm}"
        );
        assert_eq!((admitted_ahead, admitted_behind), (20, 20), "{algorithm}");
        keys.push((
            ahead.key(&a, "e").unwrap(),
            behind.key(&b, "e").unwrap(),
            algorithm,
        ));
    }
    keys
}

/// The Cluster form of the test above: MONITOR on every node, and each side's commands told
/// apart by the keys they carry (a side's keys may live on any node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_client_clocks_on_cluster_send_identical_commands() {
    let cluster = tokio::task::spawn_blocking(|| LocalCluster::start(3))
        .await
        .unwrap()
        .unwrap();
    let ports: Vec<u16> = cluster.nodes().iter().map(|n| n.port()).collect();
    let (ahead_redis, behind_redis) = (
        Redis::connect(cluster.config()).await.unwrap(),
        Redis::connect(cluster.config()).await.unwrap(),
    );
    let (ahead, behind) = (
        skewed_limiter(&ahead_redis, 5_000),
        skewed_limiter(&behind_redis, -5_000),
    );
    // Warm up on enough keys that every node has every script cached: no NOSCRIPT while
    // monitored, which would add an EVAL to one side only.
    for algorithm in ALGORITHMS {
        let tier = TierName::custom(format!("t-{algorithm}"));
        for i in 0..40 {
            let endpoint = algorithm.to_string();
            ahead
                .check(&format!("warm-{i}"), &endpoint, &tier)
                .await
                .unwrap();
        }
    }
    const DONE: &str = "cluster-skew-test-done";
    let mut captures = Vec::new();
    for port in &ports {
        captures.push(monitor_port(*port, DONE).await);
    }
    let keys = check_both_sides(&ahead, &behind).await;
    for port in &ports {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: String = redis::cmd("ECHO")
            .arg(DONE)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    for capture in captures {
        seen.extend(capture.await.unwrap().into_iter().map(|(_, args)| args));
    }
    for (ahead_key, behind_key, algorithm) in &keys {
        let side = |key: &str| -> Vec<String> {
            let quoted = format!("\"{key}\"");
            seen.iter()
                .filter(|args| args.contains(&quoted))
                .map(|args| args.replace(&quoted, "<key>"))
                .collect()
        };
        let (sent_ahead, sent_behind) = (side(ahead_key), side(behind_key));
        // 30 checks + 1 peek, at least one command each that names the key.
        assert!(sent_ahead.len() >= 31, "{algorithm}: {sent_ahead:#?}");
        assert_eq!(
            sent_ahead, sent_behind,
            "{algorithm}: a client clock reached the wire"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_run_each_policy_then_recovery() {
    let server = start(LocalOptions::default()).await;
    let redis = Redis::connect(server.config()).await.unwrap();
    let server = Arc::new(Mutex::new(server));
    let (k, r) = (server.clone(), server.clone());
    stopped_mid_run(
        redis,
        "u",
        move || k.lock().unwrap().kill(),
        move || r.lock().unwrap().restart().unwrap(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_node_stopped_mid_run_each_policy_then_recovery() {
    let cluster = tokio::task::spawn_blocking(|| LocalCluster::start(3))
        .await
        .unwrap()
        .unwrap();
    let redis = Redis::connect(cluster.config()).await.unwrap();
    // A user whose three keys (one per tier below) are all served by the first node, which is
    // then killed: every check of the run meets the outage.
    let probe = redis.rate_limiter().unwrap();
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{}", cluster.nodes()[0].port()))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut user = None;
    for i in 0..2000 {
        let candidate = format!("u{i}");
        let mut on_first = true;
        for endpoint in ["open", "closed", "local"] {
            let key = probe.key(&candidate, endpoint).unwrap();
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            on_first &= cluster.node_for_slot(slot) == 0;
        }
        if on_first {
            user = Some(candidate);
            break;
        }
    }
    let user = user.expect("a user whose keys share a node");
    let cluster = Arc::new(Mutex::new(cluster));
    let (k, r) = (cluster.clone(), cluster.clone());
    stopped_mid_run(
        redis,
        &user,
        move || k.lock().unwrap().nodes_mut()[0].kill(),
        move || r.lock().unwrap().nodes_mut()[0].restart().unwrap(),
    )
    .await;
}

/// `config` plus three tiers of 5 per `window` under `algorithm`, one per failure policy:
/// `open`, `closed` and `local`.
fn policy_tiers(
    redis: &Redis,
    algorithm: Algorithm,
    window: Duration,
    config: RateLimiterConfig,
) -> (RateLimiter, [TierName; 3]) {
    let names = [
        TierName::custom("open"),
        TierName::custom("closed"),
        TierName::custom("local"),
    ];
    let policies = [
        FailurePolicy::FailOpen,
        FailurePolicy::FailClosed,
        FailurePolicy::Local,
    ];
    let config = names
        .iter()
        .zip(policies)
        .fold(config, |config, (name, policy)| {
            let tier = Tier::new(5, window)
                .unwrap()
                .with_algorithm(algorithm)
                .with_failure_policy(policy);
            config.tier(name.clone(), tier)
        });
    (redis.rate_limiter_with(config).unwrap(), names)
}

/// Checks of `user` on three tiers (fail open, fail closed, local) while the server holding
/// their keys is killed, with the breaker open, and after it restarts.
async fn stopped_mid_run(
    redis: Redis,
    user: &str,
    kill: impl FnOnce() + Send + 'static,
    restart: impl FnOnce() + Send + 'static,
) {
    let (limiter, [open, closed, local]) = policy_tiers(
        &redis,
        Algorithm::Gcra,
        Duration::from_secs(3600),
        RateLimiterConfig::default()
            .timeout(Duration::from_millis(300))
            .breaker(BreakerSettings::new(3, Duration::from_secs(3))),
    );
    for t in [&open, &closed, &local] {
        let d = limiter.check(user, t.as_str(), t).await.unwrap();
        assert_eq!((d.allowed, d.source), (true, DecisionSource::Redis));
    }

    tokio::task::spawn_blocking(kill).await.unwrap();

    // Fail open: allowed, and says so.
    let d = limiter.check(user, "open", &open).await.unwrap();
    assert_eq!((d.allowed, d.source), (true, DecisionSource::FailOpen));
    assert!(d.is_degraded());
    // Fail closed: an error, never a denial.
    let err = limiter.check(user, "closed", &closed).await.unwrap_err();
    assert!(err.is_unavailable() || err.is_timeout(), "{err:?}");
    // Local: the same limit enforced in process (5 per hour from a fresh local state).
    let mut local_admitted = 0;
    for _ in 0..8 {
        let d = limiter.check(user, "local", &local).await.unwrap();
        assert_eq!(d.source, DecisionSource::Local);
        local_admitted += u64::from(d.allowed);
    }
    assert_eq!(local_admitted, 5);
    assert_eq!(limiter.breaker_state(), BreakerState::Open);

    // While the breaker is open nothing is sent to Redis and every call returns at once.
    let before = limiter.stats();
    for i in 0..100 {
        match i % 3 {
            0 => assert!(limiter.check(user, "open", &open).await.unwrap().allowed),
            1 => assert!(limiter.check(user, "closed", &closed).await.is_err()),
            _ => assert_eq!(
                limiter.check(user, "local", &local).await.unwrap().source,
                DecisionSource::Local
            ),
        }
    }
    let after = limiter.stats();
    assert_eq!(after.redis_calls, before.redis_calls);
    assert_eq!(after.short_circuited - before.short_circuited, 100);

    tokio::task::spawn_blocking(restart).await.unwrap();
    // After the cooldown one trial call goes through, succeeds and closes the breaker.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let mut recovered = None;
    for _ in 0..20 {
        match limiter.check(user, "closed", &closed).await {
            Ok(d) => {
                recovered = Some(d);
                break;
            }
            Err(e) => {
                eprintln!("not yet recovered: {e:?} {:?}", limiter.breaker_state());
                tokio::time::sleep(Duration::from_millis(3100)).await
            }
        }
    }
    let d = recovered.expect("Redis decisions resume after restart");
    assert_eq!((d.allowed, d.source), (true, DecisionSource::Redis));
    assert_eq!(limiter.breaker_state(), BreakerState::Closed);
    let d = limiter.check(user, "local", &local).await.unwrap();
    assert_eq!(d.source, DecisionSource::Redis);
}

#[tokio::test]
async fn hardened_server_with_renamed_eval_runs_every_algorithm() {
    let server = start(LocalOptions {
        config_lines: support::RENAMED_COMMANDS
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ..LocalOptions::default()
    })
    .await;
    let ports = [server.port()];
    renamed_eval_runs_every_algorithm(hardened(server.config()), &ports).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardened_cluster_with_renamed_eval_runs_every_algorithm() {
    let cluster =
        tokio::task::spawn_blocking(|| LocalCluster::start_with(3, support::RENAMED_COMMANDS))
            .await
            .unwrap()
            .unwrap();
    let ports: Vec<u16> = cluster.nodes().iter().map(|n| n.port()).collect();
    renamed_eval_runs_every_algorithm(hardened(cluster.config()), &ports).await;
}

/// The client side of [`support::RENAMED_COMMANDS`].
fn hardened(config: Config) -> Config {
    config
        .to_builder()
        .renamed_command("EVAL", "EVAL_b835c3f9a8")
        .renamed_command("SCRIPT", "SCRIPT_b835c3f9a8")
        .renamed_command("CONFIG", "")
        .renamed_command("KEYS", "")
        .renamed_command("FLUSHDB", "")
        .renamed_command("FLUSHALL", "")
        .renamed_command("DEBUG", "")
        .build()
        .unwrap()
}

/// Every algorithm admits exactly its limit although the script cache of every node (`ports`)
/// is flushed between calls: `NOSCRIPT` is recovered through the renamed `EVAL`.
async fn renamed_eval_runs_every_algorithm(config: Config, ports: &[u16]) {
    let redis = Redis::connect(config).await.unwrap();
    let mut nodes = Vec::new();
    for port in ports {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        nodes.push(client.get_multiplexed_async_connection().await.unwrap());
    }
    for algorithm in ALGORITHMS {
        let limiter = limiter(&redis, algorithm, 3, Duration::from_secs(60));
        let t = TierName::custom("t");
        let mut admitted = 0;
        for _ in 0..5 {
            admitted += u64::from(limiter.check("h", "e", &t).await.unwrap().allowed);
            for conn in &mut nodes {
                let _: () = redis::cmd("SCRIPT_b835c3f9a8")
                    .arg("FLUSH")
                    .query_async(conn)
                    .await
                    .unwrap();
            }
        }
        assert_eq!(admitted, 3, "{algorithm}");
        limiter.reset("h", "e").await.unwrap();
    }
}

/// [`support::RENAMED_COMMANDS`] with `EVAL` and `EVALSHA` disabled.
fn without_scripting() -> Vec<String> {
    let mut lines: Vec<String> = support::RENAMED_COMMANDS
        .iter()
        .map(|s| s.to_string())
        .collect();
    lines[0] = "rename-command EVAL \"\"".into();
    lines.push("rename-command EVALSHA \"\"".into());
    lines
}

fn scripting_disabled(config: Config) -> Config {
    config
        .to_builder()
        .renamed_command("EVAL", "")
        .renamed_command("EVALSHA", "")
        .renamed_command("SCRIPT", "SCRIPT_b835c3f9a8")
        .build()
        .unwrap()
}

#[tokio::test]
async fn scripting_disabled_fails_script_tiers_at_construction_fixed_window_works() {
    let server = start(LocalOptions {
        config_lines: without_scripting(),
        ..LocalOptions::default()
    })
    .await;
    fixed_window_works_without_scripting(scripting_disabled(server.config())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_without_scripting_fails_script_tiers_at_construction_fixed_window_works() {
    let cluster = tokio::task::spawn_blocking(|| {
        let lines = without_scripting();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        LocalCluster::start_with(3, &lines)
    })
    .await
    .unwrap()
    .unwrap();
    fixed_window_works_without_scripting(scripting_disabled(cluster.config())).await;
}

async fn fixed_window_works_without_scripting(config: Config) {
    let redis = Redis::connect(config).await.unwrap();
    assert!(!redis.capabilities().scripting);

    // The default tiers are GCRA: refused now, with a reason, not on first use.
    let err = redis
        .rate_limiter_with(RateLimiterConfig::default())
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("gcra") && message.contains("FixedWindow"),
        "{message}"
    );
    let sliding = Tier::new(3, Duration::from_secs(60))
        .unwrap()
        .with_algorithm(Algorithm::SlidingWindow);
    let err = redis
        .rate_limiter_with(
            RateLimiterConfig::default()
                .algorithm_for_all(Algorithm::FixedWindow)
                .tier(TierName::custom("s"), sliding),
        )
        .unwrap_err();
    assert!(err.to_string().contains("sliding-window"), "{err}");

    // Fixed window needs no scripting.
    let limiter = redis
        .rate_limiter_with(
            RateLimiterConfig::default()
                .algorithm_for_all(Algorithm::FixedWindow)
                .tier(
                    TierName::custom("t"),
                    Tier::new(3, Duration::from_secs(60))
                        .unwrap()
                        .with_algorithm(Algorithm::FixedWindow),
                ),
        )
        .unwrap();
    let mut admitted = 0;
    for _ in 0..5 {
        admitted += u64::from(
            limiter
                .check("h", "e", &TierName::custom("t"))
                .await
                .unwrap()
                .allowed,
        );
    }
    assert_eq!(admitted, 3);
    assert!(
        limiter
            .peek("h", "other", &TierName::Mfa)
            .await
            .unwrap()
            .allowed
    );
}

/// A master demoted to a replica (a Sentinel failover, seen from a connection that has not
/// moved yet) answers writes with `READONLY`: to the limiter that is Redis unavailable, so each
/// tier's failure policy applies, for scripts and for the fixed window's `MULTI` alike.
#[tokio::test]
async fn read_only_replica_applies_the_failure_policy() {
    let master_port = aether_redis::testkit::free_port().unwrap();
    let server = start(LocalOptions {
        config_lines: vec![format!("replicaof 127.0.0.1 {master_port}")],
        ..LocalOptions::default()
    })
    .await;
    let redis = Redis::connect(server.config()).await.unwrap();
    for algorithm in ALGORITHMS {
        let (limiter, [open, closed, local]) = policy_tiers(
            &redis,
            algorithm,
            Duration::from_secs(60),
            RateLimiterConfig::default().breaker(BreakerSettings::new(100, Duration::from_secs(1))),
        );
        let d = limiter.check("u", "open", &open).await.unwrap();
        assert_eq!(d.source, DecisionSource::FailOpen, "{algorithm}");
        let d = limiter.check("u", "local", &local).await.unwrap();
        assert_eq!(d.source, DecisionSource::Local, "{algorithm}");
        let err = limiter.check("u", "closed", &closed).await.unwrap_err();
        assert!(err.is_unavailable(), "{algorithm}: {err:?}");
        assert!(err.to_string().contains("read-only"), "{algorithm}: {err}");
        assert_eq!(limiter.stats().redis_failures, 3, "{algorithm}");
    }
}

/// Runs a script on a connection of its own that holds the server for `millis` (past
/// `busy-reply-threshold`, every other client is answered `BUSY`); returns once it ended.
fn hold_server_busy(port: u16, millis: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_multiplexed_async_connection_with_config(
                &redis::AsyncConnectionConfig::new().set_response_timeout(None),
            )
            .await
            .unwrap();
        let _: i64 = redis::cmd("EVAL")
            .arg(
                "local t0 = redis.call('TIME') \
                 while true do \
                   local t = redis.call('TIME') \
                   if (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) >= tonumber(ARGV[1]) * 1000 then \
                     return 1 end \
                 end",
            )
            .arg(0)
            .arg(millis)
            .query_async(&mut conn)
            .await
            .unwrap();
    })
}

/// Once the server serves again, every algorithm's fail-open tier is decided by Redis, not by
/// the failure policy or an open breaker.
async fn checks_are_served_by_redis_again(
    limiters: &[(Algorithm, RateLimiter, [TierName; 3])],
    after: &str,
) {
    for (algorithm, limiter, [open, ..]) in limiters {
        let d = limiter
            .check(&algorithm.to_string(), "open", open)
            .await
            .unwrap();
        assert_eq!(d.source, DecisionSource::Redis, "{algorithm} {after}");
    }
}

/// Checks each policy tier of every algorithm (user = the algorithm's name) on a server that
/// refuses them with `code` (applying nothing): fail open allows, local decides in process, fail
/// closed is `Unavailable` naming the reply, and the breaker counts every one. A peek, which
/// writes nothing, is refused too when `peeks_refused`.
async fn refused_checks_apply_the_failure_policy(
    limiters: &[(Algorithm, RateLimiter, [TierName; 3])],
    code: &str,
    peeks_refused: bool,
) {
    for (algorithm, limiter, [open, closed, local]) in limiters {
        let user = algorithm.to_string();
        let before = limiter.stats();
        let d = limiter.check(&user, "open", open).await.unwrap();
        assert_eq!(
            (d.allowed, d.source),
            (true, DecisionSource::FailOpen),
            "{algorithm} {code}"
        );
        let d = limiter.check(&user, "local", local).await.unwrap();
        assert_eq!(d.source, DecisionSource::Local, "{algorithm} {code}");
        let err = limiter.check(&user, "closed", closed).await.unwrap_err();
        assert!(err.is_unavailable(), "{algorithm}: {err:?}");
        assert!(err.to_string().contains(code), "{algorithm}: {err}");
        let mut failures = 3;
        if peeks_refused {
            let d = limiter.peek(&user, "open", open).await.unwrap();
            assert_eq!(
                d.source,
                DecisionSource::FailOpen,
                "{algorithm} {code} peek"
            );
            failures += 1;
        }
        assert_eq!(
            limiter.stats().redis_failures - before.redis_failures,
            failures,
            "{algorithm} {code}"
        );
    }
}

fn limiters_per_algorithm(redis: &Redis) -> Vec<(Algorithm, RateLimiter, [TierName; 3])> {
    ALGORITHMS
        .into_iter()
        .map(|algorithm| {
            let (limiter, tiers) = policy_tiers(
                redis,
                algorithm,
                Duration::from_secs(60),
                RateLimiterConfig::default()
                    .timeout(Duration::from_secs(2))
                    .breaker(BreakerSettings::new(100, Duration::from_secs(1))),
            );
            (algorithm, limiter, tiers)
        })
        .collect()
}

/// A server busy running another client's long script answers `BUSY` and runs nothing: an
/// outage to the limiter, not a server error to pass on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_server_applies_the_failure_policy() {
    let server = start(LocalOptions {
        config_lines: vec!["busy-reply-threshold 100".into()],
        ..LocalOptions::default()
    })
    .await;
    let redis = Redis::connect(server.config()).await.unwrap();
    let limiters = limiters_per_algorithm(&redis);
    // Connected before the server turns busy (a handshake during BUSY could fail).
    let mut probe = redis::Client::open(format!("redis://127.0.0.1:{}", server.port()))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let busy = hold_server_busy(server.port(), 3000);
    // Past the 100 ms threshold the server answers other clients with BUSY: wait until it does
    // (however late the spawned script starts), rather than for a fixed time.
    let seen_busy = Instant::now();
    loop {
        assert!(
            seen_busy.elapsed() < Duration::from_secs(2),
            "the server never answered BUSY"
        );
        match redis::cmd("GET")
            .arg("probe")
            .query_async::<Option<String>>(&mut probe)
            .await
        {
            Err(e) if e.code() == Some("BUSY") => break,
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    refused_checks_apply_the_failure_policy(&limiters, "BUSY", true).await;
    // Answered while the script still holds the server: the BUSY replies decided, not a wait.
    assert!(!busy.is_finished(), "checks outlived the busy script");
    busy.await.unwrap();
    checks_are_served_by_redis_again(&limiters, "after the script").await;
}

/// A server over `maxmemory` refuses writes with `OOM` (and a transaction holding one with
/// `EXECABORT`) before applying anything: the failure policy applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_out_of_memory_applies_the_failure_policy() {
    refusals_of_a_setting_apply_the_failure_policy("maxmemory", "OOM").await;
}

/// A server with `min-replicas-to-write` and too few replicas refuses writes with
/// `NOREPLICAS` before applying anything: the failure policy applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_without_enough_replicas_applies_the_failure_policy() {
    refusals_of_a_setting_apply_the_failure_policy("min-replicas-to-write", "NOREPLICAS").await;
}

/// On a server of its own, `CONFIG SET <setting> 1` makes the server refuse writes with `code`
/// (reads are still served: only the consuming checks are refused); the failure policy applies
/// while it is set, and Redis decides again once it is back at 0.
async fn refusals_of_a_setting_apply_the_failure_policy(setting: &str, code: &str) {
    let server = start(LocalOptions::default()).await;
    let redis = Redis::connect(server.config()).await.unwrap();
    let limiters = limiters_per_algorithm(&redis);
    let set = |n: u32| redis::cmd("CONFIG").arg("SET").arg(setting).arg(n).clone();
    let _: () = query(&redis, &set(1)).await;
    refused_checks_apply_the_failure_policy(&limiters, code, false).await;
    let _: () = query(&redis, &set(0)).await;
    checks_are_served_by_redis_again(&limiters, &format!("after {code}")).await;
}

/// A limiter whose tier `open` (5 per minute) fails open, with a 200 ms deadline and `breaker`,
/// after one check that Redis answered.
async fn fail_open_limiter(redis: &Redis, breaker: BreakerSettings) -> (RateLimiter, TierName) {
    let open = TierName::custom("open");
    let limiter = redis
        .rate_limiter_with(
            RateLimiterConfig::default()
                .tier(
                    open.clone(),
                    Tier::new(5, Duration::from_secs(60))
                        .unwrap()
                        .with_failure_policy(FailurePolicy::FailOpen),
                )
                .timeout(Duration::from_millis(200))
                .breaker(breaker),
        )
        .unwrap();
    assert_eq!(
        limiter.check("u", "e", &open).await.unwrap().source,
        DecisionSource::Redis
    );
    (limiter, open)
}

/// A stalled server (not a stopped one): the limiter's deadline holds on the shared connection,
/// the failure policy applies, and the missed deadline leaves that connection in place for the
/// other repositories and the next check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_server_costs_one_deadline_and_keeps_the_shared_connection() {
    let server = start(LocalOptions::default()).await;
    let redis = Redis::connect(server.config()).await.unwrap();
    let (limiter, open) = fail_open_limiter(&redis, BreakerSettings::default()).await;
    let client_id = || async {
        let mut conn = redis.connection().await.unwrap();
        redis::cmd("CLIENT")
            .arg("ID")
            .query_async::<i64>(&mut conn)
            .await
            .unwrap()
    };
    let before = client_id().await;

    support::pause_all(&redis, 1500).await;
    let started = Instant::now();
    let d = limiter.check("u", "e", &open).await.unwrap();
    let waited = started.elapsed();
    assert_eq!((d.allowed, d.source), (true, DecisionSource::FailOpen));
    // Bounded by the 200 ms deadline, not by the 1.5 s pause (loose margin for a loaded machine).
    assert!(waited < Duration::from_millis(1200), "{waited:?}");
    assert_eq!(limiter.stats().redis_failures, 1);

    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(
        limiter.check("u", "e", &open).await.unwrap().source,
        DecisionSource::Redis
    );
    assert_eq!(
        client_id().await,
        before,
        "the shared connection was replaced"
    );
}

/// Concurrent checks on one key during a stall are batched behind the first; every one still
/// gets its failure policy within two deadlines of the limiter, and the breaker counts each
/// failed check, not each call, so a batch opens it as the same checks sent one by one would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_during_a_stall_apply_their_policy_and_open_the_breaker() {
    let server = start(LocalOptions::default()).await;
    let redis = Redis::connect(server.config()).await.unwrap();
    let (limiter, open) =
        fail_open_limiter(&redis, BreakerSettings::new(10, Duration::from_secs(30))).await;
    let before = limiter.stats();

    support::pause_all(&redis, 1500).await;
    let started = Instant::now();
    let checks: Vec<_> = (0..32)
        .map(|_| {
            let (limiter, open) = (limiter.clone(), open.clone());
            tokio::spawn(async move { limiter.check("u", "e", &open).await.unwrap() })
        })
        .collect();
    for check in checks {
        let d = check.await.unwrap();
        assert_eq!((d.allowed, d.source), (true, DecisionSource::FailOpen));
    }
    let waited = started.elapsed();
    // Twice the 200 ms deadline at most, not the 1.5 s pause (loose margin for a loaded machine).
    assert!(waited < Duration::from_millis(1200), "{waited:?}");
    let stats = limiter.stats();
    assert!(
        stats.redis_calls - before.redis_calls < 32,
        "the checks were not batched: {stats:?}"
    );
    assert_eq!(limiter.breaker_state(), BreakerState::Open, "{stats:?}");
}
