use super::{Attempt, Ledger, Record, read_all};

fn rec(i: usize) -> Record {
    let attempts = if i % 10 == 3 {
        vec![
            Attempt {
                tier: "small".into(),
                outcome: "low_confidence".into(),
                confidence: Some(0.2),
                ..Attempt::default()
            },
            Attempt {
                tier: "cloud".into(),
                outcome: "ok".into(),
                cost_usd: 0.5,
                ..Attempt::default()
            },
        ]
    } else {
        Vec::new()
    };
    Record {
        request_id: format!("r{i}"),
        outcome: "ok".into(),
        http_status: 200,
        prompt_tokens: i as u64,
        escalated: !attempts.is_empty(),
        attempts,
        ..Record::default()
    }
}

#[tokio::test]
async fn rows_are_written_in_order_and_survive_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("l.db");
    let ledger = Ledger::start(&path, 1000, 7).expect("start");
    for i in 0..50 {
        ledger.record(rec(i));
    }
    ledger.clone().shutdown().await;
    let rows = read_all(&path).expect("read");
    assert_eq!(rows.len(), 50);
    assert_eq!(rows[49], rec(49));
    assert_eq!(rows[13], rec(13), "attempts round-trip");
    assert_eq!(rows[13].attempts.len(), 2);
    assert_eq!(ledger.written(), 50);
    assert_eq!(ledger.dropped(), 0);
    let conn = rusqlite::Connection::open(&path).expect("open");
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).expect("pragma");
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_instead_of_blocking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::start(&dir.path().join("l.db"), 1, 1).expect("start");
    // Far more rows than a one-slot queue can take while the writer is busy.
    for i in 0..5000 {
        ledger.record(rec(i));
    }
    ledger.flush().await;
    assert!(ledger.dropped() > 0);
    assert_eq!(ledger.dropped() + ledger.written(), 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_durable_record_is_committed_when_it_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("l.db");
    let ledger = Ledger::start(&path, 1000, 256).expect("start");
    // No flush, no shutdown: another connection sees the row as soon as the call returns,
    // which is what lets a response go out only once its row would survive a kill.
    ledger.record_durable(rec(0)).await;
    assert_eq!(read_all(&path).expect("read").len(), 1);

    let tasks: Vec<_> = (1..=64)
        .map(|i| {
            let l = ledger.clone();
            tokio::spawn(async move { l.record_durable(rec(i)).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(read_all(&path).expect("read").len(), 65);
    assert_eq!((ledger.written(), ledger.dropped()), (65, 0));
}
