//! barngate's integration tests, in one test binary (`cargo test --test it`).
//! One module per area; shared helpers in `support` (an in-process gateway
//! and MQTT devices, the simulator harness, the upstream servers). Select an
//! area with a filter: `cargo test --test it upstream::`.
//!
//! The tests that need external programs (chromium, PostgreSQL, s3s-fs,
//! mosquitto clients) run in every `cargo test` and fail when the program is
//! missing: they are never skipped.

mod support;

mod alerts;
mod bad_input_corpus;
mod cli;
mod conversation;
mod dashboard;
mod engine;
mod front;
mod ingest_e2e;
mod layout;
mod mqtt_conformance;
mod password;
mod security;
#[cfg(feature = "simulator")]
mod sim_e2e;
#[cfg(feature = "simulator")]
mod sim_integration;
#[cfg(feature = "simulator")]
mod sim_realtime;
mod upstream;
