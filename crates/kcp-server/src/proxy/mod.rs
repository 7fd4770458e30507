//! The proxy path: from a client's `/v1/*` request to the upstream answer it gets; the steps
//! run in order in [`crate::pipeline`].
//!
//! One module per concept: [`model`] reads the model from the body, [`stateful`] tells which
//! endpoints stick to a home key, [`headers`] and [`target_url`] shape the upstream request,
//! [`attempts`] runs the attempt loop by error class (with [`classify`], [`backoff`] and
//! [`wait`]), [`body`] streams the answer back, [`report`] sums up what happened, and
//! [`probe`] re-checks disabled keys in the background.

pub mod attempts;
pub mod backoff;
pub mod body;
pub mod classify;
pub mod headers;
pub mod model;
pub mod probe;
pub mod report;
pub mod stateful;
pub mod target_url;
pub mod wait;

pub use body::ProxyBody;
pub use model::ModelName;
pub use report::Report;
