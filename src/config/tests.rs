use std::path::Path;

use super::Config;

fn example() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiergate.toml")).expect("example")
}

fn parse(text: &str) -> Result<Config, String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiergate.toml");
    Config::parse(text, &path).map_err(|e| e.0)
}

#[test]
fn the_example_config_is_valid() {
    let c = parse(&example()).expect("valid");
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.policy.name, "balanced");
    assert_eq!(c.aliases, ["tiergate-auto"]);
    assert_eq!(c.tiers.len(), 2);
    assert!(c.ledger.path.ends_with("examples/tiergate-ledger.db"));
    assert!((c.baseline.cost(1_000_000, 1_000_000) - 12.5).abs() < 1e-9);
    let cc = c.classifier.expect("the example uses the learned router");
    assert!(cc.head.ends_with("router-model/head.onnx") && cc.spec.ends_with("router-model/head.json"));
}

#[test]
fn errors_name_the_file_and_key() {
    let cases = [
        (example().replace("listen = ", "listn = "), "unknown field `listn`"),
        (
            example().replace(
                "backend = \"openai\"\nbase_url = \"http://127",
                "backend = \"grpc\"\nbase_url = \"http://127",
            ),
            "tiers.small.backend = `grpc`",
        ),
        (
            example().replace(
                "output_usd_per_mtok = 10.00\ntimeout",
                "output_usd_per_mtok = -1\ntimeout",
            ),
            "tiers.cloud.output_usd_per_mtok must be a number >= 0",
        ),
        (
            example().replace("timeout_secs = 120", "timeout_secs = 0"),
            "tiers.small.timeout_secs must be > 0",
        ),
        (
            example().replace("aliases = [\"tiergate-auto\"]", "aliases = [\"gpt-4o\"]"),
            "routing.aliases: `gpt-4o` is also tiers.cloud.model",
        ),
        (
            example().replace("balanced.toml", "missing.toml"),
            "routing.policy: policy",
        ),
        (
            example().replace("queue_capacity = 10000", "queue_capacity = \"many\""),
            "invalid type",
        ),
    ];
    for (text, want) in cases {
        let e = parse(&text).expect_err(want);
        assert!(e.contains(want) && e.contains("tiergate.toml"), "{e}\n  wanted: {want}");
    }
}

#[test]
fn telemetry_is_off_unless_an_otlp_endpoint_is_set() {
    assert_eq!(parse(&example()).expect("valid").telemetry.otlp_endpoint, None);
    let on = example().replace(
        "# otlp_endpoint = \"http://127.0.0.1:4318\"",
        "otlp_endpoint = \"http://127.0.0.1:4318\"",
    );
    assert_eq!(
        parse(&on).expect("valid").telemetry.otlp_endpoint.as_deref(),
        Some("http://127.0.0.1:4318")
    );
    let e = parse(&on.replace("\"http://127.0.0.1:4318\"", "\"127.0.0.1:4318\"")).expect_err("not a URL");
    assert!(e.contains("telemetry.otlp_endpoint = `127.0.0.1:4318`"), "{e}");
    let e = parse(&on.replace("otlp_endpoint =", "otlp_endpiont =")).expect_err("typo");
    assert!(e.contains("unknown field `otlp_endpiont`"), "{e}");
}

const LOCAL_TIER: &str = "\n[tiers.local]\nbackend = \"local\"\nmodel = \"smollm2-135m-instruct\"\n";

#[test]
fn a_local_tier_gets_defaults_and_a_model_dir_under_the_cache() {
    let c = parse(&format!(
        "{}{LOCAL_TIER}max_concurrent = 2\nmodel_dir = \"models/x\"\n",
        example()
    ))
    .expect("valid");
    let super::BackendConfig::Local(s) = &c.tiers["local"].backend else {
        panic!("local backend");
    };
    assert_eq!(s.max_concurrent, 2);
    assert_eq!(s.queue_capacity, 16);
    assert!(s.threads >= 1 && !s.spinning);
    assert_eq!(s.draft_tokens, 0, "speculative decoding is opt-in");
    assert!(s.model_dir.ends_with("examples/models/x"), "{}", s.model_dir.display());
    let c = parse(&format!("{}{LOCAL_TIER}draft_tokens = 6\n", example())).expect("valid");
    let super::BackendConfig::Local(s) = &c.tiers["local"].backend else {
        panic!("local backend");
    };
    assert!(s.model_dir.ends_with("models/smollm2-135m-instruct"));
    assert_eq!(s.draft_tokens, 6);
}

#[test]
fn keys_of_the_other_backend_are_rejected_with_their_path() {
    for (extra, want) in [
        (
            "base_url = \"http://x\"\n",
            "tiers.local.base_url is only valid for backend `openai`",
        ),
        ("threads = 0\n", "tiers.local.threads must be > 0"),
        ("max_concurrent = 0\n", "tiers.local.max_concurrent must be > 0"),
        ("max_concurrency = 2\n", "unknown field `max_concurrency`"),
    ] {
        let e = parse(&format!("{}{LOCAL_TIER}{extra}", example())).expect_err(extra);
        assert!(e.contains(want), "{e}\n  wanted: {want}");
    }
    let e = parse(&example().replace("timeout_secs = 120", "timeout_secs = 120\nthreads = 2"))
        .expect_err("threads on an openai tier");
    assert!(
        e.contains("tiers.small.threads is only valid for backend `local`"),
        "{e}"
    );
    let e = parse(&example().replace("timeout_secs = 120", "timeout_secs = 120\ndraft_tokens = 4"))
        .expect_err("draft_tokens on an openai tier");
    assert!(
        e.contains("tiers.small.draft_tokens is only valid for backend `local`"),
        "{e}"
    );
}

#[test]
fn the_local_example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/local.toml");
    let c = Config::load(&path).expect("valid");
    let super::BackendConfig::Local(s) = &c.tiers["local"].backend else {
        panic!("local backend");
    };
    assert!(s.model_dir.ends_with("models/qwen2.5-coder-0.5b-instruct"));
    assert_eq!((s.max_concurrent, s.queue_capacity), (4, 16));
    let then = &c.policy.rules[0].then;
    assert_eq!(then.on_saturated.as_deref(), Some("cloud"));
    assert!(then.escalate.is_some());
}

#[test]
fn machine_priced_tiers_charge_their_share_of_the_machine() {
    let c = parse(&format!(
        "{}{LOCAL_TIER}max_concurrent = 4\nmachine_usd_per_hour = 0.36\n",
        example()
    ))
    .expect("valid");
    let p = c.tiers["local"].price;
    // 2 s on a $0.36/h machine shared by 4 sequences.
    assert!((p.cost_with_time(0, 0, 2.0) - 0.00005).abs() < 1e-12, "{p:?}");
    let c = parse(&example().replace("timeout_secs = 120", "timeout_secs = 120\nmachine_usd_per_hour = 3.6"))
        .expect("valid");
    assert!((c.tiers["small"].price.cost_with_time(1_000_000, 0, 1.0) - 0.001).abs() < 1e-12);
    let e = parse(&example().replace("timeout_secs = 120", "timeout_secs = 120\nmachine_usd_per_hour = -1"))
        .expect_err("negative");
    assert!(
        e.contains("tiers.small.machine_usd_per_hour must be a number >= 0"),
        "{e}"
    );
}
