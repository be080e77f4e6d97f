//! The same conformance suite the embedded engine passes.

use crate::common::dyn_store;

macro_rules! pg_store {
    () => {
        match dyn_store().await {
            Some(s) => s,
            None => return,
        }
    };
}

cairn_core::conformance_suite!(pg_store!());
