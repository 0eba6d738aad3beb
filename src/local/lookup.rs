//! Prompt-lookup drafting for speculative greedy decoding: guesses the next tokens by
//! finding the latest earlier occurrence of the sequence's last few tokens (in the prompt
//! or the answer so far) and proposing what followed it. Answers that copy from their
//! prompt (extraction, quoting a FAQ, reformatting) are full of such runs. The model checks
//! every guess in one forward pass, so a guess never changes the answer, only its speed;
//! this module also decides how much to guess, backing off when guesses keep missing.
//! Pure: tokens in, tokens out. `benches/lookup_bound.py` replays this policy in Python to
//! bound what drafting can gain; keep the two in step.

/// A draft length that pays off (BENCHMARKS.md, "Local generator").
pub const SUGGESTED_DRAFT_TOKENS: usize = 8;

/// `draft_tokens` of a local tier unless configured. On a graph whose rows are exact
/// (provisioned `row8`), verifying several tokens in one pass computes, bit for bit, what
/// one-token passes compute, so speculation only changes speed: on. Elsewhere (a user's own
/// export, `hybrid8`: per-tensor dynamic activation quantization, multi-row kernels) a pass
/// over several tokens computes slightly different numbers and an answer can drift from
/// plain greedy's: off unless asked for.
pub fn default_draft_tokens(rows_exact: bool) -> usize {
    if rows_exact { SUGGESTED_DRAFT_TOKENS } else { 0 }
}
/// Longest n-gram matched; shorter ones are tried when it finds nothing.
const MAX_NGRAM: usize = 3;
/// Shortest n-gram matched. A single token (`,`, ` the`) recurs everywhere and predicts
/// little; two are the shortest match worth a wider forward pass.
const MIN_NGRAM: usize = 2;
/// Fully missed drafts in a row before drafting pauses.
const MISSES_BEFORE_PAUSE: u32 = 2;
/// Longest pause, in decode steps; pauses double up to it while drafts keep missing.
const MAX_PAUSE: u32 = 32;

/// Drafting state of one sequence.
#[derive(Debug, Clone)]
pub struct PromptLookup {
    /// Most tokens drafted per step (0: never draft).
    max_draft: usize,
    /// Tokens to draft next time: grows while drafts are accepted whole, shrinks when not.
    next_len: usize,
    misses: u32,
    pause: u32,
    paused_for: u32,
    /// Totals over the sequence: tokens proposed, and proposed tokens the model confirmed.
    pub drafted: usize,
    pub accepted: usize,
}

impl PromptLookup {
    pub fn new(max_draft: usize) -> PromptLookup {
        PromptLookup {
            max_draft,
            next_len: max_draft.min(4),
            misses: 0,
            pause: 0,
            paused_for: 0,
            drafted: 0,
            accepted: 0,
        }
    }

    /// Up to `room` tokens guessed to follow `history` (the prompt, then the answer so
    /// far, its last token included), appended to `draft`.
    pub fn draft(&mut self, history: &[u32], room: usize, draft: &mut Vec<u32>) {
        let want = self.next_len.min(room);
        if want == 0 {
            return;
        }
        if self.paused_for > 0 {
            self.paused_for -= 1;
            return;
        }
        let n = history.len();
        for size in (MIN_NGRAM..=MAX_NGRAM.min(n.saturating_sub(1))).rev() {
            let tail = &history[n - size..];
            // Latest earlier occurrence that has at least one token after it.
            let found = (0..n - size)
                .rev()
                .find(|&i| &history[i..i + size] == tail)
                .map(|i| i + size);
            if let Some(start) = found {
                let end = (start + want).min(n);
                draft.extend_from_slice(&history[start..end]);
                return;
            }
        }
    }

    /// What the model made of the last draft: `accepted` of its `drafted` tokens.
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.drafted += drafted;
        self.accepted += accepted;
        if accepted == drafted {
            self.next_len = (self.next_len + 2).min(self.max_draft);
        } else {
            self.next_len = (accepted + 1).clamp(1, self.max_draft);
        }
        if accepted == 0 {
            self.misses += 1;
            if self.misses >= MISSES_BEFORE_PAUSE {
                self.pause = (self.pause * 2).clamp(2, MAX_PAUSE);
                self.paused_for = self.pause;
                self.misses = 0;
            }
        } else {
            self.misses = 0;
            self.pause = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(l: &mut PromptLookup, history: &[u32], room: usize) -> Vec<u32> {
        let mut d = Vec::new();
        l.draft(history, room, &mut d);
        d
    }

    #[test]
    fn drafts_what_followed_the_latest_match_of_the_longest_ngram() {
        let mut l = PromptLookup::new(8);
        // The tail [2, 3, 4] occurred at 1..4 (followed by 9, 9) and [3, 4] later at 6..8
        // (followed by 7): the longer match wins.
        let h = [1, 2, 3, 4, 9, 9, 3, 4, 7, 5, 2, 3, 4];
        assert_eq!(draft(&mut l, &h, 3), vec![9, 9, 3]);
        // No earlier [8, 3, 4]: the 2-gram [3, 4], whose latest earlier occurrence (3..5) is
        // followed by 7, 8.
        let h = [3, 4, 1, 3, 4, 7, 8, 3, 4];
        assert_eq!(draft(&mut l, &h, 2), vec![7, 8]);
        // Room limits the draft; no match, no draft.
        assert_eq!(draft(&mut l, &h, 1), vec![7]);
        assert!(draft(&mut l, &[1, 2, 3, 4], 4).is_empty());
        assert!(draft(&mut l, &[1, 2], 4).is_empty());
    }

    #[test]
    fn draft_length_follows_acceptance_and_misses_pause_drafting() {
        let mut l = PromptLookup::new(8);
        let h = [5, 6, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6];
        assert_eq!(draft(&mut l, &h, 100).len(), 4);
        l.record(4, 4);
        assert_eq!(draft(&mut l, &h, 100).len(), 6);
        l.record(6, 2);
        assert_eq!(draft(&mut l, &h, 100).len(), 3);
        l.record(3, 0);
        l.record(1, 0);
        // Two full misses: a pause of 2 steps, then drafting again.
        assert!(draft(&mut l, &h, 100).is_empty());
        assert!(draft(&mut l, &h, 100).is_empty());
        assert_eq!(draft(&mut l, &h, 100).len(), 1);
        assert_eq!((l.drafted, l.accepted), (14, 6));
        // Off: never drafts.
        assert!(draft(&mut PromptLookup::new(0), &h, 100).is_empty());
    }
}
