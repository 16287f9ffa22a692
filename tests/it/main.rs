//! The integration tests: one binary (faster to build), one module per capability.
//! They drive the real `dotmac-gitops` binary against repositories made in temp folders.

mod bao;
mod daemon_util;
mod util;

mod daemon;
mod http;
mod kube_fake;
mod kubernetes;
mod openbao;
mod parity;
mod plan_apply;
mod platform;
mod render;
mod sandbox;
mod secrets;
mod validate;
