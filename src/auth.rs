//! Join tokens: HS256 JWTs that admit one identity to one room.
//!
//! The algorithm is pinned: the header is read before the signature is
//! checked and anything but `HS256` (including `none`) is refused with its
//! own error, so a token can never choose how it is verified.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::signaling::protocol::ErrorCode;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    /// May join the room at all (a token with `join: false` is refused
    /// with `token_no_join`, e.g. one minted for another purpose).
    #[serde(default = "yes")]
    pub join: bool,
    /// May send media.
    #[serde(default = "yes")]
    pub publish: bool,
    /// May receive media.
    #[serde(default = "yes")]
    pub subscribe: bool,
}

fn yes() -> bool {
    true
}

impl Default for Grants {
    fn default() -> Self {
        Grants {
            join: true,
            publish: true,
            subscribe: true,
        }
    }
}

/// The claims of a join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Identity: one live socket per identity and room.
    pub sub: String,
    /// The room the token admits to.
    pub room: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Not before, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Display name overriding the one in `join`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What the holder may do.
    #[serde(default)]
    pub grants: Grants,
}

/// Why a token was refused; maps one-to-one onto protocol error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Malformed, or the signature does not verify.
    Invalid,
    /// Not HS256.
    Algorithm,
    /// Expired, or not yet valid.
    Expired,
    /// Issued for another room.
    WrongRoom,
    /// Valid, but without the join grant.
    NoJoinGrant,
}

impl TokenError {
    /// The protocol error code.
    pub fn code(self) -> ErrorCode {
        match self {
            TokenError::Invalid => ErrorCode::TokenInvalid,
            TokenError::Algorithm => ErrorCode::TokenAlgorithm,
            TokenError::Expired => ErrorCode::TokenExpired,
            TokenError::WrongRoom => ErrorCode::TokenWrongRoom,
            TokenError::NoJoinGrant => ErrorCode::TokenNoJoin,
        }
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs a token for `identity` in `room`, valid for `ttl_secs`.
pub fn issue(
    secret: &str,
    room: &str,
    identity: &str,
    name: Option<&str>,
    ttl_secs: u64,
    grants: Grants,
) -> String {
    let claims = Claims {
        sub: identity.to_owned(),
        room: room.to_owned(),
        exp: now_secs() + ttl_secs,
        nbf: None,
        name: name.map(str::to_owned),
        grants,
    };
    encode_claims(secret, &claims)
}

/// Signs arbitrary claims with HS256 (also used by tests for edge cases).
pub fn encode_claims(secret: &str, claims: &Claims) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding of plain claims cannot fail")
}

/// Checks `token` and that it admits to `room`.
pub fn verify(secret: &str, token: &str, room: &str) -> Result<Claims, TokenError> {
    // Read the algorithm ourselves: jsonwebtoken cannot even parse a header
    // naming `none`, and we want to tell that case apart.
    let header_b64 = token.split('.').next().ok_or(TokenError::Invalid)?;
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| TokenError::Invalid)?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|_| TokenError::Invalid)?;
    match header.get("alg").and_then(|a| a.as_str()) {
        Some("HS256") => {}
        Some(_) => return Err(TokenError::Algorithm),
        None => return Err(TokenError::Invalid),
    }

    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 0;
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp", "sub"]);
    let data = jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .map_err(|e| match e.kind() {
        ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => TokenError::Expired,
        ErrorKind::InvalidAlgorithm => TokenError::Algorithm,
        _ => TokenError::Invalid,
    })?;
    if data.claims.room != room {
        return Err(TokenError::WrongRoom);
    }
    if !data.claims.grants.join {
        return Err(TokenError::NoJoinGrant);
    }
    Ok(data.claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123";

    #[test]
    fn round_trip_and_rejections() {
        let t = issue(SECRET, "r1", "ada", None, 60, Grants::default());
        let c = verify(SECRET, &t, "r1").unwrap();
        assert_eq!(c.sub, "ada");
        assert!(c.grants.publish && c.grants.subscribe);
        assert_eq!(verify(SECRET, &t, "r2"), Err(TokenError::WrongRoom));
        assert_eq!(
            verify("another-secret-of-length", &t, "r1"),
            Err(TokenError::Invalid)
        );
        assert_eq!(verify(SECRET, "garbage", "r1"), Err(TokenError::Invalid));
        assert_eq!(verify(SECRET, "", "r1"), Err(TokenError::Invalid));

        let expired = Claims {
            exp: now_secs() - 10,
            ..c.clone()
        };
        assert_eq!(
            verify(SECRET, &encode_claims(SECRET, &expired), "r1"),
            Err(TokenError::Expired)
        );
        let future = Claims {
            nbf: Some(now_secs() + 600),
            ..c.clone()
        };
        assert_eq!(
            verify(SECRET, &encode_claims(SECRET, &future), "r1"),
            Err(TokenError::Expired)
        );
        let no_join = Claims {
            grants: Grants {
                join: false,
                ..Grants::default()
            },
            ..c
        };
        assert_eq!(
            verify(SECRET, &encode_claims(SECRET, &no_join), "r1"),
            Err(TokenError::NoJoinGrant)
        );
        // Tokens without the field (older ones) may join.
        let claims: Claims =
            serde_json::from_str(r#"{"sub":"x","room":"r1","exp":1,"grants":{"publish":false}}"#)
                .unwrap();
        assert!(claims.grants.join && !claims.grants.publish && claims.grants.subscribe);
    }

    #[test]
    fn alg_none_and_others_are_refused() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let claims = format!(r#"{{"sub":"x","room":"r1","exp":{}}}"#, now_secs() + 60);
        let none = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&claims));
        assert_eq!(verify(SECRET, &none, "r1"), Err(TokenError::Algorithm));
        let hs512 = format!("{}.{}.AAAA", b64(r#"{"alg":"HS512"}"#), b64(&claims));
        assert_eq!(verify(SECRET, &hs512, "r1"), Err(TokenError::Algorithm));
    }
}
