//! The harness: the workspace's real binaries run as processes, driven and measured.

pub mod http;
pub mod mocks;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod report;
pub mod run;
pub mod scenario;
pub mod sentinel;
pub mod stats;
pub mod verdict;
