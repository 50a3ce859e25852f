//! OAuth 2.0 client-credentials grants (`OAUTH2_CC`): the token request a connection's own
//! client credentials make, when it is authorized and on every renewal (there is no refresh
//! token; the renewal asks again, through the same fenced refresh as OAuth 2.0).

use chrono::{DateTime, Duration, Utc};
use domain::catalog::{AuthorizationMethod, Template};
use domain::credentials::{ClientSecret, Credentials};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Serialize;
use serde_json::{Map, Value};
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::provider::{ProviderClient, TokenError, TokenRequest, split_scopes};

/// How long a client assertion may be used: long enough for one request, short enough that a
/// copy is worthless soon after.
const ASSERTION_LIFETIME: Duration = Duration::minutes(5);

/// How long a token whose answer names no expiry is taken to live (Nango's assumption too).
const ASSUMED_LIFETIME: Duration = Duration::minutes(55);

/// A connection's client credentials.
#[derive(Clone, Copy)]
pub struct ClientCredentials<'a> {
    pub client_id: &'a str,
    pub client_secret: &'a str,
    pub client_certificate: Option<&'a str>,
    pub client_private_key: Option<&'a str>,
}

/// The scopes a grant asks for: the connection's `oauth_scopes` (comma or space separated)
/// when it has them, else the integration's.
pub fn scopes(
    connection_config: &Map<String, Value>,
    integration_scopes: &[String],
) -> Vec<String> {
    match connection_config
        .get("oauth_scopes")
        .and_then(Value::as_str)
    {
        Some(text) if !text.trim().is_empty() => split_scopes(text),
        _ => integration_scopes.to_vec(),
    }
}

/// Asks `token_url` (the template's, filled) for a token with `client` and returns the
/// credentials to store.
pub async fn fetch(
    provider: &ProviderClient,
    template: &Template,
    token_url: &str,
    scopes: &[String],
    client: ClientCredentials<'_>,
    now: DateTime<Utc>,
) -> Result<Credentials, TokenError> {
    let mut params: Vec<(String, String)> = template
        .token_params
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    params.push(("grant_type".into(), "client_credentials".into()));
    if !scopes.is_empty() {
        params.push(("scope".into(), scopes.join(&template.scope_separator)));
    }
    let secret = ClientSecret::new(client.client_secret);
    let method = client_auth(template, client);
    let assertion = match method {
        AuthorizationMethod::PrivateKeyJwt => Some(assertion(client, token_url, now)?),
        _ => None,
    };
    let token = provider
        .request_token(
            &TokenRequest {
                token_url,
                client_id: client.client_id,
                client_secret: &secret,
                authorization_method: method,
                client_assertion: assertion.as_deref(),
                body_format: template.body_format,
                params,
            },
            now,
        )
        .await?;
    Ok(Credentials::OAuth2Cc {
        token: token.access_token,
        client_id: client.client_id.to_owned(),
        client_secret: client.client_secret.to_owned(),
        client_certificate: client.client_certificate.map(str::to_owned),
        client_private_key: client.client_private_key.map(str::to_owned),
        expires_at: Some(token.expires_at.unwrap_or(now + ASSUMED_LIFETIME)),
        raw: Value::Object(token.raw),
    })
}

/// How the client authenticates at the token endpoint: a signed assertion when the template
/// asks for `private_key_jwt`, or when the client brought a private key and no secret (a key
/// cannot authenticate any other way); else as the template says, with the secret.
pub fn client_auth(template: &Template, client: ClientCredentials<'_>) -> AuthorizationMethod {
    if client.client_secret.is_empty() && client.client_private_key.is_some() {
        AuthorizationMethod::PrivateKeyJwt
    } else {
        template.authorization_method
    }
}

/// The claims of a client assertion (RFC 7523 §3): the client asserts itself (`iss` and `sub`)
/// to this token endpoint (`aud`), once (`jti`), for a few minutes.
#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    jti: String,
    iat: i64,
    nbf: i64,
    exp: i64,
}

/// A private key as PEM, with the algorithm it signs with.
fn signing_key(pem: &str) -> Result<(Algorithm, EncodingKey), TokenError> {
    let bytes = pem.as_bytes();
    if let Ok(key) = EncodingKey::from_rsa_pem(bytes) {
        return Ok((Algorithm::RS256, key));
    }
    if let Ok(key) = EncodingKey::from_ec_pem(bytes) {
        return Ok((Algorithm::ES256, key));
    }
    if let Ok(key) = EncodingKey::from_ed_pem(bytes) {
        return Ok((Algorithm::EdDSA, key));
    }
    Err(TokenError::ClientAuth(
        "client_private_key is not a PEM private key (RSA, EC P-256 or Ed25519)".to_owned(),
    ))
}

/// Checks that `pem` is a private key a client assertion can be signed with (and signs a
/// throwaway one to be sure the key and its algorithm agree).
pub fn check_private_key(pem: &str) -> Result<(), TokenError> {
    let client = ClientCredentials {
        client_id: "check",
        client_secret: "",
        client_certificate: None,
        client_private_key: Some(pem),
    };
    assertion(client, "https://check.invalid/token", Utc::now()).map(drop)
}

/// Checks that `pem` is an X.509 certificate (a client assertion names its thumbprints).
pub fn check_certificate(pem: &str) -> Result<(), TokenError> {
    certificate(pem).map(drop)
}

fn certificate(pem: &str) -> Result<CertificateDer<'static>, TokenError> {
    let refused = || TokenError::ClientAuth("client_certificate is not a PEM certificate".into());
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| refused())?;
    // Base64 between the markers is not enough: the bytes must be an X.509 certificate.
    webpki::EndEntityCert::try_from(&der).map_err(|_| refused())?;
    Ok(der)
}

/// The signed client assertion for `client` at `token_url`. With a certificate, the header
/// names its SHA-1 and SHA-256 thumbprints (`x5t`, `x5t#S256`), which some providers (Microsoft
/// Entra ID) use to find the key.
pub fn assertion(
    client: ClientCredentials<'_>,
    token_url: &str,
    now: DateTime<Utc>,
) -> Result<String, TokenError> {
    let Some(pem) = client.client_private_key else {
        return Err(TokenError::ClientAuth(
            "private_key_jwt needs the connection's client_private_key".to_owned(),
        ));
    };
    let (algorithm, key) = signing_key(pem)?;
    let mut header = Header::new(algorithm);
    if let Some(pem) = client.client_certificate {
        let der = certificate(pem)?;
        header.x5t = Some(base64url(&Sha1::digest(der.as_ref())));
        header.x5t_s256 = Some(base64url(&Sha256::digest(der.as_ref())));
    }
    let claims = AssertionClaims {
        iss: client.client_id,
        sub: client.client_id,
        aud: token_url,
        jti: uuid::Uuid::new_v4().to_string(),
        iat: now.timestamp(),
        nbf: now.timestamp(),
        exp: (now + ASSERTION_LIFETIME).timestamp(),
    };
    jsonwebtoken::encode(&header, &claims, &key).map_err(|_| {
        TokenError::ClientAuth(format!(
            "client_private_key cannot sign with {algorithm:?} (for EC keys, only P-256 is \
             supported)"
        ))
    })
}

fn base64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/api/keys/");

    fn key(name: &str) -> String {
        std::fs::read_to_string(format!("{KEYS}{name}")).unwrap_or_default()
    }

    #[test]
    fn supported_keys_sign_and_others_are_refused() {
        assert!(check_private_key(&key("rsa.key")).is_ok());
        assert!(check_private_key(&key("ec.key")).is_ok());
        assert!(check_private_key(&key("ed25519.key")).is_ok());
        assert!(check_private_key(&key("ec384.key")).is_err(), "P-384");
        assert!(check_private_key("not a key").is_err());
        assert!(check_certificate(&key("rsa.crt")).is_ok());
        assert!(
            check_certificate("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
                .is_err()
        );
    }
}
