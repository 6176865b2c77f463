//! TPMS_ATTEST of a quote, and TPML_PCR_SELECTION.

use super::{HashAlg, Reader, WireError, MAX_DIGEST, MAX_NAME};

const STRUCTURE: &str = "tpms_attest";

/// TPM_GENERATED_VALUE: a restricted signing key signs only data that starts with it and that
/// the TPM itself produced, which is what makes a quote trustworthy.
pub const GENERATED_VALUE: u32 = 0xff54_4347;
/// TPM_ST_ATTEST_QUOTE.
pub const ATTEST_QUOTE: u16 = 0x8018;

/// A TPM has one bank per implemented hash; more than this is not a real TPM.
const MAX_BANKS: u32 = 16;
/// sizeofSelect: 8 bytes select PCRs 0–63, more than any TPM has.
const MAX_SELECT: u8 = 8;

/// A parsed quote (TPMS_ATTEST with TPMS_QUOTE_INFO).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attest {
    /// Qualified name of the signing key.
    pub qualified_signer: Vec<u8>,
    /// The caller's qualifying data: our nonce.
    pub extra_data: Vec<u8>,
    pub clock_info: ClockInfo,
    pub firmware_version: u64,
    pub pcr_select: PcrSelection,
    pub pcr_digest: Vec<u8>,
}

/// TPMS_CLOCK_INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockInfo {
    /// Milliseconds the TPM has been powered since it was manufactured or cleared.
    pub clock: u64,
    /// TPM resets (reboots) so far.
    pub reset_count: u32,
    /// Restarts (resume from hibernation) since the last reset.
    pub restart_count: u32,
    /// Clock has not been set back since it was last reported.
    pub safe: bool,
}

impl Attest {
    /// Parses a TPMS_ATTEST that must be a quote; trailing bytes are an error.
    pub fn parse(input: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(STRUCTURE, input);
        let magic = r.u32("magic")?;
        if magic != GENERATED_VALUE {
            return Err(WireError::WrongMagic { found: magic });
        }
        let attest_type = r.u16("type")?;
        if attest_type != ATTEST_QUOTE {
            return Err(WireError::WrongType { found: attest_type });
        }
        let qualified_signer = r.tpm2b("qualifiedSigner", MAX_NAME)?.to_vec();
        let extra_data = r.tpm2b("extraData", MAX_NAME)?.to_vec();
        let clock = r.u64("clockInfo.clock")?;
        let reset_count = r.u32("clockInfo.resetCount")?;
        let restart_count = r.u32("clockInfo.restartCount")?;
        let safe_at = r.offset();
        let safe = match r.u8("clockInfo.safe")? {
            0 => false,
            1 => true,
            other => return Err(r.invalid("clockInfo.safe", safe_at, other.into())),
        };
        let firmware_version = r.u64("firmwareVersion")?;
        let pcr_select = PcrSelection::read(&mut r)?;
        let pcr_digest = r.tpm2b("quote.pcrDigest", MAX_DIGEST)?.to_vec();
        r.finish()?;
        Ok(Attest {
            qualified_signer,
            extra_data,
            clock_info: ClockInfo { clock, reset_count, restart_count, safe },
            firmware_version,
            pcr_select,
            pcr_digest,
        })
    }
}

/// TPML_PCR_SELECTION: per bank, a bitmap of PCR indices. Banks keep their order, which is
/// the order their values enter the quote's PCR digest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PcrSelection {
    banks: Vec<PcrBank>,
}

/// TPMS_PCR_SELECTION.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcrBank {
    pub hash: HashAlg,
    /// Bytes of bitmap on the wire (kept so marshalling reproduces the input).
    pub size_of_select: u8,
    /// Bit i = PCR i.
    pub bitmap: u64,
}

impl PcrBank {
    pub fn contains(&self, index: u8) -> bool {
        index < 64 && self.bitmap & (1u64 << index) != 0
    }

    /// Selected indices, ascending (the digest order within a bank).
    pub fn pcrs(&self) -> impl Iterator<Item = u8> + '_ {
        (0u8..64).filter(|i| self.contains(*i))
    }
}

impl PcrSelection {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a TPML_PCR_SELECTION on its own; trailing bytes are an error.
    pub fn parse(input: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new("tpml_pcr_selection", input);
        let selection = Self::read(&mut r)?;
        r.finish()?;
        Ok(selection)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let count_at = r.offset();
        let count = r.u32("pcrSelect.count")?;
        if count > MAX_BANKS {
            return Err(r.too_large("pcrSelect.count", count_at, count as usize, MAX_BANKS as usize));
        }
        let mut banks = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let hash = r.hash_alg("pcrSelections.hash")?;
            let size_at = r.offset();
            let size_of_select = r.u8("pcrSelections.sizeofSelect")?;
            if size_of_select > MAX_SELECT {
                return Err(r.too_large(
                    "pcrSelections.sizeofSelect",
                    size_at,
                    size_of_select.into(),
                    MAX_SELECT.into(),
                ));
            }
            let bytes = r.take("pcrSelections.pcrSelect", size_of_select.into())?;
            let bitmap = bytes.iter().enumerate().fold(0u64, |acc, (j, b)| acc | (u64::from(*b) << (8 * j)));
            banks.push(PcrBank { hash, size_of_select, bitmap });
        }
        Ok(PcrSelection { banks })
    }

    pub fn marshal(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.banks.len() * 6);
        out.extend_from_slice(&(self.banks.len() as u32).to_be_bytes());
        for bank in &self.banks {
            out.extend_from_slice(&bank.hash.id().to_be_bytes());
            out.push(bank.size_of_select);
            out.extend_from_slice(&bank.bitmap.to_le_bytes()[..usize::from(bank.size_of_select.min(MAX_SELECT))]);
        }
        out
    }

    /// Adds `index` to the bank of `hash`, appending the bank if it is new. Indices are
    /// limited to 0–63 (a 24-PCR TPM needs 0–23).
    pub fn select(&mut self, hash: HashAlg, index: u8) -> Result<(), WireError> {
        if index >= 8 * MAX_SELECT {
            return Err(WireError::TooLarge {
                structure: "tpml_pcr_selection",
                field: "pcr index",
                offset: 0,
                value: index.into(),
                max: usize::from(8 * MAX_SELECT - 1),
            });
        }
        // A TPM wants at least PCR_SELECT_MIN (3) bytes of bitmap.
        let needed = (index / 8 + 1).max(3);
        match self.banks.iter_mut().find(|b| b.hash == hash) {
            Some(bank) => {
                bank.bitmap |= 1 << index;
                bank.size_of_select = bank.size_of_select.max(needed);
            }
            None => {
                if self.banks.len() >= MAX_BANKS as usize {
                    return Err(WireError::TooLarge {
                        structure: "tpml_pcr_selection",
                        field: "pcrSelect.count",
                        offset: 0,
                        value: self.banks.len() + 1,
                        max: MAX_BANKS as usize,
                    });
                }
                self.banks.push(PcrBank { hash, size_of_select: needed, bitmap: 1 << index });
            }
        }
        Ok(())
    }

    pub fn banks(&self) -> &[PcrBank] {
        &self.banks
    }

    pub fn contains(&self, hash: HashAlg, index: u8) -> bool {
        self.banks.iter().any(|b| b.hash == hash && b.contains(index))
    }

    /// Every selected (bank, index) in digest order: banks in selection order, indices
    /// ascending within a bank.
    pub fn iter(&self) -> impl Iterator<Item = (HashAlg, u8)> + '_ {
        self.banks.iter().flat_map(|b| b.pcrs().map(move |i| (b.hash, i)))
    }

    /// Number of selected PCRs, counting a bank listed twice twice.
    pub fn len(&self) -> usize {
        self.banks.iter().map(|b| b.bitmap.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same (bank, index) pairs, regardless of bank order and bitmap width.
    pub fn same_pcrs(&self, other: &PcrSelection) -> bool {
        let mine: std::collections::BTreeSet<_> = self.iter().collect();
        let theirs: std::collections::BTreeSet<_> = other.iter().collect();
        mine == theirs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_round_trips_and_orders() {
        let mut s = PcrSelection::new();
        s.select(HashAlg::Sha256, 7).unwrap();
        s.select(HashAlg::Sha256, 0).unwrap();
        s.select(HashAlg::Sha1, 23).unwrap();
        let bytes = s.marshal();
        assert_eq!(bytes, [0, 0, 0, 2, 0, 0x0b, 3, 0x81, 0, 0, 0, 0x04, 3, 0, 0, 0x80]);
        let parsed = PcrSelection::parse(&bytes).unwrap();
        assert_eq!(parsed, s);
        assert_eq!(
            parsed.iter().collect::<Vec<_>>(),
            [(HashAlg::Sha256, 0), (HashAlg::Sha256, 7), (HashAlg::Sha1, 23)]
        );
        assert!(s.select(HashAlg::Sha1, 64).is_err());
    }

    #[test]
    fn selection_bounds() {
        assert!(matches!(
            PcrSelection::parse(&[0, 0, 0, 17]),
            Err(WireError::TooLarge { field: "pcrSelect.count", value: 17, .. })
        ));
        assert!(matches!(
            PcrSelection::parse(&[0, 0, 0, 1, 0, 0x0b, 9]),
            Err(WireError::TooLarge { field: "pcrSelections.sizeofSelect", offset: 6, .. })
        ));
        assert!(matches!(
            PcrSelection::parse(&[0, 0, 0, 1, 0, 0x99, 3]),
            Err(WireError::Unsupported { field: "pcrSelections.hash", offset: 4, value: 0x99, .. })
        ));
    }
}
