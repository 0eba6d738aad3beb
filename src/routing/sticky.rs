//! Conversation stickiness: remembers the strongest tier each conversation reached, so a
//! short follow-up turn is not sent back to a weaker tier. Owns the identity hash and the
//! bounded, expiring store; decides nothing else.

use std::time::Duration;

use sha2::{Digest, Sha256};

use std::collections::BTreeMap;

use super::RouteDecision;
use crate::config::TierConfig;
use crate::openai::ChatRequest;

/// The header that names a conversation explicitly.
pub const HEADER_CONVERSATION: &str = "x-tiergate-conversation";

/// Settings of `[routing.stickiness]`.
#[derive(Debug, Clone, PartialEq)]
pub struct StickinessConfig {
    pub enabled: bool,
    pub ttl: Duration,
    pub capacity: u64,
}

impl Default for StickinessConfig {
    fn default() -> Self {
        StickinessConfig {
            enabled: true,
            ttl: Duration::from_secs(3600),
            capacity: 100_000,
        }
    }
}

/// Conversation id → the strongest tier it was routed or escalated to.
pub struct Stickiness {
    cache: moka::sync::Cache<String, String>,
}

impl Stickiness {
    pub fn new(c: &StickinessConfig) -> Stickiness {
        Stickiness {
            cache: moka::sync::Cache::builder()
                .max_capacity(c.capacity)
                .time_to_live(c.ttl)
                .build(),
        }
    }

    pub fn get(&self, conversation: &str) -> Option<String> {
        self.cache.get(conversation)
    }

    /// Records that `conversation` reached `tier`, unless it already reached a stronger one.
    /// Every write restarts the entry's time to live.
    pub fn raise(&self, conversation: &str, tier: &TierConfig, stored: Option<&TierConfig>) {
        let keep = stored.filter(|s| strength(s) > strength(tier)).unwrap_or(tier);
        self.cache.insert(conversation.to_owned(), keep.name.clone());
    }
}

/// Keeps a conversation on the strongest tier it reached: when the policy chose a weaker
/// tier than the conversation's sticky one, `d` moves there (rule `sticky`). Reads the
/// store only; returns the conversation id when stickiness applies to this request.
pub fn apply(
    store: Option<&Stickiness>,
    tiers: &BTreeMap<String, TierConfig>,
    d: &mut RouteDecision,
    header: Option<&str>,
    req: &ChatRequest,
) -> Option<String> {
    let store = store?;
    if !d.sticky {
        return None;
    }
    let id = conversation_id(header, req)?;
    if let Some(held) = store.get(&id)
        && let (Some(held_tier), Some(chosen)) = (tiers.get(&held), tiers.get(&d.tier))
        && strength(held_tier) > strength(chosen)
    {
        // The rule's cost cap holds for the tier the conversation would be lifted to too.
        if let Some(cap) = d.max_cost_usd {
            let output = super::requested_output_tokens(req)
                .unwrap_or(super::DEFAULT_OUTPUT_ESTIMATE)
                .saturating_mul(req.choices());
            let estimate = held_tier.price.cost(d.request_tokens, output);
            if estimate > cap {
                d.notes.push(format!(
                    "conversation not kept on `{held}`: its estimated ${estimate:.6} there is over max_cost_usd ${cap}"
                ));
                return Some(id);
            }
        }
        d.notes.push(format!(
            "conversation stays on `{held}` (rule `{}` chose `{}`)",
            d.rule, d.tier
        ));
        d.tier = held;
        d.rule = "sticky".to_owned();
        d.then = Default::default();
        d.max_output_tokens = None;
    }
    Some(id)
}

/// How strong (costly) a tier is: its USD per million input + output tokens, plus its
/// machine price per hour share. Stickiness only ever moves a conversation up this order.
pub fn strength(t: &TierConfig) -> f64 {
    t.price.input_per_mtok + t.price.output_per_mtok + t.price.machine_usd_per_second * 3600.0
}

/// A conversation's identity: `h:` + the `x-tiergate-conversation` header when given;
/// otherwise `m:` + the hex SHA-256 of the canonical JSON array of `{"content", "role"}` of
/// the system/developer messages and the first user message, in order. Every turn of a
/// conversation repeats those, so turn 1 and turn 5 get the same id. `None` when there is
/// no user message.
pub fn conversation_id(header: Option<&str>, req: &ChatRequest) -> Option<String> {
    if let Some(h) = header.map(str::trim).filter(|h| !h.is_empty()) {
        return Some(format!("h:{h}"));
    }
    let first_user = req.messages.iter().position(|m| m.role == "user")?;
    let parts: Vec<serde_json::Value> = req.messages[..=first_user]
        .iter()
        .filter(|m| matches!(m.role.as_str(), "system" | "developer" | "user"))
        .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
        .collect();
    // serde_json's map is ordered by key, so this serialization is canonical.
    let canonical = serde_json::Value::Array(parts).to_string();
    let digest = Sha256::digest(canonical.as_bytes());
    Some(format!(
        "m:{}",
        digest.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(messages: serde_json::Value) -> ChatRequest {
        ChatRequest::parse(
            serde_json::json!({"model": "m", "messages": messages})
                .to_string()
                .as_bytes(),
        )
        .expect("valid")
    }

    #[test]
    fn follow_up_turns_share_the_first_turns_identity() {
        let turn1 = req(serde_json::json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "prove it"},
        ]));
        let turn2 = req(serde_json::json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "prove it"},
            {"role": "assistant", "content": "…"},
            {"role": "user", "content": "thanks"},
        ]));
        let other = req(serde_json::json!([{"role": "user", "content": "prove it"}]));
        let id1 = conversation_id(None, &turn1).expect("id");
        assert!(id1.starts_with("m:") && id1.len() == 66, "{id1}");
        assert_eq!(conversation_id(None, &turn2), Some(id1.clone()));
        assert_ne!(conversation_id(None, &other), Some(id1));
        assert_eq!(conversation_id(Some(" c-1 "), &other).as_deref(), Some("h:c-1"));
    }
}
