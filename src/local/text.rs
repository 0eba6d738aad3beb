//! Turning generated token ids into answer text while they arrive: incremental
//! detokenization that never splits a UTF-8 character across chunks, and `stop` sequences
//! that end the answer without their text ever being sent. Pure: ids in, text pieces out.

use tokenizers::Tokenizer;

/// Incremental detokenizer over `tokenizers`' streaming decode: it holds back a token that
/// ends inside a multi-byte character (byte-level BPE splits emoji and CJK) until the next
/// one completes it.
#[derive(Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
    /// Every id fed so far, and the length of the text given out, so `finish` can give the
    /// exact remainder of a full decode.
    all: Vec<u32>,
    emitted: usize,
}

impl Detokenizer {
    /// New text made complete by `id`, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>, String> {
        self.all.push(id);
        let piece = tokenizers::tokenizer::step_decode_stream(
            tok,
            vec![id],
            true,
            &mut self.ids,
            &mut self.prefix,
            &mut self.prefix_index,
        );
        match piece {
            Ok(Some(p)) => {
                self.emitted += p.len();
                Ok(Some(p))
            }
            Ok(None) => Ok(None),
            // Some decoders rewrite earlier text when a token arrives (the window's prefix no
            // longer matches): fall back to a full decode and give out what is new.
            Err(_) => {
                self.ids.clear();
                self.prefix.clear();
                self.prefix_index = 0;
                self.flush_full(tok)
            }
        }
    }

    /// Whatever a full decode has beyond what was given out (held-back bytes at the end).
    /// An answer cut (by `max_tokens`) inside a multi-byte character ends before it: the
    /// lossy decode of its first bytes is U+FFFD, which is no text the model wrote.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Option<String>, String> {
        Ok(self.flush_full(tok)?.and_then(|rest| {
            let kept = rest.trim_end_matches('\u{FFFD}');
            (!kept.is_empty()).then(|| kept.to_owned())
        }))
    }

    fn flush_full(&mut self, tok: &Tokenizer) -> Result<Option<String>, String> {
        let full = tok
            .decode(&self.all, true)
            .map_err(|e| format!("cannot decode the answer: {e}"))?;
        if full.len() > self.emitted && full.is_char_boundary(self.emitted) {
            let rest = full[self.emitted..].to_owned();
            self.emitted = full.len();
            Ok(Some(rest))
        } else {
            Ok(None)
        }
    }
}

/// Holds back text that could be the start of a stop sequence, and cuts the answer where
/// one appears.
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What the matcher lets through for one piece of text.
#[derive(Debug, PartialEq)]
pub struct Released {
    pub text: String,
    /// A stop sequence was found: `text` ends right before it and the answer is over.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, piece: &str) -> Released {
        self.pending.push_str(piece);
        if self.stops.is_empty() {
            return Released {
                text: std::mem::take(&mut self.pending),
                stopped: false,
            };
        }
        // The earliest stop sequence wins.
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let mut text = std::mem::take(&mut self.pending);
            text.truncate(at);
            return Released { text, stopped: true };
        }
        // Keep the longest tail that is a proper prefix of some stop sequence.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        let text = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        Released { text, stopped: false }
    }

    /// The text held back when the answer ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on character
/// boundaries.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = (stop.len() - 1).min(text.len());
    (1..=max)
        .rev()
        .find(|&k| {
            let start = text.len() - k;
            text.is_char_boundary(start) && stop.starts_with(&text[start..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(m: &mut StopMatcher, pieces: &[&str]) -> (String, bool) {
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_sequence_split_across_pieces_is_never_emitted() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        let mut seen = Vec::new();
        for p in ["Hello E", "N", "D world"] {
            let r = m.push(p);
            seen.push(r.text.clone());
            if r.stopped {
                break;
            }
        }
        assert_eq!(seen, vec!["Hello ", "", ""]);
    }

    #[test]
    fn a_false_start_is_released_and_the_earliest_stop_wins() {
        let mut m = StopMatcher::new(vec!["\n\n".into(), "STOP".into()]);
        assert_eq!(feed(&mut m, &["a\n", "b ST", "OP c\n\n"]), ("a\nb ".into(), true));
        let mut m = StopMatcher::new(vec!["xyz".into()]);
        assert_eq!(feed(&mut m, &["x", "y", "!"]), ("xy!".into(), false));
    }

    #[test]
    fn multibyte_text_is_held_on_character_boundaries() {
        let mut m = StopMatcher::new(vec!["é!".into()]);
        let r = m.push("caf\u{e9}");
        assert_eq!(r.text, "caf");
        assert_eq!(feed(&mut m, &["?"]), ("\u{e9}?".into(), false));
    }
}
