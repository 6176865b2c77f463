//! What the node may issue and how it is checked: the identity layer under the Workload API,
//! enforcement and the manager.

pub mod jwt;
