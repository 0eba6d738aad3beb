//! Fuzzes routing-policy parsing: any text is a valid policy or an error message that
//! names the file, never a panic.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tiergate::config::{BackendConfig, Price, TierConfig};
use tiergate::policy::Policy;

fn tiers() -> BTreeMap<String, TierConfig> {
    ["small", "cloud", "local"]
        .into_iter()
        .map(|n| {
            let t = TierConfig {
                name: n.to_owned(),
                model: format!("m-{n}"),
                price: Price::per_mtok(0.0, 1.0),
                backend: BackendConfig::OpenAi {
                    base_url: "http://127.0.0.1:1/v1".into(),
                    api_key_env: None,
                    timeout: Duration::from_secs(1),
                    connect_timeout: Duration::from_secs(1),
                },
            };
            (n.to_owned(), t)
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Policy::parse(text, Path::new("fuzz.toml"), &tiers()) {
        Ok(p) => assert!(!p.rules.is_empty(), "a valid policy has rules"),
        Err(e) => assert!(e.contains("fuzz.toml"), "{e}"),
    }
});
