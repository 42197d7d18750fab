//! The dashboard pages, rendered on the server as plain HTML with inline
//! SVG charts (no JavaScript): overview, device, images, alerts, login.
//! Everything interpolated goes through [`layout::esc`].
//!
//! One file per page group; the shared frame and formatting are in
//! `layout`, the SVG chart in `chart`.

mod alerts;
mod chart;
mod device;
mod images;
mod layout;
mod login;
mod overview;

pub use alerts::alerts;
pub use device::device;
pub use images::{image, image_download, image_raw, images};
pub use login::{login, login_form, logout};
pub use overview::overview;
