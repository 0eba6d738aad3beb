use std::path::Path;

use std::time::Duration;

use super::{BackendConfig, Config};

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
    assert!(!cc.float_encoder, "the integer graph where the CPU computes it exactly");
    let float = parse(&example().replace("timeout_ms = 50", "timeout_ms = 50\nencoder = \"float\""));
    assert!(float.expect("valid").classifier.expect("classifier").float_encoder);
}

#[test]
fn errors_name_the_file_and_key() {
    let cases = [
        (example().replace("listen = ", "listn = "), "unknown field `listn`"),
        (
            example().replace("ttft_timeout_secs = 60", "ttft_timeout_secs = 600"),
            "tiers.cloud.ttft_timeout_secs is longer than tiers.cloud.timeout_secs",
        ),
        (
            example().replace("retry_backoff_secs = 0.25", "retry_backoff_secs = 10"),
            "tiers.cloud.retry_backoff_secs is longer than tiers.cloud.retry_backoff_max_secs (8 s)",
        ),
        (
            example().replace("api_key_env = \"OPENAI_API_KEY\"", "api_key_env = \" \""),
            "tiers.cloud.api_key_env must name an environment variable",
        ),
        (
            example().replace("model = \"qwen2.5:0.5b-instruct\"", "model = \"tiergate:balanced\""),
            "tiers.small.model = `tiergate:balanced`: names starting with `tiergate:` select policies",
        ),
        (
            example().replace("aliases = [\"tiergate-auto\"]", "aliases = [\"a\", \"a\"]"),
            "routing.aliases: `a` must be a non-empty name, listed once",
        ),
        (
            example()
                .replace("scorer = \"classifier\"", "scorer = \"length\"")
                .replace("max_batch = 8", "max_batch = 0"),
            "routing.classifier.max_batch must be",
        ),
        (
            example().replace("timeout_ms = 50", "timeout_ms = 50\nencoder = \"int8\""),
            "routing.classifier.encoder must be \"auto\" or \"float\", not \"int8\"",
        ),
        (
            example().replace("aliases = [\"tiergate-auto\"]", "aliases = [\"\"]"),
            "routing.aliases: `` must be a non-empty name",
        ),
        (
            example().replace("aliases = [\"tiergate-auto\"]", "aliases = [\"tiergate:x\"]"),
            "not starting with `tiergate:`",
        ),
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
            example().replace("timeout_secs = 120", "timeout_secs = 1e300"),
            "tiers.small.timeout_secs must be > 0",
        ),
        (
            example().replace("body_timeout_secs = 30", "body_timeout_secs = -1"),
            "limits.body_timeout_secs must be > 0 and at most 3600 seconds, got -1",
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
    assert_eq!(s.draft_tokens, None, "the model decides");
    assert!(s.draft_head, "a model's draft head is used unless turned off");
    assert!(s.model_dir.ends_with("examples/models/x"), "{}", s.model_dir.display());
    let c = parse(&format!(
        "{}{LOCAL_TIER}draft_tokens = 6\ndraft_head = false\n",
        example()
    ))
    .expect("valid");
    let super::BackendConfig::Local(s) = &c.tiers["local"].backend else {
        panic!("local backend");
    };
    assert!(s.model_dir.ends_with("models/smollm2-135m-instruct"));
    assert_eq!((s.draft_tokens, s.draft_head), (Some(6), false));
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
    let routine = c
        .policy
        .rules
        .iter()
        .find(|r| r.name == "routine")
        .expect("routine rule");
    assert_eq!(routine.tier, "local");
    let then = &routine.then;
    assert_eq!(then.on_saturated.as_deref(), Some("cloud"));
    assert!(then.escalate.is_some());
    // The local tier reads text only and refuses tool calling and JSON mode: both shipped
    // policies send those to the cloud, whatever the score.
    for body in [
        r#"{"model": "tiergate-auto", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}"#,
        r#"{"model": "tiergate-auto", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]}"#,
        r#"{"model": "tiergate-auto", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}"#,
    ] {
        let req = crate::openai::ChatRequest::parse(body.as_bytes()).expect("valid");
        let facts = crate::routing::facts(&req, "hi".into(), 0.0, 1, &Default::default());
        for p in c.policies.values() {
            assert_eq!(p.decide(&facts).tier, "cloud", "{}: {body}", p.name);
        }
    }
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

/// Every shipped policy passes `tiergate policy check` against the config it is meant for;
/// a new file in `policies/` must be added here.
#[test]
fn shipped_policies_check_against_their_configs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let meant_for = [
        ("balanced.toml", "examples/tiergate.toml"),
        ("cost-saver.toml", "examples/tiergate.toml"),
        ("quality-first.toml", "examples/tiergate.toml"),
        ("test.toml", "examples/tiergate.toml"),
        ("local-first.toml", "examples/local.toml"),
        ("private-first.toml", "examples/local.toml"),
    ];
    let mut files: Vec<String> = std::fs::read_dir(root.join("policies"))
        .expect("policies/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut listed: Vec<String> = meant_for.iter().map(|(f, _)| (*f).to_owned()).collect();
    listed.sort();
    assert_eq!(files, listed, "say which config each policy in policies/ is for");
    for (file, config) in meant_for {
        let c = Config::load(&root.join(config)).unwrap_or_else(|e| panic!("{e}"));
        crate::policy::Policy::load(&root.join("policies").join(file), &c.tiers).unwrap_or_else(|e| panic!("{e}"));
    }
    // The example configs load their selectable policies.
    let c = Config::load(&root.join("examples/tiergate.toml")).expect("valid");
    assert_eq!(
        c.policies.keys().map(String::as_str).collect::<Vec<_>>(),
        ["balanced", "cost-saver", "quality-first"]
    );
    let c = Config::load(&root.join("examples/local.toml")).expect("valid");
    assert_eq!(
        c.policies.keys().map(String::as_str).collect::<Vec<_>>(),
        ["local-first", "private-first"]
    );
}

#[test]
fn routing_policies_stickiness_and_reload_are_validated() {
    let c = parse(&example()).expect("valid");
    assert!(c.stickiness.enabled);
    assert_eq!(c.stickiness.ttl.as_secs(), 3600);
    assert_eq!(c.reload_poll.map(|d| d.as_secs()), Some(1));
    let twice = example().replace(
        "policies = [\"../policies/cost-saver.toml\"",
        "policies = [\"../policies/cost-saver.toml\", \"../policies/cost-saver.toml\"",
    );
    let e = parse(&twice).expect_err("same name twice");
    assert!(
        e.contains("routing.policies[1]:") && e.contains("are both named `cost-saver`"),
        "{e}"
    );
    let e = parse(&example().replace("quality-first.toml", "nope.toml")).expect_err("missing file");
    assert!(
        e.contains("routing.policies[1]: policy") && e.contains("nope.toml`: cannot read"),
        "{e}"
    );
    let e = parse(&example().replace("ttl_secs = 3600", "ttl_secs = 0")).expect_err("ttl");
    assert!(e.contains("routing.stickiness.ttl_secs must be > 0"), "{e}");
    let e = parse(&example().replace("poll_secs = 1", "poll_secs = -1")).expect_err("poll");
    assert!(e.contains("reload.poll_secs must be in [0.1, 3600] seconds"), "{e}");
    let e = parse(&example().replace("poll_secs = 1", "poll_secs = 0.001")).expect_err("poll");
    assert!(e.contains("reload.poll_secs must be in [0.1, 3600] seconds"), "{e}");
    let e = parse(&example().replace("poll_secs = 1", "poll_secs = 1e12")).expect_err("poll");
    assert!(
        e.contains("in [0.1, 3600] seconds, or 0 to reload only on SIGHUP; got 1000000000000"),
        "{e}"
    );
    let c = parse(&example().replace("poll_secs = 1", "poll_secs = 0")).expect("sighup only");
    assert_eq!(c.reload_poll, None);
}

#[test]
fn policies_dir_loads_every_policy_file_in_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = "[[rules]]\nname = \"all\"\ntier = \"small\"\n";
    for (file, name) in [("a.toml", "alpha"), ("b.toml", "beta"), ("notes.txt", "ignored")] {
        std::fs::write(dir.path().join(file), format!("name = \"{name}\"\n{rules}")).expect("write");
    }
    let with_dir = |d: &Path| {
        example().replace(
            "policies = [",
            &format!("policies_dir = \"{}\"\npolicies = [", d.display()),
        )
    };
    let c = parse(&with_dir(dir.path())).expect("valid");
    assert_eq!(
        c.policies.keys().map(String::as_str).collect::<Vec<_>>(),
        ["alpha", "balanced", "beta", "cost-saver", "quality-first"]
    );
    // The shipped directory holds the default and listed policies too (skipped), and
    // policies for other tiers (an error that names the file).
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let e = parse(&with_dir(&shipped)).expect_err("local-first needs a `local` tier");
    assert!(
        e.contains("routing.policies_dir: policy") && e.contains("local-first.toml`: rules[3].tier"),
        "{e}"
    );
    std::fs::write(dir.path().join("c.toml"), format!("name = \"alpha\"\n{rules}")).expect("write");
    let e = parse(&with_dir(dir.path())).expect_err("two alphas");
    assert!(e.contains("are both named `alpha`"), "{e}");
}

#[test]
fn fault_settings_are_read_defaulted_and_checked() {
    let c = parse(&example()).expect("valid");
    assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    let BackendConfig::OpenAi {
        timeouts,
        retry,
        breaker,
        ..
    } = &c.tiers["cloud"].backend
    else {
        panic!("cloud is an openai tier");
    };
    assert_eq!(
        (timeouts.connect, timeouts.first_token, timeouts.total),
        (
            Duration::from_secs(5),
            Duration::from_secs(60),
            Duration::from_secs(300)
        )
    );
    assert_eq!((retry.max_retries, retry.backoff), (2, Duration::from_millis(250)));
    assert_eq!((breaker.consecutive_failures, breaker.min_calls), (5, 10));
    // `small` sets no first-token limit: the total applies.
    let BackendConfig::OpenAi { timeouts, .. } = &c.tiers["small"].backend else {
        panic!("small is an openai tier");
    };
    assert_eq!(timeouts.first_token, timeouts.total);

    for (from, to, want) in [
        (
            "ttft_timeout_secs = 60",
            "ttft_timeout_secs = 0",
            "tiers.cloud.ttft_timeout_secs must be > 0",
        ),
        (
            "breaker_failure_rate = 0.5",
            "breaker_failure_rate = 1.5",
            "tiers.cloud.breaker_failure_rate must be in (0, 1]",
        ),
        (
            "breaker_failures = 5",
            "breaker_failures = 0",
            "tiers.cloud.breaker_failures must be > 0",
        ),
        (
            "retry_backoff_secs = 0.25",
            "retry_backoff_secs = -1",
            "tiers.cloud.retry_backoff_secs must be > 0",
        ),
        (
            "shutdown_grace_secs = 30",
            "shutdown_grace_secs = 0",
            "shutdown_grace_secs must be > 0",
        ),
    ] {
        let e = parse(&example().replace(from, to)).expect_err(to);
        assert!(e.contains(want), "{e}\n  wanted: {want}");
    }
}

#[test]
fn auth_and_limits_default_to_on_and_bounded_and_name_bad_keys() {
    let text = example();
    let c = parse(&text).expect("valid");
    assert!(c.auth.enabled && c.auth.protect_reports && !c.auth.protect_metrics);
    assert!(c.auth.keys_db.ends_with("examples/tiergate-keys.db"));
    assert_eq!(c.limits, super::Limits::default());
    // Without the sections at all: the same defaults, auth on.
    let start = text.find("[limits]").expect("limits");
    let end = text.find("[telemetry]").expect("telemetry");
    let bare = parse(&format!("{}{}", &text[..start], &text[end..])).expect("valid");
    assert!(bare.auth.enabled);
    assert_eq!(bare.limits, super::Limits::default());
    for (from, to, says) in [
        (
            "max_messages = 1000",
            "max_messages = 0",
            "limits.max_messages must be > 0",
        ),
        (
            "keys_db = \"tiergate-keys.db\"",
            "keys_db = \"tiergate-keys.db\"\ndefault_rpm = 0",
            "auth.default_rpm must be > 0",
        ),
        (
            "keys_db = \"tiergate-keys.db\"",
            "keys_db = \"tiergate-keys.db\"\ndefault_daily_usd = -1",
            "auth.default_daily_usd must be a number >= 0",
        ),
        (
            "keys_db = \"tiergate-keys.db\"",
            "keys_db = \"tiergate-keys.db\"\nmaster_key = \"x\"",
            "unknown field `master_key`",
        ),
    ] {
        let e = parse(&text.replace(from, to)).expect_err(to);
        assert!(e.contains(says), "{to}: {e}");
    }
}

#[test]
fn ledger_and_key_store_must_be_files_that_outlive_the_process() {
    for (key, line) in [
        ("ledger.path", "path = \"tiergate-ledger.db\""),
        ("auth.keys_db", "keys_db = \"tiergate-keys.db\""),
    ] {
        let field = line.split(' ').next().expect("field");
        for bad in ["", " ", ":memory:", "file:x.db?mode=memory"] {
            let e = parse(&example().replace(line, &format!("{field} = \"{bad}\""))).expect_err(bad);
            assert!(
                e.contains(&format!("{key} = `{bad}` must be the path of a file")),
                "{e}"
            );
        }
        // The examples directory itself.
        let e = parse(&example().replace(line, &format!("{field} = \".\""))).expect_err("a directory");
        assert!(
            e.contains(&format!("{key} = `.` is a directory; name a file in it")),
            "{e}"
        );
    }
}

#[test]
fn tier_names_baseline_model_and_connect_timeout_are_checked() {
    for bad in ["\"\"", "\"sm all\"", "\"tiergate:x\""] {
        let e = parse(&example().replace("[tiers.small]", &format!("[tiers.{bad}]"))).expect_err(bad);
        assert!(e.contains("must be ASCII letters, digits, `_` or `-`"), "{bad}: {e}");
    }
    let e = parse(&example().replace("model = \"gpt-4o\"\ninput", "model = \" \"\ninput")).expect_err("empty");
    assert!(e.contains("baseline.model must name the cloud model"), "{e}");
    let e = parse(&example().replace("connect_timeout_secs = 2", "connect_timeout_secs = 200"))
        .expect_err("connect past total");
    assert!(
        e.contains("tiers.small.connect_timeout_secs is longer than tiers.small.timeout_secs"),
        "{e}"
    );
    // The default connect limit (5 s) shrinks to a shorter total rather than failing.
    let c = parse(
        &example()
            .replace("connect_timeout_secs = 2\n", "")
            .replace("timeout_secs = 120", "timeout_secs = 3"),
    )
    .expect("valid");
    let crate::config::BackendConfig::OpenAi { timeouts, .. } = &c.tiers["small"].backend else {
        panic!("openai tier");
    };
    assert_eq!(timeouts.connect.as_secs_f64(), 3.0);
}
