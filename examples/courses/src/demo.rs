//! Course subscriptions, narrated: rules across courses and students, kept by
//! tags and conditional appends while subscriptions race.
//! `cargo run -p cairn-example-courses` runs it on a fresh store, and `cairn
//! demo courses` and `cairn tour` do too.

use std::sync::Arc;

use anyhow::Result;
use cairn_core::{EventStore, Query, ReadAllOptions};
use cairn_domain::RepositoryError;
use cairn_log::EmbeddedStore;

use crate::{COURSES_PER_STUDENT, Courses, Error as CourseError};

/// A numbered step's title, set apart from what the step prints.
fn step(title: &str) {
    println!("\n▸ {title}");
}

/// The walk on a fresh temporary store, with a word before and after.
pub async fn run() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("cairn-demo-").tempdir()?;
    println!(
        "Cairn demo: rules across entities with tags and conditional appends (store in {})",
        dir.path().display()
    );
    walk(Arc::new(EmbeddedStore::open(dir.path())?), 1).await?;
    println!(
        "\nThe code: examples/courses/src/lib.rs (the rules) and examples/courses/src/demo.rs (this walk)."
    );
    Ok(())
}

/// Races subscriptions against the course rules on `store`, numbering steps from `first`.
pub async fn walk(store: Arc<dyn EventStore>, first: usize) -> Result<()> {
    let courses = Courses::new(store.clone());
    let mut n = first;
    let mut next = |title: &str| {
        step(&format!("{n}. {title}"));
        n += 1;
    };
    // Runs `count` subscriptions at once; returns (accepted, refusals, attempts).
    let race = |pairs: Vec<(String, String)>| {
        let courses = courses.clone();
        async move {
            let handles: Vec<_> = pairs
                .into_iter()
                .map(|(student, course)| {
                    let courses = courses.clone();
                    tokio::spawn(async move { courses.subscribe(&student, &course).await })
                })
                .collect();
            let (mut accepted, mut refused, mut attempts) = (0, Vec::new(), 0);
            for h in handles {
                match h.await? {
                    Ok(done) => {
                        accepted += 1;
                        attempts += done.attempts;
                    }
                    Err(RepositoryError::Rejected(e)) => refused.push(e),
                    Err(e) => return Err(anyhow::Error::from(e)),
                }
            }
            anyhow::Ok((accepted, refused, attempts))
        }
    };

    next("Rules that span entities: seats per course, courses per student, no double subscription");
    println!("   a subscription is one event tagged course:<id> and student:<id>; each rule is a");
    println!("   decision model: a tag query plus a fold (see examples/courses)");
    courses.define("cs101", 30).await?;
    println!("   CourseDefined cs101 with 30 seats");

    next("40 students race for cs101's 30 seats, all at once");
    let (accepted, refused, attempts) =
        race((0..40).map(|s| (format!("student-{s}"), "cs101".to_string())).collect()).await?;
    let full = refused.iter().filter(|e| matches!(e, CourseError::CourseFull { .. })).count();
    println!(
        "   {accepted} subscribed, {full} refused (\"course full\"); the course now has {} students",
        courses.course("cs101").await?.students
    );
    println!(
        "   the winners needed {attempts} attempts between them: whenever another subscription landed"
    );
    println!(
        "   between a decision's read and its append, the condition failed and it decided again"
    );

    next(&format!("One student races for 8 electives (the limit is {COURSES_PER_STUDENT})"));
    for c in 0..8 {
        courses.define(&format!("elective-{c}"), 20).await?;
    }
    let (accepted, refused, _) =
        race((0..8).map(|c| ("zoe".to_string(), format!("elective-{c}"))).collect()).await?;
    println!(
        "   {accepted} accepted, {} refused: {}",
        refused.len(),
        refused.first().map(|e| e.to_string()).unwrap_or_default()
    );

    next("The same subscription sent twice at once");
    courses.define("once", 5).await?;
    let (accepted, refused, _) =
        race(vec![("yan".into(), "once".into()), ("yan".into(), "once".into())]).await?;
    println!(
        "   {accepted} accepted, {} refused: {}",
        refused.len(),
        refused.first().map(|e| e.to_string()).unwrap_or_default()
    );

    next("Reading by tag: the events of one student, in global order");
    let events = store.read_query(&Query::tags(["student:zoe"]), ReadAllOptions::forward()).await?;
    for e in &events {
        println!(
            "   [{:>6}] {} {}  tags {}",
            e.position,
            e.stream,
            e.event_type,
            e.tags.join(", ")
        );
    }
    let decided = courses.decider().load(&(crate::CourseModel("cs101".into()),)).await?;
    let after = decided.after.map(|p| p.to_string()).unwrap_or_default();
    println!(
        "   a decision on cs101 now reads {} events, the store's newest at position {after}; its append",
        decided.events_read
    );
    println!(
        "   carries the condition \"fail if an event tagged course:cs101 was appended after {after}\""
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use cairn_domain::EventCodec;

    use super::*;
    use crate::Event;

    #[tokio::test]
    async fn no_race_of_the_walk_breaks_a_rule() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        walk(store.clone(), 1).await.unwrap();
        let codec = EventCodec::<Event>::new();
        let (mut capacity, mut taken) = (HashMap::new(), HashMap::<String, u32>::new());
        let (mut per_student, mut pairs) = (HashMap::<String, usize>::new(), HashSet::new());
        for e in store.read_all(ReadAllOptions::forward()).await.unwrap() {
            match codec.decode(&e) {
                Ok(Event::CourseDefined { course, capacity: c }) => {
                    capacity.insert(course, c);
                }
                Ok(Event::StudentSubscribed { student, course }) => {
                    assert!(pairs.insert((student.clone(), course.clone())), "twice: {student}");
                    *taken.entry(course).or_default() += 1;
                    *per_student.entry(student).or_default() += 1;
                }
                Err(_) => {}
            }
        }
        assert!(!taken.is_empty(), "the walk subscribed nobody");
        for (course, n) in &taken {
            assert!(
                *n <= capacity[course],
                "{course}: {n} students, capacity {}",
                capacity[course]
            );
        }
        assert!(per_student.values().all(|n| *n <= COURSES_PER_STUDENT), "{per_student:?}");
    }
}
