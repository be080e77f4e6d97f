//! Course subscriptions, the classic case for Dynamic Consistency Boundaries:
//! a course has at most `capacity` students, a student takes at most
//! [`COURSES_PER_STUDENT`] courses, and nobody subscribes to a course twice.
//!
//! The rules span two entities, so neither a course stream nor a student
//! stream can guard them alone. Here each rule is a decision model over tagged
//! events (`course:<id>`, `student:<id>`), and the subscription is appended on
//! the condition that none of the events the decision read has changed.

pub mod demo;

use std::sync::Arc;

use cairn_core::{EventStore, Query, QueryItem};
use cairn_domain::{
    CommandContext, Decider, DecisionModel, DecisionOutcome, DomainEvent, RepositoryError,
    RetryPolicy,
};
use serde::{Deserialize, Serialize};

/// The most courses one student may take.
pub const COURSES_PER_STUDENT: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    CourseDefined { course: String, capacity: u32 },
    StudentSubscribed { student: String, course: String },
}

impl DomainEvent for Event {
    fn tags(&self) -> Vec<String> {
        match self {
            Event::CourseDefined { course, .. } => vec![course_tag(course)],
            Event::StudentSubscribed { student, course } => {
                vec![course_tag(course), student_tag(student)]
            }
        }
    }
}

pub fn course_tag(course: &str) -> String {
    format!("course:{course}")
}

pub fn student_tag(student: &str) -> String {
    format!("student:{student}")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("course {0} already exists")]
    CourseExists(String),
    #[error("course {0} does not exist")]
    NoSuchCourse(String),
    #[error("course {course} is full ({capacity} students)")]
    CourseFull { course: String, capacity: u32 },
    #[error("student {student} already takes {COURSES_PER_STUDENT} courses")]
    StudentAtLimit { student: String },
    #[error("student {student} already takes course {course}")]
    AlreadySubscribed { student: String, course: String },
}

/// What the rules need to know of one course.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Course {
    pub capacity: Option<u32>,
    pub students: u32,
}

/// Decision model: the course's definition and its subscriptions.
pub struct CourseModel(pub String);

impl DecisionModel<Event> for CourseModel {
    type State = Course;
    fn query(&self) -> Query {
        QueryItem::types(["CourseDefined", "StudentSubscribed"])
            .with_tags([course_tag(&self.0)])
            .into()
    }
    fn initial_state(&self) -> Course {
        Course::default()
    }
    fn evolve(&self, mut state: Course, event: &Event) -> Course {
        match event {
            Event::CourseDefined { capacity, .. } => state.capacity = Some(*capacity),
            Event::StudentSubscribed { .. } => state.students += 1,
        }
        state
    }
}

/// Decision model: the courses one student takes.
pub struct StudentModel(pub String);

impl DecisionModel<Event> for StudentModel {
    type State = Vec<String>;
    fn query(&self) -> Query {
        QueryItem::types(["StudentSubscribed"]).with_tags([student_tag(&self.0)]).into()
    }
    fn initial_state(&self) -> Vec<String> {
        Vec::new()
    }
    fn evolve(&self, mut courses: Vec<String>, event: &Event) -> Vec<String> {
        if let Event::StudentSubscribed { course, .. } = event {
            courses.push(course.clone());
        }
        courses
    }
}

/// The course catalogue's commands.
#[derive(Clone)]
pub struct Courses {
    decider: Decider<Event>,
}

impl Courses {
    /// Commands that retry a failed condition on fresh state, up to 50 times.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Courses { decider: Decider::new(store).with_retry(RetryPolicy::attempts(50)) }
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.decider = self.decider.with_retry(retry);
        self
    }

    pub fn decider(&self) -> &Decider<Event> {
        &self.decider
    }

    pub async fn define(
        &self,
        course: &str,
        capacity: u32,
    ) -> Result<DecisionOutcome<Event>, RepositoryError<Error>> {
        let models = (CourseModel(course.to_string()),);
        self.decider
            .execute(&models, &format!("course-{course}"), &CommandContext::new(), |(existing,)| {
                if existing.capacity.is_some() {
                    return Err(Error::CourseExists(course.to_string()));
                }
                Ok(vec![Event::CourseDefined { course: course.to_string(), capacity }])
            })
            .await
    }

    /// Subscribes `student` to `course` if every rule allows it.
    pub async fn subscribe(
        &self,
        student: &str,
        course: &str,
    ) -> Result<DecisionOutcome<Event>, RepositoryError<Error>> {
        let models = (CourseModel(course.to_string()), StudentModel(student.to_string()));
        self.decider
            .execute(
                &models,
                &format!("course-{course}"),
                &CommandContext::new(),
                |(state, taken)| {
                    let Some(capacity) = state.capacity else {
                        return Err(Error::NoSuchCourse(course.to_string()));
                    };
                    if taken.iter().any(|c| c == course) {
                        return Err(Error::AlreadySubscribed {
                            student: student.to_string(),
                            course: course.to_string(),
                        });
                    }
                    if state.students >= capacity {
                        return Err(Error::CourseFull { course: course.to_string(), capacity });
                    }
                    if taken.len() >= COURSES_PER_STUDENT {
                        return Err(Error::StudentAtLimit { student: student.to_string() });
                    }
                    Ok(vec![Event::StudentSubscribed {
                        student: student.to_string(),
                        course: course.to_string(),
                    }])
                },
            )
            .await
    }

    /// The course as the rules see it now.
    pub async fn course(
        &self,
        course: &str,
    ) -> Result<Course, RepositoryError<std::convert::Infallible>> {
        Ok(self.decider.load(&(CourseModel(course.to_string()),)).await?.states.0)
    }

    /// The courses a student takes now.
    pub async fn courses_of(
        &self,
        student: &str,
    ) -> Result<Vec<String>, RepositoryError<std::convert::Infallible>> {
        Ok(self.decider.load(&(StudentModel(student.to_string()),)).await?.states.0)
    }
}
