use std::collections::BTreeMap;
use std::path::Path;

use super::{Facts, Policy};
use crate::config::{BackendConfig, Price, TierConfig};
use crate::local::LocalSettings;

/// `small` and `cloud` behind HTTP (cloud priced like gpt-4o), `local` in-process.
pub(crate) fn tiers() -> BTreeMap<String, TierConfig> {
    ["small", "cloud", "local"]
        .into_iter()
        .map(|n| {
            let backend = if n == "local" {
                BackendConfig::Local(LocalSettings {
                    model_dir: "/nonexistent".into(),
                    threads: 1,
                    spinning: false,
                    max_concurrent: 4,
                    queue_capacity: 4,
                    max_context_tokens: None,
                    default_max_tokens: None,
                    draft_tokens: Some(0),
                    draft_head: false,
                })
            } else {
                BackendConfig::OpenAi {
                    base_url: "http://x".into(),
                    api_key_env: None,
                    timeouts: crate::upstream::resilience::Timeouts {
                        connect: std::time::Duration::from_secs(1),
                        first_token: std::time::Duration::from_secs(1),
                        total: std::time::Duration::from_secs(1),
                    },
                    retry: Default::default(),
                    breaker: Default::default(),
                }
            };
            let price = match n {
                "cloud" => Price::per_mtok(2.5, 10.0),
                "small" => Price::per_mtok(0.1, 0.2),
                _ => Price::per_mtok(0.0, 0.0),
            };
            let t = TierConfig {
                name: n.to_owned(),
                model: format!("m-{n}"),
                price,
                backend,
            };
            (n.to_owned(), t)
        })
        .collect()
}

fn facts(score: f64, prompt_tokens: u64) -> Facts {
    Facts {
        score,
        prompt_tokens,
        ..Facts::default()
    }
}

fn parse(text: &str) -> Result<Policy, String> {
    Policy::parse(text, Path::new("p.toml"), &tiers())
}

const TWO_RULES: &str = r#"
[[rules]]
name = "easy"
score_below = 0.5
tier = "small"
[[rules]]
name = "rest"
tier = "cloud"
"#;

#[test]
fn threshold_boundaries_decide_by_the_first_matching_rule() {
    let p = parse(TWO_RULES).expect("valid");
    assert_eq!(p.name, "p");
    for (score, want) in [(0.0, "easy"), (0.4999, "easy"), (0.5, "rest"), (1.0, "rest")] {
        assert_eq!(p.decide(&facts(score, 10)).name, want, "score {score}");
    }
}

#[test]
fn token_bounds_are_inclusive() {
    let p = parse(
        "[[rules]]\nname = \"mid\"\nmin_prompt_tokens = 10\nmax_prompt_tokens = 20\ntier = \"small\"\n[[rules]]\nname = \"rest\"\ntier = \"cloud\"\n",
    )
    .expect("valid");
    for (t, want) in [(9, "rest"), (10, "mid"), (20, "mid"), (21, "rest")] {
        assert_eq!(p.decide(&facts(0.3, t)).name, want, "tokens {t}");
    }
}

#[test]
fn errors_name_the_key_path_and_line() {
    let cases = [
        (
            TWO_RULES.replace("tier = \"small\"", "tier = \"gpu\""),
            "rules[0].tier (line 5)",
        ),
        (
            TWO_RULES.replace("0.5", "1.5"),
            "rules[0].score_below (line 4) = 1.5 must be in 0..=1",
        ),
        (
            TWO_RULES.replace("score_below = 0.5\n", ""),
            "rules[1].name (line 6): rule `rest` is unreachable",
        ),
        (
            TWO_RULES.replace("name = \"rest\"\ntier", "name = \"rest\"\nscore_below = 0.9\ntier"),
            "the last rule must have no conditions",
        ),
        (
            TWO_RULES.replace("score_below", "score_under"),
            "unknown field `score_under`",
        ),
        ("rules = []".to_owned(), "`rules` is empty"),
    ];
    for (text, want) in cases {
        let e = parse(&text).expect_err(&text);
        assert!(e.contains(want) && e.contains("p.toml"), "{e}\n  wanted: {want}");
    }
}

#[test]
fn shipped_policies_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for entry in std::fs::read_dir(dir).expect("policies/") {
        let path = entry.expect("entry").path();
        Policy::load(&path, &tiers()).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn spill_and_escalation_are_validated_and_carried_by_the_rule() {
    let with = |extra: &str| TWO_RULES.replace("tier = \"small\"", &format!("tier = \"local\"\n{extra}"));
    let p = parse(&with(
        "on_saturated = \"cloud\"\nmin_confidence = 0.4\nescalate_to = \"cloud\"",
    ))
    .expect("valid");
    let then = &p.rules[0].then;
    assert_eq!(then.on_saturated.as_deref(), Some("cloud"));
    let esc = then.escalate.as_ref().expect("escalation");
    assert_eq!((esc.min_confidence, esc.tier.as_str()), (0.4, "cloud"));
    assert_eq!(esc.hold_tokens, super::DEFAULT_HOLD_TOKENS);
    // Not conditions: the rule still matches by score alone.
    assert_eq!(p.decide(&facts(0.1, 5)).name, "easy");

    for (extra, want) in [
        (
            "on_saturated = \"gpu\"",
            "rules[0].on_saturated (line 6) = `gpu` is not a configured tier",
        ),
        ("on_saturated = \"local\"", "is the rule's own tier"),
        ("min_confidence = 0.4", "`min_confidence` needs `escalate_to`"),
        ("escalate_to = \"cloud\"", "`escalate_to` needs `min_confidence`"),
        (
            "min_confidence = 2.0\nescalate_to = \"cloud\"",
            "rules[0].min_confidence (line 6) = 2 must be in 0..=1",
        ),
        (
            "min_confidence = 0.4\nescalate_to = \"cloud\"\nhold_tokens = 257",
            "rules[0].hold_tokens (line 8) = 257 must be in 0..=256 (0: streams are not escalated)",
        ),
        (
            "min_confidence = 0.4\nescalate_to = \"cloud\"\nhold_tokens = -1",
            "rules[0].hold_tokens (line 8) = -1 must be in 0..=256",
        ),
        (
            "hold_tokens = 8",
            "rules[0].hold_tokens (line 6): `hold_tokens` needs `min_confidence` and `escalate_to`",
        ),
        ("hold_tokens = \"8\"", "hold_tokens"),
    ] {
        let e = parse(&with(extra)).expect_err(extra);
        assert!(e.contains(want), "{e}\n  wanted: {want}");
    }
}

#[test]
fn local_only_actions_need_a_local_tier_the_rule_can_reach() {
    let with =
        |tier: &str, extra: &str| parse(&TWO_RULES.replace("tier = \"small\"", &format!("tier = \"{tier}\"\n{extra}")));
    for (extra, key) in [
        ("max_local_output_tokens = 64", "max_local_output_tokens"),
        ("on_saturated = \"cloud\"", "on_saturated"),
        ("min_confidence = 0.4\nescalate_to = \"cloud\"", "min_confidence"),
        (
            "fallback = [\"cloud\"]\nmax_local_output_tokens = 64",
            "max_local_output_tokens",
        ),
    ] {
        let e = with("small", extra).expect_err(extra);
        assert!(
            e.contains(&format!("rules[0].{key} (line")) && e.contains("does nothing here"),
            "{extra}: {e}"
        );
    }
    // Reachable through the fallback, the spill or the over-cost tier: the option acts.
    for extra in [
        "fallback = [\"local\"]\non_saturated = \"cloud\"",
        "fallback = [\"local\"]\nmin_confidence = 0.4\nescalate_to = \"cloud\"",
        "max_cost_usd = 0.01\nover_cost_tier = \"local\"\nmax_local_output_tokens = 64",
    ] {
        with("small", extra).unwrap_or_else(|e| panic!("{extra}: {e}"));
    }
}

#[test]
fn hold_tokens_sets_how_much_of_a_stream_is_judged_and_zero_turns_stream_escalation_off() {
    let with = |n: &str| {
        TWO_RULES.replace(
            "tier = \"small\"",
            &format!("tier = \"local\"\nmin_confidence = 0.4\nescalate_to = \"cloud\"\nhold_tokens = {n}"),
        )
    };
    for (n, want) in [("0", 0), ("1", 1), ("32", 32), ("256", 256)] {
        let p = parse(&with(n)).unwrap_or_else(|e| panic!("{n}: {e}"));
        let esc = p.rules[0].then.escalate.as_ref().expect("escalation");
        assert_eq!(esc.hold_tokens, want);
    }
}

/// One rule per condition, each followed by a catch-all, so each row tests one condition.
fn one_rule(cond: &str) -> Policy {
    parse(&format!(
        "[[rules]]\nname = \"r\"\ntier = \"local\"\n{cond}\n[[rules]]\nname = \"rest\"\ntier = \"cloud\"\n"
    ))
    .unwrap_or_else(|e| panic!("{cond}: {e}"))
}

#[test]
fn each_condition_matches_at_its_boundaries() {
    let base = || facts(0.5, 100);
    type Edit = fn(&mut Facts);
    let cases: &[(&str, Edit, bool)] = &[
        ("score_below = 0.5", |_| {}, false),
        ("score_below = 0.5", |f| f.score = 0.4999, true),
        ("score_at_least = 0.5", |_| {}, true),
        ("score_at_least = 0.5", |f| f.score = 0.4999, false),
        ("score_at_least = 0.0", |f| f.score = 0.0, true),
        ("score_below = 1.0", |f| f.score = 1.0, false),
        ("max_prompt_tokens = 100", |_| {}, true),
        ("max_prompt_tokens = 100", |f| f.prompt_tokens = 101, false),
        ("min_prompt_tokens = 100", |_| {}, true),
        ("min_prompt_tokens = 100", |f| f.prompt_tokens = 99, false),
        (
            "models = [\"tiergate-auto\"]",
            |f| f.model = "tiergate-auto".into(),
            true,
        ),
        ("models = [\"tiergate-auto\"]", |f| f.model = "tiergate:x".into(), false),
        ("min_turns = 2", |f| f.turns = 2, true),
        ("min_turns = 2", |f| f.turns = 1, false),
        ("max_turns = 1", |f| f.turns = 1, true),
        ("max_turns = 1", |f| f.turns = 2, false),
        ("tools = true", |f| f.tools = true, true),
        ("tools = true", |_| {}, false),
        ("tools = false", |_| {}, true),
        ("json_mode = true", |f| f.json_mode = true, true),
        ("json_mode = true", |_| {}, false),
        ("images = true", |f| f.images = true, true),
        ("images = false", |f| f.images = true, false),
        ("regex = '(?i)\\bprove\\b'", |f| f.text = "Please PROVE it".into(), true),
        ("regex = '(?i)\\bprove\\b'", |f| f.text = "improve it".into(), false),
        (
            "keywords = [\"Invoice\", \"refund\"]",
            |f| f.text = "my INVOICE is wrong".into(),
            true,
        ),
        ("keywords = [\"invoice\"]", |f| f.text = "hello".into(), false),
        ("api_keys = [\"key-abc\"]", |f| f.key = Some("key-abc".into()), true),
        ("api_keys = [\"key-abc\"]", |_| {}, false),
        ("teams = [\"research\"]", |f| f.team = Some("research".into()), true),
        ("teams = [\"research\"]", |f| f.team = Some("sales".into()), false),
        (
            "headers = { \"X-Priority\" = \"high\" }",
            |f| {
                f.headers.insert("x-priority".into(), "high".into());
            },
            true,
        ),
        (
            "headers = { \"x-priority\" = \"high\" }",
            |f| {
                f.headers.insert("x-priority".into(), "low".into());
            },
            false,
        ),
        (
            "headers = { \"x-priority\" = \"*\" }",
            |f| {
                f.headers.insert("x-priority".into(), "low".into());
            },
            true,
        ),
        ("headers = { \"x-priority\" = \"*\" }", |_| {}, false),
        ("local_load_below = 0.75", |_| {}, true),
        (
            "local_load_below = 0.75",
            |f| {
                f.local_load.insert("local".into(), 0.75);
            },
            false,
        ),
        (
            "local_load_below = 0.75",
            |f| {
                f.local_load.insert("local".into(), 0.5);
            },
            true,
        ),
    ];
    for (cond, edit, want) in cases {
        let p = one_rule(cond);
        let mut f = base();
        edit(&mut f);
        let got = p.decide(&f).name == "r";
        assert_eq!(got, *want, "{cond} with {f:?}");
        // The trace says why, either way.
        let why = p.rules[0].check(&f);
        assert_eq!(why.is_ok(), *want, "{cond}: {why:?}");
    }
}

#[test]
fn trace_reasons_name_the_condition() {
    let p = one_rule("score_below = 0.5\nkeywords = [\"refund\"]");
    let mut f = facts(0.2, 10);
    f.text = "I want a refund".into();
    assert_eq!(
        p.rules[0].check(&f),
        Ok("score 0.2000 < 0.5, keyword `refund` found".to_owned())
    );
    f.score = 0.5;
    assert_eq!(p.rules[0].check(&f), Err("score 0.5000 >= 0.5".to_owned()));
    assert_eq!(p.rules[1].check(&f), Ok("no conditions".to_owned()));
    let p = one_rule("headers = { \"x-team\" = \"a\" }");
    assert_eq!(p.rules[0].check(&f), Err("header `x-team` absent".to_owned()));
}

#[test]
fn policy_level_switches_default_to_safe_values() {
    let p = parse(TWO_RULES).expect("valid");
    assert!(!p.allow_tier_override && p.stickiness);
    let p = parse(&format!("allow_tier_override = true\nstickiness = false\n{TWO_RULES}")).expect("valid");
    assert!(p.allow_tier_override && !p.stickiness);
}

#[test]
fn new_keys_are_validated_with_file_key_and_line() {
    let cases = [
        ("regex = 'a(b'", "rules[0].regex (line 4) = `a(b` is not a valid regex"),
        ("\n\nregex = '['", "rules[0].regex (line 6)"),
        ("regex = ''", "rules[0].regex (line 4) = `` matches every request"),
        ("regex = '(?i)(prove)?'", "matches every request"),
        (
            "keywords = []",
            "rules[0].keywords (line 4): the list must not be empty",
        ),
        ("models = [\"\"]", "rules[0].models (line 4)"),
        ("min_turns = 3\nmax_turns = 2", "min_turns 3 > max_turns 2"),
        ("max_turns = 0", "rules[0].max_turns (line 4) = 0 never matches"),
        ("score_below = 0.0", "rules[0].score_below (line 4) = 0 never matches"),
        (
            "headers = { \"bad header\" = \"x\" }",
            "`bad header` is not a valid HTTP header name",
        ),
        ("headers = { \"x-a\" = \"\" }", "rules[0].headers (line 4).x-a"),
        (
            "local_load_below = 0",
            "rules[0].local_load_below (line 4) = 0 must be in (0, 2]",
        ),
        ("local_load_below = 2.5", "must be in (0, 2]"),
        (
            "max_local_output_tokens = 0",
            "rules[0].max_local_output_tokens (line 4) must be > 0",
        ),
        (
            "max_cost_usd = -1.0",
            "rules[0].max_cost_usd (line 4) = -1 must be a number > 0",
        ),
        ("over_cost_tier = \"small\"", "`over_cost_tier` needs `max_cost_usd`"),
        (
            "max_cost_usd = 0.01\nover_cost_tier = \"gpu\"",
            "over_cost_tier (line 5) = `gpu` is not a configured tier",
        ),
        ("tools = \"yes\"", "invalid type: string \"yes\", expected a boolean"),
        ("tool = true", "unknown field `tool`"),
    ];
    for (cond, want) in cases {
        let text = format!(
            "[[rules]]\nname = \"r\"\ntier = \"local\"\n{cond}\n[[rules]]\nname = \"rest\"\ntier = \"cloud\"\n"
        );
        let e = parse(&text).expect_err(cond);
        assert!(
            e.contains(want) && e.contains("p.toml"),
            "{cond}\n  got:    {e}\n  wanted: {want}"
        );
    }
    let e = Policy::parse(
        "[[rules]]\nname = \"r\"\ntier = \"small\"\nlocal_load_below = 0.5\n[[rules]]\nname = \"rest\"\ntier = \"cloud\"\n",
        Path::new("p.toml"),
        &tiers(),
    )
    .expect_err("small is not local");
    assert!(e.contains("tier `small` is not a `local` tier"), "{e}");
}

#[test]
fn a_rule_shadowed_by_an_earlier_looser_rule_is_unreachable() {
    let text = "[[rules]]\nname = \"a\"\ntier = \"small\"\nkeywords = [\"x\"]\n[[rules]]\nname = \"b\"\ntier = \"local\"\nkeywords = [\"X\"]\n[[rules]]\nname = \"rest\"\ntier = \"cloud\"\n";
    let e = parse(text).expect_err("shadowed");
    assert!(
        e.contains(
            "rules[1].name (line 6): rule `b` is unreachable because rule `a` before it matches every request it would"
        ),
        "{e}"
    );
    let two = |a: &str, b: &str| {
        parse(&format!(
            "[[rules]]\nname = \"a\"\ntier = \"small\"\n{a}\n[[rules]]\nname = \"b\"\ntier = \"local\"\n{b}\n[[rules]]\nname = \"rest\"\ntier = \"cloud\"\n"
        ))
    };
    for (a, b, shadowed) in [
        ("score_below = 0.5", "score_below = 0.3", true),
        ("score_below = 0.3", "score_below = 0.5", false),
        ("score_below = 0.5", "score_below = 0.5\nkeywords = [\"refund\"]", true),
        ("score_below = 0.5\nkeywords = [\"refund\"]", "score_below = 0.5", false),
        ("keywords = [\"refund\"]", "keywords = [\"invoice\"]", false),
        ("min_turns = 2", "min_turns = 3\nmax_turns = 5", true),
        (
            "max_prompt_tokens = 100",
            "min_prompt_tokens = 10\nmax_prompt_tokens = 100",
            true,
        ),
        ("models = [\"x\", \"y\"]", "models = [\"y\"]", true),
        ("models = [\"y\"]", "models = [\"x\", \"y\"]", false),
        ("tools = true", "tools = false", false),
        (
            "headers = { \"x-a\" = \"1\" }",
            "headers = { \"x-a\" = \"1\", \"x-b\" = \"2\" }",
            true,
        ),
        ("regex = 'a'", "regex = 'b'", false),
    ] {
        let got = two(a, b);
        assert_eq!(
            got.as_ref()
                .is_err_and(|e| e.contains("rule `b` is unreachable because rule `a`")),
            shadowed,
            "{a} / {b}: {got:?}"
        );
    }
}

#[test]
fn bad_policy_names_are_rejected() {
    let e = parse(&format!("name = \"has space\"\n{TWO_RULES}")).expect_err("name");
    assert!(e.contains("name = `has space`"), "{e}");
}

mod calibration {
    use super::*;
    use crate::policy::calibrate::{Key, calibrate, pick_rule, rewrite};

    fn sample() -> Vec<Facts> {
        (0..100).map(|i| facts(f64::from(i) / 100.0, 10)).collect()
    }

    #[test]
    fn picks_the_threshold_that_sends_the_target_share_to_the_cloud() {
        let p = parse(TWO_RULES).expect("valid");
        let (rule, key) = pick_rule(&p, None).expect("rule");
        assert_eq!((rule, key), (0, Key::ScoreBelow));
        // All to the cloud would take `score_below = 0`, which never matches and so is no
        // setting: the lowest is 0.0001, which keeps the one request scored 0.
        for (target, want_t, want_n) in [(0.25, 0.745, 25), (0.0, 0.9901, 0), (1.0, 0.0001, 99), (0.5, 0.495, 50)] {
            let c = calibrate(&p, rule, key, &sample(), "cloud", target).expect("calibrates");
            assert_eq!((c.threshold, c.to_tier), (want_t, want_n), "target {target}");
            // Re-evaluating the policy with that threshold gives the reported share.
            let mut q = p.clone();
            q.rules[0].when.score_below = Some(c.threshold);
            assert_eq!(sample().iter().filter(|f| q.decide(f).tier == "cloud").count(), want_n);
        }
        let c = calibrate(&p, rule, key, &sample(), "cloud", 0.25).expect("calibrates");
        assert_eq!(c.current, Some((0.5, 50)));
    }

    #[test]
    fn score_at_least_rules_are_calibrated_too() {
        let p = parse("[[rules]]\nname = \"hard\"\nscore_at_least = 0.9\ntier = \"cloud\"\n[[rules]]\nname = \"rest\"\ntier = \"small\"\n")
            .expect("valid");
        let (rule, key) = pick_rule(&p, Some("hard")).expect("rule");
        assert_eq!(key, Key::ScoreAtLeast);
        let c = calibrate(&p, rule, key, &sample(), "cloud", 0.1).expect("calibrates");
        assert_eq!((c.threshold, c.to_tier), (0.895, 10));
        assert!(pick_rule(&p, Some("rest")).is_err());
        assert!(
            pick_rule(&p, Some("nope"))
                .expect_err("unknown")
                .contains("no rule named `nope`")
        );
    }

    #[test]
    fn rewrite_changes_only_the_threshold() {
        let text = "# header comment\nname = \"x\"\n\n[[rules]]\nname = \"routine\"\nscore_below = 0.12 # tuned by hand\ntier = \"small\"\n\n[[rules]]\nname = \"default\"\ntier = \"cloud\"\n";
        let out = rewrite(text, "routine", Key::ScoreBelow, 0.2345).expect("rewrites");
        assert_eq!(out, text.replace("0.12", "0.2345"));
        let out = rewrite(text, "default", Key::ScoreAtLeast, 0.5).expect("adds the key");
        assert!(
            out.contains("name = \"default\"\ntier = \"cloud\"\nscore_at_least = 0.5\n"),
            "{out}"
        );
        assert!(rewrite(text, "nope", Key::ScoreBelow, 0.1).is_err());
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    const RICH: &str = r#"
[[rules]]
name = "vision"
images = true
tier = "cloud"
[[rules]]
name = "tools"
tools = true
min_turns = 2
tier = "cloud"
[[rules]]
name = "json"
json_mode = true
score_below = 0.3
tier = "small"
[[rules]]
name = "keywords"
keywords = ["refund", "invoice"]
max_prompt_tokens = 500
tier = "small"
[[rules]]
name = "vip"
teams = ["vip"]
tier = "cloud"
[[rules]]
name = "header"
headers = { "x-priority" = "low" }
tier = "small"
[[rules]]
name = "local"
score_below = 0.2
local_load_below = 0.8
tier = "local"
[[rules]]
name = "mid"
score_at_least = 0.2
score_below = 0.6
max_turns = 3
tier = "small"
[[rules]]
name = "rest"
tier = "cloud"
"#;

    fn any_facts() -> impl Strategy<Value = Facts> {
        (
            (
                0.0f64..=1.0,
                0u64..5000,
                1u64..8,
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
            ),
            (
                prop::sample::select(vec!["", "refund please", "an invoice", "prove it"]),
                prop::option::of(prop::sample::select(vec!["vip", "dev"])),
                prop::option::of(prop::sample::select(vec!["low", "high"])),
                0.0f64..3.0,
            ),
        )
            .prop_map(
                |((score, prompt_tokens, turns, tools, json_mode, images), (text, team, prio, load))| {
                    let mut f = Facts {
                        score,
                        prompt_tokens,
                        turns,
                        tools,
                        json_mode,
                        images,
                        text: text.to_owned(),
                        team: team.map(str::to_owned),
                        ..Facts::default()
                    };
                    if let Some(p) = prio {
                        f.headers.insert("x-priority".into(), p.into());
                    }
                    f.local_load.insert("local".into(), load);
                    f
                },
            )
    }

    proptest! {
        /// Every request gets a decision, and it is the first rule whose conditions hold.
        #[test]
        fn every_request_gets_the_first_matching_rule(f in any_facts()) {
            let p = parse(RICH).expect("valid");
            let chosen = p.decide(&f);
            let first = p.rules.iter().position(|r| r.check(&f).is_ok());
            prop_assert_eq!(first.map(|i| &p.rules[i]), Some(chosen));
            prop_assert!(tiers().contains_key(&chosen.tier));
        }

        /// The same holds for every shipped policy.
        #[test]
        fn shipped_policies_decide_every_request(f in any_facts()) {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
            for entry in std::fs::read_dir(dir).expect("policies/") {
                let p = Policy::load(&entry.expect("entry").path(), &tiers()).expect("valid");
                let chosen = p.decide(&f);
                prop_assert!(chosen.matches(&f));
            }
        }
    }
}

#[test]
fn fallback_chain_is_validated_and_carried_by_the_rule() {
    let with = |extra: &str| TWO_RULES.replace("tier = \"small\"", &format!("tier = \"small\"\n{extra}"));
    let p = parse(&with("fallback = [\"cloud\", \"local\"]")).expect("valid");
    assert_eq!(p.rules[0].then.fallback, ["cloud", "local"]);
    assert!(p.rules[1].then.fallback.is_empty());
    for (extra, want) in [
        (
            "fallback = [\"cloud\", \"gpu\"]",
            "p.toml`: rules[0].fallback[1] (line 6) = `gpu` is not a configured tier; use one of",
        ),
        (
            "fallback = [\"small\"]",
            "rules[0].fallback[0] (line 6) = `small` is the rule's own tier",
        ),
        (
            "fallback = [\"cloud\", \"cloud\"]",
            "rules[0].fallback[1] (line 6) = `cloud` is already in the fallback list",
        ),
        ("fallback = \"cloud\"", "invalid type"),
    ] {
        let e = parse(&with(extra)).expect_err(extra);
        assert!(e.contains(want), "{e}\n  wanted: {want}");
    }
}

#[test]
fn over_budget_refuses_by_default_or_names_a_tier() {
    use super::OverBudget;
    assert_eq!(parse(TWO_RULES).expect("valid").over_budget, OverBudget::Refuse);
    let p = parse(&format!("over_budget = \"local\"\n{TWO_RULES}")).expect("valid");
    assert_eq!(p.over_budget, OverBudget::Downgrade("local".into()));
    let e = parse(&format!("over_budget = \"free\"\n{TWO_RULES}")).expect_err("unknown tier");
    assert!(
        e.contains("over_budget = `free` is neither `refuse` nor a configured tier"),
        "{e}"
    );
}
