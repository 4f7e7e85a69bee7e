//! The harness: the workspace's real binaries run as processes, driven and measured.

pub mod http;
pub mod process;
pub mod proxy;
pub mod stats;
