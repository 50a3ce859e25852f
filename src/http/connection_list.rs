//! `GET /connection` and `GET /connections`: the connection list, filtered and paged as Nango's
//! is (README, "Listing connections").

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{MatchedPath, State};
use domain::connect_session::{self, EndUser};
use projections::queries::{ConnectionFilter, ConnectionSummary};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::ApiError;
use super::connection::timestamp;
use super::extract::{ApiQuery, identifier, in_query};
use crate::connections;
use crate::state::AppState;

/// The most a page holds when the caller says how many.
const MAX_LIMIT: u32 = 2000;
/// The most integrations one `integrationId` may list.
const MAX_INTEGRATIONS: usize = 100;

/// `GET /connection…`: the connections, without credentials.
#[derive(Serialize, ToSchema)]
pub struct ConnectionList {
    connections: Vec<ListItem>,
}

/// One connection of the list.
#[derive(Serialize, ToSchema)]
pub struct ListItem {
    /// Internal id.
    id: i64,
    connection_id: String,
    provider_config_key: String,
    /// The provider (template); on the seed's `/connection` route, the provider config key, as
    /// the seed's clients read it.
    provider: String,
    /// The connection's active errors: `{"type": "auth", "log_id"}` while its refresh fails
    /// (`log_id` is the history version of the connection's state).
    #[schema(value_type = Vec<Object>)]
    errors: Vec<Value>,
    #[schema(value_type = Option<Object>)]
    end_user: Option<EndUserItem>,
    #[schema(value_type = Object)]
    tags: BTreeMap<String, String>,
    #[schema(value_type = Option<Object>)]
    metadata: Option<Map<String, Value>>,
    /// Creation time, e.g. `2023-03-08T09:43:03.725Z`.
    #[schema(format = DateTime)]
    created: String,
}

/// The end user as a list item shows it: every field present, `null` when unknown.
#[derive(Serialize)]
pub(super) struct EndUserItem {
    id: String,
    display_name: Option<String>,
    email: Option<String>,
    tags: Option<Value>,
    organization: Option<OrganizationItem>,
}

#[derive(Serialize)]
struct OrganizationItem {
    id: String,
    display_name: Option<String>,
}

impl From<EndUser> for EndUserItem {
    fn from(user: EndUser) -> Self {
        Self {
            id: user.id,
            display_name: user.display_name,
            email: user.email,
            tags: None,
            organization: user.organization.map(|o| OrganizationItem {
                id: o.id,
                display_name: o.display_name,
            }),
        }
    }
}

/// `GET /connection[s]`: live connections, newest first, filtered and paged.
///
/// Never refreshes a token. Unknown parameters are refused, as Nango's list does.
#[utoipa::path(
    get,
    path = "/connection",
    tag = "connections",
    params(
        ("connectionId" = Option<String>, Query, description = "Only connections with exactly this id (of any integration)"),
        ("search" = Option<String>, Query, description = "A case-insensitive substring of the connection id, the end user's display name or e-mail"),
        ("endUserId" = Option<String>, Query, description = "Only the connections of this end user"),
        ("endUserOrganizationId" = Option<String>, Query, description = "Only the connections of end users of this organization"),
        ("integrationId" = Option<String>, Query, description = "Only the connections of these integrations (comma-separated keys)"),
        ("tags[key]" = Option<String>, Query, description = "`tags[key]=value`, any number of times: only connections with all these tags"),
        ("limit" = Option<u32>, Query, description = "At most this many (1–2000; 10,000 when absent)"),
        ("page" = Option<u64>, Query, description = "Which page of `limit` connections, from 0"),
    ),
    responses(
        (status = 200, description = "The connections, without credentials", body = ConnectionList),
        (status = 400, description = "An unknown or invalid parameter (`invalid_query_params`)", body = super::error::ErrorBody),
    ),
)]
pub async fn list_connections(
    State(state): State<AppState>,
    path: MatchedPath,
    ApiQuery(query): ApiQuery<Vec<(String, String)>>,
) -> Result<Json<ConnectionList>, ApiError> {
    let filter = filter(query)?;
    // The seed's route names the provider config key `provider`.
    let seed_route = path.as_str() == "/connection";
    let connections = connections::list(&state, &filter)
        .await?
        .into_iter()
        .map(|c| item(c, seed_route))
        .collect();
    Ok(Json(ConnectionList { connections }))
}

/// A connection's active errors as Nango lists them: one `auth` error while its refresh fails
/// (`log_id` names the history version of the state).
pub(super) fn auth_errors(failing: bool, version: u32) -> Vec<Value> {
    if failing {
        vec![serde_json::json!({"type": "auth", "log_id": version.to_string()})]
    } else {
        Vec::new()
    }
}

fn item(c: ConnectionSummary, seed_route: bool) -> ListItem {
    let errors = auth_errors(
        matches!(c.refresh_state.as_str(), "failed" | "retrying"),
        c.version,
    );
    ListItem {
        id: c.id,
        provider: if seed_route {
            c.provider_config_key.clone()
        } else {
            c.provider
        },
        connection_id: c.connection_id,
        provider_config_key: c.provider_config_key,
        errors,
        end_user: c.ownership.end_user.map(EndUserItem::from),
        tags: c.ownership.tags,
        metadata: c.metadata,
        created: timestamp(c.created_at),
    }
}

/// The filter the query's pairs ask for; each parameter at most once (a tag key once).
fn filter(pairs: Vec<(String, String)>) -> Result<ConnectionFilter, ApiError> {
    let invalid = |message: String| ApiError::InvalidQuery(message);
    let mut filter = ConnectionFilter::default();
    let mut seen = Vec::new();
    let mut tags = BTreeMap::new();
    for (name, value) in pairs {
        if let Some(key) = name.strip_prefix("tags[").and_then(|k| k.strip_suffix(']')) {
            if tags.insert(key.to_owned(), value).is_some() {
                return Err(invalid(format!("tags[{key}] is given twice")));
            }
            continue;
        }
        if seen.contains(&name) {
            return Err(invalid(format!("{name} is given twice")));
        }
        let text = |what: &str| -> Result<Option<String>, ApiError> {
            if value.is_empty() {
                return Ok(None);
            }
            identifier(&value, what).map_err(in_query)?;
            Ok(Some(value.clone()))
        };
        match name.as_str() {
            "connectionId" => filter.connection_id = text("connectionId")?,
            "search" => filter.search = text("search")?.map(|s| s.to_lowercase()),
            "endUserId" => filter.end_user_id = text("endUserId")?,
            "endUserOrganizationId" => filter.end_user_org_id = text("endUserOrganizationId")?,
            "integrationId" => filter.integrations = integrations(&value)?,
            "limit" => filter.limit = number(&value, "limit", 1, MAX_LIMIT.into())? as u32,
            "page" => filter.offset = number(&value, "page", 0, u64::MAX)?,
            other => {
                return Err(invalid(format!(
                    "unknown parameter {other:?}: the list takes connectionId, search, \
                     endUserId, endUserOrganizationId, integrationId, tags[key], limit and page"
                )));
            }
        }
        seen.push(name);
    }
    // `page` counts pages of `limit` connections.
    filter.offset = filter.offset.saturating_mul(filter.limit.into());
    filter.tags = connect_session::check_tags(&tags).map_err(|e| invalid(e.to_string()))?;
    Ok(filter)
}

/// The integration keys of a comma-separated list (empty entries skipped).
fn integrations(value: &str) -> Result<Vec<String>, ApiError> {
    let keys: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect();
    if keys.len() > MAX_INTEGRATIONS {
        return Err(ApiError::InvalidQuery(format!(
            "integrationId lists at most {MAX_INTEGRATIONS} integrations"
        )));
    }
    for key in &keys {
        identifier(key, "integrationId").map_err(in_query)?;
    }
    Ok(keys)
}

/// A whole number from `min` to `max`.
fn number(value: &str, what: &str, min: u64, max: u64) -> Result<u64, ApiError> {
    value
        .parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            ApiError::InvalidQuery(format!("{what} must be a whole number from {min} to {max}"))
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pairs(query: &str) -> Vec<(String, String)> {
        url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect()
    }

    #[test]
    fn the_filter_reads_every_parameter() {
        let f = filter(pairs(
            "connectionId=c1&search=Ab%25&endUserId=u1&endUserOrganizationId=o1\
             &integrationId=github,%20slack,&tags[Team]=core&limit=20&page=3",
        ))
        .unwrap();
        assert_eq!(f.connection_id.as_deref(), Some("c1"));
        assert_eq!(f.search.as_deref(), Some("ab%"));
        assert_eq!(f.end_user_id.as_deref(), Some("u1"));
        assert_eq!(f.end_user_org_id.as_deref(), Some("o1"));
        assert_eq!(f.integrations, ["github", "slack"]);
        assert_eq!(f.tags, BTreeMap::from([("team".into(), "core".into())]));
        assert_eq!((f.limit, f.offset), (20, 60));
        let none = filter(Vec::new()).unwrap();
        assert_eq!((none.limit, none.offset), (10_000, 0));
    }

    #[test]
    fn bad_parameters_are_refused() {
        for query in [
            "limit=0",
            "limit=2001",
            "limit=5000",
            "limit=-1",
            "limit=ten",
            "page=-1",
            "page=1.5",
            "unknown=1",
            "limit=5&limit=6",
            "tags[a]=1&tags[a]=2",
            "tags[1bad]=x",
            "tags[end_user_email]=not-an-email",
            "tags[a]=",
            "tags[a]=1&tags[b]=2&tags[c]=3&tags[d]=4&tags[e]=5&tags[f]=6&tags[g]=7&tags[h]=8\
             &tags[i]=9&tags[j]=10&tags[k]=11",
            "search=a%0Ab",
        ] {
            let e = filter(pairs(query)).unwrap_err();
            assert!(matches!(e, ApiError::InvalidQuery(_)), "{query}: {e:?}");
        }
        let long = format!("connectionId={}", "x".repeat(256));
        assert!(filter(pairs(&long)).is_err());
    }
}
