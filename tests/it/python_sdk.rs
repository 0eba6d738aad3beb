//! The official OpenAI Python SDK, unchanged but for `base_url`, against the gateway:
//! runs `examples/openai_python.py` in the venv that `scripts/provision.py --test` makes.

use crate::common::{FAKE_USAGE, PIECES, gateway, repo};

#[tokio::test]
async fn openai_python_example_works_streaming_and_not() {
    let gw = gateway().await;
    let python = tiergate::cache::cache_dir().join("venv-test/bin/python");
    assert!(
        python.exists(),
        "`{}` is missing: run `python3 scripts/provision.py --test`",
        python.display()
    );
    let out = tokio::process::Command::new(&python)
        .arg(repo().join("examples/openai_python.py"))
        .env("TIERGATE_BASE_URL", format!("{}/v1", gw.url))
        .env("OPENAI_API_KEY", &gw.key)
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "example failed:\n{stdout}\n{stderr}");
    let answer = PIECES.concat();
    assert!(stdout.contains("tier: small rule: routine"), "{stdout}");
    assert!(stdout.contains(&format!("answer: {answer}")), "{stdout}");
    assert!(
        stdout.contains(&format!("usage: {} {}", FAKE_USAGE.0, FAKE_USAGE.1)),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("stream usage: {} {}", FAKE_USAGE.0, FAKE_USAGE.1)),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("streamed: {answer}")), "{stdout}");
    let rows = gw.ledger_rows(2).await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows.iter().filter(|r| r.streamed).count(), 1);
}
