//! TPM 2.0 node attestation. The verifier half (`wire`, `credential`, `verify`, and `binding`,
//! which both halves use) is pure Rust and needs no TPM; the device half (`device`, feature `tpm`) is the only code that touches
//! tss-esapi.

pub mod binding;
pub mod credential;
#[cfg(feature = "tpm")]
pub mod device;
pub mod verify;
pub mod wire;
