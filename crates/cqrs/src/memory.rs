use std::sync::{Arc, RwLock};

use cairn_core::{Position, RecordedEvent, Timestamp};

use crate::{ProjectionError, Sink};

/// A projection into a plain Rust value kept in memory.
pub trait MemoryProjection: Send + Sync + 'static {
    type State: Default + Send + Sync + 'static;
    fn name(&self) -> &str;
    fn apply(
        &self,
        state: &mut Self::State,
        event: &RecordedEvent,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

struct Inner<S> {
    state: S,
    checkpoint: Option<(Position, Timestamp)>,
}

/// An in-memory read model. State and checkpoint change under one lock, so a
/// reader never sees one without the other. Clones share the model.
pub struct MemoryModel<P: MemoryProjection> {
    projection: Arc<P>,
    inner: Arc<RwLock<Inner<P::State>>>,
}

impl<P: MemoryProjection> Clone for MemoryModel<P> {
    fn clone(&self) -> Self {
        MemoryModel { projection: self.projection.clone(), inner: self.inner.clone() }
    }
}

impl<P: MemoryProjection> MemoryModel<P> {
    pub fn new(projection: P) -> Self {
        MemoryModel {
            projection: Arc::new(projection),
            inner: Arc::new(RwLock::new(Inner { state: P::State::default(), checkpoint: None })),
        }
    }

    /// Reads the state (and nothing changes it meanwhile).
    pub fn read<R>(&self, f: impl FnOnce(&P::State) -> R) -> R {
        f(&self.inner.read().unwrap().state)
    }

    pub fn position(&self) -> Option<Position> {
        self.inner.read().unwrap().checkpoint.map(|(p, _)| p)
    }

    /// Takes over `rebuilt`'s state and checkpoint in one step (after a rebuild).
    pub fn replace_with(&self, rebuilt: MemoryModel<P>) {
        let fresh = std::mem::replace(
            &mut *rebuilt.inner.write().unwrap(),
            Inner { state: P::State::default(), checkpoint: None },
        );
        *self.inner.write().unwrap() = fresh;
    }
}

#[async_trait::async_trait]
impl<P: MemoryProjection> Sink for MemoryModel<P> {
    fn name(&self) -> &str {
        self.projection.name()
    }

    async fn checkpoint(&mut self) -> Result<Option<(Position, Timestamp)>, ProjectionError> {
        Ok(self.inner.read().unwrap().checkpoint)
    }

    async fn apply(
        &mut self,
        events: &[RecordedEvent],
        checkpoint: (Position, Timestamp),
    ) -> Result<(), ProjectionError> {
        let mut inner = self.inner.write().unwrap();
        for e in events {
            if let Err(reason) = self.projection.apply(&mut inner.state, e) {
                // The events before this one are in the state: the checkpoint says so.
                return Err(ProjectionError::Handler {
                    projection: self.name().to_string(),
                    position: e.position,
                    reason: reason.to_string(),
                });
            }
            inner.checkpoint = Some((e.position, e.timestamp));
        }
        inner.checkpoint = Some(checkpoint);
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), ProjectionError> {
        *self.inner.write().unwrap() = Inner { state: P::State::default(), checkpoint: None };
        Ok(())
    }
}
