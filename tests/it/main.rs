//! The integration test binary: the real gateway on a random port against fake
//! OpenAI-compatible upstreams (`common`), driven over HTTP.

mod access;
mod bad_input;
mod chat;
mod classifier;
mod common;
mod durability;
mod faults;
mod local;
mod local_http;
mod metrics;
mod otel;
mod policies;
mod python_sdk;
mod replay;
mod report;
mod secrets;
