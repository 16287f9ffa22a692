//! dotmac-gitops: declarative GitOps reconciliation for DotMac tenants.
//!
//! The data flow, one module per stage (see ARCHITECTURE.md):
//! `load` -> `validate` -> `render` -> (providers read live) -> `diff` -> `plan` -> `apply`,
//! with `state` keeping the last-applied record, the audit log and the lock.

#![allow(clippy::result_large_err, clippy::type_complexity)]

pub mod apply;
pub mod binfmt;
pub mod cache;
pub mod cli;
pub mod daemon;
pub mod diag;
pub mod diff;
pub mod drift;
pub mod engine;
pub mod fingerprint;
pub mod github;
pub mod load;
pub mod model;
pub mod plan;
pub mod prdiff;
pub mod providers;
pub mod render;
pub mod state;
pub mod validate;
pub mod yamlfmt;

/// Counts what a thread holds while it renders a template (see `render::budget`).
#[global_allocator]
static ALLOCATOR: render::CountingAllocator = render::CountingAllocator;
