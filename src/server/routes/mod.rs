//! One module per resource.

pub(crate) mod artifact;
pub(super) mod publish;
pub(super) mod stream;
