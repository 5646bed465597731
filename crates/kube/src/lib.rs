//! Everything Kubernetes for keelson. Today: rendering an app profile into
//! the objects that run it ([`render`]), and writing them as YAML.

pub mod render;
pub mod yaml_out;

pub use render::{RenderError, RenderRequest, Track, render};
