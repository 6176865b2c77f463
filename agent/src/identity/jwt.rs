//! JWT-SVID validation against the trust domain's JWT authorities (and [`jwt_claims`], the
//! unverified claims of a token the server minted). Signatures and the
//! registered claims (`exp`, `aud`) are checked by the `jsonwebtoken` crate; the checks before
//! it exist to say precisely why a token is refused. The JWKS is parsed once per bundle
//! ([`JwtAuthorities::parse`], held in the snapshot), not on every call.

use std::collections::HashMap;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64URL, Engine};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use tether_attestors::SpiffeId;

/// Decodes a compact JWS's claims without verifying it (for cache expiry only).
pub fn jwt_claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    serde_json::from_slice(&B64URL.decode(payload).ok()?).ok()
}

/// The JWT authorities of one trust domain, from its bundle's JWKS.
#[derive(Clone, Default)]
pub struct JwtAuthorities {
    trust_domain: String,
    keys: HashMap<String, DecodingKey>,
}

impl std::fmt::Debug for JwtAuthorities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthorities")
            .field("trust_domain", &self.trust_domain)
            .field("kids", &self.keys.len())
            .finish()
    }
}

impl JwtAuthorities {
    /// The authorities of `jwks`, parsed once: the last JWKS parsed is remembered, and an
    /// unchanged one (every snapshot between bundle changes) is not parsed again.
    pub fn for_bundle(trust_domain: &str, jwks: &[u8]) -> std::sync::Arc<Self> {
        type Memo = Option<(String, Vec<u8>, std::sync::Arc<JwtAuthorities>)>;
        static LAST: std::sync::Mutex<Memo> = std::sync::Mutex::new(None);
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((td, bytes, parsed)) = last.as_ref() {
            if td == trust_domain && bytes == jwks {
                return parsed.clone();
            }
        }
        let parsed = std::sync::Arc::new(Self::parse(trust_domain, jwks));
        *last = Some((trust_domain.to_owned(), jwks.to_vec(), parsed.clone()));
        parsed
    }

    /// The `jwt-svid` keys of a JWKS (P-256 EC keys: what this trust domain signs with). Keys
    /// that are not are left out, with a warning.
    pub fn parse(trust_domain: &str, jwks: &[u8]) -> Self {
        let mut keys = HashMap::new();
        if !jwks.is_empty() {
            match serde_json::from_slice::<jsonwebtoken::jwk::JwkSet>(jwks) {
                Ok(set) => {
                    for jwk in &set.keys {
                        let kid = jwk.common.key_id.clone().unwrap_or_default();
                        let is_svid_key = matches!(
                            &jwk.common.public_key_use,
                            Some(jsonwebtoken::jwk::PublicKeyUse::Other(u)) if u == "jwt-svid"
                        );
                        let p256 = matches!(
                            &jwk.algorithm,
                            jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(ec)
                                if ec.curve == jsonwebtoken::jwk::EllipticCurve::P256
                        );
                        match (is_svid_key && p256 && !kid.is_empty(), DecodingKey::from_jwk(jwk)) {
                            (true, Ok(key)) => {
                                keys.insert(kid, key);
                            }
                            _ => tracing::warn!(kid, "JWT authority left out: not a P-256 jwt-svid key"),
                        }
                    }
                }
                Err(e) => tracing::warn!("the bundle's JWKS does not parse; no JWT-SVID will validate: {e}"),
            }
        }
        JwtAuthorities { trust_domain: trust_domain.to_owned(), keys }
    }

    /// Verifies a JWT-SVID. In order, each with its own reason: a compact JWS of base64url
    /// JSON; a `sub` that is a SPIFFE ID of this trust domain (the agent holds no other trust
    /// domain's bundle); `alg` ES256 (what this trust domain's authorities sign with; `none`
    /// and HMAC never); `typ`, if present, JWT or JOSE; a `kid` of the bundle; then the
    /// signature, the expiry and the audience.
    pub fn validate(&self, token: &str, audience: &str) -> Result<(SpiffeId, serde_json::Value), String> {
        let parts: Vec<&str> = token.split('.').collect();
        let [h, p, _] = parts[..] else { return Err("malformed: not a compact JWS (header.claims.signature)".into()) };
        let json = |what: &str, part: &str| -> Result<serde_json::Value, String> {
            let bytes = B64URL.decode(part).map_err(|_| format!("malformed: the {what} is not base64url"))?;
            serde_json::from_slice(&bytes).map_err(|_| format!("malformed: the {what} is not JSON"))
        };
        let header = json("header", h)?;
        let claims = json("claims", p)?;
        let sub = claims["sub"].as_str().ok_or("malformed: no sub claim")?;
        let sub = SpiffeId::parse(sub).map_err(|e| format!("sub {sub:?} is not a SPIFFE ID: {e}"))?;
        if sub.trust_domain() != self.trust_domain {
            return Err(format!(
                "sub {sub} is of trust domain {}; this agent holds the bundle of trust domain {} only",
                sub.trust_domain(),
                self.trust_domain
            ));
        }
        if header["alg"] != "ES256" {
            return Err(format!("alg {} is not allowed (this trust domain signs JWT-SVIDs with ES256)", header["alg"]));
        }
        if !matches!(header.get("typ").map(|t| t.as_str()), None | Some(Some("JWT" | "JOSE"))) {
            return Err(format!("typ {} is neither JWT nor JOSE", header["typ"]));
        }
        let kid = header["kid"].as_str().ok_or("no kid in the header")?;
        let key =
            self.keys.get(kid).ok_or_else(|| format!("unknown kid {kid:?}: no JWT authority of the bundle has it"))?;

        let mut validation = Validation::new(Algorithm::ES256);
        validation.leeway = 0;
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(token, key, &validation).map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => "signature does not verify".to_string(),
            ErrorKind::ExpiredSignature => format!("token expired at {} (unix time)", claims["exp"]),
            ErrorKind::InvalidAudience => {
                format!("audience {audience:?} is not in the token's aud {}", claims["aud"])
            }
            ErrorKind::MissingRequiredClaim(c) => format!("malformed: no {c} claim"),
            other => format!("refused: {other:?}"),
        })?;
        Ok((sub, data.claims))
    }
}
