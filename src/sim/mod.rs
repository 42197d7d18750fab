//! `barngate simulate`: firmware-faithful ESP32-CAM nodes (GATEWAY.md §2).
//!
//! This module owns the device model — SD card files (`images/`,
//! `metadata.txt`, `pendingImage.txt`), Wi-Fi retries, the drifting crystal
//! and the offline wake estimate, the HELLO → METADATA → chunks → ACK_OK
//! session with targeted resends, fault injection and the synthetic petri-dish
//! JPEGs — and two drivers for it:
//! - [`Simulation`]: simulated time, in process. A discrete-event loop feeds
//!   an [`Engine`] directly and advances a [`ManualClock`], so days of
//!   operation for a hundred devices run in seconds (tests, load models);
//! - [`run_mqtt`]: real time over MQTT against a running gateway (demos).
//!
//! [`SimDevice`] is transport-agnostic: it is fed wakes, messages, timer
//! firings and disconnects and answers with [`Action`]s stamped in true time.
//!
//! A developer tool: built with the `simulator` feature (a default one), left
//! out of the Debian packages.

mod base;
mod device;
mod faults;
mod fleet;
mod petri;
mod realtime;
mod sd;
mod simulated;
#[cfg(test)]
mod tests;

pub use base::*;
pub use device::*;
pub use faults::*;
pub use fleet::*;
pub use petri::*;
pub use realtime::*;
pub use sd::*;
pub use simulated::*;
