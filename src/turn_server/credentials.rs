//! Time-limited TURN credentials, the scheme of coturn's `use-auth-secret`
//! (draft-uberti-behave-turn-rest): the username is
//! `<expiry unix time>:<participant id>` and the password is
//! `base64(HMAC-SHA1(shared secret, username))`. Whoever knows the secret
//! (Confab's embedded server, or an external coturn configured with
//! `static-auth-secret`) can check a credential without any shared state,
//! and a credential stops working at its expiry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ring::hmac;

/// A TURN username and password for one participant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// `<expiry>:<participant id>`.
    pub username: String,
    /// `base64(HMAC-SHA1(secret, username))`.
    pub password: String,
}

/// The password for `username` under `secret`.
pub fn password(secret: &[u8], username: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    base64::engine::general_purpose::STANDARD.encode(hmac::sign(&key, username.as_bytes()))
}

/// A credential for `participant` valid for `ttl` from `now`.
pub fn issue(secret: &[u8], participant: &str, ttl: Duration, now: SystemTime) -> Credential {
    let expiry = unix_secs(now).saturating_add(ttl.as_secs());
    let username = format!("{expiry}:{participant}");
    let password = password(secret, &username);
    Credential { username, password }
}

/// Why a username is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not of the form `<unix time>:<id>`.
    Malformed,
    /// Its expiry has passed.
    Expired,
}

/// Checks the expiry part of `username` against `now`. (The password is
/// checked by the message integrity, which is keyed with it.)
pub fn check_username(username: &str, now: SystemTime) -> Result<(), Refusal> {
    let (expiry, id) = username.split_once(':').ok_or(Refusal::Malformed)?;
    if expiry.is_empty() || id.is_empty() || !expiry.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Refusal::Malformed);
    }
    let expiry: u64 = expiry.parse().map_err(|_| Refusal::Malformed)?;
    if expiry <= unix_secs(now) {
        return Err(Refusal::Expired);
    }
    Ok(())
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_matches_coturn_rest_api_scheme() {
        // Computed independently: printf %s '1700000000:p-1' |
        //   openssl dgst -sha1 -hmac 'north' -binary | base64
        assert_eq!(
            password(b"north", "1700000000:p-1"),
            "4fVfFOXdOyuYBbhpUlx0mS/p6cs="
        );
    }

    #[test]
    fn issued_credentials_expire() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let c = issue(b"secret", "p-42", Duration::from_secs(3600), now);
        assert_eq!(c.username, "1700003600:p-42");
        assert_eq!(c.password, password(b"secret", &c.username));
        assert_ne!(c.password, password(b"other", &c.username));
        assert_eq!(check_username(&c.username, now), Ok(()));
        let later = now + Duration::from_secs(3600);
        assert_eq!(check_username(&c.username, later), Err(Refusal::Expired));
    }

    #[test]
    fn malformed_usernames_are_refused() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        for u in [
            "",
            "p-1",
            ":p-1",
            "2000:",
            "-5:p",
            "+2000:p",
            "20x0:p",
            "99999999999999999999999:p",
        ] {
            assert_eq!(check_username(u, now), Err(Refusal::Malformed), "{u:?}");
        }
    }
}
