//! One module per resource.

pub(crate) mod artifact;
pub(crate) mod openapi;
pub(super) mod publish;
pub(super) mod stream;
