//! barngate: an on-site TLS MQTT gateway for sleepy ESP32-CAM camera nodes.
//!
//! See `ARCHITECTURE.md` for how a chunk flows from socket to disk to ACK.
pub mod admin;
pub mod alerts;
pub mod broker;
pub mod clock;
pub mod config;
pub mod devpass;
pub mod front;
pub mod fsmode;
pub mod http;
pub mod ident;
pub mod ingest;
pub mod metrics;
pub mod pki;
pub mod protocol;
pub mod provision;
pub mod registry;
pub mod schedule;
pub mod server;
#[cfg(feature = "simulator")]
pub mod sim;
pub mod store;
pub mod upstream;
