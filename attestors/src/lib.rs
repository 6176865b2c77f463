//! Identity vocabulary shared by the agent and the server: SPIFFE IDs, selectors, and the
//! node attestors (agent half and server half side by side).

pub mod hex;
pub mod join_token;
pub mod pem;
mod selector;
mod spiffe_id;
pub mod tpm;

pub use selector::{is_subset, Selector, SelectorError};
pub use spiffe_id::{parse_trust_domain, SpiffeId, SpiffeIdError, MAX_LEN};
