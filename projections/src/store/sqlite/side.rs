//! The tables that keep parts of a connection row beside it on SQLite: its tags
//! (`connection_tags`) and its indexed search text (`connection_search`, FTS5 with the trigram
//! tokenizer), each with a shadow twin that a rebuild fills and swaps with the rows.

use domain::store::StoreError;
use rusqlite::{Connection, params};

use super::db;
use crate::model::Row;

/// The table that keeps the tags of the rows of `table`, if its rows have tags.
pub(super) fn tags_table(table: &str) -> Option<&'static str> {
    match table {
        "connections" => Some("connection_tags"),
        "connections_shadow" => Some("connection_tags_shadow"),
        _ => None,
    }
}

/// The full-text table that indexes the `search` text of the rows of `table`, if they have one.
pub(super) fn search_table(table: &str) -> Option<&'static str> {
    match table {
        "connections" => Some("connection_search"),
        "connections_shadow" => Some("connection_search_shadow"),
        _ => None,
    }
}

/// The tables that keep parts of `table`'s rows beside it, which a rebuild empties and swaps
/// with it.
pub(super) fn side_tables(table: &str) -> impl Iterator<Item = &'static str> {
    [tags_table(table), search_table(table)]
        .into_iter()
        .flatten()
}

/// Replaces the tags of `row`'s stream in `tags` with the row's (none once it is deleted).
pub(super) fn write_tags(conn: &Connection, tags: &str, row: &Row) -> Result<(), StoreError> {
    conn.prepare_cached(&format!("DELETE FROM {tags} WHERE stream_id = ?1"))
        .map_err(db)?
        .execute([&row.stream_id])
        .map_err(db)?;
    if row.deleted_at.is_some() {
        return Ok(());
    }
    let mut insert = conn
        .prepare_cached(&format!(
            "INSERT INTO {tags} (stream_id, key, value) VALUES (?1, ?2, ?3)"
        ))
        .map_err(db)?;
    for (key, value) in &row.tags {
        insert.execute([&row.stream_id, key, value]).map_err(db)?;
    }
    Ok(())
}

/// Replaces the indexed search text of `row`'s stream in `search` with the row's (none once it
/// is deleted), under the stream's document number.
pub(super) fn write_search(conn: &Connection, search: &str, row: &Row) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO connection_search_docs (stream_id) VALUES (?1) ON CONFLICT DO NOTHING",
    )
    .map_err(db)?
    .execute([&row.stream_id])
    .map_err(db)?;
    let doc: i64 = conn
        .prepare_cached("SELECT doc FROM connection_search_docs WHERE stream_id = ?1")
        .map_err(db)?
        .query_row([&row.stream_id], |r| r.get(0))
        .map_err(db)?;
    conn.prepare_cached(&format!("DELETE FROM {search} WHERE rowid = ?1"))
        .map_err(db)?
        .execute([doc])
        .map_err(db)?;
    if let (None, Some(text)) = (row.deleted_at, &row.search) {
        conn.prepare_cached(&format!(
            "INSERT INTO {search} (rowid, search) VALUES (?1, ?2)"
        ))
        .map_err(db)?
        .execute(params![doc, text])
        .map_err(db)?;
    }
    Ok(())
}
