//! Fuzzes chat-completions request parsing: any bytes give a request or a client error
//! (4xx), never a panic; whatever parses can be checked against limits, scored and
//! serialised again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiergate::config::Limits;
use tiergate::openai::ChatRequest;

fuzz_target!(|data: &[u8]| {
    match ChatRequest::parse(data) {
        Ok(req) => {
            let _ = req.check_limits(&Limits::default());
            let _ = req.scored_text();
            let _ = req.max_output_tokens();
            let again = serde_json::to_vec(&req).expect("a parsed request serialises");
            ChatRequest::parse(&again).expect("a serialised request parses again");
        }
        Err(e) => assert!(e.status_code().is_client_error(), "{e:?}"),
    }
});
