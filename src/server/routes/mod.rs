//! One module per resource.

pub(crate) mod artifact;
pub(super) mod dev_session;
pub(crate) mod openapi;
pub(super) mod page;
pub(super) mod publish;
pub(super) mod stream;
pub(super) mod webhooks;
