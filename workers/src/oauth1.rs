//! OAuth 1.0a (RFC 5849) requests: temporary credentials (the request token) and token
//! credentials (the access token), signed with HMAC-SHA1 or PLAINTEXT.
//!
//! The signature covers the `oauth_*` protocol parameters, the URL's query and the form body,
//! percent-encoded with RFC 3986's unreserved set, sorted, and joined into the signature base
//! string (RFC 5849 §3.4.1); the protocol parameters travel in the `Authorization: OAuth …`
//! header. Answers are form-encoded (JSON is accepted too). Errors follow [`TokenError`]: they
//! never carry a secret.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, Utc};
use domain::catalog::SignatureMethod;
use domain::credentials::ClientSecret;
use hmac::{Hmac, KeyInit, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde_json::{Map, Value};
use sha1::Sha1;
use uuid::Uuid;

use crate::provider::{ProviderClient, TokenError, decode_body, error_fields};

/// A signed OAuth 1.0a request (always a POST with a form body).
pub struct Oauth1Request<'a> {
    /// The endpoint, already interpolated; its query is signed too.
    pub url: &'a str,
    /// The client (consumer) key.
    pub consumer_key: &'a str,
    /// The client (consumer) secret.
    pub consumer_secret: &'a ClientSecret,
    /// The request token and its secret, when there is one.
    pub token: Option<(&'a str, &'a str)>,
    /// How to sign.
    pub signature_method: SignatureMethod,
    /// Protocol parameters besides the standard ones (`oauth_callback`, `oauth_verifier`).
    pub oauth_params: Vec<(String, String)>,
    /// Form parameters of the body (`request_params`, `token_params`).
    pub body_params: Vec<(String, String)>,
}

impl fmt::Debug for Oauth1Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Oauth1Request")
            .field("url", &self.url)
            .field("consumer_key", &self.consumer_key)
            .field("signature_method", &self.signature_method)
            .finish_non_exhaustive()
    }
}

/// A signing method this client cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {0} signature method is not supported; use HMAC-SHA1 or PLAINTEXT")]
pub struct UnsupportedSignature(pub &'static str);

/// The name of a signature method as OAuth spells it.
pub fn method_name(method: SignatureMethod) -> &'static str {
    match method {
        SignatureMethod::HmacSha1 => "HMAC-SHA1",
        SignatureMethod::RsaSha1 => "RSA-SHA1",
        SignatureMethod::Plaintext => "PLAINTEXT",
    }
}

/// Whether this client can sign with `method`.
pub fn check_signature_method(method: SignatureMethod) -> Result<(), UnsupportedSignature> {
    match method {
        SignatureMethod::HmacSha1 | SignatureMethod::Plaintext => Ok(()),
        SignatureMethod::RsaSha1 => Err(UnsupportedSignature("RSA-SHA1")),
    }
}

/// What OAuth 1.0a percent-encodes (RFC 5849 §3.6): every byte but RFC 3986's unreserved
/// characters, `ALPHA / DIGIT / "-" / "." / "_" / "~"` (bytes outside ASCII always are).
const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// RFC 3986 percent-encoding of everything but the unreserved characters (RFC 5849 §3.6), with
/// uppercase hex digits.
pub fn percent_encode(text: &str) -> String {
    utf8_percent_encode(text, NOT_UNRESERVED).to_string()
}

/// The signature base string (RFC 5849 §3.4.1) of a request to `url` with these parameters
/// (protocol and body; the URL's query is added here).
pub fn signature_base_string(method: &str, url: &url::Url, params: &[(String, String)]) -> String {
    let mut base_url = url.clone();
    base_url.set_query(None);
    base_url.set_fragment(None);
    let mut encoded: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (percent_encode(&k), percent_encode(&v)))
        .chain(
            params
                .iter()
                .map(|(k, v)| (percent_encode(k), percent_encode(v))),
        )
        .collect();
    encoded.sort();
    let normalized = encoded
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    format!(
        "{}&{}&{}",
        method.to_ascii_uppercase(),
        percent_encode(base_url.as_str()),
        percent_encode(&normalized)
    )
}

/// The `oauth_signature` of a base string.
pub fn sign(
    method: SignatureMethod,
    base_string: &str,
    consumer_secret: &str,
    token_secret: &str,
) -> Result<String, UnsupportedSignature> {
    let key = format!(
        "{}&{}",
        percent_encode(consumer_secret),
        percent_encode(token_secret)
    );
    match method {
        SignatureMethod::HmacSha1 => {
            // HMAC takes a key of any length, so this cannot fail.
            #[allow(clippy::expect_used)]
            let mut mac =
                Hmac::<Sha1>::new_from_slice(key.as_bytes()).expect("HMAC accepts any key length");
            mac.update(base_string.as_bytes());
            Ok(BASE64.encode(mac.finalize().into_bytes()))
        }
        SignatureMethod::Plaintext => Ok(key),
        SignatureMethod::RsaSha1 => Err(UnsupportedSignature("RSA-SHA1")),
    }
}

/// The `Authorization` header of `request`, signed with this nonce and timestamp.
pub fn authorization_header(
    request: &Oauth1Request<'_>,
    nonce: &str,
    timestamp: i64,
) -> Result<String, TokenError> {
    authorization_header_for("POST", request, nonce, timestamp)
}

/// The `Authorization` header of a request to a provider's API (`method` and `request.url`,
/// whose query is signed) with a connection's token credentials. A form body's parameters go
/// in `request.body_params`, decoded, and are signed (RFC 5849 §3.4.1.3.1); a body that is not
/// a form is not signed.
pub fn resource_authorization(
    method: &str,
    request: &Oauth1Request<'_>,
) -> Result<String, TokenError> {
    let nonce = Uuid::new_v4().simple().to_string();
    authorization_header_for(method, request, &nonce, chrono::Utc::now().timestamp())
}

fn authorization_header_for(
    method: &str,
    request: &Oauth1Request<'_>,
    nonce: &str,
    timestamp: i64,
) -> Result<String, TokenError> {
    let url = url::Url::parse(request.url).map_err(|e| TokenError::InvalidUrl(e.to_string()))?;
    let mut oauth: Vec<(String, String)> = vec![
        ("oauth_consumer_key".into(), request.consumer_key.to_owned()),
        ("oauth_nonce".into(), nonce.to_owned()),
        (
            "oauth_signature_method".into(),
            method_name(request.signature_method).to_owned(),
        ),
        ("oauth_timestamp".into(), timestamp.to_string()),
        ("oauth_version".into(), "1.0".into()),
    ];
    if let Some((token, _)) = request.token {
        oauth.push(("oauth_token".into(), token.to_owned()));
    }
    oauth.extend(request.oauth_params.iter().cloned());
    let signed: Vec<(String, String)> = oauth
        .iter()
        .chain(request.body_params.iter())
        .cloned()
        .collect();
    let base = signature_base_string(method, &url, &signed);
    let token_secret = request.token.map_or("", |(_, secret)| secret);
    let signature = sign(
        request.signature_method,
        &base,
        request.consumer_secret.expose(),
        token_secret,
    )
    .map_err(|e| TokenError::InvalidUrl(e.to_string()))?;
    oauth.push(("oauth_signature".into(), signature));
    oauth.sort();
    let fields = oauth
        .iter()
        .map(|(k, v)| format!("{}=\"{}\"", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(format!("OAuth {fields}"))
}

/// The parameters of an `Authorization: OAuth …` header (for servers and tests).
pub fn parse_authorization_header(header: &str) -> Option<Vec<(String, String)>> {
    let rest = header.trim().strip_prefix("OAuth ")?;
    rest.split(',')
        .map(|field| {
            let (key, value) = field.trim().split_once('=')?;
            let value = value.trim().strip_prefix('"')?.strip_suffix('"')?;
            let decode = |s: &str| percent_decode(s);
            Some((decode(key.trim())?, decode(value)?))
        })
        .collect()
}

/// `text` percent-decoded; `None` if a `%` does not start two hex digits (the crate would pass
/// such a `%` through unchanged) or the bytes are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let escapes_are_whole = bytes
        .iter()
        .enumerate()
        .filter(|(_, byte)| **byte == b'%')
        .all(|(at, _)| {
            bytes
                .get(at + 1..at + 3)
                .is_some_and(|digits| digits.iter().all(u8::is_ascii_hexdigit))
        });
    if !escapes_are_whole {
        return None;
    }
    percent_decode_str(text)
        .decode_utf8()
        .ok()
        .map(|decoded| decoded.into_owned())
}

impl ProviderClient {
    /// Sends a signed OAuth 1.0a request and returns the answer's fields. A non-2xx answer, an
    /// answer with `error` or `oauth_problem`, or one without `oauth_token` and
    /// `oauth_token_secret`, is a [`TokenError`].
    #[tracing::instrument(
        name = "provider.oauth1_request",
        skip_all,
        fields(url = %crate::provider::loggable_url(request.url))
    )]
    pub async fn oauth1_request(
        &self,
        request: &Oauth1Request<'_>,
        now: DateTime<Utc>,
    ) -> Result<Map<String, Value>, TokenError> {
        let header = authorization_header(
            request,
            &Uuid::new_v4().simple().to_string(),
            now.timestamp(),
        )?;
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(
                request
                    .body_params
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .finish();
        let answer = self
            .exchange(
                self.http
                    .post(request.url)
                    .header(reqwest::header::AUTHORIZATION, header)
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(body),
            )
            .await?;
        let status = answer.status;
        let body = answer
            .body
            .ok_or_else(|| TokenError::Malformed("the answer is too large".into()))?;
        let fields = decode_body(answer.content_type.as_deref(), &body);
        let refused = |fields: Option<&Map<String, Value>>| {
            let (mut error, description) = fields.map(error_fields).unwrap_or((None, None));
            if error.is_none() {
                error = fields
                    .and_then(|f| f.get("oauth_problem"))
                    .and_then(Value::as_str)
                    .map(str::to_owned);
            }
            TokenError::Refused {
                status,
                error,
                description,
            }
        };
        if !(200..300).contains(&status) {
            return Err(refused(fields.as_ref()));
        }
        let Some(fields) = fields else {
            return Err(TokenError::Malformed(
                "it is neither form-encoded nor a JSON object".into(),
            ));
        };
        if fields.contains_key("error") || fields.contains_key("oauth_problem") {
            return Err(refused(Some(&fields)));
        }
        for name in ["oauth_token", "oauth_token_secret"] {
            if fields
                .get(name)
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(TokenError::Malformed(format!("it has no {name}")));
            }
        }
        Ok(fields)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The worked example of X's (Twitter's) "Creating a signature" documentation.
    #[test]
    fn the_hmac_sha1_signature_matches_the_documented_example() {
        let url = url::Url::parse(
            "https://api.twitter.com/1.1/statuses/update.json?include_entities=true",
        )
        .unwrap();
        let params: Vec<(String, String)> = [
            (
                "status",
                "Hello Ladies + Gentlemen, a signed OAuth request!",
            ),
            ("oauth_consumer_key", "xvz1evFS4wEEPTGEFPHBog"),
            ("oauth_nonce", "kYjzVBB8Y0ZFabxSWbWovY3uYSQ2pTgmZeNu2VS4cg"),
            ("oauth_signature_method", "HMAC-SHA1"),
            ("oauth_timestamp", "1318622958"),
            (
                "oauth_token",
                "370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb",
            ),
            ("oauth_version", "1.0"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let base = signature_base_string("post", &url, &params);
        assert!(base.starts_with(
            "POST&https%3A%2F%2Fapi.twitter.com%2F1.1%2Fstatuses%2Fupdate.json&include_entities%3Dtrue%26oauth_consumer_key%3Dxvz1evFS4wEEPTGEFPHBog"
        ));
        let signature = sign(
            SignatureMethod::HmacSha1,
            &base,
            "kAcSOqF21Fu85e7zjz7ZN2U4ZRhfV3WpwPAoE3Z7kBw",
            "LswwdoUaIvS8ltyTt5jkRh4J50vUPVVHtR2YPi5kE",
        )
        .unwrap();
        assert_eq!(signature, "hCtSmYh+iHYCEqBWrE7C7hYmtUk=");
    }

    #[test]
    fn plaintext_signs_with_the_encoded_secrets() {
        assert_eq!(
            sign(SignatureMethod::Plaintext, "ignored", "c s", "t&s").unwrap(),
            "c%20s&t%26s"
        );
        assert!(sign(SignatureMethod::RsaSha1, "x", "c", "t").is_err());
    }

    #[test]
    fn the_header_round_trips_and_carries_no_secret() {
        let secret = ClientSecret::new("consumer-SECRET");
        let request = Oauth1Request {
            url: "https://example.com/request?x=1",
            consumer_key: "key",
            consumer_secret: &secret,
            token: Some(("tok", "token-SECRET")),
            signature_method: SignatureMethod::HmacSha1,
            oauth_params: vec![(
                "oauth_callback".into(),
                "https://cb.example/a?state=s".into(),
            )],
            body_params: vec![("scope".into(), "read write".into())],
        };
        let header = authorization_header(&request, "nonce", 1_700_000_000).unwrap();
        assert!(!header.contains("SECRET"), "{header}");
        let fields = parse_authorization_header(&header).unwrap();
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("oauth_callback"), Some("https://cb.example/a?state=s"));
        assert_eq!(get("oauth_token"), Some("tok"));
        assert_eq!(get("oauth_signature_method"), Some("HMAC-SHA1"));
        // The server's check: the same base string and keys give the same signature.
        let signed: Vec<(String, String)> = fields
            .iter()
            .filter(|(k, _)| k != "oauth_signature")
            .cloned()
            .chain(request.body_params.iter().cloned())
            .collect();
        let base = signature_base_string("POST", &url::Url::parse(request.url).unwrap(), &signed);
        assert_eq!(
            get("oauth_signature").unwrap(),
            sign(
                SignatureMethod::HmacSha1,
                &base,
                "consumer-SECRET",
                "token-SECRET"
            )
            .unwrap()
        );
        assert!(
            format!("{request:?}").contains("key") && !format!("{request:?}").contains("SECRET")
        );
    }

    #[test]
    fn a_resource_request_signs_its_form_parameters() {
        let secret = ClientSecret::new("consumer-SECRET");
        let request = Oauth1Request {
            url: "https://api.example.com/1/statuses?page=2",
            consumer_key: "key",
            consumer_secret: &secret,
            token: Some(("tok", "token-SECRET")),
            signature_method: SignatureMethod::HmacSha1,
            oauth_params: Vec::new(),
            body_params: vec![("status".into(), "Hello Ladies + Gentlemen".into())],
        };
        let header = resource_authorization("PUT", &request).unwrap();
        let fields = parse_authorization_header(&header).unwrap();
        let signature = fields
            .iter()
            .find(|(k, _)| k == "oauth_signature")
            .map(|(_, v)| v.clone())
            .unwrap();
        let oauth: Vec<(String, String)> = fields
            .iter()
            .filter(|(k, _)| k != "oauth_signature")
            .cloned()
            .collect();
        let url = url::Url::parse(request.url).unwrap();
        let check = |params: &[(String, String)]| {
            let base = signature_base_string("PUT", &url, params);
            sign(
                SignatureMethod::HmacSha1,
                &base,
                "consumer-SECRET",
                "token-SECRET",
            )
            .unwrap()
        };
        let with_body: Vec<_> = oauth.iter().chain(&request.body_params).cloned().collect();
        assert_eq!(check(&with_body), signature, "the form is signed");
        assert_ne!(
            check(&oauth),
            signature,
            "without the form it would not match"
        );
        assert!(
            !fields.iter().any(|(k, _)| k == "status"),
            "not in the header"
        );
    }

    #[test]
    fn percent_encoding_keeps_only_unreserved_characters() {
        assert_eq!(
            percent_encode("Ladies + Gentlemen!~._-"),
            "Ladies%20%2B%20Gentlemen%21~._-"
        );
        assert_eq!(percent_encode("☃"), "%E2%98%83");
        assert_eq!(percent_decode("%E2%98%83").as_deref(), Some("☃"));
    }

    #[test]
    fn a_malformed_escape_makes_a_field_unreadable() {
        assert_eq!(percent_decode("a%2Bb%2fc").as_deref(), Some("a+b/c"));
        for malformed in ["100%", "%4", "%zz", "%%41", "%E2%98", "%+A"] {
            assert_eq!(percent_decode(malformed), None, "{malformed}");
        }
    }
}
