//! What the node may issue and how it is checked: the identity layer under the Workload API,
//! enforcement, the tunnel, persistence and the manager.
//!
//! - [`LocalEntry`]: a registration entry as the node holds it;
//! - [`Snapshot`]: the node's entries (indexed by selector), its workload SVIDs, the
//!   [`Bundle`] and its JWT authorities ([`jwt`]), replaced whole on every change;
//! - [`identity_number`]: the kernel's number for an identity;
//! - [`IdentitySource`]: what serves snapshots and mints JWT-SVIDs (the manager), as the
//!   Workload API sees it.
//!
//! This module depends on no other part of the agent but `svid`: the modules above it
//! (config users, the node client, the manager, the Workload API, enforcement, the tunnel)
//! share these types without depending on one another.

mod bundle;
mod entry;
pub mod jwt;
mod snapshot;

use std::{future::Future, pin::Pin, sync::Arc};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

pub use bundle::Bundle;
pub use entry::LocalEntry;
pub use snapshot::Snapshot;

/// The kernel's number for an identity: stable across agent restarts (sockets keep the number
/// they were stamped with), so it is derived from what it names, never from a counter.
pub fn identity_number(spiffe_id: &str, golden: bool) -> u32 {
    let d = Sha256::digest(format!("{spiffe_id}\0{}", u8::from(golden)).as_bytes());
    let n = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) & 0x7fff_ffff;
    n.max(1)
}

/// A JWT-SVID being minted: the token, or why none was (the server's refusal, or its absence).
pub type JwtFuture<'a> =
    Pin<Box<dyn Future<Output = Result<String, Box<dyn std::error::Error + Send + Sync>>> + Send + 'a>>;

/// The node's identities as the Workload API needs them: the snapshot now and each one that
/// replaces it, and JWT-SVIDs on demand (minted by the server, so they may fail). The
/// manager implements it; the Workload API holds only this.
pub trait IdentitySource: Send + Sync + 'static {
    /// The current snapshot and every one that replaces it.
    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>>;
    /// The snapshot now.
    fn current(&self) -> Arc<Snapshot>;
    /// A JWT-SVID for the entry `entry_id` and `audience`.
    fn jwt<'a>(&'a self, entry_id: &'a str, audience: &'a [String]) -> JwtFuture<'a>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_numbers_are_stable_nonzero_and_distinguish_golden() {
        let a = identity_number("spiffe://e.org/web", false);
        assert_eq!(a, identity_number("spiffe://e.org/web", false));
        assert_ne!(a, identity_number("spiffe://e.org/web", true));
        assert_ne!(a, 0);
        assert!(a < 0x8000_0000);
    }
}
