//! One module per resource.

pub(super) mod artifact;
pub(super) mod events;
