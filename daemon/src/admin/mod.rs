//! The admin interface: the Unix socket server, the registry every module plugs into, and the
//! HTTPS API over the same registry (`web/`) with its tokens and audit log.

pub mod actions;
pub mod audit;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod tokens;
pub mod web;

pub use metrics::AdminMetrics;
pub use registry::{
    ActionResult, ApiError, NoParams, PageParams, ParamKind, ParamSpec, Registry, run_blocking,
};
