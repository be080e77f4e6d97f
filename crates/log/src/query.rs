//! Query evaluation on the index. Each item becomes a lazy iterator of
//! positions in the requested direction; the items are merged in position
//! order without duplicates, and evaluation stops at the limit.
//!
//! - An item is an AND of constraints: each of its tags (one list), its
//!   types (any of their lists), its categories (any of their lists). It
//!   walks the constraint with the fewest positions within the bounds
//!   (merging its lists) and keeps the positions found, by binary search, in
//!   every other constraint: a tag query walks its rarest tag, a category
//!   with a rare type walks that type.
//! - An empty item merges every type's list: all events of user streams.
//!
//! The conditional append uses the same walk: the first match strictly after
//! the condition's position, looking only at positions past it.

use std::collections::BinaryHeap;

use cairn_core::{Direction, Query, QueryItem, StoreError, stream_category};

use crate::idx::Kind;
use crate::index::{Index, damaged_error};
use crate::record::RecordView;

/// Positions of the events matching `query` with `lo <= position <= hi`, in
/// `direction`, at most `limit` of them.
pub(crate) fn positions(
    index: &Index,
    query: &Query,
    lo: u64,
    hi: u64,
    direction: Direction,
    limit: usize,
) -> Result<Vec<u64>, StoreError> {
    if lo > hi || limit == 0 {
        return Ok(Vec::new());
    }
    let mut items = Vec::with_capacity(query.items.len());
    for item in &query.items {
        items.push(item_positions(index, item, lo, hi, direction)?);
    }
    Ok(Merge::new(items, direction).take(limit).collect())
}

/// The first position after `after` (anywhere if `None`) of an event matching `query`.
pub(crate) fn first_match_after(
    index: &Index,
    query: &Query,
    after: Option<u64>,
) -> Result<Option<u64>, StoreError> {
    let lo = match after {
        None => 0,
        Some(p) => match p.checked_add(1) {
            Some(lo) => lo,
            None => return Ok(None),
        },
    };
    Ok(positions(index, query, lo, u64::MAX, Direction::Forward, 1)?.first().copied())
}

/// Whether a record (of a user stream) matches `query`; for the events of
/// the writer's group, which the index does not hold yet.
pub(crate) fn matches_record(query: &Query, view: &RecordView<'_>) -> bool {
    let category = stream_category(view.stream);
    query.items.iter().any(|item| {
        (item.types.is_empty() || item.types.iter().any(|t| t == view.event_type))
            && (item.categories.is_empty()
                || category.is_some_and(|c| item.categories.iter().any(|k| k == c)))
            && item.tags.iter().all(|tag| view.tags().any(|t| t == tag))
    })
}

type Positions<'a> = Box<dyn Iterator<Item = u64> + 'a>;

/// One term's positions: a sorted slice per index part, the parts in log
/// order, so that together they are one sorted list.
type List<'a> = Vec<&'a [u64]>;

/// The part of a sorted list within `lo..=hi`.
fn window(list: &[u64], lo: u64, hi: u64) -> &[u64] {
    let start = list.partition_point(|p| *p < lo);
    let end = list.partition_point(|p| *p <= hi);
    &list[start..end.max(start)]
}

fn walk<'a>(list: List<'a>, direction: Direction) -> Positions<'a> {
    match direction {
        Direction::Forward => Box::new(list.into_iter().flat_map(|l| l.iter().copied())),
        Direction::Backward => {
            Box::new(list.into_iter().rev().flat_map(|l| l.iter().rev().copied()))
        }
    }
}

fn list_len(list: &List<'_>) -> usize {
    list.iter().map(|l| l.len()).sum()
}

fn contains(list: &List<'_>, p: u64) -> bool {
    let i = list.partition_point(|l| l.last().is_some_and(|last| *last < p));
    list.get(i).is_some_and(|l| l.binary_search(&p).is_ok())
}

/// The positions of term `name` of `kind` within `lo..=hi`, over every part.
fn term_list<'a>(
    index: &'a Index,
    kind: Kind,
    name: &str,
    lo: u64,
    hi: u64,
) -> Result<List<'a>, StoreError> {
    let mut list = Vec::new();
    for part in index.parts_within(lo, hi) {
        let l = window(part.term(kind, name).map_err(|d| damaged_error(&d))?, lo, hi);
        if !l.is_empty() {
            list.push(l);
        }
    }
    Ok(list)
}

fn item_positions<'a>(
    index: &'a Index,
    item: &'a QueryItem,
    lo: u64,
    hi: u64,
    direction: Direction,
) -> Result<Positions<'a>, StoreError> {
    let nothing = || -> Result<Positions<'a>, StoreError> { Ok(Box::new(std::iter::empty())) };
    // Each constraint is a set of lists; a match is in one list of every constraint.
    let mut constraints: Vec<Vec<List<'a>>> = Vec::with_capacity(item.tags.len() + 2);
    for tag in &item.tags {
        let list = term_list(index, Kind::Tag, tag, lo, hi)?;
        if list.is_empty() {
            return nothing(); // no event in the bounds carries it
        }
        constraints.push(vec![list]);
    }
    for (names, kind) in [(&item.types, Kind::Type), (&item.categories, Kind::Category)] {
        if names.is_empty() {
            continue;
        }
        let mut lists = Vec::new();
        for name in names {
            let list = term_list(index, kind, name, lo, hi)?;
            if !list.is_empty() {
                lists.push(list);
            }
        }
        if lists.is_empty() {
            return nothing(); // none of them has an event in the bounds
        }
        constraints.push(lists);
    }
    if constraints.is_empty() {
        // An empty item: every event of a user stream, each in one type list.
        // The lists of one part are merged; the parts follow each other.
        let mut parts: Vec<Positions<'a>> = Vec::new();
        for part in index.parts_within(lo, hi) {
            let lists: Vec<Positions<'a>> = part
                .all_terms(Kind::Type)
                .map_err(|d| damaged_error(&d))?
                .into_iter()
                .map(|l| window(l, lo, hi))
                .filter(|l| !l.is_empty())
                .map(|l| walk(vec![l], direction))
                .collect();
            parts.push(Box::new(Merge::new(lists, direction)));
        }
        if direction == Direction::Backward {
            parts.reverse();
        }
        return Ok(Box::new(parts.into_iter().flatten()));
    }
    // Walk the constraint with the fewest positions, keep what the others hold.
    let size = |c: &Vec<List<'_>>| c.iter().map(list_len).sum::<usize>();
    let smallest = (0..constraints.len())
        .min_by_key(|&i| size(&constraints[i]))
        .expect("at least one constraint");
    let mut driver = constraints.swap_remove(smallest);
    let walked: Positions<'a> = if driver.len() == 1 {
        walk(driver.pop().expect("one list"), direction)
    } else {
        Box::new(Merge::new(driver.into_iter().map(|l| walk(l, direction)).collect(), direction))
    };
    if constraints.is_empty() {
        return Ok(walked);
    }
    Ok(Box::new(
        walked
            .filter(move |p| constraints.iter().all(|lists| lists.iter().any(|l| contains(l, *p)))),
    ))
}

/// Merges sorted position iterators (all in one direction) into one, in
/// that direction, without duplicates.
struct Merge<'a> {
    sources: Vec<Positions<'a>>,
    /// Next position of each source, keyed for a max-heap: the position
    /// itself going backward, its bitwise complement going forward.
    heap: BinaryHeap<(u64, usize)>,
    direction: Direction,
    last: Option<u64>,
}

impl<'a> Merge<'a> {
    fn new(mut sources: Vec<Positions<'a>>, direction: Direction) -> Self {
        let mut heap = BinaryHeap::with_capacity(sources.len());
        for (i, s) in sources.iter_mut().enumerate() {
            if let Some(p) = s.next() {
                heap.push((Self::key(direction, p), i));
            }
        }
        Merge { sources, heap, direction, last: None }
    }

    fn key(direction: Direction, position: u64) -> u64 {
        match direction {
            Direction::Forward => !position,
            Direction::Backward => position,
        }
    }

    fn position_of(&self, key: u64) -> u64 {
        // `key` is its own inverse in both directions.
        Self::key(self.direction, key)
    }
}

impl Iterator for Merge<'_> {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        loop {
            let (key, i) = self.heap.pop()?;
            if let Some(p) = self.sources[i].next() {
                self.heap.push((Self::key(self.direction, p), i));
            }
            let position = self.position_of(key);
            if self.last != Some(position) {
                self.last = Some(position);
                return Some(position);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(lists: &[&[u64]], direction: Direction) -> Vec<u64> {
        let sources = lists.iter().map(|l| walk(vec![*l], direction)).collect();
        Merge::new(sources, direction).collect()
    }

    #[test]
    fn merge_is_ordered_and_without_duplicates() {
        let lists: [&[u64]; 3] = [&[1, 5, 9], &[2, 5, 10], &[]];
        assert_eq!(merged(&lists, Direction::Forward), vec![1, 2, 5, 9, 10]);
        assert_eq!(merged(&lists, Direction::Backward), vec![10, 9, 5, 2, 1]);
        assert_eq!(merged(&[&[0, u64::MAX]], Direction::Forward), vec![0, u64::MAX]);
    }

    #[test]
    fn a_list_over_several_parts_walks_and_finds_in_order() {
        let list: List<'_> = vec![&[1, 3], &[7], &[9, 12]];
        assert_eq!(
            walk(list.clone(), Direction::Forward).collect::<Vec<_>>(),
            vec![1, 3, 7, 9, 12]
        );
        assert_eq!(
            walk(list.clone(), Direction::Backward).collect::<Vec<_>>(),
            vec![12, 9, 7, 3, 1]
        );
        assert!([1, 3, 7, 9, 12].iter().all(|p| contains(&list, *p)));
        assert!(![0, 2, 8, 10, 13].iter().any(|p| contains(&list, *p)));
        assert_eq!(list_len(&list), 5);
    }

    #[test]
    fn window_bounds_are_inclusive() {
        let list = [10, 20, 30, 40];
        assert_eq!(window(&list, 20, 30), &[20, 30]);
        assert_eq!(window(&list, 21, 29), &[] as &[u64]);
        assert_eq!(window(&list, 0, u64::MAX), &list);
    }
}
