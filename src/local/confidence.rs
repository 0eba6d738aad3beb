//! The local model's confidence in one answer, from what it generated: the mean
//! log-probability of its tokens (how sure it was of each) and a degeneration check (an
//! answer that ends in a repetition loop is weak however sure the model was). Pure.

/// The parts of the signal, kept for the ledger and for tuning thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Confidence {
    /// Mean natural-log probability of the generated tokens under the model (≤ 0).
    pub mean_logprob: f64,
    /// Share of the answer's tokens inside a trailing repetition loop, in [0, 1].
    pub repetition: f64,
    /// `exp(mean_logprob) × (1 − repetition)`, in [0, 1]: the geometric-mean token
    /// probability, discounted by how much of the answer is a loop.
    pub score: f64,
}

/// Periods (in tokens) checked for loops: from one token repeated to a repeated sentence.
const MAX_PERIOD: usize = 64;
/// A loop counts once its pattern has come back this many times in a row.
const MIN_REPEATS: usize = 3;

pub fn assess(tokens: &[u32], logprobs: &[f32]) -> Confidence {
    let mean_logprob = if logprobs.is_empty() {
        0.0
    } else {
        logprobs.iter().map(|&l| f64::from(l)).sum::<f64>() / logprobs.len() as f64
    };
    let repetition = trailing_loop(tokens) as f64 / tokens.len().max(1) as f64;
    Confidence {
        mean_logprob,
        repetition,
        score: mean_logprob.exp() * (1.0 - repetition),
    }
}

/// Length of the longest tail of `tokens` made of one pattern of period ≤ `MAX_PERIOD`
/// repeated at least `MIN_REPEATS` times (0 if there is none).
fn trailing_loop(tokens: &[u32]) -> usize {
    let n = tokens.len();
    let mut best = 0;
    for p in 1..=MAX_PERIOD.min(n / MIN_REPEATS) {
        // How far back does `t[i] == t[i - p]` hold, from the end?
        let mut run = 0;
        while run + p < n && tokens[n - 1 - run] == tokens[n - 1 - run - p] {
            run += 1;
        }
        let looped = run + p;
        if looped >= p * MIN_REPEATS {
            best = best.max(looped);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sure_clean_answer_scores_high() {
        let c = assess(&[1, 2, 3, 4, 5], &[-0.01, -0.02, -0.05, -0.01, -0.01]);
        assert_eq!(c.repetition, 0.0);
        assert!(c.score > 0.95, "{c:?}");
    }

    #[test]
    fn an_unsure_answer_scores_low() {
        let c = assess(&[1, 2, 3, 4], &[-2.0, -3.0, -2.5, -2.5]);
        assert!((c.mean_logprob + 2.5).abs() < 1e-9);
        assert!(c.score < 0.1, "{c:?}");
    }

    #[test]
    fn a_trailing_loop_is_detected_and_discounted() {
        // 4 clean tokens, then the 3-token phrase [7, 8, 9] four times.
        let toks = [1, 2, 3, 4, 7, 8, 9, 7, 8, 9, 7, 8, 9, 7, 8, 9];
        let c = assess(&toks, &[-0.01; 16]);
        assert!((c.repetition - 12.0 / 16.0).abs() < 1e-9, "{c:?}");
        assert!(c.score < 0.3, "{c:?}");
        // Two repeats are not a loop ("very very").
        assert_eq!(assess(&[1, 5, 5, 2], &[-0.1; 4]).repetition, 0.0);
    }
}
