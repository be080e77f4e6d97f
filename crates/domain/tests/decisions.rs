//! Decision models and conditional appends, on the course-subscription rules.

use std::sync::Arc;

use cairn_core::{ExpectedVersion, StoreError};
use cairn_domain::{DecisionModels, DomainEvent, EventCodec};
use cairn_domain::{RepositoryError, RetryPolicy};
use cairn_example_courses::{
    COURSES_PER_STUDENT, CourseModel, Courses, Error, Event, StudentModel,
};

use crate::common::store;

#[tokio::test]
async fn the_rules_hold_one_command_at_a_time() {
    let (store, _dir) = store();
    let courses = Courses::new(store.clone());
    courses.define("cs101", 2).await.unwrap();
    assert_eq!(
        courses.define("cs101", 9).await.unwrap_err().rejection(),
        Some(&Error::CourseExists("cs101".into()))
    );
    courses.subscribe("ada", "cs101").await.unwrap();
    let head = store.head_position().await.unwrap();
    let err = courses.subscribe("ada", "cs101").await.unwrap_err();
    assert_eq!(
        err.rejection(),
        Some(&Error::AlreadySubscribed { student: "ada".into(), course: "cs101".into() })
    );
    assert_eq!(store.head_position().await.unwrap(), head, "a refused command writes nothing");
    courses.subscribe("bob", "cs101").await.unwrap();
    assert_eq!(
        courses.subscribe("cy", "cs101").await.unwrap_err().rejection(),
        Some(&Error::CourseFull { course: "cs101".into(), capacity: 2 })
    );
    assert_eq!(
        courses.subscribe("cy", "nope").await.unwrap_err().rejection(),
        Some(&Error::NoSuchCourse("nope".into()))
    );
    for c in 0..COURSES_PER_STUDENT {
        courses.define(&format!("c{c}"), 10).await.unwrap();
        courses.subscribe("dee", &format!("c{c}")).await.unwrap();
    }
    courses.define("extra", 10).await.unwrap();
    assert_eq!(
        courses.subscribe("dee", "extra").await.unwrap_err().rejection(),
        Some(&Error::StudentAtLimit { student: "dee".into() })
    );
    assert_eq!(courses.course("cs101").await.unwrap().students, 2);
    assert_eq!(courses.courses_of("dee").await.unwrap().len(), COURSES_PER_STUDENT);
}

#[tokio::test]
async fn the_condition_covers_exactly_what_the_decision_read() {
    let (store, _dir) = store();
    let courses = Courses::new(store.clone());
    courses.define("a", 5).await.unwrap();
    courses.define("b", 5).await.unwrap();
    let models = (CourseModel("a".into()), StudentModel("ada".into()));
    let decided = courses.decider().load(&models).await.unwrap();
    assert_eq!(decided.events_read, 1);
    assert_eq!(decided.query.items.len(), 2, "the union of both models' queries");

    // Another course's subscription does not touch this decision...
    courses.subscribe("bob", "b").await.unwrap();
    let codec = EventCodec::<Event>::new();
    let subscribe = |student: &str| {
        codec
            .encode(&Event::StudentSubscribed { student: student.into(), course: "a".into() })
            .unwrap()
    };
    store
        .append_if("course-a", ExpectedVersion::Any, vec![subscribe("ada")], decided.condition())
        .await
        .unwrap();
    // ...but anything it read does: the same decision cannot be applied twice.
    let err = store
        .append_if("course-a", ExpectedVersion::Any, vec![subscribe("eve")], decided.condition())
        .await
        .unwrap_err();
    let StoreError::AppendConditionFailed { first_conflict, .. } = err else { panic!("{err}") };
    let read_again = courses.decider().load(&models).await.unwrap();
    assert_eq!(
        read_again.after,
        Some(first_conflict),
        "the conflict is the subscription of ada to a"
    );
    assert_eq!((read_again.states.0.students, read_again.states.1.len()), (1, 1));
    assert!(models.queries()[1].matches(
        "student-ada",
        "StudentSubscribed",
        &Event::StudentSubscribed { student: "ada".into(), course: "x".into() }.tags()
    ));
}

#[tokio::test]
async fn without_retry_a_concurrent_decision_gets_a_clear_condition_failure() {
    let (store, _dir) = store();
    let courses = Courses::new(store).with_retry(RetryPolicy::none());
    courses.define("c", 100).await.unwrap();
    let mut handles = Vec::new();
    for s in 0..8 {
        let courses = courses.clone();
        handles.push(tokio::spawn(async move { courses.subscribe(&format!("s{s}"), "c").await }));
    }
    let mut failed = 0;
    for h in handles {
        match h.await.unwrap() {
            Ok(_) => {}
            Err(RepositoryError::ConditionFailed { attempts, .. }) => {
                assert_eq!(attempts, 1);
                failed += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(courses.course("c").await.unwrap().students, 8 - failed);
}

/// 32 students race for 30 seats; then one student races for 8 courses; then
/// one student races with herself for one seat. No rule is ever broken.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_subscriptions_never_break_a_rule() {
    let (store, _dir) = store();
    let courses = Courses::new(store).with_retry(RetryPolicy::attempts(100));
    for round in 0..100 {
        let course = format!("full-{round}");
        courses.define(&course, 30).await.unwrap();
        let mut handles = Vec::new();
        for s in 0..32 {
            let (courses, course) = (courses.clone(), course.clone());
            handles.push(tokio::spawn(async move {
                courses.subscribe(&format!("r{round}-s{s}"), &course).await
            }));
        }
        let mut ok = 0;
        for h in handles {
            match h.await.unwrap() {
                Ok(_) => ok += 1,
                Err(e) => assert_eq!(
                    e.rejection(),
                    Some(&Error::CourseFull { course: course.clone(), capacity: 30 }),
                    "round {round}"
                ),
            }
        }
        assert_eq!(ok, 30, "round {round}: exactly the capacity");
        assert_eq!(courses.course(&course).await.unwrap().students, 30);
    }

    let courses_ = Arc::new(courses);
    for c in 0..8 {
        courses_.define(&format!("elective-{c}"), 10).await.unwrap();
    }
    let mut handles = Vec::new();
    for c in 0..8 {
        let courses = courses_.clone();
        handles.push(tokio::spawn(async move {
            courses.subscribe("zoe", &format!("elective-{c}")).await.is_ok()
        }));
    }
    let mut ok = 0;
    for h in handles {
        ok += h.await.unwrap() as usize;
    }
    assert_eq!(ok, COURSES_PER_STUDENT);
    assert_eq!(courses_.courses_of("zoe").await.unwrap().len(), COURSES_PER_STUDENT);

    courses_.define("once", 10).await.unwrap();
    let mut handles = Vec::new();
    for _ in 0..8 {
        let courses = courses_.clone();
        handles.push(tokio::spawn(async move { courses.subscribe("yan", "once").await.is_ok() }));
    }
    let mut ok = 0;
    for h in handles {
        ok += h.await.unwrap() as usize;
    }
    assert_eq!(ok, 1, "no double subscription");
}
