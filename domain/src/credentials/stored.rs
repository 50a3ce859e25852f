//! The form [`Credentials`] take inside a sealed value: JSON tagged by `type`, with the Nango
//! API's field names.
//!
//! Every byte of it is stored twice per generation (in the event and in the read model) and
//! grows by a third in base64, so it leaves out what it can give back exactly: absent fields and
//! an empty `raw` are not written, and a token that the provider's answer (`raw`) repeats, as
//! OAuth 2 token responses do, is written once; `raw_copies` names the members of `raw` to
//! restore from the token fields. Earlier values (every field written, `raw` in full) read the
//! same.

use chrono::{DateTime, Utc};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use super::{Credentials, empty_object};

/// The token fields a provider's answer may repeat in `raw`, by the name both use.
const COPYABLE: [&str; 4] = [
    "access_token",
    "refresh_token",
    "oauth_token",
    "oauth_token_secret",
];

impl Credentials {
    /// The token a member of `raw` named `name` would repeat.
    fn copy_source(&self, name: &str) -> Option<&str> {
        match (self, name) {
            (Self::OAuth2 { access_token, .. }, "access_token") => Some(access_token),
            (Self::OAuth2Cc { token, .. }, "access_token") => Some(token),
            (
                Self::OAuth2 {
                    refresh_token: Some(token),
                    ..
                },
                "refresh_token",
            ) => Some(token),
            (Self::OAuth1 { oauth_token, .. }, "oauth_token") => Some(oauth_token),
            (
                Self::OAuth1 {
                    oauth_token_secret, ..
                },
                "oauth_token_secret",
            ) => Some(oauth_token_secret),
            _ => None,
        }
    }

    fn raw_mut(&mut self) -> Option<&mut Value> {
        match self {
            Self::OAuth2 { raw, .. } | Self::OAuth1 { raw, .. } | Self::OAuth2Cc { raw, .. } => {
                Some(raw)
            }
            Self::ApiKey { .. } | Self::Basic { .. } => None,
        }
    }

    /// Puts back the members of `raw` that the stored form named in `raw_copies`.
    fn restore_copies(mut self, names: &[String]) -> Result<Self, String> {
        for name in names {
            let token = self
                .copy_source(name)
                .ok_or_else(|| format!("`raw_copies` names `{name}`, which is not a token here"))?
                .to_owned();
            let Some(Value::Object(members)) = self.raw_mut() else {
                return Err("`raw_copies` with a `raw` that is not an object".to_owned());
            };
            members.insert(name.clone(), Value::String(token));
        }
        Ok(self)
    }
}

/// `raw` without the members that repeat a token.
struct RawWithout<'a> {
    raw: &'a Value,
    copies: &'a [&'static str],
}

impl Serialize for RawWithout<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Value::Object(members) = self.raw else {
            return self.raw.serialize(serializer);
        };
        let mut map = serializer.serialize_map(None)?;
        for (name, value) in members {
            if !self.copies.contains(&name.as_str()) {
                map.serialize_entry(name, value)?;
            }
        }
        map.end()
    }
}

/// What gets written: the fields of the variant, nothing absent.
#[derive(Serialize)]
struct StoredCredentials<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    access_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    oauth_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    oauth_token_secret: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_secret: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_certificate: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_private_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw: Option<RawWithout<'a>>,
    #[serde(skip_serializing_if = "no_copies")]
    raw_copies: &'a [&'static str],
}

fn no_copies(copies: &&[&'static str]) -> bool {
    copies.is_empty()
}

impl Serialize for Credentials {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw = self.raw();
        let mut copies: Vec<&'static str> = Vec::new();
        if let Some(Value::Object(members)) = raw {
            for name in COPYABLE {
                if let (Some(Value::String(copy)), Some(token)) =
                    (members.get(name), self.copy_source(name))
                    && copy == token
                {
                    copies.push(name);
                }
            }
        }
        let raw = raw
            .filter(|raw| match raw {
                Value::Object(members) => members.len() > copies.len(),
                _ => true,
            })
            .map(|raw| RawWithout {
                raw,
                copies: &copies,
            });
        let mut stored = StoredCredentials {
            kind: "",
            access_token: None,
            refresh_token: None,
            expires_at: self.expires_at(),
            oauth_token: None,
            oauth_token_secret: None,
            api_key: None,
            username: None,
            password: None,
            token: None,
            client_id: None,
            client_secret: None,
            client_certificate: None,
            client_private_key: None,
            raw,
            raw_copies: &copies,
        };
        match self {
            Self::OAuth2 {
                access_token,
                refresh_token,
                ..
            } => {
                stored.kind = "OAUTH2";
                stored.access_token = Some(access_token);
                stored.refresh_token = refresh_token.as_deref();
            }
            Self::OAuth1 {
                oauth_token,
                oauth_token_secret,
                ..
            } => {
                stored.kind = "OAUTH1";
                stored.oauth_token = Some(oauth_token);
                stored.oauth_token_secret = Some(oauth_token_secret);
            }
            Self::ApiKey { api_key } => {
                stored.kind = "API_KEY";
                stored.api_key = Some(api_key);
            }
            Self::Basic { username, password } => {
                stored.kind = "BASIC";
                stored.username = Some(username);
                stored.password = Some(password);
            }
            Self::OAuth2Cc {
                token,
                client_id,
                client_secret,
                client_certificate,
                client_private_key,
                ..
            } => {
                stored.kind = "OAUTH2_CC";
                stored.token = Some(token);
                stored.client_id = Some(client_id);
                stored.client_secret = Some(client_secret);
                stored.client_certificate = client_certificate.as_deref();
                stored.client_private_key = client_private_key.as_deref();
            }
        }
        stored.serialize(serializer)
    }
}

/// The stored form read in one pass: serde's internally tagged enums buffer every field before
/// choosing the variant, which showed in the read path's profile.
#[derive(Deserialize)]
pub(super) struct CredentialsFields {
    #[serde(rename = "type")]
    kind: String,
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_at: Option<DateTime<Utc>>,
    raw: Option<Value>,
    oauth_token: Option<String>,
    oauth_token_secret: Option<String>,
    api_key: Option<String>,
    username: Option<String>,
    password: Option<String>,
    token: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    client_certificate: Option<String>,
    client_private_key: Option<String>,
    #[serde(default)]
    raw_copies: Vec<String>,
}

impl TryFrom<CredentialsFields> for Credentials {
    type Error = String;

    fn try_from(f: CredentialsFields) -> Result<Self, String> {
        let missing = |field: &str| format!("missing field `{field}`");
        let credentials = match f.kind.as_str() {
            "OAUTH2" => Self::OAuth2 {
                access_token: f.access_token.ok_or_else(|| missing("access_token"))?,
                refresh_token: f.refresh_token,
                expires_at: f.expires_at,
                raw: f.raw.unwrap_or_else(empty_object),
            },
            "OAUTH1" => Self::OAuth1 {
                oauth_token: f.oauth_token.ok_or_else(|| missing("oauth_token"))?,
                oauth_token_secret: f
                    .oauth_token_secret
                    .ok_or_else(|| missing("oauth_token_secret"))?,
                raw: f.raw.unwrap_or_else(empty_object),
            },
            "API_KEY" => Self::ApiKey {
                api_key: f.api_key.ok_or_else(|| missing("api_key"))?,
            },
            "BASIC" => Self::Basic {
                username: f.username.ok_or_else(|| missing("username"))?,
                password: f.password.ok_or_else(|| missing("password"))?,
            },
            "OAUTH2_CC" => Self::OAuth2Cc {
                token: f.token.ok_or_else(|| missing("token"))?,
                client_id: f.client_id.ok_or_else(|| missing("client_id"))?,
                client_secret: f.client_secret.unwrap_or_default(),
                client_certificate: f.client_certificate,
                client_private_key: f.client_private_key,
                expires_at: f.expires_at,
                raw: f.raw.unwrap_or_else(empty_object),
            },
            other => return Err(format!("unknown credentials type `{other}`")),
        };
        if f.raw_copies.is_empty() {
            Ok(credentials)
        } else {
            credentials.restore_copies(&f.raw_copies)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn oauth2(raw: Value) -> Credentials {
        Credentials::OAuth2 {
            access_token: "gho_ACCESS".to_owned(),
            refresh_token: Some("ghr_REFRESH".to_owned()),
            expires_at: None,
            raw,
        }
    }

    #[test]
    fn a_token_the_raw_answer_repeats_is_written_once_and_read_back_whole() {
        let credentials = oauth2(json!({
            "access_token": "gho_ACCESS", "refresh_token": "ghr_REFRESH",
            "token_type": "bearer", "expires_in": 3600
        }));
        let stored = serde_json::to_string(&credentials).unwrap();
        assert_eq!(stored.matches("gho_ACCESS").count(), 1, "{stored}");
        assert_eq!(stored.matches("ghr_REFRESH").count(), 1, "{stored}");
        assert_eq!(
            serde_json::from_str::<Value>(&stored).unwrap(),
            json!({
                "type": "OAUTH2", "access_token": "gho_ACCESS", "refresh_token": "ghr_REFRESH",
                "raw": { "token_type": "bearer", "expires_in": 3600 },
                "raw_copies": ["access_token", "refresh_token"]
            })
        );
        assert_eq!(
            serde_json::from_str::<Credentials>(&stored).unwrap(),
            credentials
        );
    }

    #[test]
    fn a_raw_member_that_differs_from_the_token_is_kept_as_it_is() {
        for raw in [
            json!({ "access_token": "another" }),
            json!({ "access_token": 7, "refresh_token": null }),
            json!({ "access_token": "gho_ACCESS" }),
            json!({}),
            json!("not an object"),
        ] {
            let credentials = oauth2(raw);
            let stored = serde_json::to_string(&credentials).unwrap();
            assert_eq!(
                serde_json::from_str::<Credentials>(&stored).unwrap(),
                credentials,
                "{stored}"
            );
        }
        let empty = serde_json::to_string(&oauth2(json!({}))).unwrap();
        assert!(!empty.contains("raw"), "{empty}");
        let cc = Credentials::OAuth2Cc {
            token: "TOKEN".to_owned(),
            client_id: "id".to_owned(),
            client_secret: String::new(),
            client_certificate: None,
            client_private_key: None,
            expires_at: None,
            raw: json!({ "access_token": "TOKEN", "scope": "a b" }),
        };
        let stored = serde_json::to_string(&cc).unwrap();
        assert_eq!(stored.matches("TOKEN").count(), 1, "{stored}");
        assert_eq!(serde_json::from_str::<Credentials>(&stored).unwrap(), cc);
    }

    #[test]
    fn the_earlier_form_with_every_field_reads_the_same() {
        let earlier = json!({
            "type": "OAUTH2", "access_token": "gho_ACCESS", "refresh_token": null,
            "expires_at": null, "raw": { "access_token": "gho_ACCESS" }
        });
        assert_eq!(
            serde_json::from_value::<Credentials>(earlier).unwrap(),
            Credentials::OAuth2 {
                access_token: "gho_ACCESS".to_owned(),
                refresh_token: None,
                expires_at: None,
                raw: json!({ "access_token": "gho_ACCESS" }),
            }
        );
    }

    #[test]
    fn copies_named_for_a_token_that_is_not_there_are_refused() {
        let stored = json!({
            "type": "OAUTH2", "access_token": "a", "raw_copies": ["refresh_token"]
        });
        let error = serde_json::from_value::<Credentials>(stored).unwrap_err();
        assert!(error.to_string().contains("raw_copies"), "{error}");
        let stored = json!({ "type": "API_KEY", "api_key": "k", "raw_copies": ["access_token"] });
        assert!(serde_json::from_value::<Credentials>(stored).is_err());
    }
}
