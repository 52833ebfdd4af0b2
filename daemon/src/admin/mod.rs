//! The admin interface: the Unix socket server and the registry every module plugs into.

pub mod metrics;
pub mod registry;
pub mod server;

pub use metrics::AdminMetrics;
pub use registry::{
    ActionResult, ApiError, NoParams, PageParams, ParamKind, ParamSpec, Registry, run_blocking,
};
