//! The two HMAC-SHA256 signatures a flow exchanges with the app, both hex:
//! - the app signs a connect request with the HMAC key: `hmac` over
//!   `"<provider_config_key>:<connection_id>"`, checked in constant time
//!   ([`verify_connect_hmac`]);
//! - Grantline signs a success redirect with a key derived from the secret key for that purpose
//!   alone ([`redirect_key`]): `signature` over
//!   `"<connection_id>\n<provider_config_key>\n<timestamp>"` ([`success_signature`]), so the app
//!   can tell it from a forged one. The app's front end may hold the redirect key; it cannot
//!   call the API with it.

use domain::connection::ConnectionKey;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// What the redirect key is derived with.
const REDIRECT_KEY_LABEL: &[u8] = b"grantline redirect signature";

/// The key success redirects are signed with: hex HMAC-SHA256, keyed with the secret key, of
/// `"grantline redirect signature"`. Never the secret key itself, which opens the whole API.
pub fn redirect_key(secret_key: &str) -> String {
    hex::encode(hmac_sha256(secret_key.as_bytes(), REDIRECT_KEY_LABEL))
}

/// The signature of a success redirect: hex HMAC-SHA256, keyed with the [`redirect_key`] (its
/// hex text), of `"<connection_id>\n<provider_config_key>\n<timestamp>"`.
pub fn success_signature(secret_key: &str, connection: &ConnectionKey, timestamp: &str) -> String {
    let message = format!(
        "{}\n{}\n{timestamp}",
        connection.connection_id(),
        connection.provider_config_key()
    );
    hex::encode(hmac_sha256(
        redirect_key(secret_key).as_bytes(),
        message.as_bytes(),
    ))
}

/// Whether `given` is the hex HMAC-SHA256 of `"<provider_config_key>:<connection_id>"` under
/// `key`, compared in constant time.
pub fn verify_connect_hmac(key: &str, connection: &ConnectionKey, given: &str) -> bool {
    let Ok(given) = hex::decode(given.trim()) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key.as_bytes()) else {
        return false;
    };
    mac.update(
        format!(
            "{}:{}",
            connection.provider_config_key(),
            connection.connection_id()
        )
        .as_bytes(),
    );
    mac.verify_slice(&given).is_ok()
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    // HMAC takes a key of any length, so this cannot fail.
    #[allow(clippy::expect_used)]
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_connect_hmac_is_hex_hmac_sha256_of_key_colon_id() {
        let mac = hex::encode(hmac_sha256(b"k", b"github:user-1"));
        let user_1 = ConnectionKey::new("github", "user-1");
        assert!(verify_connect_hmac("k", &user_1, &mac));
        assert!(verify_connect_hmac("k", &user_1, &mac.to_uppercase()));
        assert!(!verify_connect_hmac(
            "k",
            &ConnectionKey::new("github", "user-2"),
            &mac
        ));
        assert!(!verify_connect_hmac("other", &user_1, &mac));
        assert!(!verify_connect_hmac("k", &user_1, "zz"));
        assert!(!verify_connect_hmac("k", &user_1, ""));
    }

    #[test]
    fn the_signature_matches_a_known_vector() {
        // RFC 4231 test case 2: key "Jefe".
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let key = redirect_key("Jefe");
        assert_eq!(
            key,
            hex::encode(hmac_sha256(b"Jefe", b"grantline redirect signature"))
        );
        assert_eq!(
            success_signature(
                "Jefe",
                &ConnectionKey::new("for", "what do ya want "),
                "nothing?"
            ),
            hex::encode(hmac_sha256(
                key.as_bytes(),
                b"what do ya want \nfor\nnothing?"
            ))
        );
    }
}
