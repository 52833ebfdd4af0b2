//! The admin interface: the Unix socket server and the registry every module plugs into.

pub mod registry;
pub mod server;

pub use registry::{
    ActionResult, ApiError, NoParams, PageParams, ParamKind, ParamSpec, Registry, run_blocking,
};
