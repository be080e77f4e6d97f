//! Queries (types, tags, categories) as SQL. The text is built from the
//! query's shape only; every value travels in three array parameters
//! (types, tags, categories) that the items address by slices, so no user
//! text is ever part of the SQL.

use cairn_core::Query;

/// A query's `WHERE` condition on `cairn_events e` and its three arrays,
/// which the SQL names `$<first>`, `$<first+1>` and `$<first+2>`.
pub(crate) struct QuerySql {
    pub condition: String,
    pub types: Vec<String>,
    pub tags: Vec<String>,
    pub categories: Vec<String>,
}

impl QuerySql {
    pub(crate) fn new(query: &Query, first: usize) -> Self {
        let (tp, gp, cp) = (first, first + 1, first + 2);
        let mut out = QuerySql {
            condition: String::new(),
            types: Vec::new(),
            tags: Vec::new(),
            categories: Vec::new(),
        };
        let mut items = Vec::with_capacity(query.items.len());
        for item in &query.items {
            let mut parts = Vec::new();
            if !item.types.is_empty() {
                parts.push(format!(
                    "e.event_type = ANY((${tp}::text[])[{}:{}])",
                    out.types.len() + 1,
                    out.types.len() + item.types.len()
                ));
                out.types.extend(item.types.iter().cloned());
            }
            if !item.tags.is_empty() {
                parts.push(format!(
                    "e.tags <> '{{}}' AND e.tags @> (${gp}::text[])[{}:{}]",
                    out.tags.len() + 1,
                    out.tags.len() + item.tags.len()
                ));
                out.tags.extend(item.tags.iter().cloned());
            }
            if !item.categories.is_empty() {
                parts.push(format!(
                    "e.category = ANY((${cp}::text[])[{}:{}])",
                    out.categories.len() + 1,
                    out.categories.len() + item.categories.len()
                ));
                out.categories.extend(item.categories.iter().cloned());
            }
            items.push(if parts.is_empty() { "true".to_string() } else { parts.join(" AND ") });
        }
        // Every parameter appears typed, even when no item uses it.
        out.condition = format!(
            "NOT e.sys AND (({})) AND ${tp}::text[] IS NOT NULL AND ${gp}::text[] IS NOT NULL AND ${cp}::text[] IS NOT NULL",
            items.join(") OR (")
        );
        out
    }
}

/// The SQL that an append condition runs inside `cairn_append`: the first
/// matching event after `$4` (all of them when `$4` is null).
pub(crate) fn condition_sql(query: &Query) -> QuerySql {
    let mut q = QuerySql::new(query, 1);
    q.condition = format!(
        "SELECT e.position FROM cairn_events e WHERE ($4::bigint IS NULL OR e.position > $4::bigint) AND {} ORDER BY e.position LIMIT 1",
        q.condition
    );
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_core::QueryItem;

    #[test]
    fn items_address_their_own_slices() {
        let q = Query::tags(["a", "b"])
            .or(QueryItem::types(["T", "U"]).with_categories(["order"]))
            .or(QueryItem::any());
        let sql = QuerySql::new(&q, 1);
        assert_eq!(
            sql.condition,
            "NOT e.sys AND ((e.tags <> '{}' AND e.tags @> ($2::text[])[1:2]) OR (e.event_type = ANY(($1::text[])[1:2]) AND e.category = ANY(($3::text[])[1:1])) OR (true)) \
             AND $1::text[] IS NOT NULL AND $2::text[] IS NOT NULL AND $3::text[] IS NOT NULL"
        );
        assert_eq!(
            (sql.types, sql.tags, sql.categories),
            (vec!["T".into(), "U".into()], vec!["a".into(), "b".into()], vec!["order".into()])
        );
        let text = "x') OR true; DROP TABLE cairn_events; --";
        let sql = QuerySql::new(&Query::types([text]), 5);
        assert!(
            !sql.condition.contains("DROP"),
            "values never reach the SQL text: {}",
            sql.condition
        );
        assert!(sql.condition.contains("($5::text[])[1:1]"));
    }
}
