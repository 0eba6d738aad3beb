//! The model's chat template (`tokenizer_config.json` `chat_template`, Jinja) rendered with
//! minijinja the way `transformers` renders it: `trim_blocks`, `lstrip_blocks`,
//! `add_generation_prompt`, Python string methods, `raise_exception`. Pure: text in, text out.

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;

/// One chat turn as the template sees it.
#[derive(Debug, Clone, Serialize)]
pub struct TurnView {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Templates are written for Python's Jinja2 and call `str.strip()`, `.startswith()`,
        // `dict.items()`…; pycompat provides those.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| format!("the chat template does not parse: {e}"))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// The prompt text for `turns`, ending with the assistant's turn opened.
    pub fn render(&self, turns: &[TurnView]) -> Result<String, String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| format!("chat template: {e}"))?;
        tmpl.render(context! {
            messages => turns,
            add_generation_prompt => true,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| format!("the chat template failed on these messages: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(role: &str, content: &str) -> TurnView {
        TurnView {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_chatml_with_default_system_like_jinja2() {
        // SmolLM2's template, as `tokenizer_config.json` holds it.
        let src = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let t = ChatTemplate::new(src, "<|im_start|>", "<|im_end|>").expect("parses");
        let out = t
            .render(&[turn("user", "What is the capital of France?")])
            .expect("renders");
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let src = "{% for m in messages %}{% if m.role not in ['user', 'system'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}[{{ m.content.strip().upper() }}]{% endfor %}";
        let t = ChatTemplate::new(src, "", "").expect("parses");
        assert_eq!(t.render(&[turn("user", "  hi ")]).expect("renders"), "[HI]");
        let err = t.render(&[turn("tool", "x")]).expect_err("raises");
        assert!(err.contains("bad role tool"), "{err}");
    }
}
