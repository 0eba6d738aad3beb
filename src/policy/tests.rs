use std::collections::BTreeMap;
use std::path::Path;

use super::{Facts, Policy};
use crate::config::{BackendConfig, Price, TierConfig};

fn tiers() -> BTreeMap<String, TierConfig> {
    ["small", "cloud", "local"]
        .into_iter()
        .map(|n| {
            let t = TierConfig {
                name: n.to_owned(),
                model: format!("m-{n}"),
                price: Price::per_mtok(0.0, 0.0),
                backend: BackendConfig::OpenAi {
                    base_url: "http://x".into(),
                    api_key_env: None,
                    timeout: std::time::Duration::from_secs(1),
                    connect_timeout: std::time::Duration::from_secs(1),
                },
            };
            (n.to_owned(), t)
        })
        .collect()
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
        assert_eq!(
            p.decide(&Facts {
                score,
                prompt_tokens: 10
            })
            .name,
            want,
            "score {score}"
        );
    }
}

#[test]
fn token_bounds_are_inclusive() {
    let p = parse(
        "[[rules]]\nname = \"mid\"\nmin_prompt_tokens = 10\nmax_prompt_tokens = 20\ntier = \"small\"\n[[rules]]\nname = \"rest\"\ntier = \"cloud\"\n",
    )
    .expect("valid");
    for (t, want) in [(9, "rest"), (10, "mid"), (20, "mid"), (21, "rest")] {
        assert_eq!(
            p.decide(&Facts {
                score: 0.3,
                prompt_tokens: t
            })
            .name,
            want,
            "tokens {t}"
        );
    }
}

#[test]
fn errors_name_the_key_path_and_line() {
    let cases = [
        (
            TWO_RULES.replace("tier = \"small\"", "tier = \"gpu\""),
            "rules[0].tier (line 2)",
        ),
        (
            TWO_RULES.replace("0.5", "1.5"),
            "rules[0].score_below (line 2) = 1.5 must be in 0..=1",
        ),
        (
            TWO_RULES.replace("score_below = 0.5\n", ""),
            "rules[1].name (line 5): rule `rest` is unreachable",
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
    let with = |extra: &str| TWO_RULES.replace("tier = \"small\"", &format!("tier = \"small\"\n{extra}"));
    let p = parse(&with(
        "on_saturated = \"cloud\"\nmin_confidence = 0.4\nescalate_to = \"cloud\"",
    ))
    .expect("valid");
    let then = &p.rules[0].then;
    assert_eq!(then.on_saturated.as_deref(), Some("cloud"));
    let esc = then.escalate.as_ref().expect("escalation");
    assert_eq!((esc.min_confidence, esc.tier.as_str()), (0.4, "cloud"));
    // Not conditions: the rule still matches by score alone.
    let facts = Facts {
        score: 0.1,
        prompt_tokens: 5,
    };
    assert_eq!(p.decide(&facts).name, "easy");

    for (extra, want) in [
        (
            "on_saturated = \"gpu\"",
            "rules[0].on_saturated (line 2) = `gpu` is not a configured tier",
        ),
        ("on_saturated = \"small\"", "is the rule's own tier"),
        ("min_confidence = 0.4", "`min_confidence` needs `escalate_to`"),
        ("escalate_to = \"cloud\"", "`escalate_to` needs `min_confidence`"),
        (
            "min_confidence = 2.0\nescalate_to = \"cloud\"",
            "rules[0].min_confidence (line 2) = 2 must be in 0..=1",
        ),
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
