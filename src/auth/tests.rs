use std::sync::Arc;

use super::*;
use crate::error::Error;

fn limits(daily: Option<f64>, monthly: Option<f64>) -> KeyLimits {
    KeyLimits {
        daily_usd: daily,
        monthly_usd: monthly,
        ..KeyLimits::default()
    }
}

fn auth_config(keys_db: &Path) -> AuthConfig {
    AuthConfig {
        enabled: true,
        keys_db: keys_db.to_path_buf(),
        cache_ttl: Duration::from_secs(60),
        protect_reports: true,
        protect_metrics: false,
        defaults: KeyLimits {
            rpm: Some(100),
            ..KeyLimits::default()
        },
        default_max_output_tokens: 1000,
    }
}

fn bearer(secret: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::AUTHORIZATION,
        format!("Bearer {secret}").parse().expect("header"),
    );
    h
}

#[test]
fn a_created_key_is_stored_hashed_listed_without_its_secret_and_revocable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keys.db");
    let store = KeyStore::open(&path).expect("open");
    let (key, secret) = store
        .create(&NewKey {
            name: "alice".into(),
            team: Some("search".into()),
            limits: KeyLimits {
                rpm: Some(60),
                ..KeyLimits::default()
            },
        })
        .expect("create");
    assert!(secret.starts_with("tg-") && secret.len() == 3 + 64, "{secret}");
    assert!(key.id.starts_with("key_") && !secret.contains(&key.id[4..]));
    assert!(secret.starts_with(&key.prefix));
    let (_, other) = store.create(&NewKey::named("bob")).expect("create");
    assert_ne!(secret, other, "secrets are random");

    let listed = store.list().expect("list");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0], key);
    assert_eq!(
        store.by_hash(&store::hash_secret(&secret)).expect("lookup"),
        Some(key.clone())
    );
    let err = store.create(&NewKey::named("alice")).expect_err("duplicate name");
    assert!(err.contains("`alice` already exists"), "{err}");
    // What `keys list` prints must not drive the terminal.
    let err = store
        .create(&NewKey::named("esc\u{1b}[31mred"))
        .expect_err("control characters");
    assert!(
        err.contains("`--name` must not contain control or invisible characters"),
        "{err}"
    );
    // Nor may two names look alike.
    for (name, want) in [
        ("al\u{200B}ice", "invisible"),
        ("\u{202E}ecila", "invisible"),
        (" alice ", "must not start or end with spaces"),
        ("  ", "must not be empty"),
    ] {
        let err = store.create(&NewKey::named(name)).expect_err(name);
        assert!(err.contains(want), "{name:?}: {err}");
    }
    let err = store
        .create(&NewKey {
            team: Some(String::new()),
            ..NewKey::named("dave")
        })
        .expect_err("empty team");
    assert!(err.contains("`--team` must not be empty"), "{err}");
    let err = store
        .create(&NewKey {
            team: Some("a\nb".into()),
            ..NewKey::named("carol")
        })
        .expect_err("newline in team");
    assert!(err.contains("`--team`"), "{err}");
    let err = store.create(&NewKey::named(&"x".repeat(129))).expect_err("too long");
    assert!(err.contains("at most 128 characters"), "{err}");
    assert_eq!(store.list().expect("list").len(), 2, "none of them was stored");

    let revoked = store.revoke("alice").expect("revoke").expect("found");
    assert!(revoked.revoked_ms.is_some());
    assert_eq!(store.revoke("nobody").expect("revoke"), None);
    drop(store);
    // The file holds hashes only: neither secret appears in the database or its WAL.
    for f in std::fs::read_dir(dir.path()).expect("dir") {
        let bytes = std::fs::read(f.expect("entry").path()).expect("read");
        for s in [&secret, &other] {
            assert!(
                !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                "secret stored in plain"
            );
        }
    }
}

#[test]
fn authenticate_accepts_live_keys_and_refuses_missing_unknown_and_revoked_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = auth_config(&dir.path().join("keys.db"));
    let store = KeyStore::open(&cfg.keys_db).expect("open");
    let (key, secret) = store.create(&NewKey::named("alice")).expect("create");
    let (_, revoked) = store.create(&NewKey::named("old")).expect("create");
    store.revoke("old").expect("revoke");
    let auth = Auth::start(&cfg, &dir.path().join("ledger.db")).expect("start");

    let p = auth
        .authenticate(&cfg, &bearer(&secret))
        .expect("ok")
        .expect("principal");
    assert_eq!(p.key.id, key.id);
    assert_eq!(p.limits.rpm, Some(100), "the default applies to a key without its own");
    let mut x_api_key = HeaderMap::new();
    x_api_key.insert("x-api-key", secret.parse().expect("header"));
    assert!(auth.authenticate(&cfg, &x_api_key).expect("ok").is_some());

    // The same key twice (an SDK that sends both headers) is one key; two keys are refused
    // whichever comes first.
    let mut both = bearer(&secret);
    both.insert("x-api-key", secret.parse().expect("header"));
    assert!(auth.authenticate(&cfg, &both).expect("ok").is_some());
    let mut two = bearer(&secret);
    two.append(
        header::AUTHORIZATION,
        format!("Bearer {revoked}").parse().expect("header"),
    );
    let mut good_and_garbage = bearer(&secret);
    good_and_garbage.insert("x-api-key", "garbage".parse().expect("header"));
    for (headers, says) in [
        (HeaderMap::new(), "didn't provide"),
        (bearer("tg-0000"), "Incorrect API key"),
        (bearer(&revoked), "revoked"),
        (two, "More than one API key"),
        (good_and_garbage, "More than one API key"),
    ] {
        match auth.authenticate(&cfg, &headers) {
            Err(e @ Error::Unauthorized(m)) => {
                assert!(m.contains(says), "{m}");
                assert_eq!(e.status_code(), 401);
                assert_eq!(e.envelope()["error"]["type"], "authentication_error");
            }
            other => panic!("expected 401, got {other:?}"),
        }
    }
    let off = AuthConfig { enabled: false, ..cfg };
    assert!(auth.authenticate(&off, &HeaderMap::new()).expect("off").is_none());
}

#[test]
fn revocation_applies_once_the_cached_entry_expires() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = auth_config(&dir.path().join("keys.db"));
    cfg.cache_ttl = Duration::from_millis(50);
    let store = KeyStore::open(&cfg.keys_db).expect("open");
    let (_, secret) = store.create(&NewKey::named("alice")).expect("create");
    let auth = Auth::start(&cfg, &dir.path().join("ledger.db")).expect("start");
    assert!(auth.authenticate(&cfg, &bearer(&secret)).is_ok());
    store.revoke("alice").expect("revoke");
    // Bounded wait for the TTL (not a timing assertion: it passes as soon as it expires).
    for _ in 0..100 {
        if auth.authenticate(&cfg, &bearer(&secret)).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("a revoked key still works after its cache entry expired");
}

#[test]
fn racing_reservations_never_exceed_the_budget() {
    let budgets = Arc::new(Budgets::default());
    let l = limits(Some(10.0), None);
    // Now, since a dropped hold is released at the current time.
    let now = crate::report::now_ms();
    let holds: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..64)
            .map(|_| s.spawn(|| budgets.reserve("k", &l, 1.0, now).ok()))
            .collect();
        handles.into_iter().filter_map(|h| h.join().expect("thread")).collect()
    });
    assert_eq!(holds.len(), 10, "exactly ten reservations of $1 fit a $10 budget");
    let over = budgets.reserve("k", &l, 1.0, now).err().expect("over budget");
    assert_eq!((over.period, over.reserved_usd), ("daily", 10.0));
    assert!(over.to_string().contains("daily budget of $10.0000"), "{over}");
    // Settling to less frees the difference; a dropped hold (a failed call) frees it all.
    let mut holds = holds.into_iter();
    holds.next().expect("hold").settle(0.25);
    drop(holds.next());
    assert_eq!(budgets.spent("k", now), (0.25, 0.25));
    let _a = budgets.reserve("k", &l, 1.0, now).expect("freed by the settled hold");
    let _b = budgets.reserve("k", &l, 0.75, now).expect("freed by the dropped hold");
    assert!(budgets.reserve("k", &l, 0.01, now).is_err());
}

#[test]
fn spend_resets_with_the_utc_day_and_month() {
    let budgets = Arc::new(Budgets::default());
    let l = limits(Some(1.0), Some(1.5));
    // 2026-01-31T23:00:00Z, then an hour later (a new day and a new month).
    let jan31 = 1_769_900_400_000;
    budgets
        .reserve("k", &l, 0.9, jan31)
        .expect("fits")
        .settle_at(0.9, jan31);
    let over = budgets.reserve("k", &l, 0.2, jan31).err().expect("daily budget");
    assert_eq!(over.period, "daily");
    assert_eq!(over.resets_in_secs, 3600);
    let feb1 = jan31 + 3_600_000;
    budgets
        .reserve("k", &l, 0.9, feb1)
        .expect("a new day and month")
        .settle_at(0.9, feb1);
    assert_eq!(budgets.spent("k", feb1), (0.9, 0.9));
    let (day, month) = budget::test_period_starts(feb1);
    assert_eq!((day, month), (feb1, feb1));
}

#[test]
fn spend_is_rebuilt_from_the_ledger() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ledger.db");
    let conn = crate::ledger::open(&path).expect("ledger");
    let now = 1_769_900_400_000; // 2026-01-31T23:00:00Z
    for (ts, key, cost) in [
        (now - 1_000, "a", 0.5),
        (now - 86_400_000, "a", 2.0),        // yesterday, this month
        (now - 40 * 86_400_000, "a", 100.0), // last month
        (now - 1_000, "b", 0.25),
    ] {
        conn.execute(
            "INSERT INTO requests (ts_ms, request_id, api_key_id, prompt_tokens, completion_tokens, tokens_estimated,
             latency_ms, gateway_ms, cost_usd, baseline_cost_usd, outcome, http_status, streamed)
             VALUES (?1, 'r', ?2, 0, 0, 0, 0, 0, ?3, 0, 'ok', 200, 0)",
            rusqlite::params![ts, key, cost],
        )
        .expect("insert");
    }
    let budgets = Budgets::from_ledger(&path, now).expect("rebuild");
    assert_eq!(budgets.spent("a", now), (0.5, 2.5));
    assert_eq!(budgets.spent("b", now), (0.25, 0.25));
}

#[test]
fn rate_limits_count_requests_and_tokens_per_minute() {
    let rl = RateLimits::default();
    let l = KeyLimits {
        rpm: Some(2),
        tpm: Some(1000),
        ..KeyLimits::default()
    };
    rl.check_request("k", &l).expect("first");
    rl.check_request("k", &l).expect("second");
    match rl.check_request("k", &l) {
        Err(Error::RateLimited {
            retry_after_secs,
            message,
        }) => {
            assert!((1..=30).contains(&retry_after_secs), "{retry_after_secs}");
            assert!(message.contains("2 requests per minute"), "{message}");
        }
        other => panic!("expected a rate limit, got {other:?}"),
    }
    rl.check_request("other", &l).expect("keys are limited separately");
    rl.check_tokens("k", &l, 600).expect("fits");
    assert!(matches!(rl.check_tokens("k", &l, 600), Err(Error::RateLimited { .. })));
    match rl.check_tokens("k", &l, 5000) {
        Err(e @ Error::InvalidRequest { .. }) => assert!(e.to_string().contains("1000 tokens per minute")),
        other => panic!("a request larger than the whole limit is a 400, got {other:?}"),
    }
}

#[test]
fn rate_windows_count_down_and_say_when_the_limit_is_full_again() {
    let rl = RateLimits::default();
    let l = KeyLimits {
        rpm: Some(3),
        tpm: Some(10),
        ..KeyLimits::default()
    };
    let full = |limit| rate::Window {
        limit,
        remaining: limit,
        reset: Duration::ZERO,
    };
    assert_eq!(
        rl.windows("k", &l),
        (Some(full(3)), Some(full(10))),
        "nothing counted yet"
    );
    let requests = |rl: &RateLimits| rl.windows("k", &l).0.expect("an rpm limit");
    // One request frees up every 20 s; the estimate is late by at most one interval.
    let interval = Duration::from_secs(20);
    for left in [2, 1, 0] {
        rl.check_request("k", &l).expect("under the limit");
        let w = requests(&rl);
        assert_eq!(w.remaining, left);
        let used = 3 - left;
        assert!(w.reset > interval * (used - 1) && w.reset <= interval * used, "{w:?}");
    }
    assert!(rl.check_request("k", &l).is_err());
    let w = requests(&rl);
    assert_eq!(w.remaining, 0, "a refusal counts nothing");
    assert!(w.reset > interval * 2 && w.reset <= interval * 3, "{w:?}");

    rl.check_tokens("k", &l, 4).expect("fits");
    assert_eq!(rl.windows("k", &l).1.map(|w| w.remaining), Some(6));
    assert!(rl.check_tokens("k", &l, 7).is_err());
    assert_eq!(
        rl.windows("k", &l).1.map(|w| w.remaining),
        Some(6),
        "a refusal counts nothing"
    );

    let none = KeyLimits::default();
    assert_eq!(rl.windows("k", &none), (None, None), "no limits, no windows");
    let changed = KeyLimits { rpm: Some(5), ..l };
    assert_eq!(rl.windows("k", &changed).0, Some(full(5)), "new limits start full");
}

#[test]
fn rate_headers_use_openai_names_and_duration_forms() {
    let w = |remaining, ms| rate::Window {
        limit: 100,
        remaining,
        reset: Duration::from_millis(ms),
    };
    let mut h = HeaderMap::new();
    rate::put_headers(&mut h, (Some(w(99, 350)), None));
    let get = |h: &HeaderMap, n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert_eq!(get(&h, "x-ratelimit-limit-requests").as_deref(), Some("100"));
    assert_eq!(get(&h, "x-ratelimit-remaining-requests").as_deref(), Some("99"));
    assert_eq!(get(&h, "x-ratelimit-reset-requests").as_deref(), Some("350ms"));
    assert_eq!(
        get(&h, "x-ratelimit-limit-tokens"),
        None,
        "no tpm limit, no token headers"
    );
    for (ms, text) in [
        (0, "0s"),
        (1, "1ms"),
        (1000, "1s"),
        (1001, "2s"),
        (59_000, "59s"),
        (59_500, "1m0s"),
        (60_000, "1m0s"),
        (61_200, "1m2s"),
    ] {
        rate::put_headers(&mut h, (None, Some(w(0, ms))));
        assert_eq!(get(&h, "x-ratelimit-reset-tokens").as_deref(), Some(text), "{ms} ms");
    }
}
