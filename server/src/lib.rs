//! The Tether server: the trust domain's authorities, the registration store, and the APIs
//! agents (node API, TLS) and operators (admin API, local socket) use.

pub mod admin_client;
pub mod api;
pub mod ca;
pub mod config;
pub mod run;
pub mod store;
pub mod tpm;
pub mod tunnel;
