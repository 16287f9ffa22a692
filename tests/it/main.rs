//! The integration tests: one binary (faster to build), one module per capability.
//! They drive the real `dotmac-gitops` binary against repositories made in temp folders.

mod bao;
mod cdp;
mod concurrency;
mod crash;
mod daemon_util;
mod fake_github;
mod faults;
mod pg;
mod util;

mod action;
mod browser;
mod daemon;
mod dashboard;
mod hostile;
mod http;
mod kube_fake;
mod kubernetes;
mod openbao;
mod parity;
mod pgstate;
mod plan_apply;
mod platform;
mod pr_comment;
mod prdiff;
mod recovery;
mod render;
mod sandbox;
mod secrets;
mod validate;
