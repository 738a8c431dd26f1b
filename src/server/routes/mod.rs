//! One module per resource.

pub(super) mod events;
