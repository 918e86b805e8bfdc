//! One-time tokens: single use under concurrency, the 2FA attempt cap, nothing secret at rest,
//! TTLs per environment, domain challenges.

use std::time::Duration;

use aether_redis::tokens::{
    DomainOutcome, IssueOptions, LinkPurpose, MAX_2FA_ATTEMPTS, TwoFactorOutcome,
};
use aether_redis::{Environment, Error, Keyspace, Redis};
use futures::future::join_all;
use serde_json::json;

mod support;
use support::{all_keys, assert_ttl, contents, pttl, query, with_environment};

/// The key name and every string stored in it (values, fields, members, stream entries).
async fn dump(redis: &Redis, key: &str) -> Vec<String> {
    let mut out = vec![key.to_owned()];
    out.extend(contents(redis, key).await.1);
    out
}

aether_redis::contract_tests! {
    async fn link_token_redeems_exactly_once_under_50_concurrent_attempts(redis) {
        let tokens = redis.tokens();
        let issued = tokens
            .issue(LinkPurpose::EmailVerify, "u-1", &json!({"email": "a@example.com"}))
            .await
            .unwrap();
        assert_eq!(issued.token.expose().len(), 43, "256 bits in base64url");
        let attempts = (0..50).map(|_| {
            let tokens = tokens.clone();
            let token = issued.token.expose().to_owned();
            tokio::spawn(async move { tokens.redeem(LinkPurpose::EmailVerify, &token).await })
        });
        let results: Vec<_> = join_all(attempts)
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap())
            .collect();
        let winners: Vec<_> = results.iter().flatten().collect();
        assert_eq!(winners.len(), 1, "exactly one redemption succeeds");
        assert_eq!(winners[0].subject, "u-1");
        assert_eq!(winners[0].payload, json!({"email": "a@example.com"}));
    }

    async fn redeem_is_scoped_by_purpose_and_rejects_garbage(redis) {
        let tokens = redis.tokens();
        let issued = tokens
            .issue(LinkPurpose::PasswordReset, "u-2", &json!(null))
            .await
            .unwrap();
        let t = issued.token.expose();
        assert_eq!(tokens.redeem(LinkPurpose::EmailVerify, t).await.unwrap(), None);
        assert_eq!(tokens.redeem(LinkPurpose::PasswordReset, "no-such-token").await.unwrap(), None);
        let oversized = "t".repeat(513);
        for bad in ["", oversized.as_str()] {
            assert!(matches!(
                tokens.redeem(LinkPurpose::PasswordReset, bad).await,
                Err(Error::InvalidInput { what: "token", .. })
            ));
            assert!(matches!(
                tokens.revoke(LinkPurpose::PasswordReset, bad).await,
                Err(Error::InvalidInput { what: "token", .. })
            ));
        }
        assert!(matches!(
            tokens.issue(LinkPurpose::PasswordReset, "a:b", &json!(null)).await,
            Err(Error::InvalidInput { what: "subject", .. })
        ));
        assert!(tokens.redeem(LinkPurpose::PasswordReset, t).await.unwrap().is_some());
        assert_eq!(tokens.redeem(LinkPurpose::PasswordReset, t).await.unwrap(), None);
        assert!(!format!("{issued:?}").contains(t), "Debug must not print the token");
    }

    async fn a_new_reset_token_revokes_the_previous_ones(redis) {
        let tokens = redis.tokens();
        let revoke = IssueOptions::new().revoke_previous(true);
        let first = tokens.issue(LinkPurpose::PasswordReset, "u-3", &json!(1)).await.unwrap();
        let kept = tokens.issue(LinkPurpose::EmailVerify, "u-3", &json!(2)).await.unwrap();
        let second = tokens
            .issue_with_options(LinkPurpose::PasswordReset, "u-3", &json!(3), revoke)
            .await
            .unwrap();
        assert_eq!(tokens.redeem(LinkPurpose::PasswordReset, first.token.expose()).await.unwrap(), None);
        assert!(tokens.redeem(LinkPurpose::EmailVerify, kept.token.expose()).await.unwrap().is_some());

        // Concurrent revoking issues: exactly one token (plus none of the older) survives.
        let racers = (0..20).map(|i| {
            let tokens = tokens.clone();
            tokio::spawn(async move {
                tokens
                    .issue_with_options(LinkPurpose::PasswordReset, "u-3", &json!(i), revoke)
                    .await
                    .unwrap()
            })
        });
        let issued: Vec<_> = join_all(racers).await.into_iter().map(|r| r.unwrap()).collect();
        let mut alive = 0;
        for t in issued.iter().chain([&second]) {
            if tokens.redeem(LinkPurpose::PasswordReset, t.token.expose()).await.unwrap().is_some() {
                alive += 1;
            }
        }
        assert_eq!(alive, 1);
    }

    async fn revoke_all_and_pending(redis) {
        let tokens = redis.tokens();
        let a = tokens.issue(LinkPurpose::EmailVerify, "u-4", &json!("a")).await.unwrap();
        tokens.issue(LinkPurpose::EmailVerify, "u-4", &json!("b")).await.unwrap();
        let other = tokens.issue(LinkPurpose::EmailVerify, "u-5", &json!("c")).await.unwrap();
        let pending = tokens.pending(LinkPurpose::EmailVerify, "u-4").await.unwrap();
        assert_eq!(pending.len(), 2);
        assert!(pending.iter().any(|p| p.token_hash == a.token_hash && p.payload == json!("a")));
        assert_eq!(tokens.revoke_all(LinkPurpose::EmailVerify, "u-4").await.unwrap(), 2);
        assert!(tokens.pending(LinkPurpose::EmailVerify, "u-4").await.unwrap().is_empty());
        assert_eq!(tokens.redeem(LinkPurpose::EmailVerify, a.token.expose()).await.unwrap(), None);
        assert!(tokens.redeem(LinkPurpose::EmailVerify, other.token.expose()).await.unwrap().is_some());
    }

    async fn two_factor_wrong_attempt_cap_is_exact_under_concurrency(redis) {
        let tokens = redis.tokens();
        let code = tokens.issue_2fa("u-6").await.unwrap();
        assert_eq!(code.max_attempts, 5);
        let right = code.code.expose().to_owned();
        let wrong = format!("{:06}", (right.parse::<u32>().unwrap() + 1) % 1_000_000);
        let guesses = (0..50).map(|_| {
            let tokens = tokens.clone();
            let wrong = wrong.clone();
            tokio::spawn(async move { tokens.verify_2fa("u-6", &wrong).await.unwrap() })
        });
        let outcomes: Vec<_> = join_all(guesses).await.into_iter().map(|r| r.unwrap()).collect();
        let wrongs = outcomes.iter().filter(|o| matches!(o, TwoFactorOutcome::Wrong { .. })).count();
        let burned = outcomes.iter().filter(|o| **o == TwoFactorOutcome::Burned).count();
        let missing = outcomes.iter().filter(|o| **o == TwoFactorOutcome::Missing).count();
        assert_eq!((wrongs, burned, missing), (4, 1, 45), "{outcomes:?}");
        for left in 1..=4 {
            assert!(outcomes.contains(&TwoFactorOutcome::Wrong { attempts_left: left }));
        }
        // The right code is useless once burned.
        assert_eq!(tokens.verify_2fa("u-6", &right).await.unwrap(), TwoFactorOutcome::Missing);
        assert_eq!(tokens.two_factor_state("u-6").await.unwrap(), None);
    }

    async fn reissued_two_factor_codes_are_never_seen_half_written(redis) {
        // Re-issues race wrong guesses while an observer on a socket of its own reads the hash:
        // `MULTI DEL HSET PEXPIRE` leaves no moment with some of the fields or without a TTL
        // (as separate round trips it would), and no guess meets one and errs.
        let tokens = redis.tokens();
        let key = redis.keys().key(Keyspace::TwoFactor, &["u-reissue"]).unwrap();
        tokens.issue_2fa("u-reissue").await.unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let observer = {
            let (redis, stop, key) = (redis.clone(), stop.clone(), key.clone());
            tokio::spawn(async move {
                let mut conn = redis.dedicated().await.unwrap();
                let (mut seen, mut broken) = (0_u32, Vec::new());
                loop {
                    // One more read after the stop: the code issued last is seen at least then.
                    let done = stop.load(std::sync::atomic::Ordering::Acquire);
                    let (fields, ttl): (Vec<Option<String>>, i64) = redis::pipe()
                        .atomic()
                        .cmd("HMGET").arg(&key).arg("codeHash").arg("attempts").arg("maxAttempts").arg("issuedAt")
                        .cmd("PTTL").arg(&key)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    if fields.iter().any(Option::is_some) {
                        seen += 1;
                        if fields.iter().any(Option::is_none) || ttl <= 0 {
                            broken.push((fields, ttl));
                        }
                    }
                    if done {
                        return (seen, broken);
                    }
                }
            })
        };
        let work = (0..200).map(|i| {
            let tokens = tokens.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    tokens.issue_2fa("u-reissue").await.map(|_| ())
                } else {
                    tokens.verify_2fa("u-reissue", "000000").await.map(|_| ())
                }
            })
        });
        for result in join_all(work).await {
            result.unwrap().unwrap();
        }
        tokens.issue_2fa("u-reissue").await.unwrap();
        stop.store(true, std::sync::atomic::Ordering::Release);
        let (seen, broken) = observer.await.unwrap();
        assert!(seen > 0, "the observer never saw a code");
        assert!(broken.is_empty(), "half-written codes: {broken:?}");
    }

    async fn a_two_factor_count_that_is_not_a_number_burns_the_code(redis) {
        // Written by another service: guesses must never go uncounted.
        let tokens = redis.tokens();
        let key = redis.keys().key(Keyspace::TwoFactor, &["u-garbled"]).unwrap();
        for (field, value) in [
            ("attempts", "0.0"), ("attempts", "undefined"), ("maxAttempts", "nan"),
            ("maxAttempts", "inf"), ("maxAttempts", "1e18"), ("maxAttempts", "0x10"),
        ] {
            let code = tokens.issue_2fa("u-garbled").await.unwrap();
            let right = code.code.expose().to_owned();
            let wrong = format!("{:06}", (right.parse::<u32>().unwrap() + 1) % 1_000_000);
            let _: () = query(&redis, redis::cmd("HSET").arg(&key).arg(field).arg(value)).await;
            assert_eq!(tokens.verify_2fa("u-garbled", &wrong).await.unwrap(), TwoFactorOutcome::Burned, "{field}={value}");
            assert_eq!(tokens.verify_2fa("u-garbled", &right).await.unwrap(), TwoFactorOutcome::Missing, "{field}={value}");
        }
        // Absent counts are the defaults: 0 attempts, the verifier's cap.
        let code = tokens.issue_2fa("u-garbled").await.unwrap();
        let right = code.code.expose().to_owned();
        let wrong = format!("{:06}", (right.parse::<u32>().unwrap() + 1) % 1_000_000);
        let _: () = query(&redis, redis::cmd("HDEL").arg(&key).arg("attempts").arg("maxAttempts").arg("issuedAt")).await;
        // The state (and so the user's data export) reads the hash as the verifier does.
        let state = tokens.two_factor_state("u-garbled").await.unwrap().unwrap();
        assert_eq!((state.attempts, state.max_attempts, state.issued_at), (0, 5, None));
        assert_eq!(tokens.verify_2fa("u-garbled", &wrong).await.unwrap(), TwoFactorOutcome::Wrong { attempts_left: 4 });
        assert_eq!(tokens.two_factor_state("u-garbled").await.unwrap().unwrap().attempts, 1);
        assert!(redis.user_data().export_user("u-garbled").await.unwrap()["twoFactor"].is_object());
        assert_eq!(tokens.verify_2fa("u-garbled", &right).await.unwrap(), TwoFactorOutcome::Valid);
    }

    async fn redeemed_tokens_do_not_pile_up_in_the_subjects_index(redis) {
        // A reset link requested and used (or left to expire) again and again: the index keeps
        // at most about twice the live tokens.
        let tokens = redis.tokens();
        let live = tokens.issue(LinkPurpose::EmailVerify, "u-churn", &json!({})).await.unwrap();
        for _ in 0..100 {
            let t = tokens.issue(LinkPurpose::EmailVerify, "u-churn", &json!({})).await.unwrap();
            assert!(tokens.redeem(LinkPurpose::EmailVerify, t.token.expose()).await.unwrap().is_some());
        }
        let index = redis.keys().key(Keyspace::EmailVerify, &["user", "u-churn"]).unwrap();
        let size: u64 = query(&redis, redis::cmd("SCARD").arg(&index)).await;
        assert!(size <= 32, "{size} hashes indexed for 1 live token");
        let pending = tokens.pending(LinkPurpose::EmailVerify, "u-churn").await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].token_hash, live.token_hash);
        assert_eq!(tokens.revoke_all(LinkPurpose::EmailVerify, "u-churn").await.unwrap(), 1);
    }

    async fn index_prunes_under_concurrent_issues_never_drop_a_live_token(redis) {
        // 200 issues at once cross the prune points 16, 32, 64 and 128 while other issues and
        // redemptions are in flight: a prune may drop only tokens already gone.
        let tokens = redis.tokens();
        let calls = (0..200).map(|i| {
            let tokens = tokens.clone();
            tokio::spawn(async move {
                let t = tokens.issue(LinkPurpose::PasswordReset, "u-racing", &json!(i)).await.unwrap();
                let redeemed = i % 2 == 0
                    && tokens.redeem(LinkPurpose::PasswordReset, t.token.expose()).await.unwrap().is_some();
                (t.token_hash, redeemed)
            })
        });
        let issued: Vec<(String, bool)> = join_all(calls).await.into_iter().map(|r| r.unwrap()).collect();
        let mut live: Vec<String> = issued.iter().filter(|(_, r)| !r).map(|(h, _)| h.clone()).collect();
        live.sort();
        let mut pending: Vec<String> = tokens
            .pending(LinkPurpose::PasswordReset, "u-racing")
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.token_hash)
            .collect();
        pending.sort();
        assert_eq!(pending, live, "a live token left the index");
        assert_eq!(tokens.revoke_all(LinkPurpose::PasswordReset, "u-racing").await.unwrap(), live.len() as u64);
    }

    async fn the_largest_two_factor_cap_still_accepts_the_right_code(redis) {
        // A cap the verify script cannot read back would burn every code, the right one too.
        assert!(matches!(
            redis.tokens().with_max_2fa_attempts(MAX_2FA_ATTEMPTS + 1),
            Err(Error::InvalidInput { what: "max 2FA attempts", .. })
        ));
        let tokens = redis.tokens().with_max_2fa_attempts(MAX_2FA_ATTEMPTS).unwrap();
        let code = tokens.issue_2fa("u-cap").await.unwrap();
        let right = code.code.expose().to_owned();
        let wrong = format!("{:06}", (right.parse::<u32>().unwrap() + 1) % 1_000_000);
        assert_eq!(
            tokens.verify_2fa("u-cap", &wrong).await.unwrap(),
            TwoFactorOutcome::Wrong { attempts_left: MAX_2FA_ATTEMPTS - 1 }
        );
        assert_eq!(tokens.verify_2fa("u-cap", &right).await.unwrap(), TwoFactorOutcome::Valid);
    }

    async fn two_factor_code_is_single_use_and_survives_fewer_wrong_guesses(redis) {
        let tokens = redis.tokens().with_max_2fa_attempts(3).unwrap();
        let code = tokens.issue_2fa("u-7").await.unwrap();
        let right = code.code.expose().to_owned();
        let wrong = format!("{:06}", (right.parse::<u32>().unwrap() + 7) % 1_000_000);
        assert_eq!(
            tokens.verify_2fa("u-7", &wrong).await.unwrap(),
            TwoFactorOutcome::Wrong { attempts_left: 2 }
        );
        assert_eq!(tokens.two_factor_state("u-7").await.unwrap().unwrap().attempts, 1);
        assert!(matches!(
            tokens.verify_2fa("u-7", "12a456").await,
            Err(Error::InvalidInput { what: "2FA code", .. })
        ));
        let racers = (0..50).map(|_| {
            let tokens = tokens.clone();
            let right = right.clone();
            tokio::spawn(async move { tokens.verify_2fa("u-7", &right).await.unwrap() })
        });
        let outcomes: Vec<_> = join_all(racers).await.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(outcomes.iter().filter(|o| **o == TwoFactorOutcome::Valid).count(), 1);
        assert_eq!(outcomes.iter().filter(|o| **o == TwoFactorOutcome::Missing).count(), 49);
        // A new code replaces the old one and resets the count.
        let first = tokens.issue_2fa("u-7").await.unwrap();
        let second = tokens.issue_2fa("u-7").await.unwrap();
        if first.code.expose() != second.code.expose() {
            assert!(matches!(
                tokens.verify_2fa("u-7", first.code.expose()).await.unwrap(),
                TwoFactorOutcome::Wrong { .. }
            ));
        }
        assert_eq!(tokens.verify_2fa("u-7", second.code.expose()).await.unwrap(), TwoFactorOutcome::Valid);
    }

    async fn no_raw_token_value_appears_anywhere_in_redis(redis) {
        let tokens = redis.tokens();
        let mut link_tokens = Vec::new();
        let mut codes = Vec::new();
        for i in 0..10 {
            let user = format!("u-{i}");
            for purpose in LinkPurpose::ALL {
                let t = tokens.issue(purpose, &user, &json!({"n": i})).await.unwrap();
                link_tokens.push(t.token.expose().to_owned());
            }
            let t = tokens
                .issue_with_options(LinkPurpose::PasswordReset, &user, &json!(i), IssueOptions::new().revoke_previous(true))
                .await
                .unwrap();
            link_tokens.push(t.token.expose().to_owned());
            codes.push(tokens.issue_2fa(&user).await.unwrap().code.expose().to_owned());
        }
        let keys = all_keys(&redis).await;
        assert!(keys.len() >= 10 * 4, "found only {} keys", keys.len());
        let mut stored = Vec::new();
        for key in &keys {
            stored.extend(dump(&redis, key).await);
        }
        for token in &link_tokens {
            assert!(!stored.iter().any(|s| s.contains(token.as_str())), "a link token is stored");
        }
        for code in &codes {
            // A 6-digit string may occur by chance inside a timestamp or digest, so the test
            // is that no key, field or value *is* the code.
            assert!(!stored.iter().any(|s| s == code), "a 2FA code is stored");
        }
    }

    async fn ttls_equal_the_table_in_every_environment(redis) {
        // (environment, 2fa, email-verify, password-reset, domain-verify) in seconds.
        for (environment, two_fa, verify, reset, domain) in [
            (Environment::Production, 300, 3_600, 1_800, 86_400),
            (Environment::Development, 120, 600, 300, 1_800),
            (Environment::Test, 30, 30, 60, 60),
        ] {
            let redis = with_environment(&redis, environment).await;
            let tokens = redis.tokens();
            let v = tokens.issue(LinkPurpose::EmailVerify, "u-8", &json!(null)).await.unwrap();
            let r = tokens.issue(LinkPurpose::PasswordReset, "u-8", &json!(null)).await.unwrap();
            tokens.issue_2fa("u-8").await.unwrap();
            let challenge = tokens.domain_challenge("u-8", "example.org").await.unwrap();
            assert_eq!(v.expires_in, Duration::from_secs(verify));
            let keys = redis.keys();
            let k = |ks, parts: &[&str]| keys.key(ks, parts).unwrap();
            use aether_redis::Keyspace as K;
            assert_ttl(pttl(&redis, &k(K::EmailVerify, &[&v.token_hash])).await, verify, "email-verify");
            assert_ttl(pttl(&redis, &k(K::EmailVerify, &["user", "u-8"])).await, verify, "email-verify index");
            assert_ttl(pttl(&redis, &k(K::PasswordReset, &[&r.token_hash])).await, reset, "password-reset");
            assert_ttl(pttl(&redis, &k(K::PasswordReset, &["user", "u-8"])).await, reset, "password-reset index");
            assert_ttl(pttl(&redis, &k(K::TwoFactor, &["u-8"])).await, two_fa, "2fa");
            assert_ttl(pttl(&redis, &k(K::DomainVerify, &["u-8", &challenge.domain])).await, domain, "domain-verify");
        }
    }

    async fn concurrent_first_challenges_agree_on_one_token(redis) {
        let tokens = redis.tokens();
        let asks = (0..32).map(|_| {
            let tokens = tokens.clone();
            tokio::spawn(async move { tokens.domain_challenge("org-race", "race.example.com").await.unwrap() })
        });
        let challenges: Vec<_> = join_all(asks).await.into_iter().map(|r| r.unwrap()).collect();
        assert!(challenges.iter().all(|c| *c == challenges[0]), "two tokens handed out for one challenge");
        assert_eq!(tokens.get_domain_challenge("org-race", "race.example.com").await.unwrap(), Some(challenges[0].clone()));
    }

    async fn domain_challenge_is_readable_until_confirmed(redis) {
        let tokens = redis.tokens();
        let challenge = tokens.domain_challenge("org-1", "Mail.Example.COM.").await.unwrap();
        assert_eq!(challenge.domain, "mail.example.com");
        assert_eq!(challenge.txt_name(), "_aether-verify.mail.example.com");
        assert_eq!(tokens.domain_challenge("org-1", "mail.example.com").await.unwrap(), challenge);
        assert_eq!(
            tokens.get_domain_challenge("org-1", "mail.example.com").await.unwrap(),
            Some(challenge.clone())
        );
        let rival = tokens.domain_challenge("org-2", "mail.example.com").await.unwrap();
        assert_ne!(rival.token, challenge.token, "each owner has a token of its own");
        assert_eq!(
            tokens.confirm_domain("org-2", "mail.example.com", &[challenge.txt_value()]).await.unwrap(),
            DomainOutcome::NotFound,
            "a record published for another owner does not verify"
        );
        assert_eq!(
            tokens.confirm_domain("org-1", "mail.example.com", &["v=spf1 -all".into()]).await.unwrap(),
            DomainOutcome::NotFound
        );
        assert!(tokens.get_domain_challenge("org-1", "mail.example.com").await.unwrap().is_some());
        let confirmations = (0..10).map(|_| {
            let tokens = tokens.clone();
            let values = vec!["v=spf1 -all".to_owned(), challenge.txt_value()];
            tokio::spawn(async move { tokens.confirm_domain("org-1", "mail.example.com", &values).await.unwrap() })
        });
        let outcomes: Vec<_> = join_all(confirmations).await.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(outcomes.iter().filter(|o| matches!(o, DomainOutcome::Verified(_))).count(), 1);
        assert_eq!(tokens.get_domain_challenge("org-1", "mail.example.com").await.unwrap(), None);
        assert!(matches!(
            tokens.domain_challenge("org-1", "not a domain").await,
            Err(Error::InvalidInput { what: "domain", .. })
        ));
    }
}

/// On a server with scripting disabled link tokens work and script-backed checks are refused
/// with a typed error (never half-working).
#[tokio::test]
async fn without_scripting_links_work_and_2fa_is_refused() {
    let server = support::server_without_scripting().await;
    let redis = Redis::connect(server.config()).await.unwrap();
    assert!(!redis.capabilities().scripting);
    let tokens = redis.tokens();
    let link = tokens
        .issue(LinkPurpose::EmailVerify, "u-1", &json!(1))
        .await
        .unwrap();
    assert!(
        tokens
            .redeem(LinkPurpose::EmailVerify, link.token.expose())
            .await
            .unwrap()
            .is_some()
    );
    let code = tokens.issue_2fa("u-1").await.unwrap();
    assert!(matches!(
        tokens.verify_2fa("u-1", code.code.expose()).await,
        Err(Error::Unsupported(_))
    ));
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .unwrap();
}

/// Which node of `cluster` serves `key`.
fn node_of(cluster: &aether_redis::testkit::LocalCluster, key: &str) -> usize {
    cluster.node_for_slot(aether_redis::keyspace::cluster_slot(key))
}

/// A revocation cut off half way (the node holding a token dies between reading the index and
/// deleting the tokens) fails, and running it again once the node is back revokes the token:
/// the index still lists it. With AOF, the token outlives the kill, as a leaked link would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_revoke_all_is_finished_by_running_it_again() {
    let mut cluster = tokio::task::spawn_blocking(|| {
        aether_redis::testkit::LocalCluster::start_with(
            3,
            &["appendonly yes", "appendfsync always"],
        )
    })
    .await
    .unwrap()
    .unwrap();
    let mut config = cluster.config();
    config.key_prefix = "revoke:".into();
    config.connect_timeout = Duration::from_millis(500);
    config.response_timeout = Duration::from_secs(1);
    let redis = Redis::connect(config).await.unwrap();
    let tokens = redis.tokens();
    let purpose = LinkPurpose::PasswordReset;
    let index_node = node_of(&cluster, "revoke:password-reset:user:u-leak");
    // Tokens (each lands on a random slot) until one lives on another node than the index and
    // another on a node that stays up: the revocation's deletes then span a live node and the
    // dead one, which the redis client's own split of a multi-key `DEL` answered with `Ok(0)`.
    let mut issued = Vec::new();
    let mut nodes = Vec::new();
    let (victim, victim_node) = loop {
        let t = tokens.issue(purpose, "u-leak", &json!(null)).await.unwrap();
        nodes.push(node_of(
            &cluster,
            &format!("revoke:password-reset:{}", t.token_hash),
        ));
        issued.push(t);
        let victim = nodes.iter().position(|n| *n != index_node);
        if let Some(v) = victim
            && nodes.iter().any(|n| *n != nodes[v])
        {
            break (issued[v].token.expose().to_owned(), nodes[v]);
        }
        assert!(
            issued.len() < 50,
            "the tokens did not spread over the nodes"
        );
    };

    let node = &mut cluster.nodes_mut()[victim_node];
    tokio::task::block_in_place(|| node.kill());
    assert!(
        tokens.revoke_all(purpose, "u-leak").await.is_err(),
        "the token's node is down, so the revocation cannot complete"
    );
    tokio::task::block_in_place(|| node.restart().unwrap());

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let revoked = loop {
        match tokens.revoke_all(purpose, "u-leak").await {
            Ok(n) => break n,
            Err(e) => assert!(std::time::Instant::now() < deadline, "node not back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(revoked >= 1, "the run again found the surviving token");
    assert_eq!(tokens.redeem(purpose, &victim).await.unwrap(), None);
    for t in &issued {
        assert_eq!(
            tokens.redeem(purpose, t.token.expose()).await.unwrap(),
            None
        );
    }
    assert!(tokens.pending(purpose, "u-leak").await.unwrap().is_empty());
}
