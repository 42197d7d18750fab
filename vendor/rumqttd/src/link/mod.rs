pub mod alerts;
pub mod bridge;
pub mod console;
// barngate patch: sessions whose transport the application drives.
pub mod embedded;
pub mod local;
pub mod meters;
pub mod network;
pub mod remote;
pub mod timer;
