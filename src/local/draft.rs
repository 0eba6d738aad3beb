//! The trained draft head: a small ONNX graph beside the model that guesses the token after
//! the one just produced, from the model's final hidden state and that token (EAGLE-style;
//! trained and exported by `benches/draft_head.py`). Prompt lookup can only copy; this
//! predicts, so it drafts where lookup finds nothing. The engine verifies a guess like a
//! lookup draft (one more row in the next pass), so a guess never changes the answer.

use std::path::Path;

use ort::session::Session;
use ort::value::TensorRef;

use super::model::SessionSettings;

/// The head's file in a model directory.
pub const FILE: &str = "draft_head.onnx";
/// The model's output the head reads: its final norm's output, one row per position.
pub const HIDDEN_OUTPUT: &str = "last_hidden_state";
/// Guesses the head is less sure of are not drafted: a wrong guess costs a row in the
/// next pass, and the first extra row is the dear one (~20 % of a one-token pass on the
/// default model). Chosen by replay (BENCHMARKS.md, "The trained draft heads").
pub const MIN_CONFIDENCE: f32 = 0.5;
/// Most guesses drafted in one step: the second comes from the head's own prediction of
/// the next hidden state, and a second extra row costs much less than the first.
pub const MAX_GUESSES: usize = 2;

/// One loaded head. Inputs `hidden` `[n, width]` and `token` `[n]`; outputs `guess` `[n]`,
/// `confidence` `[n]` and `next_hidden` `[n, width]` (its prediction of the model's next
/// hidden state, from which it guesses again).
pub struct DraftHead {
    session: Session,
    width: usize,
}

impl DraftHead {
    pub fn load(path: &Path, settings: SessionSettings) -> Result<DraftHead, String> {
        let session = settings.load(path)?;
        let width = session
            .inputs()
            .iter()
            .find(|i| i.name() == "hidden")
            .and_then(|i| i.dtype().tensor_shape().and_then(|s| s.last().copied()))
            .filter(|&w| w > 0)
            .map(|w| w as usize)
            .ok_or_else(|| format!("`{}` has no `hidden` input of a known width", path.display()))?;
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        for needed in ["guess", "confidence", "next_hidden"] {
            if !outputs.contains(&needed) {
                return Err(format!("`{}` has no `{needed}` output", path.display()));
            }
        }
        Ok(DraftHead { session, width })
    }

    /// The guessed next token after `token`, which the row with final hidden state
    /// `hidden` produced, and the head's confidence in it; `next` receives the predicted
    /// hidden state of the row that will produce the guess.
    pub fn guess(&mut self, hidden: &[f32], token: u32, next: &mut Vec<f32>) -> Result<(u32, f32), String> {
        if hidden.len() != self.width {
            return Err(format!(
                "the draft head reads hidden states of width {}, the model gave {}",
                self.width,
                hidden.len()
            ));
        }
        let err = |what: &'static str| move |e: ort::Error| format!("draft head {what}: {e}");
        let token = [i64::from(token)];
        let h = TensorRef::from_array_view(([1usize, self.width], hidden)).map_err(err("input"))?;
        let t = TensorRef::from_array_view(([1usize], &token[..])).map_err(err("input"))?;
        let outputs = self
            .session
            .run(ort::inputs!["hidden" => h, "token" => t])
            .map_err(err("run"))?;
        let (_, guess) = outputs["guess"].try_extract_tensor::<i64>().map_err(err("guess"))?;
        let (_, confidence) = outputs["confidence"]
            .try_extract_tensor::<f32>()
            .map_err(err("confidence"))?;
        let (_, predicted) = outputs["next_hidden"]
            .try_extract_tensor::<f32>()
            .map_err(err("next_hidden"))?;
        match (guess.first(), confidence.first()) {
            (Some(&g), Some(&c)) if g >= 0 && predicted.len() == self.width => {
                next.clear();
                next.extend_from_slice(predicted);
                Ok((g as u32, c))
            }
            _ => Err("the draft head returned no guess".to_owned()),
        }
    }
}
